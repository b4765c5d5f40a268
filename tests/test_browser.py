"""Real-browser smoke test: `streamlit run` the dashboard, open the home page and every page in headless
Chromium, and check that each renders without an exception or an error box. Screenshots go to
test-artifacts/screenshots/<page>.png.

AppTest runs page scripts without a browser; this catches what only a browser shows (front-end
errors, pages that never finish running, a server that does not start).

Needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`); skipped
without them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from app_helpers import HAS_BROWSER, NO_BROWSER_REASON, headless_chromium

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
SCREENSHOTS = PROJECT_ROOT / "test-artifacts" / "screenshots"
KERMANY_224 = SHARED_DATA / "kermany_224"
SERVER_START_TIMEOUT_S = 90
# The home page decodes the whole data folder on its first visit (about 10 s on two idle cores).
PAGE_TIMEOUT_S = 300
# Streamlit's own markers: the script-run state on the app root, exceptions, and st.error boxes.
APP = '[data-testid="stApp"]'
ERROR_SELECTORS = ('[data-testid="stException"]', '[data-testid="stAlertContentError"]')
RENDERED_JS = """
const app = document.querySelector('[data-testid="stApp"]');
if (!app) return false;
return app.getAttribute('data-test-connection-state') === 'CONNECTED'
    && app.getAttribute('data-test-script-state') === 'notRunning'
    && document.querySelector('[data-testid="stMain"] h1') !== null;
"""

pytestmark = pytest.mark.skipif(
    not HAS_BROWSER, reason=NO_BROWSER_REASON)


def _page_paths() -> list[tuple[str, str]]:
    """(name, URL path) for the home page and each other page of the menu (ui.PAGES): /Train, ..."""
    from ui import PAGES

    return [("home", "")] + [(title, title) for _, title in PAGES[1:]]


PAGES = _page_paths()
pytest.importorskip("selenium", reason="the browser test drives Chromium with selenium (pip install selenium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"streamlit did not answer within {SERVER_START_TIMEOUT_S}s:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def server(finished_run: Path, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """The dashboard served from a subprocess, pointed at a runs folder holding one finished run and at
    settings that name the 224 px data folder. Yields (base URL, server log)."""
    if not KERMANY_224.is_dir():
        pytest.skip(f"real X-rays not found at {KERMANY_224} (expected ../shared/data beside the repo)")
    tmp = tmp_path_factory.mktemp("browser")
    runs_dir = tmp / "runs"
    shutil.copytree(finished_run, runs_dir / finished_run.name)
    settings = tmp / "settings.json"
    settings.write_text(json.dumps({"data_folder": str(KERMANY_224)}))
    port = _free_port()
    log = tmp / "streamlit.log"
    env = {**os.environ, "CXR_RUNS_DIR": str(runs_dir), "CXR_SETTINGS": str(settings),
           "CXR_CACHE_DIR": str(tmp / "image-cache"), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true",
             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
            cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)  # its own process group, so training it launches dies with it
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Any]:
    driver = headless_chromium(tmp_path_factory.mktemp("chromium-profile"), 60, logs=True)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.parametrize("name,path", PAGES, ids=[name for name, _ in PAGES])
def test_page_renders_without_errors(server, browser, name: str, path: str) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, log = server
    browser.get(f"{url}/{path}")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"{name}.png"
    try:
        # A script run can end and immediately trigger another (a rerun after setting state): wait for
        # it to settle twice, a moment apart.
        for _ in range(2):
            WebDriverWait(browser, PAGE_TIMEOUT_S, poll_frequency=0.5).until(lambda d: d.execute_script(RENDERED_JS))
            time.sleep(1.5)
    except TimeoutException:
        browser.save_screenshot(str(shot))
        state = browser.execute_script(
            f"const a = document.querySelector('{APP}'); return a && a.getAttribute('data-test-script-state');")
        pytest.fail(f"page '{name}' did not finish rendering within {PAGE_TIMEOUT_S}s (script state {state!r}, "
                    f"screenshot {shot}); server log:\n{log.read_text(errors='replace')[-4000:]}")
    browser.save_screenshot(str(shot))
    errors = [el.text.strip()[:1500] for sel in ERROR_SELECTORS for el in browser.find_elements(By.CSS_SELECTOR, sel)]
    assert not errors, f"page '{name}' shows errors (screenshot {shot}):\n" + "\n---\n".join(errors)


def test_server_log_has_no_traceback(server) -> None:
    """Exceptions Streamlit did not render (callbacks, threads) still land in the server log."""
    _, log = server
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-6000:]
