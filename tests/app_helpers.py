"""Helpers for the dashboard page tests (AppTest): where the shared X-rays are, opening a page, and
waiting for (or ending) background training runs. The fixtures live in conftest.py."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import runs

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The repo and ../shared sit side by side (locally /work/main and /work/shared; in CI a fresh clone).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KERMANY_224 = SHARED_DATA / "kermany_224"
ORIGINAL_SUBSET = SHARED_DATA / "kermany_original_train_subset"
# The first decode of 5,856 images takes about 10 s on two cores; a page run must not time out on it.
PAGE_TIMEOUT_S = 120
RUN_TIMEOUT_S = 180


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
HAS_BROWSER = CHROMIUM.exists() and CHROMEDRIVER.exists()
NO_BROWSER_REASON = (f"headless browser test needs {CHROMIUM} and {CHROMEDRIVER} "
                     "(apt-get install chromium chromium-driver)")


def headless_chromium(profile_dir: Path, page_load_timeout_s: float, logs: bool = False):
    """Debian's Chromium under selenium, with the flags that keep it off the network on its own (no
    background updates, sync or first-run pages); `logs` records the console and network events."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1440,1800", f"--user-data-dir={profile_dir}"):
        options.add_argument(arg)
    if logs:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(page_load_timeout_s)
    return driver


def require_data(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(f"real X-rays not found at {folder} (expected ../shared/data beside the repo)")
    return folder


def page(path: str) -> AppTest:
    return AppTest.from_file(str(PROJECT_ROOT / path), default_timeout=PAGE_TIMEOUT_S)


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


def first_epoch_run(finished_run: Path, runs_dir: Path) -> Path:
    """A run caught during its first epoch: 'running' (this process's pid, so it counts as alive),
    step metrics written, no epoch record yet."""
    run_dir = runs_dir / "20000101-000001-smallcnn-full"
    run_dir.mkdir()
    shutil.copy(finished_run / "config.json", run_dir / "config.json")
    steps = [line for line in (finished_run / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    (run_dir / "metrics.jsonl").write_text("\n".join(steps[:3]) + "\n")
    runs.write_status(run_dir, state="running", pid=os.getpid(), phase="training", epochs=2, steps_per_epoch=5,
                      epoch=1, step=3, global_step=3, total_steps=10, images_per_s=100.0, elapsed=2.0)
    return run_dir
