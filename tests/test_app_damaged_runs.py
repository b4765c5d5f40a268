"""Every dashboard page with a runs folder full of damaged runs (one damaged file each, see
bad_inputs.RUN_DAMAGE) beside a good one: no page exception, the good run still works, and a damaged run
shows a message rather than a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from app_helpers import page
from bad_inputs import (
    EXTERNAL_DAMAGE,
    HOSTILE_NAME,
    HOSTILE_TEXT,
    RUN_DAMAGE,
    add_external_set,
    as_read,
    damage_external,
    damage_run,
    point_predictions_at,
    unreadable_paths,
)
from conftest import write_dataset

import ui
from core import runs

RUN_PAGES = [script for script, _ in ui.PAGES if not script.endswith("0_Data.py")]
PICKER_KEYS = {"views/1_Train.py": "train_monitor_run"}  # the others use ui.run_picker's key "run"


ODD_PATHS_RUN = "damaged-external-paths"  # its external predictions name a FIFO, a device, a folder, a missing file


@pytest.fixture(scope="module")
def damaged_runs(finished_run: Path, tmp_path_factory) -> Path:
    """Every run holds a real external evaluation `site`; each damaged run has one damaged file."""
    work = tmp_path_factory.mktemp("damaged")
    base = work / "base"
    shutil.copytree(finished_run, base, ignore=shutil.ignore_patterns("last.pt"))
    add_external_set(base, write_dataset(work / "site", {"NORMAL": 4, "PNEUMONIA": 4}, splits=None, size=64))
    root = work / "runs"
    root.mkdir()
    shutil.copytree(base, root / "good")
    for variants, damage in ((RUN_DAMAGE, damage_run), (EXTERNAL_DAMAGE, damage_external)):
        for variant in variants:
            shutil.copytree(base, root / f"damaged-{variant}")
            damage(root / f"damaged-{variant}", variant)
    shutil.copytree(base, root / ODD_PATHS_RUN)
    point_predictions_at(root / ODD_PATHS_RUN / "external" / "site" / "predictions.csv",
                         list(unreadable_paths(work / "odd")))
    hostile = root / HOSTILE_NAME  # a finished run with that name, and a failed one whose error quotes it
    shutil.copytree(base, hostile)
    shutil.copytree(base, root / "failed-hostile")
    runs.write_status(root / "failed-hostile", state="failed", error=HOSTILE_TEXT)
    study = root / "studies" / HOSTILE_NAME  # one run mapped to two arms: refused, with the reason shown
    study.mkdir(parents=True)
    (study / "study.json").write_text(json.dumps({
        "base": runs.read_config(finished_run), "arms": ["scratch"], "seeds": [0, 1],
        "runs": {"scratch/0": "good", "scratch/1": "good"}, "command": HOSTILE_TEXT}))
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
    ("threshold-nan", "views/3_Thresholds.py", "threshold.json is damaged"),
    ("threshold-nan", "views/5_Predict.py", "threshold.json is damaged"),
    ("test-predictions-values", "views/3_Thresholds.py", "predictions_test.csv"),
    ("checkpoint-garbage", "views/5_Predict.py", "best.safetensors"),
    ("checkpoint-metadata", "views/5_Predict.py", "best.safetensors"),
    ("checkpoint-missing", "views/5_Predict.py", "best.safetensors"),
])
def test_a_damaged_file_is_named_on_the_page(env, variant, page_script, words):
    at = page(page_script).run()
    at.selectbox(key="run").select(f"damaged-{variant}").run()
    assert not at.exception
    # A damaged threshold or validation set stops the page (an error); another set is left out (a warning).
    assert words in " ".join(as_read(e.value) for e in [*at.error, *at.warning]), [e.value for e in at.error]


def _markdown_texts(at) -> list[str]:
    """The source of every element that renders Markdown, image captions included."""
    texts = [str(e.value) for kind in ("error", "warning", "info", "success", "markdown", "caption", "subheader")
             for e in getattr(at, kind)]
    texts += [caption for image in at.image for caption in image.captions]
    return texts


def assert_shown_as_text(at, hostile: str) -> None:
    """`hostile` reaches the page only escaped: what a reader sees is the literal text, and no link, image or
    tag of it is rendered."""
    texts = _markdown_texts(at)
    assert not [t for t in texts if hostile in t], "raw file text reached Markdown"
    assert any(hostile in as_read(t) for t in texts), "the text is not shown at all"
    for chart in at.get("plotly_chart"):
        assert "<b>" not in chart.proto.spec


def test_plain_escapes_markdown_and_html_so_the_text_reads_as_written():
    for text in (HOSTILE_TEXT, HOSTILE_NAME, "a_b*c* `code` # h\n1. x | y ~z~ &amp; :smile: \\ end"):
        escaped = ui.plain(text)
        assert as_read(escaped) == text
        assert not any(c in escaped.replace("\\" + c, "") for c in "[]()<>!*_`$&:")


@pytest.mark.parametrize("script", ["views/3_Thresholds.py", "views/4_Mistakes.py"])
def test_a_run_name_with_markdown_and_html_is_shown_as_text(env, script):
    at = page(script).run()
    at.selectbox(key="run").select(HOSTILE_NAME).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert not [t for t in _markdown_texts(at) if "<b>bold<b>" in t or "[link](x)" in t]
    for chart in at.get("plotly_chart"):
        assert "<b>bold" not in chart.proto.spec


def test_compare_shows_a_hostile_error_and_a_refused_study_as_text(env):
    at = page("views/2_Compare.py").run()
    at.multiselect(key="compare_runs").set_value([HOSTILE_NAME, "failed-hostile"]).run()
    assert not at.exception, at.exception
    error = next(e.value for e in at.error if "failed" in e.value)
    assert HOSTILE_NAME not in error and HOSTILE_TEXT in as_read(error) and "failed-hostile" in as_read(error)
    for chart in at.get("plotly_chart"):
        assert "<b>bold" not in chart.proto.spec
    at.selectbox(key="study_pick").select(HOSTILE_NAME).run()
    assert not at.exception, at.exception
    refused = next(e.value for e in at.error if "cannot be read" in e.value)
    assert "mapped to scratch/0 and scratch/1" in as_read(refused) and HOSTILE_NAME not in refused


@pytest.mark.parametrize("variant", list(EXTERNAL_DAMAGE) + ["paths"])
def test_a_damaged_external_set_leaves_the_other_sets_usable(env, variant):
    name = ODD_PATHS_RUN if variant == "paths" else f"damaged-{variant}"
    at = page("views/3_Thresholds.py").run()
    at.selectbox(key="run").select(name).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    assert {"validation", "test"} <= set(table.columns)
    if variant == "external-probabilities":
        warning = next(w.value for w in at.warning if "left out" in w.value)
        assert "external/site/predictions.csv" in as_read(warning) and "between 0 and 1" in as_read(warning)
        assert "external: site" not in table.columns
    else:
        assert "external: site" in table.columns


@pytest.mark.parametrize("variant", list(EXTERNAL_DAMAGE) + ["paths"])
def test_mistakes_of_a_damaged_external_set_open_without_blocking(env, variant):
    name = ODD_PATHS_RUN if variant == "paths" else f"damaged-{variant}"
    at = page("views/4_Mistakes.py")
    at.default_timeout = 60  # a FIFO opened for reading would block until then
    at.run()
    at.selectbox(key="run").select(name).run()
    at.selectbox(key="mistakes_set").select("external:site").run()
    assert not at.exception, at.exception
    texts = " ".join(as_read(t) for t in _markdown_texts(at))
    if variant == "external-probabilities":
        assert "predictions.csv" in " ".join(as_read(w.value) for w in at.warning)
        at.selectbox(key="mistakes_set").select("test").run()  # the run's other sets still open
        assert not at.exception and not at.warning
    elif variant == "paths":
        assert texts.count("file missing or unreadable") >= 4, texts
        assert any("Not a file" in as_read(e.value) for e in at.error)  # Grad-CAM of the first: the FIFO
    elif variant == "external-hostile-names":
        assert_shown_as_text(at, HOSTILE_TEXT)
