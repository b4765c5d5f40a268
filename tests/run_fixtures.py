"""A tiny REAL finished run for the dashboard page tests, trained once per test session on the full-size
Kermany originals in ../shared/data.

Import the fixtures into a test module (`from run_fixtures import finished_run, run_copy`). Pytest
registers an imported fixture once per importing module, so a session-scoped fixture would train once
per module; the module-level memo below makes it train once per session.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ORIGINALS = SHARED_DATA / "kermany_original_train_subset"

_built: dict[Path, Path] = {}


def _train_tiny_run(base: Path) -> Path:
    from core import runs
    from core.config import config_from_preset
    from core.trainer import train

    config = config_from_preset("tiny", data=str(ORIGINALS), runs_dir=str(base / "fixture-runs"),
                                cache_dir=str(base / "image-cache"), device="cpu", seed=0)
    run_dir = train(config)
    state = runs.read_status(run_dir).get("state")
    assert state == "finished", f"fixture run ended '{state}': {runs.log_tail(run_dir)}"
    return run_dir


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A finished run (best.safetensors, predictions_{val,test}.csv, report.json). Do not modify it:
    tests that write into a run use `run_copy`."""
    if not ORIGINALS.is_dir():
        pytest.skip(f"real X-rays not found at {ORIGINALS} (expected ../shared/data beside the repo)")
    base = tmp_path_factory.getbasetemp()
    if base not in _built:
        _built[base] = _train_tiny_run(base)
    return _built[base]


@pytest.fixture
def run_copy(finished_run, tmp_path, monkeypatch) -> Path:
    """A private copy of the finished run in its own runs folder, which the dashboard is pointed at."""
    runs_dir = tmp_path / "runs"
    target = runs_dir / finished_run.name
    shutil.copytree(finished_run, target, ignore=shutil.ignore_patterns("last.pt"))
    monkeypatch.setenv("CXR_RUNS_DIR", str(runs_dir))
    return target


@pytest.fixture
def empty_runs_dir(tmp_path, monkeypatch) -> Path:
    """The dashboard pointed at a runs folder with nothing in it (and settings in a temp file)."""
    runs_dir = tmp_path / "no-runs"
    runs_dir.mkdir()
    monkeypatch.setenv("CXR_RUNS_DIR", str(runs_dir))
    monkeypatch.setenv("CXR_SETTINGS", str(tmp_path / "settings.json"))
    return runs_dir
