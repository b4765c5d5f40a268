from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import CopiesToTheDevice, write_dataset

from core import runs
from core.config import TrainConfig, config_from_preset
from core.launch import launch_training
from core.trainer import fit_temperature, load_resume_state, train


def tiny_config(data: Path, runs_dir: Path, **overrides) -> TrainConfig:
    values = dict(data=str(data), runs_dir=str(runs_dir), image_size=32, batch_size=8, epochs=2,
                  max_steps_per_epoch=0, lr=3e-3, decode_workers=1)
    return config_from_preset("tiny", **{**values, **overrides})


def wait_for(predicate, timeout: float = 120, interval: float = 0.05):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(interval)
    raise AssertionError("timed out")


def test_run_directory_holds_everything_a_reader_needs(tiny_dataset, tmp_path):
    run_dir = train(tiny_config(tiny_dataset, tmp_path / "runs", epochs=3))
    for name in ("config.json", "environment.json", "split.csv", "data_report.json", "status.json",
                 "metrics.jsonl", "log.txt", "best.safetensors", "last.pt", "predictions_val.csv",
                 "predictions_test.csv", "report.json"):
        assert (run_dir / name).exists(), name
    assert runs.read_status(run_dir)["state"] == "finished"
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and "numpy" in env and env["device"] == "cpu"
    assert TrainConfig.load(run_dir / "config.json").seed == 0
    epochs = runs.epoch_metrics(run_dir)
    assert list(epochs["epoch"]) == [1, 2, 3]
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_auc", "lr", "images_per_s"} <= set(epochs)
    assert len(runs.step_metrics(run_dir)) == 3 * runs.read_status(run_dir)["steps_per_epoch"]
    preds = pd.read_csv(run_dir / "predictions_test.csv")
    assert list(preds.columns[:4]) == ["path", "patient", "label", "class_name"] and len(preds) == 64
    assert preds["prob"].between(0, 1).all()
    report = runs.read_report(run_dir)
    assert {"sensitivity", "specificity", "auc"} <= set(report["test"]) and 0 <= report["threshold"] <= 1
    split = pd.read_csv(run_dir / "split.csv")
    train_patients = set(split[split.split == "train"].patient)
    assert not train_patients & set(split[split.split == "val"].patient)
    # The best checkpoint loads without unpickling: safetensors, and last.pt under weights_only.
    assert "model" in load_resume_state(run_dir / "last.pt")


def test_synthetic_signal_is_learned(tiny_dataset, tmp_path):
    run_dir = train(tiny_config(tiny_dataset, tmp_path / "runs", epochs=6, augment=False))
    assert runs.read_report(run_dir)["test"]["auc"] > 0.9


def test_same_seed_same_result(tiny_dataset, tmp_path):
    a = train(tiny_config(tiny_dataset, tmp_path / "runs", name="a"))
    b = train(tiny_config(tiny_dataset, tmp_path / "runs", name="b"))
    pa, pb = pd.read_csv(a / "predictions_test.csv"), pd.read_csv(b / "predictions_test.csv")
    assert (pa["prob"] - pb["prob"]).abs().max() < 1e-5


def test_a_dataset_over_the_memory_budget_streams_from_the_cache_with_the_same_result(tiny_dataset, tmp_path):
    in_memory = train(tiny_config(tiny_dataset, tmp_path / "runs", name="memory"))
    streamed = train(tiny_config(tiny_dataset, tmp_path / "runs", name="streamed", memory_budget_gb=1e-6))
    assert runs.read_json(in_memory / "data_report.json")["images_in_memory"] is True
    assert runs.read_json(streamed / "data_report.json")["images_in_memory"] is False
    pa, pb = pd.read_csv(in_memory / "predictions_test.csv"), pd.read_csv(streamed / "predictions_test.csv")
    assert (pa["prob"] - pb["prob"]).abs().max() < 1e-5


def test_frozen_strategy_trains_the_head_on_cached_features(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path / "runs", arch="resnet18", pretrained=False, strategy="frozen",
                      epochs=3)
    run_dir = train(cfg)
    assert runs.read_status(run_dir)["state"] == "finished"
    assert "Backbone features" in runs.log_tail(run_dir, 50)


def test_corrupt_and_text_files_are_skipped_and_reported(tiny_dataset, tmp_path):
    (tiny_dataset / "train" / "NORMAL" / "notes.jpeg").write_text("not an image")
    good = next((tiny_dataset / "train" / "PNEUMONIA").glob("*.jpeg"))
    (tiny_dataset / "train" / "PNEUMONIA" / "broken.jpeg").write_bytes(good.read_bytes()[:150])
    run_dir = train(tiny_config(tiny_dataset, tmp_path / "runs"))
    assert runs.read_status(run_dir)["state"] == "finished"
    skipped = {Path(s["path"]).name for s in json.loads((run_dir / "data_report.json").read_text())["skipped"]}
    assert skipped == {"notes.jpeg", "broken.jpeg"}
    assert "Skipped unreadable file" in runs.log_tail(run_dir, 100)


