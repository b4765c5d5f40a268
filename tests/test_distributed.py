"""torchrun on the CPU (gloo, 2 processes): one run folder written by rank 0, metrics of both ranks, the test AUC
of a one-process run, validation and final predictions computed in shares that equal one process's, and a killed
rank that marks the run failed with the reason and resumes. The gathering itself is tested on 2 spawned processes."""

from __future__ import annotations

import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import write_dataset

from core import runs
from core.distributed import Distributed, process_group_backend, torchrun_commands
from core.trainer import train

REPO = Path(__file__).resolve().parents[1]


def _torchrun(args: list[str], runs_dir: Path, cache: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "CXR_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "core",
               "train", "--preset", "tiny", "--device", "cpu", "--image-size", "32", "--batch-size", "16", "--quiet",
               "--runs-dir", str(runs_dir), *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def _run_dirs(runs_dir: Path) -> list[Path]:
    return [p for p in runs_dir.iterdir() if p.is_dir()] if runs_dir.exists() else []


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ddp") / "xrays", {"NORMAL": 40, "PNEUMONIA": 40})


def _finished_run(args: list[str], tmp_path: Path) -> Path:
    proc = _torchrun(args, tmp_path / "runs", tmp_path / "cache")
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:  # a rank waiting for a collective the others never reach
        proc.kill()
        pytest.fail("the 2-process run did not end within 600 s: " + proc.communicate()[0])
    assert proc.returncode == 0, out
    (run,) = _run_dirs(tmp_path / "runs")
    return run


# fp32: in bf16 the two runs differ by bf16 rounding from the first step on (the half batches' convolutions and
# batch norms round differently), which 10 steps of Adam on 80 generated images amplify into a different model.
@pytest.fixture(scope="module")
def two_process_run(data, tmp_path_factory) -> Path:
    return _finished_run(["--data", str(data), "--precision", "fp32"], tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def one_process_run(data, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("one")
    return train(config=runs_config(data, tmp / "runs", tmp / "cache", precision="fp32"))


def test_two_processes_write_one_run_with_both_ranks_metrics_and_the_one_process_auc(two_process_run,
                                                                                      one_process_run):
    run = two_process_run
    assert runs.read_status(run)["state"] == "finished"
    assert json.loads((run / "environment.json").read_text())["world_size"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    # 2 epochs of ceil(train images / 16) steps, each written once (by rank 0), with the images of both ranks.
    assert [r["global_step"] for r in steps] == list(range(1, len(steps) + 1))
    assert len([r for r in records if r["kind"] == "epoch"]) == 2
    one = one_process_run
    auc_two = runs.read_report(run)["test"]["auc"]
    from core.operating import load_set, set_summary

    summary = set_summary(load_set(one, "test"), runs.operating_point(one).threshold)
    low = summary["metrics"]["auc"]["low"]
    # Not worse than one process: at or above the low end of its 95% interval (on these few generated images either
    # run can separate the test set perfectly, AUC 1.0, above the interval's high end).
    assert auc_two >= low - 1e-9, (auc_two, summary["metrics"]["auc"])


def _one_process_view(run: Path):
    """The run's data, model and precision as one process sees them: the same split, the same class weights."""
    from core.config import TrainConfig
    from core.device import uses_bf16
    from core.model import build_model, normalization
    from core.pipeline import prepare_data

    config = TrainConfig.load(run / "config.json")
    data = prepare_data(config)
    counts = torch.bincount(data.splits["train"].labels, minlength=2).float()
    weights = counts.sum() / (2 * counts) if config.class_weights == "inverse" else torch.ones(2)
    model = build_model(config.arch, dropout=config.dropout).to(memory_format=torch.channels_last)  # as trained
    bf16 = uses_bf16(torch.device("cpu"), config.precision)  # bf16 autocast on CPUs with native bf16
    return data, model, normalization(config.arch), weights, bf16


def test_the_shared_validation_and_final_predictions_equal_one_process_evaluating_the_same_weights(two_process_run):
    from core.checkpoint import load_resume_state, load_weights_into
    from core.finalize import positive_probs
    from core.pipeline import features_and_logits
    from core.trainer import evaluate

    data, model, (mean, std), weights, bf16 = _one_process_view(two_process_run)
    cpu, val = torch.device("cpu"), data.splits["val"]
    saved = load_resume_state(two_process_run / "last.pt")
    model.load_state_dict(saved["model"])  # the weights after the last epoch
    one = evaluate(model, val.images, val.labels, cpu, mean, std, bf16, weights)
    last = runs.epoch_metrics(two_process_run).iloc[-1]
    assert int(last["epoch"]) == saved["progress"]["epoch"]
    assert last["val_loss"] == pytest.approx(one["loss"], abs=1e-6)
    assert last["val_auc"] == pytest.approx(one["auc"], abs=1e-9)
    assert last["val_accuracy"] == pytest.approx(one["accuracy"], abs=1e-9)

    load_weights_into(model, two_process_run / "best.safetensors")
    for split in ("val", "test"):
        written = pd.read_csv(two_process_run / f"predictions_{split}.csv")
        _, logits = features_and_logits(model, data.splits[split].images, cpu, mean, std, bf16)
        assert list(written["path"]) == list(data.splits[split].table["path"])  # every image, in order
        assert written["prob_uncalibrated"].to_numpy() == pytest.approx(positive_probs(logits), abs=1e-6)
        assert written["ood_score"].notna().all()
    assert runs.read_report(two_process_run)["ood"]["n_train"] == len(data.splits["train"].labels)


def test_early_stopping_and_an_empty_test_split_end_every_rank(tmp_path):
    data = write_dataset(tmp_path / "xrays", {"NORMAL": 24, "PNEUMONIA": 24}, splits=None)
    # Patience 1 over 10 epochs: 8 validation images are most unlikely to improve their AUC 9 times in a row.
    run = _finished_run(["--data", str(data), "--test-fraction", "0", "--epochs", "10", "--patience", "1",
                         "--max-steps-per-epoch", "1"], tmp_path)
    assert runs.read_status(run)["state"] == "finished"
    assert "Early stopping" in runs.log_tail(run, 200) and len(runs.epoch_metrics(run)) < 10
    assert runs.read_json(run / "data_report.json")["counts"]["test"] == {"NORMAL": 0, "PNEUMONIA": 0}
    assert (run / "predictions_val.csv").exists() and not (run / "predictions_test.csv").exists()


def _on_two_ranks(worker, tmp_path: Path, *args, group_timeout: float = 60, deadline: int = 300) -> list[dict]:
    """worker(dist, *args) -> dict on 2 spawned gloo processes; each rank's dict. A rank left waiting in a
    collective fails the test after the group's timeout (seconds), and one still running after `deadline` seconds
    (polling a store, which has no timeout) is ended by SIGALRM, so the test fails instead of hanging."""
    _spawn_two(_rank_main, worker, str(tmp_path), args, group_timeout, deadline)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _spawn_two(function, *args) -> None:
    """function(rank, *args) in 2 spawned processes, until both end."""
    # A spawned child re-runs the parent's __main__ script; in a full test run an AppTest leaves a dashboard page
    # there (views/1_Train.py), which fails outside Streamlit. The workers live in this module, not in __main__.
    real_main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        torch.multiprocessing.spawn(function, args=args, nprocs=2, join=True)
    finally:
        sys.modules["__main__"] = real_main


def _rank_main(rank: int, worker, folder: str, args: tuple, group_timeout: float, deadline: int) -> None:
    signal.alarm(deadline)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                                         world_size=2, timeout=datetime.timedelta(seconds=group_timeout))
    try:
        torch.save(worker(Distributed(rank, 2), *args), Path(folder) / f"rank{rank}.pt")
    finally:
        if torch.distributed.is_initialized():  # a worker may have left the group itself
            torch.distributed.destroy_process_group()


def _gather_uneven(dist: Distributed, sizes: list[int]) -> dict:
    out = {}
    for n in sizes:
        start, stop = dist.share(n)
        mine = torch.arange(3 * n, dtype=torch.float32).reshape(n, 3)[start:stop]
        out[n] = (dist.share(n), dist.gather_rows(mine), dist.gather_rows(mine, main_only=True))
    return out


def test_gathered_rows_come_back_whole_and_in_order_from_uneven_shares(tmp_path):
    sizes = [5, 1, 0, 2]
    ranks = _on_two_ranks(_gather_uneven, tmp_path, sizes)
    assert [ranks[r][5][0] for r in range(2)] == [(0, 2), (2, 5)]
    assert [ranks[r][1][0] for r in range(2)] == [(0, 0), (0, 1)]  # one image: rank 0 has none
    for n in sizes:
        whole = torch.arange(3 * n, dtype=torch.float32).reshape(n, 3)
        for r in range(2):
            assert torch.equal(ranks[r][n][1], whole)  # on every rank
        start, stop = ranks[1][n][0]
        assert torch.equal(ranks[0][n][2], whole) and torch.equal(ranks[1][n][2], whole[start:stop])


def _stop_after_the_first_step(run_dir: Path) -> None:
    while not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.01)
    runs.request_stop(run_dir)


def _train_as_a_rank(dist: Distributed, data: str, folder: str, stop: str = "", rank0_slow: float = 0,
                     rank0_fails: str = "", rank0_fails_at: str = "decoding") -> dict:
    """One rank of `python -m core train` under torchrun: the CLI's own path, from the run folder to leaving the
    process group. `stop`: "queued" asks for a stop before the run leaves the queue, "training" once it trains.
    `rank0_slow`: rank 0 waits that many seconds in the queue (another run holds it), decoding and writing the
    results. `rank0_fails`: rank 0 raises OSError with that message `rank0_fails_at` "decoding" the data or
    "queueing" the run (its status write, before anything else could record the failure)."""
    import argparse
    import fcntl
    import threading

    from core import trainer
    from core.cli import _train_distributed
    from core.trainer import create_run

    def slowed(function):
        def slow(*args, **kwargs):
            result = function(*args, **kwargs)
            time.sleep(rank0_slow)
            return result
        return slow

    def failing(*args, **kwargs):
        raise OSError(rank0_fails)

    def status_failing_when_queued(run_dir, **fields):
        if fields.get("state") == "queued":
            raise OSError(rank0_fails)
        return write_status(run_dir, **fields)

    if dist.is_main and rank0_slow:
        trainer._prepare, trainer.finalize_run = slowed(trainer._prepare), slowed(trainer.finalize_run)
        runs_dir = Path(folder) / "runs"
        runs_dir.mkdir(parents=True, exist_ok=True)
        other_run = open(runs_dir / ".training.lock", "w")  # noqa: SIM115 - held by another "run", released below
        fcntl.flock(other_run, fcntl.LOCK_EX)
        threading.Timer(rank0_slow, other_run.close).start()
    write_status = runs.write_status
    if dist.is_main and rank0_fails and rank0_fails_at == "decoding":
        trainer._prepare = failing

    in_memory = []
    if not dist.is_main:  # as if rank 0 had taken all the memory: rank 1 alone would stream; it takes rank 0's budget
        from core import pipeline

        real_prepare = trainer.prepare_data
        pipeline.default_memory_budget = lambda: 0

        def recorded(*args, **kwargs):
            data = real_prepare(*args, **kwargs)
            in_memory.append(data.report["images_in_memory"])
            return data
        trainer.prepare_data = recorded

    os.environ.update(RANK=str(dist.rank), WORLD_SIZE=str(dist.world), LOCAL_RANK=str(dist.rank),
                      LOCAL_WORLD_SIZE=str(dist.world))
    config = runs_config(Path(data), Path(folder) / "runs", Path(folder) / "cache",
                         epochs=40 if stop == "training" else 1)
    run_dir = dist.broadcast_object(str(create_run(config)) if dist.is_main else None)
    if dist.is_main and rank0_fails and rank0_fails_at == "queueing":  # create_run has queued it once
        runs.write_status = status_failing_when_queued
    if stop == "queued" and dist.is_main:
        runs.request_stop(Path(run_dir))
    if stop == "training" and dist.is_main:
        threading.Thread(target=_stop_after_the_first_step, args=(Path(run_dir),), daemon=True).start()
    try:
        _train_distributed(lambda _: run_dir, config, argparse.Namespace(quiet=True, launched=False), resume=False)
        outcome = "returned"
    except Exception as e:  # noqa: BLE001 - what the rank met is the result
        outcome = f"{type(e).__name__}: {e}"
    return {"left": time.time(), "outcome": outcome, "run": run_dir, "in_memory": in_memory}


def test_no_rank_of_a_finished_run_leaves_before_rank_0_has_written_the_results(data, tmp_path):
    ranks = _on_two_ranks(_train_as_a_rank, tmp_path, str(data), str(tmp_path))
    assert [r["outcome"] for r in ranks] == ["returned", "returned"]
    run = Path(ranks[0]["run"])
    assert runs.read_status(run)["state"] == "finished"
    last_write = max(p.stat().st_mtime for p in run.iterdir() if p.is_file())
    assert ranks[1]["left"] >= last_write  # rank 1 waited for rank 0's report, predictions, status and log
    report = runs.read_json(run / "data_report.json")
    assert report["processes_sharing_memory"] == 2  # one machine's 2 processes
    assert report["images_in_memory"] and ranks[1]["in_memory"] == [True]  # rank 0's decision, on every rank


def test_a_stop_asked_while_queued_ends_every_rank_before_it_touches_the_data(data, tmp_path):
    ranks = _on_two_ranks(_train_as_a_rank, tmp_path, str(data), str(tmp_path), "queued")
    run = Path(ranks[0]["run"])
    assert [r["outcome"] for r in ranks] == ["returned", "returned"]  # stopped, not failed, on every rank
    assert runs.read_status(run)["state"] == "stopped"
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.rglob("*.npy"))  # nobody decoded the images


def test_ranks_wait_for_rank_0_in_the_queue_decoding_and_writing_results_longer_than_the_group_timeout(data,
                                                                                                       tmp_path):
    # Each of rank 0's three solo waits lasts 10 s; the process group times out a collective after 8 s (less
    # would time out DDP's first collectives on a CPU loaded by other work).
    ranks = _on_two_ranks(_train_as_a_rank, tmp_path, str(data), str(tmp_path), "", 10.0, group_timeout=8)
    assert [r["outcome"] for r in ranks] == ["returned", "returned"]
    run = Path(ranks[0]["run"])
    assert runs.read_status(run)["state"] == "finished"
    assert ranks[1]["left"] >= max(p.stat().st_mtime for p in run.iterdir() if p.is_file())


@pytest.mark.parametrize("where", ["queueing", "decoding"])
def test_a_failure_of_rank_0_ends_the_other_ranks_wait_with_its_reason(data, tmp_path, where):
    ranks = _on_two_ranks(_train_as_a_rank, tmp_path, str(data), str(tmp_path), "", 0, "disk on fire", where,
                          group_timeout=600, deadline=120)
    assert ranks[0]["outcome"] == "OSError: disk on fire"
    assert ranks[1]["outcome"] == "RuntimeError: rank 0 failed: OSError: disk on fire"  # at once, not after 600 s
    if where == "decoding":
        assert runs.read_status(Path(ranks[0]["run"]))["state"] == "failed"


def test_a_stop_during_training_ends_every_rank_after_rank_0_saved_and_recorded_it(data, tmp_path):
    ranks = _on_two_ranks(_train_as_a_rank, tmp_path, str(data), str(tmp_path), "training")
    run = Path(ranks[0]["run"])
    assert [r["outcome"] for r in ranks] == ["returned", "returned"]
    status = runs.read_status(run)
    assert status["state"] == "stopped" and status["epoch"] < 40
    assert ranks[1]["left"] >= max((run / name).stat().st_mtime for name in ("last.pt", "status.json", "log.txt"))


def _shared_evaluation(dist: Distributed, n_val: int, test_sizes: list[int]) -> dict:
    from core.finalize import _sharded_features_and_logits
    from core.model import build_model, normalization
    from core.trainer import evaluate

    torch.manual_seed(0)
    model, (mean, std) = build_model("smallcnn"), normalization("smallcnn")
    images = torch.randint(0, 256, (n_val, 1, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    labels = torch.arange(n_val) % 2
    cpu, weights = torch.device("cpu"), torch.tensor([0.7, 1.3])
    features = torch.randn(n_val, model.feature_dim, generator=torch.Generator().manual_seed(2))
    if dist.rank == 1:  # BatchNorm statistics updated by this rank's own images in the last step: rank 0's count
        for buffer in model.buffers():
            buffer.add_(1)
    out = {"images": evaluate(model, images, labels, cpu, mean, std, False, weights, dist=dist),
           "features": evaluate(model.head, features, labels, cpu, mean, std, False, weights, features=True,
                                dist=dist),
           "one image": evaluate(model, images[:1], labels[:1], cpu, mean, std, False, weights, dist=dist)}
    for n in test_sizes:
        out[n] = _sharded_features_and_logits(model, images[:n], cpu, mean, std, False, dist)
    return out


def test_validation_and_final_outputs_computed_in_shares_equal_one_process(tmp_path):
    # 300 images: each rank's 150 are batched 128 + 22, one process's 128 + 128 + 44.
    args = (300, [300, 3, 1, 0])
    one = _shared_evaluation(Distributed(), *args)
    ranks = _on_two_ranks(_shared_evaluation, tmp_path, *args)
    for key in ("images", "features", "one image"):
        for rank in ranks:
            for name, value in one[key].items():
                if math.isnan(value):  # the AUC of one image
                    assert math.isnan(rank[key][name])
                else:
                    assert rank[key][name] == pytest.approx(value, abs=1e-6), (key, name)
    for n in args[1]:
        features, logits = ranks[0][n]
        assert features.shape == one[n][0].shape and logits.shape == one[n][1].shape == (n, 2)
        # relative: an untrained model's logits are of the order of 0.01
        assert torch.allclose(torch.from_numpy(features), torch.from_numpy(one[n][0]), rtol=1e-5, atol=1e-7)
        assert torch.allclose(logits, one[n][1], rtol=1e-5, atol=1e-7)


def runs_config(data: Path, runs_dir: Path, cache: Path, **overrides):
    from core.config import config_from_preset

    return config_from_preset("tiny", data=str(data), runs_dir=str(runs_dir), device="cpu", image_size=32,
                              batch_size=16, cache_dir=str(cache), **overrides)


def _step_losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def test_two_processes_train_the_steps_one_process_trains(two_process_run, one_process_run):
    """Same seed, same global batch, fp32: each rank's half batch is normalised with the whole batch's statistics
    and its loss is its part of the whole batch's class-weighted loss, so the first steps' losses are one process's
    (to float rounding). Later steps drift apart only by summation order, which Adam amplifies for parameters whose
    gradient is near zero: up to 0.01 over these 10 steps on the development machine."""
    one, two = one_process_run, two_process_run
    losses_one, losses_two = _step_losses(one), _step_losses(two)
    assert len(losses_one) == len(losses_two) == 10
    assert losses_two[:2] == pytest.approx(losses_one[:2], abs=1e-4)
    assert losses_two == pytest.approx(losses_one, abs=0.05)
    assert "Batch norm over the whole batch of all 2 processes" in (two / "log.txt").read_text()


def test_a_killed_rank_fails_the_run_with_the_reason_and_resume_continues(data, tmp_path):
    runs_dir = tmp_path / "runs"
    proc = _torchrun(["--data", str(data), "--epochs", "40", "--max-steps-per-epoch", "2"], runs_dir,
                     tmp_path / "cache")
    deadline = time.time() + 300
    while time.time() < deadline:
        found = _run_dirs(runs_dir)
        if found and (found[0] / "last.pt").exists():
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("no checkpoint within 300 s: " + (proc.stdout.read() if proc.stdout else ""))
    (run,) = _run_dirs(runs_dir)
    rank0 = runs.read_status(run)["pid"]
    others = [p for p in _children(proc.pid) if p != rank0]
    assert others, "rank 1 not found"
    os.kill(others[0], signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    status = runs.read_status(run)
    assert status["state"] in ("failed", "killed") and status.get("error"), status
    epochs_before = len(runs.epoch_metrics(run))
    assert epochs_before < 40

    from core.cli import main

    assert main(["resume", str(run), "--quiet"]) == 0  # one process continues the two-process run
    assert runs.read_status(run)["state"] == "finished"
    assert "Resumed with " in runs.log_tail(run, 200)
    assert int(runs.epoch_metrics(run)["epoch"].max()) == 40


@pytest.mark.parametrize("device_spec,cuda_available", [("cuda", True), ("cuda:1", True), ("auto", True)])
def test_a_gpu_run_joins_a_group_that_carries_cpu_tensors_too(device_spec, cuda_available):
    # The stop flag every rank agrees on is a CPU tensor; NCCL alone has no backend for it and the first step of
    # every multi-GPU run would fail ("No backend type associated with device type cpu").
    from torch.distributed.distributed_c10d import BackendConfig

    backends = BackendConfig(process_group_backend(device_spec, cuda_available)).get_device_backend_map()
    assert backends == {"cpu": "gloo", "cuda": "nccl"}


def test_a_cpu_run_joins_a_gloo_group():
    assert process_group_backend("cpu", True) == process_group_backend("auto", False) == "gloo"


def test_each_process_knows_how_many_of_the_run_share_its_machine(monkeypatch):
    from core.distributed import from_environment

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun on 2 machines of 2
    assert from_environment() == Distributed(3, 4, 1, 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # a launcher that does not say: all on this machine, the safe side
    assert from_environment().local_world == 4
    for local_rank, local_world in (("1", "5"), ("2", "2")):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
        with pytest.raises(ValueError, match=f"LOCAL_RANK {local_rank} and LOCAL_WORLD_SIZE {local_world} do not fit"):
            from_environment()
    for name in ("WORLD_SIZE", "RANK"):  # one process, with torchrun's other variables left behind
        monkeypatch.delenv(name)
    assert from_environment() == Distributed()


def _start_as_torchrun_would(rank: int, port: int, folder: str) -> None:
    from core.distributed import start, stop

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist = start(Distributed(rank, 2, rank, 2), "cpu")
    try:
        torch.save({"attempt": dist.attempt, "backend": torch.distributed.get_backend()}, Path(folder) / f"{rank}.pt")
    finally:
        stop(dist)


def test_every_rank_of_one_start_names_its_keys_alike_and_a_new_start_differently(tmp_path):
    # torchrun's restarts keep the store: keys named by an earlier start would answer the next start's waits.
    import socket

    attempts = []
    for k in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        folder = tmp_path / str(k)
        folder.mkdir()
        _spawn_two(_start_as_torchrun_would, port, str(folder))
        ranks = [torch.load(folder / f"{r}.pt") for r in range(2)]
        assert ranks[0] == ranks[1] and ranks[0]["backend"] == "gloo" and ranks[0]["attempt"]
        attempts.append(ranks[0]["attempt"])
    assert attempts[0] != attempts[1]


def test_the_commands_for_several_machines_name_each_node():
    lines = torchrun_commands(2, 8, "10.0.0.1", ["--data", "/data/x", "--preset", "gpu"])
    assert len(lines) == 2 and "--node-rank=1" in lines[1] and "--nproc-per-node=8" in lines[0]
    assert lines[0].endswith("-m core train --data /data/x --preset gpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_batch_norm_on_one_process_is_batch_norm_forward_and_backward(dtype):
    """With one process the whole batch is this batch: outputs, the gradients of input, weight and bias, and the
    running statistics are BatchNorm2d's (fp32 to 1e-5; bf16 to 1%, bf16's own rounding)."""
    from core.distributed import WholeBatchNorm2d, _WholeBatchNormFunction

    torch.manual_seed(0)
    x0 = (torch.randn(6, 5, 7, 9) * 3 + 2).to(dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x0.shape)
    reference, whole = torch.nn.BatchNorm2d(5), WholeBatchNorm2d(5)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    whole.load_state_dict(reference.state_dict())
    results = []
    for module, forward in ((reference, reference),
                            (whole, lambda x: _WholeBatchNormFunction.apply(x, whole.weight, whole.bias, whole))):
        x = x0.clone().requires_grad_(True)
        y = forward(x)
        (y.float() * grad).sum().backward()
        results.append([y.detach().float(), x.grad.float(), module.weight.grad, module.bias.grad,
                        module.running_mean, module.running_var])
    tolerance = {"rtol": 0, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **tolerance)


def _batch_norm_case(n: int, grad_offset: float = 0.0, grad_scale: float = 1.0, dtype=torch.float32):
    """A batch norm's input, output gradient, weight and bias, the same in every process (seed 0)."""
    torch.manual_seed(0)
    x_all = (torch.randn(n, 5, 7, 9) * 3 + 2).to(dtype).contiguous(memory_format=torch.channels_last)
    grad_all = (grad_offset + grad_scale * torch.randn(x_all.shape)).to(dtype)
    return x_all, grad_all, torch.empty(5).uniform_(0.5, 1.5), torch.empty(5).uniform_(-1, 1)


def _whole_batch_norm_of_shares(dist: Distributed, n: int, grad_offset: float = 0.0, grad_scale: float = 1.0,
                                dtype=torch.float32) -> dict:
    from core.distributed import WholeBatchNorm2d

    x_all, grad_all, weight, bias = _batch_norm_case(n, grad_offset, grad_scale, dtype)
    module = WholeBatchNorm2d(5)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    start, stop = dist.share(n)
    x = x_all[start:stop].clone().requires_grad_(True)
    y = module(x)
    y.backward(grad_all[start:stop])
    return {"y": y.detach(), "x_grad": x.grad, "weight_grad": module.weight.grad, "bias_grad": module.bias.grad,
            "running_mean": module.running_mean, "running_var": module.running_var}


@pytest.mark.parametrize("n", [1, 3])
def test_whole_batch_norm_across_ranks_is_one_process_batch_norm_even_with_an_empty_share(tmp_path, n):
    """One image on two ranks (rank 0's share is empty: a last batch smaller than the world) and 3 images (2 + 1):
    the ranks' outputs and input gradients put together, their summed weight and bias gradients (what DDP averages
    over ranks whose loss is their part of the whole batch's x world) and the running statistics are those of
    BatchNorm2d on the whole batch in one process."""
    ranks = _on_two_ranks(_whole_batch_norm_of_shares, tmp_path, n)
    x_all, grad_all, weight, bias = _batch_norm_case(n)
    x_all.requires_grad_(True)
    reference = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        reference.weight.copy_(weight)
        reference.bias.copy_(bias)
    y = reference(x_all)
    y.backward(grad_all)
    close = {"rtol": 0, "atol": 1e-5}
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), **close)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x_all.grad, **close)
    torch.testing.assert_close(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], reference.weight.grad, **close)
    torch.testing.assert_close(ranks[0]["bias_grad"] + ranks[1]["bias_grad"], reference.bias.grad, **close)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], reference.running_mean, **close)
        torch.testing.assert_close(r["running_var"], reference.running_var, **close)


