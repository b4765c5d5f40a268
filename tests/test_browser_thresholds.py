"""The Thresholds page in a real browser: a threshold slider step reruns only the threshold's views (a fragment),
not the page around them. AppTest always reruns the whole script, so this needs the browser: Streamlit marks and
redraws every element a run touches, and elements outside a fragment are left alone by its reruns.

Needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`); skipped without them.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest
from app_helpers import HAS_BROWSER, NO_BROWSER_REASON, headless_chromium

pytestmark = pytest.mark.skipif(not HAS_BROWSER, reason=NO_BROWSER_REASON)
pytest.importorskip("selenium", reason="the browser test drives Chromium with selenium (pip install selenium)")

import test_browser  # noqa: E402  (after the skips: it needs selenium too)

RENDERED_JS = test_browser.RENDERED_JS
# The dashboard served with one finished run (a copy of `finished_run`) in its runs folder: the smoke test's fixture.
server = test_browser.server
TIMEOUT_S = 120

# Mutations inside the elements outside the threshold's views (title, calibration chart, report button) and
# inside the "Threshold on this page" metric, counted from now on.
WATCH_JS = """
const container = el => el && el.closest('[data-testid="stElementContainer"]');
const outside = [container(document.querySelector('[data-testid="stMain"] h1')),
                 document.querySelector('.st-key-reliability'), document.querySelector('.st-key-thr_report')];
const metric = [...document.querySelectorAll('[data-testid="stMetric"]')]
    .find(m => m.innerText.startsWith('Threshold on this page'));
const counts = window.__counts = {outside: 0, metric: 0, missing: outside.filter(el => !el).length + !metric};
for (const el of outside.filter(Boolean))
    new MutationObserver(r => { counts.outside += r.length; })
        .observe(el, {subtree: true, childList: true, attributes: true, characterData: true});
if (metric) new MutationObserver(r => { counts.metric += r.length; })
    .observe(container(metric), {subtree: true, childList: true, attributes: true, characterData: true});
return metric ? metric.querySelector('[data-testid="stMetricValue"]').innerText : null;
"""
METRIC_JS = """
const metric = [...document.querySelectorAll('[data-testid="stMetric"]')]
    .find(m => m.innerText.startsWith('Threshold on this page'));
return metric ? metric.querySelector('[data-testid="stMetricValue"]').innerText : null;
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Any]:
    driver = headless_chromium(tmp_path_factory.mktemp("chromium-profile"), TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _settle(browser) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    for _ in range(2):  # a run can trigger another: settled twice, a moment apart
        WebDriverWait(browser, TIMEOUT_S, poll_frequency=0.2).until(lambda d: d.execute_script(RENDERED_JS))
        time.sleep(1.0)


def test_a_slider_step_reruns_only_the_threshold_views(server, browser) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, log = server
    browser.get(f"{url}/Thresholds")
    _settle(browser)
    before = browser.execute_script(WATCH_JS)
    assert browser.execute_script("return window.__counts.missing") == 0, "title, calibration or report not found"
    browser.execute_script("document.querySelector('.st-key-thr_slider input[type=\"range\"]').focus()")
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()
    WebDriverWait(browser, TIMEOUT_S, poll_frequency=0.2).until(lambda d: d.execute_script(METRIC_JS) != before)
    _settle(browser)

    after = browser.execute_script(METRIC_JS)
    assert float(after) == pytest.approx(float(before) + 0.001), (before, after)
    counts = browser.execute_script("return window.__counts")
    assert counts["metric"] > 0, counts  # the observer sees the views redrawn...
    assert counts["outside"] == 0, f"the page outside the threshold's views was redrawn: {counts}"  # ...not the rest


# The live view's shadow root: its curves (paths), operating points (stars) and confusion-matrix counts.
VIEW_JS = """
const host = [...document.querySelectorAll('.st-key-thr_operating_view *')].find(el => el.shadowRoot);
const root = host && host.shadowRoot;
if (!root) return null;
const paths = [...root.querySelectorAll('.panel > svg path.curve')];
if (arguments[0]) paths.forEach((p, i) => { p.__mark = i; });  // a mark survives only on the same DOM node
return {curves: paths.length, marked: paths.filter(p => p.__mark !== undefined).length,
        stars: [...root.querySelectorAll('.panel > svg polygon.marker')].map(p => p.getAttribute('points')),
        counts: [...root.querySelectorAll('.matrix td.count')].map(td => td.textContent),
        legend: root.textContent.includes('validation (AUC ')};
"""


def test_a_slider_step_moves_the_operating_points_without_redrawing_the_curves(server, browser) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    browser.get(f"{url}/Thresholds")
    _settle(browser)
    browser.find_element("css selector", ".st-key-thr_mode label").click()  # "By hand": the slider moves freely
    _settle(browser)
    before = browser.execute_script(VIEW_JS, True)
    assert before and before["curves"] >= 5 and before["legend"], before  # chance, 2 ROC, 2 PR (+ prevalence)
    assert len(before["stars"]) == 4 and len(before["counts"]) == 8  # val and test on both charts; 2 matrices
    browser.execute_script("document.querySelector('.st-key-thr_slider input[type=\"range\"]').focus()")
    for _ in range(40):  # far enough that the counts change on a barely trained model
        ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()
    WebDriverWait(browser, TIMEOUT_S, poll_frequency=0.2).until(
        lambda d: d.execute_script(VIEW_JS, False)["stars"] != before["stars"])
    _settle(browser)
    after = browser.execute_script(VIEW_JS, False)
    assert after["marked"] == before["curves"], "the curves were drawn again"
    assert after["stars"] != before["stars"] and after["counts"] != before["counts"]
