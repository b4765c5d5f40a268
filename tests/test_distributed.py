"""torchrun on the CPU (gloo, 2 processes): one run folder written by rank 0, metrics of both ranks, the test AUC
of a one-process run, and a killed rank that marks the run failed with the reason and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_dataset

from core import runs
from core.distributed import torchrun_commands
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


def test_two_processes_write_one_run_with_both_ranks_metrics_and_the_one_process_auc(data, tmp_path):
    proc = _torchrun(["--data", str(data)], tmp_path / "runs", tmp_path / "cache")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    (run,) = _run_dirs(tmp_path / "runs")
    assert runs.read_status(run)["state"] == "finished"
    assert json.loads((run / "environment.json").read_text())["world_size"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    # 2 epochs of ceil(train images / 16) steps, each written once (by rank 0), with the images of both ranks.
    assert [r["global_step"] for r in steps] == list(range(1, len(steps) + 1))
    assert len([r for r in records if r["kind"] == "epoch"]) == 2
    one = train(run_dir=None, config=runs_config(data, tmp_path / "single", tmp_path / "cache"))
    auc_two = runs.read_report(run)["test"]["auc"]
    from core.operating import load_set, set_summary

    summary = set_summary(load_set(one, "test"), runs.operating_point(one).threshold)
    low, high = summary["metrics"]["auc"]["low"], summary["metrics"]["auc"]["high"]
    assert low - 1e-9 <= auc_two <= high + 1e-9, (auc_two, low, high)


def runs_config(data: Path, runs_dir: Path, cache: Path):
    from core.config import config_from_preset

    return config_from_preset("tiny", data=str(data), runs_dir=str(runs_dir), device="cpu", image_size=32,
                              batch_size=16, cache_dir=str(cache))


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


def test_the_commands_for_several_machines_name_each_node():
    lines = torchrun_commands(2, 8, "10.0.0.1", ["--data", "/data/x", "--preset", "gpu"])
    assert len(lines) == 2 and "--node-rank=1" in lines[1] and "--nproc-per-node=8" in lines[0]
    assert lines[0].endswith("-m core train --data /data/x --preset gpu")
