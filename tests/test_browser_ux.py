"""What only a real browser shows, at 1280x800 (headless Chromium): Enter in the launch form queues nothing,
plotly's toolbar covers no plot area, no status tile is cut off, Data's sample images stay in their columns,
and the run chosen in the address survives a reload. Uses test_browser's server (one finished run)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from app_helpers import HAS_BROWSER, NO_BROWSER_REASON
from test_browser import PAGE_TIMEOUT_S, RENDERED_JS, SCREENSHOTS, browser, server  # noqa: F401 - fixtures

from core import runs

pytestmark = pytest.mark.skipif(not HAS_BROWSER, reason=NO_BROWSER_REASON)

# Every plot's toolbar box against its plot area (the drag layer plotly puts over the axes' rectangle).
TOOLBAR_OVERLAPS_JS = """
const out = [];
for (const plot of document.querySelectorAll('.js-plotly-plot')) {
  const bar = plot.querySelector('.modebar');
  const area = plot.querySelector('.nsewdrag');
  if (!bar || !area) continue;
  const b = bar.getBoundingClientRect(), a = area.getBoundingClientRect();
  const overlap = b.width > 0 && b.left < a.right && a.left < b.right && b.top < a.bottom && a.top < b.bottom;
  out.push({title: (plot.querySelector('.gtitle') || {}).textContent || '?', overlap: overlap});
}
return out;
"""
CUT_TILES_JS = """
return [...document.querySelectorAll('[data-testid="stMetricValue"] div, [data-testid="stMetricValue"]')]
  .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent);
"""
IMAGES_OUTSIDE_COLUMNS_JS = """
const out = [];
for (const col of document.querySelectorAll('[data-testid="stColumn"]')) {
  const c = col.getBoundingClientRect();
  for (const img of col.querySelectorAll('img')) {
    const r = img.getBoundingClientRect();
    if (r.right > c.right + 1 || r.left < c.left - 1) out.push(img.alt || img.src.slice(0, 40));
  }
}
return out;
"""


def _open(driver, url: str, settle_s: float = 1.5) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    for _ in range(2):
        WebDriverWait(driver, PAGE_TIMEOUT_S, poll_frequency=0.3).until(lambda d: d.execute_script(RENDERED_JS))
        time.sleep(settle_s)


@pytest.fixture(scope="module")
def narrow(browser):  # noqa: F811
    browser.set_window_size(1280, 800)
    return browser


def _runs_dir(server) -> Path:  # noqa: F811
    return Path(server[1]).parent / "runs"


def test_enter_in_the_launch_form_queues_nothing(server, narrow):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, _ = server
    before = sorted(p.name for p in _runs_dir(server).iterdir())
    _open(narrow, f"{url}/Train")
    for label in ("Run name (optional)", "Epochs"):
        field = narrow.find_element(By.CSS_SELECTOR, f'input[aria-label="{label}"]')
        field.click()
        field.send_keys("7" if label == "Epochs" else "typed", Keys.ENTER)
        time.sleep(2)
    narrow.save_screenshot(str(SCREENSHOTS / "ux-train-enter.png"))
    assert sorted(p.name for p in _runs_dir(server).iterdir()) == before
    assert "Launched" not in narrow.find_element(By.TAG_NAME, "body").text


@pytest.mark.parametrize("path", ["Train", "Compare"])
def test_the_toolbar_covers_no_plot_and_no_tile_is_cut(server, narrow, path):  # noqa: F811
    url, _ = server
    _open(narrow, f"{url}/{path}")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    narrow.save_screenshot(str(SCREENSHOTS / f"ux-{path}-1280.png"))
    plots = narrow.execute_script(TOOLBAR_OVERLAPS_JS)
    assert plots, f"no chart on {path}"
    assert not [p["title"] for p in plots if p["overlap"]], plots
    assert narrow.execute_script(CUT_TILES_JS) == []


def test_sample_images_stay_in_their_columns(server, narrow):  # noqa: F811
    url, _ = server
    _open(narrow, f"{url}/", settle_s=3)
    assert narrow.execute_script(IMAGES_OUTSIDE_COLUMNS_JS) == []


def test_the_run_in_the_address_survives_a_reload(server, narrow):  # noqa: F811

    url, _ = server
    (run,) = [p.name for p in _runs_dir(server).iterdir() if runs.is_run_folder(p)]
    _open(narrow, f"{url}/Mistakes")
    assert f"run={run}" in narrow.current_url  # the choice is written into the address
    narrow.refresh()
    _open(narrow, narrow.current_url)
    assert f"run={run}" in narrow.current_url


def test_the_menu_lists_the_pages_once_in_words(server, narrow):  # noqa: F811
    from selenium.webdriver.common.by import By

    import ui

    url, _ = server
    _open(narrow, f"{url}/Compare")
    links = [a.text.strip() for a in narrow.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNavLink"]')]
    assert links == [title for _, title in ui.PAGES], links


def test_a_page_opened_by_its_address_logs_no_error_in_the_console(server, narrow):  # noqa: F811
    """Streamlit's page probes <page>/_stcore/health and host-config first unless told where its server is: two
    404s per direct load. streamlit_app.py's middleware (app_server.py) tells it."""
    import ui

    url, _ = server
    narrow.get_log("browser")  # what earlier tests left
    for _, title in ui.PAGES[1:]:
        _open(narrow, f"{url}/{title}", settle_s=0.5)
    narrow.refresh()
    _open(narrow, narrow.current_url, settle_s=0.5)
    severe = [e["message"] for e in narrow.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe
