"""Every dashboard page with a runs folder full of damaged runs (one damaged file each, see
bad_inputs.RUN_DAMAGE) beside a good one: no page exception, the good run still works, and a damaged run
shows a message rather than a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from app_helpers import page
from bad_inputs import RUN_DAMAGE, damage_run

import ui

RUN_PAGES = [script for script, _, _ in ui.PAGES if not script.endswith("0_Data.py")]
PICKER_KEYS = {"pages/1_Train.py": "train_monitor_run"}  # the others use ui.run_picker's key "run"


@pytest.fixture(scope="module")
def damaged_runs(finished_run: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("damaged") / "runs"
    root.mkdir()
    shutil.copytree(finished_run, root / "good", ignore=shutil.ignore_patterns("last.pt"))
    for variant in RUN_DAMAGE:
        target = root / f"damaged-{variant}"
        shutil.copytree(finished_run, target, ignore=shutil.ignore_patterns("last.pt"))
        damage_run(target, variant)
    return root


@pytest.fixture
def env(damaged_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CXR_RUNS_DIR", str(damaged_runs))
    monkeypatch.setenv("CXR_SETTINGS", str(tmp_path / "settings.json"))
    return damaged_runs


def _texts(at) -> str:
    return " ".join(str(e.value) for kind in ("error", "warning", "info", "success", "markdown", "caption")
                    for e in getattr(at, kind))


@pytest.mark.parametrize("script", RUN_PAGES)
def test_every_run_of_a_damaged_folder_opens_without_a_page_exception(script, env):
    at = page(script).run()
    assert not at.exception, at.exception
    if script.endswith("2_Compare.py"):
        at.multiselect(key="compare_runs").set_value(at.multiselect(key="compare_runs").options).run()
        assert not at.exception, at.exception
        return
    picker = at.selectbox(key=PICKER_KEYS.get(script, "run"))
    options = list(picker.options)
    assert "good" in options
    for name in options:
        at.selectbox(key=PICKER_KEYS.get(script, "run")).select(name).run()
        assert not at.exception, (name, at.exception)
        if name == "good":
            assert not at.error, [e.value for e in at.error]


@pytest.mark.parametrize("variant, page_script, words", [
    ("threshold-nan", "pages/3_Thresholds.py", "threshold.json is damaged"),
    ("threshold-nan", "pages/5_Predict.py", "threshold.json is damaged"),
    ("test-predictions-values", "pages/3_Thresholds.py", "predictions_test.csv"),
    ("checkpoint-garbage", "pages/5_Predict.py", "best.safetensors"),
    ("checkpoint-metadata", "pages/5_Predict.py", "best.safetensors"),
    ("checkpoint-missing", "pages/5_Predict.py", "best.safetensors"),
])
def test_a_damaged_file_is_named_on_the_page(env, variant, page_script, words):
    at = page(page_script).run()
    at.selectbox(key="run").select(f"damaged-{variant}").run()
    assert not at.exception
    assert words in " ".join(e.value for e in at.error), [e.value for e in at.error]
