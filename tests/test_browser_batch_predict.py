"""The Predict page's batch mode in a real browser: a folder of 500 generated X-rays (plus a damaged PNG and a text
file) typed as a server path. Pressing Enter in the path must not start anything; the Predict button does, and the
table, the list of files left out and the CSV download (one row per file, 500 probabilities) follow. Screenshot in
test-artifacts/predict_batch.png.

Needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`); skipped without them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pytest
from app_helpers import HAS_BROWSER, NO_BROWSER_REASON, headless_chromium
from conftest import make_xray

pytestmark = pytest.mark.skipif(not HAS_BROWSER, reason=NO_BROWSER_REASON)
pytest.importorskip("selenium", reason="the browser test drives Chromium with selenium (pip install selenium)")

import test_browser  # noqa: E402  (after the skips: it needs selenium too)

APP, ERROR_SELECTORS, RENDERED_JS = test_browser.APP, test_browser.ERROR_SELECTORS, test_browser.RENDERED_JS
# The dashboard served with one finished run (a copy of `finished_run`) in its runs folder: the smoke test's fixture.
server = test_browser.server

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = PROJECT_ROOT / "test-artifacts" / "predict_batch.png"
TIMEOUT_S = 45
N_IMAGES = 500
BATCH_LABEL = "A folder, label file or zip (batch)"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """500 small PNGs of 64 to 128 px in two sub-folders, a damaged PNG and a text file."""
    root = tmp_path_factory.mktemp("ward")
    for i in range(N_IMAGES):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        make_xray(64 + (i % 5) * 16, i % 2, seed=i).save(sub / f"x{i:04d}.png")
    (root / "damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "notes.txt").write_text("exported from the PACS")
    return root


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[tuple[Any, Path]]:
    """Headless Chromium that saves downloads into a folder of its own."""
    downloads = tmp_path_factory.mktemp("downloads")
    driver = headless_chromium(tmp_path_factory.mktemp("chromium-profile"), TIMEOUT_S)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver, downloads
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


def test_batch_predicts_a_server_folder_of_500_images_to_a_csv(server, browser, folder: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, log = server
    driver, downloads = browser
    started = time.monotonic()
    driver.get(f"{url}/Predict")
    radio = '[data-testid="stRadio"]'
    _wait(driver, lambda d: d.execute_script(RENDERED_JS) and d.find_elements(By.CSS_SELECTOR, radio),
          "the Predict page did not render", log)
    option = next(el for el in driver.find_elements(By.CSS_SELECTOR, f"{radio} label")
                  if el.text.strip() == BATCH_LABEL)
    option.click()
    path_input = '[data-testid="stTextInput"] input'
    _wait(driver, lambda d: _settled(d) and d.find_elements(By.CSS_SELECTOR, path_input), "the batch form did not show",
          log)

    field = driver.find_element(By.CSS_SELECTOR, path_input)
    field.send_keys(str(folder))
    field.send_keys(Keys.ENTER)
    time.sleep(1.5)
    _wait(driver, _settled, "the page did not settle after Enter", log)
    assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stDataFrame"]'), "Enter started a prediction"

    driver.find_element(By.CSS_SELECTOR, '[data-testid="stFormSubmitButton"] button').click()
    _wait(driver, lambda d: _settled(d) and len(d.find_elements(By.CSS_SELECTOR, '[data-testid="stDataFrame"]')) == 2,
          "the table and the list of files left out did not appear", log)
    main = driver.find_element(By.CSS_SELECTOR, '[data-testid="stMain"]').text
    assert f"{N_IMAGES} images predicted at the operating threshold" in main, main[:2000]
    assert "1 unreadable, 1 skipped" in main
    errors = [el.text for sel in ERROR_SELECTORS for el in driver.find_elements(By.CSS_SELECTOR, sel)]
    assert not errors, errors

    driver.find_element(By.CSS_SELECTOR, '[data-testid="stDownloadButton"] button').click()
    csv = downloads / "predictions.csv"
    _wait(driver, lambda d: csv.exists() and csv.stat().st_size > 0, "the CSV was not downloaded", log)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOT))
    table = pd.read_csv(csv, keep_default_na=False)
    assert len(table) == N_IMAGES + 2
    predicted = table[table["error"] == ""]
    assert len(predicted) == N_IMAGES and predicted["probability"].astype(float).between(0, 1).all()
    assert set(predicted["decision"]) <= {"NORMAL", "PNEUMONIA"}
    assert {Path(f).name for f in table.loc[table["error"] != "", "file"]} == {"damaged.png", "notes.txt"}
    assert time.monotonic() - started < 60