def _input_gradient_error(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          x_grad: torch.Tensor) -> float:
    """Largest error of `x_grad` against one process's batch norm input gradient in float64 (same inputs)."""
    x64 = x.double().requires_grad_(True)
    module = torch.nn.BatchNorm2d(5).double()
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    module(x64).backward(grad.double())
    return float((x_grad.double() - x64.grad).abs().max())


def test_in_bf16_the_input_gradient_across_ranks_is_as_precise_as_one_process_batch_norm(tmp_path):
    # A nearly constant output gradient per channel: most of it cancels in the input's gradient, so a subtraction
    # rounded to bf16 before it cancels would lose the rest (it lost half of it before this was fixed).
    case = (8, 0.5, 0.02, torch.bfloat16)
    ranks = _on_two_ranks(_whole_batch_norm_of_shares, tmp_path, *case)
    x_all, grad_all, weight, bias = _batch_norm_case(*case)
    native_x = x_all.clone().requires_grad_(True)
    native = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        native.weight.copy_(weight)
        native.bias.copy_(bias)
    native(native_x).backward(grad_all)
    native_error = _input_gradient_error(x_all, grad_all, weight, bias, native_x.grad)
    whole_error = _input_gradient_error(x_all, grad_all, weight, bias, torch.cat([r["x_grad"] for r in ranks]))
    assert whole_error <= 2 * native_error + 1e-6, (whole_error, native_error)


