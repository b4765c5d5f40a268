"""The HTML report in a real browser with the network off: it must render completely from the file alone
(plotly.js, figures, images inline), with no console error and no request that fails or leaves the page.
Screenshot in test-artifacts/screenshots/report.png.

Needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`); skipped without them.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from app_helpers import HAS_BROWSER, NO_BROWSER_REASON, headless_chromium

from core.report import SECTION_IDS, write_report

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = PROJECT_ROOT / "test-artifacts" / "screenshots"
RENDER_TIMEOUT_S = 60
# Sections whose figures a finished run always has (training curves, confusion matrices, ROC/PR, reliability).
SECTIONS_WITH_FIGURES = ("training", "operating-point", "curves", "calibration")

pytestmark = pytest.mark.skipif(
    not HAS_BROWSER, reason=NO_BROWSER_REASON)
pytest.importorskip("selenium", reason="the browser test drives Chromium with selenium (pip install selenium)")

# Every figure div that plotly.js has drawn carries the class js-plotly-plot and an SVG of its own.
PLOTS_PER_SECTION_JS = """
const out = {};
for (const section of document.querySelectorAll('section[id]')) {
    out[section.id] = {figures: section.querySelectorAll('.plotly-graph-div').length,
                       drawn: section.querySelectorAll('.js-plotly-plot .main-svg').length > 0
                              ? section.querySelectorAll('.js-plotly-plot').length : 0};
}
return out;
"""


@pytest.fixture(scope="module")
def report_file(finished_run: Path, tmp_path_factory) -> Path:
    import shutil

    run_dir = tmp_path_factory.mktemp("report-run") / finished_run.name
    shutil.copytree(finished_run, run_dir, ignore=shutil.ignore_patterns("last.pt"))
    return write_report(run_dir, tmp_path_factory.mktemp("report") / "report.html", None)


@pytest.fixture(scope="module")
def offline_browser(tmp_path_factory) -> Iterator[Any]:
    driver = headless_chromium(tmp_path_factory.mktemp("chromium-profile"), RENDER_TIMEOUT_S, logs=True)
    try:
        # The network off for the whole session: anything the page tried to fetch would fail and be logged.
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
            "offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})
        yield driver
    finally:
        driver.quit()


def _performance_events(driver: Any) -> list[dict]:
    return [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]


def _open(driver: Any, report: Path, shot: Path) -> None:
    """Load the report and wait until plotly.js has drawn every figure."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    # The logs so far hold the browser's own start-up page (a new-tab page whose requests fail offline).
    driver.get_log("browser")
    driver.get_log("performance")
    driver.get(report.resolve().as_uri())
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        WebDriverWait(driver, RENDER_TIMEOUT_S, poll_frequency=0.5).until(lambda d: d.execute_script(
            "const figs = document.querySelectorAll('.plotly-graph-div');"
            "return document.readyState === 'complete' && figs.length > 0 && "
            "[...figs].every(f => f.classList.contains('js-plotly-plot') && f.querySelector('.main-svg'));"))
    except TimeoutException:
        driver.save_screenshot(str(shot))
        pytest.fail(f"the report's figures were not drawn within {RENDER_TIMEOUT_S}s (screenshot {shot})")
    time.sleep(0.5)  # figures are resized once the page has loaded
    _save_full_page(driver, shot)


def _save_full_page(driver: Any, shot: Path) -> None:
    """The whole page, not only the window, at 60% scale."""
    width, height = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight];")
    image = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 0.6}})
    shot.write_bytes(base64.b64decode(image["data"]))


def test_report_renders_offline_without_errors_or_requests(report_file: Path, offline_browser: Any) -> None:
    driver = offline_browser
    shot = SCREENSHOTS / "report.png"
    _open(driver, report_file, shot)

    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, f"console errors (screenshot {shot}):\n" + "\n".join(e["message"] for e in severe)

    events = _performance_events(driver)
    failed = [e["params"] for e in events if e.get("method") == "Network.loadingFailed"]
    assert not failed, f"failed requests: {failed}"
    requested = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    # chrome:// is the browser's own (its favicon service), never a request of the page's.
    assert all(url == report_file.resolve().as_uri() or url.startswith(("data:", "blob:", "chrome:"))
               for url in requested), requested
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(r => r.name);")
    assert all(url.startswith(("data:", "blob:")) for url in resources), resources

    present = driver.execute_script("return [...document.querySelectorAll('section[id]')].map(s => s.id);")
    assert present == list(SECTION_IDS)
    plots = driver.execute_script(PLOTS_PER_SECTION_JS)
    for section in SECTIONS_WITH_FIGURES:
        assert plots[section]["figures"] >= 1 and plots[section]["drawn"] == plots[section]["figures"], plots

    # Every figure of core.figures has a title; plotly.js leaves out a title it cannot read.
    untitled = driver.execute_script(
        "return [...document.querySelectorAll('.js-plotly-plot')]"
        ".filter(f => !f.querySelector('.gtitle')).map(f => f.id);")
    assert not untitled

    images = driver.execute_script(
        "return [...document.querySelectorAll('#mistakes img')].map(i => [i.complete, i.naturalWidth]);")
    assert images and all(complete and width > 0 for complete, width in images), images


def test_report_figures_fit_their_columns(report_file: Path, offline_browser: Any) -> None:
    """No figure is drawn wider than the box it sits in (a clipped axis hides part of a curve)."""
    driver = offline_browser
    _open(driver, report_file, SCREENSHOTS / "report.png")
    overflowing = driver.execute_script("""
        return [...document.querySelectorAll('.plotly-graph-div')]
            .filter(f => f.querySelector('.main-svg').getBoundingClientRect().width
                         > f.parentElement.getBoundingClientRect().width + 1)
            .map(f => f.id);
    """)
    assert not overflowing
    page_width = driver.execute_script("return document.documentElement.scrollWidth;")
    view_width = driver.execute_script("return document.documentElement.clientWidth;")
    assert page_width <= view_width, "the report scrolls sideways"