def test_second_run_decodes_nothing(tiny_dataset, tmp_path):
    first = train(tiny_config(tiny_dataset, tmp_path / "runs", name="first"))
    second = train(tiny_config(tiny_dataset, tmp_path / "runs", name="second"))
    assert json.loads((first / "data_report.json").read_text())["decoded_now"] == 128
    assert json.loads((second / "data_report.json").read_text())["decoded_now"] == 0


def test_failure_is_recorded_with_the_error(tmp_path):
    bad = tiny_config(tmp_path / "missing", tmp_path / "runs")
    with pytest.raises(Exception, match="not found"):
        train(bad)
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    status = runs.read_status(run_dir)
    assert status["state"] == "failed" and "not found" in status["error"]


def test_stop_from_another_process_then_resume_loses_nothing(tmp_path):
    data = write_dataset(tmp_path / "xrays", {"NORMAL": 40, "PNEUMONIA": 60})
    run_dir = launch_training(tiny_config(data, tmp_path / "runs", epochs=12, batch_size=4))
    wait_for(lambda: len(runs.step_metrics(run_dir)) >= 5)
    runs.request_stop(run_dir)
    wait_for(lambda: runs.read_status(run_dir)["state"] == "stopped")
    saved = load_resume_state(run_dir / "last.pt")["progress"]
    stopped_at = saved["global_step"]
    assert stopped_at >= 5
    steps_per_epoch = runs.read_status(run_dir)["steps_per_epoch"]
    assert saved["epoch"] < 12

    train(run_dir=run_dir, resume=True)
    assert runs.read_status(run_dir)["state"] == "finished"
    # environment.json names what the user did, not the launcher's internal `resume --launched`.
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["started_by"]["command"] == "dashboard"
    assert env["started_by"]["equivalent_command"].startswith("python -m core train --data ")
    assert len(env["resumed_by"]) == 1 and "--launched" not in json.dumps(env)
    steps = runs.step_metrics(run_dir)
    assert list(steps["global_step"]) == list(range(1, 12 * steps_per_epoch + 1))
    assert list(runs.epoch_metrics(run_dir)["epoch"]) == list(range(1, 13))


def test_killed_run_resumes_losing_at_most_one_epoch(tmp_path):
    data = write_dataset(tmp_path / "xrays", {"NORMAL": 40, "PNEUMONIA": 60})
    run_dir = launch_training(tiny_config(data, tmp_path / "runs", epochs=12, batch_size=4))
    wait_for(lambda: len(runs.epoch_metrics(run_dir)) >= 2)
    pid = runs.read_status(run_dir)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: runs.read_status(run_dir)["state"] == "killed", timeout=10)
    done_before = int(runs.epoch_metrics(run_dir)["epoch"].max())
    saved_epoch = load_resume_state(run_dir / "last.pt")["progress"]["epoch"]
    assert saved_epoch >= done_before - 1

    train(run_dir=run_dir, resume=True)
    assert runs.read_status(run_dir)["state"] == "finished"
    assert list(runs.epoch_metrics(run_dir)["epoch"]) == list(range(1, 13))


def test_queued_runs_wait_for_the_running_one(tmp_path):
    data = write_dataset(tmp_path / "xrays", {"NORMAL": 20, "PNEUMONIA": 30})
    first = launch_training(tiny_config(data, tmp_path / "runs", epochs=15, name="first"))
    second = launch_training(tiny_config(data, tmp_path / "runs", epochs=2, name="second"))
    wait_for(lambda: runs.read_status(first)["state"] == "running")
    assert runs.read_status(second)["state"] == "queued"
    wait_for(lambda: runs.read_status(second)["state"] == "finished", timeout=180)
    assert runs.read_status(first)["finished"] < runs.read_status(second)["finished"]


def test_temperature_scaling_recovers_a_known_temperature():
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (4000,))
    true_logits = torch.stack([torch.zeros(4000), (labels * 2 - 1) * 1.0 + torch.randn(4000)], 1)
    sampled = torch.bernoulli(torch.sigmoid(true_logits[:, 1] - true_logits[:, 0])).long()
    assert fit_temperature(true_logits * 3, sampled) == pytest.approx(3, rel=0.15)


