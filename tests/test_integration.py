"""Integration tests on the real chest X-rays in ../shared/data (skipped when absent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from core import runs
from core.config import config_from_preset
from core.evaluate import dataset_overview, evaluate_run
from core.predict import load_run_model, predict_files
from core.trainer import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kermany_run(shared_data, tmp_path_factory) -> Path:
    """A short CPU training run on the full Kermany layout at 64 px: 2 epochs of 25 steps."""
    cfg = config_from_preset("cpu", data=str(shared_data / "kermany_224"),
                             runs_dir=str(tmp_path_factory.mktemp("runs")), image_size=64, epochs=2,
                             max_steps_per_epoch=25, batch_size=64)
    return train(cfg)


def test_short_cpu_training_on_kermany_evaluates_the_official_test_split(kermany_run):
    assert runs.read_status(kermany_run)["state"] == "finished"
    report = runs.read_report(kermany_run)
    assert report["test"]["tp"] + report["test"]["fn"] + report["test"]["tn"] + report["test"]["fp"] == 624
    assert report["test"]["auc"] > 0.8  # 50 steps at 64 px already separate the classes
    assert 0 < report["test"]["sensitivity"] <= 1 and 0 < report["test"]["specificity"] <= 1
    data_report = json.loads((kermany_run / "data_report.json").read_text())
    assert data_report["counts"]["test"] == {"NORMAL": 234, "PNEUMONIA": 390}
    assert sum(data_report["counts"]["val"].values()) > 500  # carved from train, not the 16 official images
    split = pd.read_csv(kermany_run / "split.csv")
    val_patients = set(split[split.split == "val"].patient)
    assert not val_patients & set(split[split.split == "train"].patient)


def test_second_run_on_the_same_files_decodes_nothing(kermany_run, shared_data, tmp_path):
    cfg = config_from_preset("tiny", data=str(shared_data / "kermany_224"), runs_dir=str(tmp_path),
                             image_size=64, epochs=1, max_steps_per_epoch=2)
    second = train(cfg)
    assert json.loads((second / "data_report.json").read_text())["decoded_now"] == 0


def test_evaluate_on_the_test_split_matches_the_run_report(kermany_run):
    result = evaluate_run(kermany_run, split="test")
    assert result["n"] == 624
    assert result["metrics"]["auc"] == pytest.approx(runs.read_report(kermany_run)["test"]["auc"], abs=2e-3)


def test_prediction_on_full_size_originals(kermany_run, shared_data):
    originals = sorted((shared_data / "kermany_original_train_subset" / "PNEUMONIA").glob("*.jpeg"))[:3]
    originals += sorted((shared_data / "kermany_original_train_subset" / "NORMAL").glob("*.jpeg"))[:3]
    loaded = load_run_model(kermany_run)
    results = predict_files(loaded, originals)
    assert all("error" not in r and 0 <= r["prob"] <= 1 for r in results)
    out = subprocess.run([sys.executable, "-m", "core", "predict", str(kermany_run), str(originals[0])],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "P(PNEUMONIA)" in out.stdout


def test_stop_and_resume_on_real_images(shared_data, tmp_path):
    from test_trainer import wait_for

    from core.launch import launch_training

    cfg = config_from_preset("tiny", data=str(shared_data / "kermany_original_train_subset"),
                             runs_dir=str(tmp_path), image_size=64, epochs=3, max_steps_per_epoch=0, batch_size=8)
    run_dir = launch_training(cfg)
    wait_for(lambda: len(runs.step_metrics(run_dir)) >= 3, timeout=300)
    runs.request_stop(run_dir)
    wait_for(lambda: runs.read_status(run_dir)["state"] == "stopped", timeout=120)
    train(run_dir=run_dir, resume=True)
    assert runs.read_status(run_dir)["state"] == "finished"
    assert list(runs.epoch_metrics(run_dir)["epoch"]) == [1, 2, 3]


def test_dataset_overview_reports_kermany_counts_and_leakage(shared_data):
    overview = dataset_overview(str(shared_data / "kermany_224"), image_size=64)
    assert overview["counts"]["train"] == {"NORMAL": 1341, "PNEUMONIA": 3875}
    assert overview["counts"]["val"] == {"NORMAL": 8, "PNEUMONIA": 8}
    assert overview["unreadable"] == []
    official = overview["leakage_official"]
    assert official["shared_patients"]["train-test"]["count"] >= 170
    assert official["identical_file_groups"] == 30
    planned = overview["leakage_planned"]
    assert planned["shared_patients"]["train-val"]["count"] == 0