def test_a_last_batch_of_one_image_for_two_processes_trains(tmp_path):
    """The epoch's last batch holds one image, so one rank's share is empty: the run trains through it (a rank
    with no images still takes part in the batch norm's and the loss's sums) and writes that step's loss."""
    from core.pipeline import prepare_data

    data = write_dataset(tmp_path / "xrays", {"NORMAL": 24, "PNEUMONIA": 24}, splits=None)
    n_train = len(prepare_data(runs_config(data, tmp_path / "runs", tmp_path / "cache", test_fraction=0))
                  .splits["train"].labels)
    run = _finished_run(["--data", str(data), "--test-fraction", "0", "--epochs", "1",
                         "--batch-size", str(n_train - 1)], tmp_path)
    steps = runs.step_metrics(run)
    assert len(steps) == 2 and steps["loss"].notna().all() and math.isfinite(steps["loss"].iloc[-1])
    assert runs.read_status(run)["state"] == "finished"


def test_two_processes_streaming_from_the_cache_train_the_steps_they_train_in_memory(data, two_process_run, tmp_path):
    """A dataset larger than the memory budget is streamed from the cache's memory maps on every rank: each rank
    reads its share of each batch, and the steps are the in-memory run's (same batches, same augmentation)."""
    run = _finished_run(["--data", str(data), "--precision", "fp32", "--memory-budget-gb", "0.000001"], tmp_path)
    assert runs.read_json(run / "data_report.json")["images_in_memory"] is False
    assert runs.read_json(two_process_run / "data_report.json")["images_in_memory"] is True
    assert _step_losses(run) == pytest.approx(_step_losses(two_process_run), abs=1e-6)
    assert runs.read_status(run)["state"] == "finished"
