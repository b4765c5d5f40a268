"""The Predict page in a real browser: three files uploaded through the page's own file input (a colour
photo, a blank gray image and a real chest X-ray) against a finished run that has its out-of-distribution
score. What a clinician reads must say which images the decision does not apply to, and why, above the
probability; the summary table marks the same. Screenshot (1280 px wide) in test-artifacts/predict_ood.png.

Needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`); skipped without them.
"""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from app_helpers import HAS_BROWSER, NO_BROWSER_REASON, ORIGINAL_SUBSET, headless_chromium, require_data
from PIL import Image

pytestmark = pytest.mark.skipif(not HAS_BROWSER, reason=NO_BROWSER_REASON)
pytest.importorskip("selenium", reason="the browser test drives Chromium with selenium (pip install selenium)")

import test_browser  # noqa: E402  (after the skips: it needs selenium too)

APP, ERROR_SELECTORS, RENDERED_JS = test_browser.APP, test_browser.ERROR_SELECTORS, test_browser.RENDERED_JS
# The dashboard served with one finished run (a copy of `finished_run`) in its runs folder: the smoke test's fixture.
server = test_browser.server

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = PROJECT_ROOT / "test-artifacts" / "predict_ood.png"
WIDTH, HEIGHT = 1280, 800
TIMEOUT_S = 60
COLOUR, BLANK = "colour_photo.png", "blank_gray.png"

# Each uploaded file's bordered box on the page, keyed by the file name it starts with: its text, its own box,
# and the boxes of what it shows (warning, metric, decision, captions, the <img> themselves, which may be drawn
# wider than the block holding them) in page coordinates.
CARDS_JS = """
const box = el => { const r = el.getBoundingClientRect();
                    return {top: r.top + scrollY, bottom: r.bottom + scrollY, left: r.left, right: r.right}; };
const kinds = ['stAlert', 'stMetric', 'stMarkdown', 'stCaptionContainer', 'stImage'];
const any = kinds.map(k => `[data-testid="${k}"]`).join(', ');
const out = {};
for (const card of document.querySelectorAll('[data-testid="stMain"] [data-testid="stVerticalBlock"]')) {
    const style = getComputedStyle(card);
    if (style.borderTopStyle === 'none' || parseFloat(style.borderTopWidth) === 0) continue;
    const title = card.querySelector('[data-testid="stMarkdown"]');
    if (!title) continue;
    const parts = [];
    for (const el of card.querySelectorAll(any)) {
        const outer = el.parentElement.closest(any);
        if (outer && card.contains(outer)) continue;  // part of one already listed (a caption's markdown)
        const kind = el.getAttribute('data-testid');
        const shown = kind === 'stImage' ? el.querySelector('img') : el;
        parts.push({kind: kind, text: (kind === 'stImage' ? el.innerText || 'image' : el.innerText).slice(0, 60),
                    ...box(shown)});
    }
    out[title.innerText.trim()] = {text: card.innerText, box: box(card), parts: parts};
}
return out;
"""
# The summary table is drawn on a canvas; its cells are also in an accessible table, as text.
SUMMARY_JS = """
const grid = document.querySelector('[data-testid="stDataFrame"]');
return grid ? [...grid.querySelectorAll('table tr')].map(tr => [...tr.querySelectorAll('th, td')]
    .map(c => c.innerText.trim())) : [];
"""