def test_disk_full_marks_the_run_failed_with_the_reason_and_removes_half_written_files(tiny_dataset, tmp_path,
                                                                                       monkeypatch):
    import core.checkpoint as checkpoint
    import core.trainer as trainer

    real_save = checkpoint.save_file
    calls = []

    def save_then_fill_the_disk(state, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second epoch's best weights: half written, then the disk is full
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device", path)
        return real_save(state, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_then_fill_the_disk)
    monkeypatch.setattr(trainer, "safe_auc", lambda y, p: float(len(calls)))  # every epoch improves
    with pytest.raises(OSError):
        train(tiny_config(tiny_dataset, tmp_path / "runs", epochs=3))
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    status = runs.read_status(run_dir)
    assert status["state"] == "failed" and status["error"].startswith("No space left on device: ")
    assert not list(run_dir.glob("*.tmp"))
    assert load_resume_state(run_dir / "last.pt")["progress"]["epoch"] == 1  # the last good checkpoint


def test_mark_failed_still_records_the_reason_when_no_new_file_can_be_written(tmp_path, monkeypatch):
    runs.write_status(tmp_path, state="running", pid=os.getpid())

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs, "_write_json_atomic", full)
    runs.mark_failed(tmp_path, "No space left on device: last.pt")
    status = runs.read_status(tmp_path)
    assert status["state"] == "failed" and status["error"] == "No space left on device: last.pt"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tiny_dataset, tmp_path, monkeypatch):
    import pickle

    monkeypatch.chdir(tmp_path)
    run_dir = train(tiny_config(tiny_dataset, tmp_path / "runs", epochs=1))
    (run_dir / "last.pt").write_bytes(pickle.dumps({"model": _RunsCode()}))
    runs.write_status(run_dir, state="stopped")
    with pytest.raises(ValueError, match="last.pt cannot be loaded safely"):
        train(run_dir=run_dir, resume=True)
    assert not (tmp_path / "PWNED").exists()
    status = runs.read_status(run_dir)
    assert status["state"] == "failed" and "cannot be loaded safely" in status["error"]
    (run_dir / "last.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="Delete it to restart"):
        train(run_dir=run_dir, resume=True)


def test_a_killed_run_says_why_it_is_believed_killed(tmp_path):
    runs.write_status(tmp_path, state="running", pid=2**22 + 12345, phase="training")
    status = runs.read_status(tmp_path)
    assert status["state"] == "killed" and "no longer running" in status["error"]
    assert "probably killed" in status["error"] and "(training)" in status["error"]
    (tmp_path / "process.log").write_text("Starting\nerror: No space left on device: /runs/x/metrics.jsonl\n")
    assert "its output ends with: error: No space left on device" in runs.read_status(tmp_path)["error"]


@pytest.mark.parametrize("arch", ["smallcnn", "resnet18"])
def test_training_steps_between_recordings_never_wait_for_the_device(arch, tmp_path, monkeypatch):
    # On 'meta' nothing can be read back: any host synchronisation in a step (a loss or count read, a .cpu()) raises
    # at once. The first read must be the recorder's, after its cadence of steps; every copy to the device in
    # between must not block (a blocking one waits for all the GPU's queued work).
    from core import pipeline
    from core.augment import AugmentParams
    from core.bookkeeping import ProgressBar, StepRecorder
    from core.device import optimizer_options
    from core.model import apply_strategy, build_model
    from core.trainer import train_one_epoch

    monkeypatch.setattr(pipeline, "fits_on_device", lambda images, device: True)  # the split lives on the device
    device = torch.device("meta")
    model = build_model(arch, pretrained=False)
    optimizer = torch.optim.AdamW(apply_strategy(model, "full"), lr=1e-3, **optimizer_options(device))
    model.to(device).to(memory_format=torch.channels_last).train()
    images, labels = torch.randint(0, 256, (40, 1, 32, 32), dtype=torch.uint8), torch.randint(0, 2, (40,))
    batches = pipeline.TrainBatches(images, labels, device, 8, 0.5, 0.25, AugmentParams(),
                                    torch.Generator().manual_seed(0))
    assert batches.on_device
    recorder = StepRecorder(tmp_path, 3, ProgressBar(False, 5, 0, ""), 5, 5)
    progress = {"global_step": 0, "step_in_epoch": 0, "elapsed_now": lambda: 0.0, "loss_sum": 0.0, "correct": 0,
                "seen": 0}
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.ones(2, device=device))
    with CopiesToTheDevice() as copies, pytest.raises(NotImplementedError, match="meta") as read:
        train_one_epoch(model, batches, torch.randperm(40), 0, 5, optimizer, None, loss_fn, device, False,
                        recorder, 0, progress)
    reader = [(Path(e.path).name, e.name) for e in read.traceback if Path(e.path).parent.name == "core"][-1]
    assert reader == ("bookkeeping.py", "flush") and progress["global_step"] == 3  # the recorder's read, 3 steps in
    assert copies.copies and all(non_blocking is True for _, non_blocking in copies.copies)
