from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_help_explains_every_training_option():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for option in ("--data", "--arch", "--strategy", "--pretrained", "--weights-file", "--epochs",
                   "--batch-size", "--lr", "--schedule", "--image-size", "--augment", "--class-weights",
                   "--device", "--seed", "--preset"):
        assert option in text
    assert cli("--help").returncode == 0


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    from conftest import write_dataset

    base = tmp_path_factory.mktemp("cli")
    data = write_dataset(base / "xrays", {"NORMAL": 16, "PNEUMONIA": 24})
    result = cli("train", "--preset", "tiny", "--data", str(data), "--runs-dir", str(base / "runs"),
                 "--image-size", "32", "--decode-workers", "1")
    assert result.returncode == 0, result.stderr
    assert "test: AUC" in result.stdout and "sensitivity" in result.stdout and "specificity" in result.stdout
    (run_dir,) = [p for p in (base / "runs").iterdir() if p.is_dir()]
    return run_dir, data


def test_runs_lists_the_run_with_status(trained_run):
    run_dir, _ = trained_run
    out = cli("runs", "--runs-dir", str(run_dir.parent)).stdout
    assert run_dir.name in out and "finished" in out


def test_predict_gives_class_and_probability_and_reports_bad_files(trained_run, tmp_path):
    run_dir, data = trained_run
    image = next((data / "test" / "PNEUMONIA").glob("*.jpeg"))
    fake = tmp_path / "fake.jpeg"
    fake.write_text("hello")
    result = cli("predict", str(run_dir), str(image), str(fake))
    assert result.returncode == 1  # one file failed
    lines = result.stdout.strip().splitlines()
    assert "P(PNEUMONIA) =" in lines[0] and ("NORMAL" in lines[0] or "PNEUMONIA" in lines[0])
    assert "ERROR" in lines[1] and "Not a readable image" in lines[1]


def test_evaluate_prints_metrics_and_writes_predictions(trained_run, tmp_path):
    run_dir, data = trained_run
    out_csv = tmp_path / "preds.csv"
    result = cli("evaluate", str(run_dir), "--split", "test", "--out", str(out_csv))
    assert result.returncode == 0, result.stderr
    assert "test: AUC" in result.stdout and out_csv.exists()
    other = cli("evaluate", str(run_dir), "--data", str(data), "--split", "test")
    assert "40 images" in other.stdout


def test_bad_data_folder_is_a_clear_error(tmp_path):
    result = cli("train", "--preset", "tiny", "--data", str(tmp_path / "nowhere"), "--runs-dir", str(tmp_path))
    assert result.returncode == 1
    assert "error: Dataset folder not found" in result.stderr and "Traceback" not in result.stderr
    listed = cli("runs", "--runs-dir", str(tmp_path)).stdout
    assert "failed" in listed and "Dataset folder not found" in listed  # the run and why it failed