def _images(folder: Path) -> list[Path]:
    """A random RGB photo, a uniform gray image (both PNG, 320 x 320) and one real NORMAL X-ray."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8), "RGB").save(folder / COLOUR)
    Image.fromarray(np.full((320, 320), 128, np.uint8), "L").save(folder / BLANK)
    xray = sorted((require_data(ORIGINAL_SUBSET) / "NORMAL").glob("*.jpeg"))[0]
    return [folder / COLOUR, folder / BLANK, xray]


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Any]:
    driver = headless_chromium(tmp_path_factory.mktemp("chromium-profile"), TIMEOUT_S)
    driver.set_window_size(WIDTH, HEIGHT)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, condition, what: str, log: Path) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, TIMEOUT_S, poll_frequency=0.3).until(condition)
    except TimeoutException:
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SCREENSHOT))
        pytest.fail(f"{what} within {TIMEOUT_S}s (screenshot {SCREENSHOT}); server log:\n"
                    f"{log.read_text(errors='replace')[-4000:]}")


def _settled(driver: Any) -> bool:
    return driver.execute_script(f"const a = document.querySelector('{APP}'); "
                                 "return a && a.getAttribute('data-test-script-state') === 'notRunning';")


def _save_whole_page(driver: Any, shot: Path) -> None:
    """The page at the window's width and its full height (Streamlit scrolls inside its main block, so a
    plain screenshot holds only the first 800 px)."""
    height = driver.execute_script(
        "return Math.max(...[...document.querySelectorAll('[data-testid=\"stMain\"], "
        "[data-testid=\"stMainBlockContainer\"]')].map(e => e.scrollHeight), window.innerHeight);")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        time.sleep(1.0)  # let the taller window lay out and draw the images again
        image = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
        shot.parent.mkdir(parents=True, exist_ok=True)
        shot.write_bytes(base64.b64decode(image["data"]))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _overlaps(parts: list[dict]) -> list[tuple[str, str]]:
    """Pairs of shown things whose boxes share more than a pixel in both directions."""
    found = []
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            if (min(a["bottom"], b["bottom"]) - max(a["top"], b["top"]) > 1
                    and min(a["right"], b["right"]) - max(a["left"], b["left"]) > 1):
                found.append((f"{a['kind']} {a['text']!r}", f"{b['kind']} {b['text']!r}"))
    return found


@pytest.fixture(scope="module")
def predicted(server, browser, tmp_path_factory) -> dict[str, Any]:
    """The Predict page after the three files went through its file input, read at 1280 x 800: the cards, the
    summary rows, the page width, and the real X-ray's name. Saves the screenshot."""
    from selenium.webdriver.common.by import By

    url, log = server
    files = _images(tmp_path_factory.mktemp("uploads"))
    browser.get(f"{url}/Predict")
    file_input = '[data-testid="stFileUploader"] input[type="file"]'
    _wait(browser, lambda d: d.execute_script(RENDERED_JS) and d.find_elements(By.CSS_SELECTOR, file_input),
          "the Predict page did not render", log)
    intro = browser.find_element(By.CSS_SELECTOR, '[data-testid="stMain"]').text

    # The real <input type=file> behind the drop zone, filled as a file dialog fills it (several at once).
    browser.find_element(By.CSS_SELECTOR, file_input).send_keys("\n".join(str(f) for f in files))
    _wait(browser, lambda d: _settled(d) and len(d.execute_script(CARDS_JS)) == 3 and d.execute_script(SUMMARY_JS),
          "the three predictions and the summary did not appear", log)
    time.sleep(1.0)  # a rerun may follow the first; let it settle
    _wait(browser, _settled, "the page did not settle", log)
    state = {"intro": intro, "xray": files[2].name, "cards": browser.execute_script(CARDS_JS),
             "rows": browser.execute_script(SUMMARY_JS),
             "errors": [el.text for sel in ERROR_SELECTORS for el in browser.find_elements(By.CSS_SELECTOR, sel)],
             "page_width": browser.execute_script("return document.documentElement.scrollWidth")}
    _save_whole_page(browser, SCREENSHOT)
    return state


def test_predict_says_which_images_the_decision_does_not_apply_to(predicted: dict[str, Any]) -> None:
    assert "no out-of-distribution score" not in predicted["intro"], "the fixture run should have ood.safetensors"
    assert "Each image is first checked against the training data" in predicted["intro"]
    assert not predicted["errors"], predicted["errors"]
    cards, xray_name = predicted["cards"], predicted["xray"]
    assert set(cards) == {COLOUR, BLANK, xray_name}, list(cards)

    colour = cards[COLOUR]["text"]
    assert "Not a chest X-ray: the image is in colour" in colour
    assert "Decision: not applicable" in colour
    blank = cards[BLANK]["text"]
    assert "blank or almost uniform" in blank
    assert "Decision: not applicable" in blank
    xray = cards[xray_name]["text"]
    assert re.search(r"Decision: (NORMAL|PNEUMONIA)\b", xray) or "Decision: not applicable" in xray, xray
    assert re.search(r"(Like|Unlike) the training data \(score \d+\.\d\d, threshold \d+\.\d\d\)", xray), xray
    # The real X-ray passes the image gate: if its decision is withheld, it is for its score alone.
    if "Decision: not applicable" in xray:
        assert "Unlike the training data" in xray and "Not a chest X-ray" not in xray, xray
    else:
        assert "Like the training data" in xray, xray

    # The warning reads before the number it qualifies.
    for name in (COLOUR, BLANK):
        parts = cards[name]["parts"]
        warning = [p for p in parts if p["kind"] == "stAlert"]
        metric = [p for p in parts if p["kind"] == "stMetric"]
        assert len(warning) == 1 and len(metric) == 1, parts
        assert warning[0]["bottom"] <= metric[0]["top"], (name, warning, metric)
    assert not [p for p in cards[xray_name]["parts"] if p["kind"] == "stAlert"] or "Unlike" in xray

    rows = predicted["rows"]
    header = rows[0]
    applies = {row[header.index("file")]: row[header.index("applies")].lower() for row in rows[1:]}
    assert applies[COLOUR] == "false" and applies[BLANK] == "false", rows
    assert applies[xray_name] == ("false" if "Decision: not applicable" in xray else "true"), rows


def test_predict_cards_fit_a_1280_window(predicted: dict[str, Any]) -> None:
    """Nothing in a file's box covers anything else or reaches outside the box, and the page does not scroll
    sideways."""
    for name, card in predicted["cards"].items():
        assert not _overlaps(card["parts"]), (name, _overlaps(card["parts"]))
        outside = [(p["kind"], p["text"], p["left"], p["right"]) for p in card["parts"]
                   if p["left"] < card["box"]["left"] - 1 or p["right"] > card["box"]["right"] + 1]
        assert not outside, (name, card["box"], outside)
    assert predicted["page_width"] <= WIDTH, "the page scrolls sideways"
