"""Fixtures and helpers for the dashboard page tests (AppTest): an isolated runs folder and settings
file per test, a real finished run trained once per session on the shared X-rays, and waiting for
background runs.

Test modules load the fixtures with `pytest_plugins = ("app_fixtures",)`: registered once as a plugin,
the session fixture really trains once per session (an imported fixture would train once per module)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import runs
from core.config import config_from_preset
from core.trainer import train

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The repo and ../shared sit side by side (locally /work/main and /work/shared; in CI a fresh clone).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KERMANY_224 = SHARED_DATA / "kermany_224"
ORIGINAL_SUBSET = SHARED_DATA / "kermany_original_train_subset"
# The first decode of 5,856 images takes about 10 s on two cores; a page run must not time out on it.
PAGE_TIMEOUT_S = 120
RUN_TIMEOUT_S = 180


def require_data(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(f"real X-rays not found at {folder} (expected ../shared/data beside the repo)")
    return folder


def page(path: str) -> AppTest:
    return AppTest.from_file(str(PROJECT_ROOT / path), default_timeout=PAGE_TIMEOUT_S)


@pytest.fixture
def app_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty runs folder and a fresh settings file, so tests never read or write the user's."""
    import ui

    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    settings = tmp_path / "settings.json"
    monkeypatch.setenv("CXR_RUNS_DIR", str(runs_dir))
    monkeypatch.setenv("CXR_SETTINGS", str(settings))
    monkeypatch.setattr(ui, "SETTINGS_FILE", settings)  # ui reads $CXR_SETTINGS once, at import
    return runs_dir


@pytest.fixture(scope="session")
def tiny_finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run (preset 'tiny': 2 epochs of 5 steps at 64 px) trained once per test session."""
    data = require_data(ORIGINAL_SUBSET)
    runs_dir = tmp_path_factory.mktemp("finished-runs")
    # Session fixtures start before conftest's per-test cache isolation: name the same cache folder.
    cache_dir = tmp_path_factory.getbasetemp() / "image-cache"
    config = config_from_preset("tiny", data=str(data), runs_dir=str(runs_dir), cache_dir=str(cache_dir))
    run_dir = train(config)
    assert runs.read_status(run_dir)["state"] == "finished"
    return run_dir


def wait_until_settled(run_dirs: list[Path], timeout_s: float = RUN_TIMEOUT_S) -> dict[str, str]:
    """Poll until no run is queued or running; returns the final state per run."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = {d.name: runs.read_status(d).get("state") for d in run_dirs}
        if not any(s in runs.ACTIVE_STATES for s in states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(1)


def kill_active(run_dirs: list[Path]) -> None:
    """End background training processes a failed test left behind (by their recorded pid)."""
    for d in run_dirs:
        status = runs.read_status(d)
        if status.get("state") in runs.ACTIVE_STATES and status.get("pid") and status["pid"] != os.getpid():
            try:
                os.killpg(status["pid"], signal.SIGTERM)  # launched with start_new_session: own group
            except (ProcessLookupError, PermissionError):
                pass


def run_dirs_in(runs_dir: Path) -> list[Path]:
    return sorted(d for d in runs_dir.iterdir() if runs.is_run_dir(d))
