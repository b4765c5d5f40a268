"""Mistakes page (AppTest): renders with and without runs; FN/FP sorted by confidence, filters, the
threshold handed over by the Thresholds page, missing files and Grad-CAM."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import runs
from core.metrics import mistakes

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "4_Mistakes.py")
TIMEOUT = 120


def gallery_captions(at: AppTest) -> list[str]:
    return [c for img in at.image for c in img.captions if c.startswith("false ")]


def test_no_runs_shows_hint(empty_runs_dir):  # noqa: F811
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert "No finished runs" in at.info[0].value


def test_lists_mistakes_most_confident_first(run_copy):  # noqa: F811
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    threshold = runs.operating_threshold(run_copy)
    expected = mistakes(runs.read_predictions(run_copy, "test"), threshold)
    assert len(expected) > 0, "the tiny fixture model should make mistakes on test"
    table = at.dataframe[0].value
    assert list(table["path"]) == list(expected["path"])
    assert set(table["kind"]) <= {"false negative", "false positive"}
    assert list(table["confidence"]) == sorted(table["confidence"], reverse=True)
    captions = gallery_captions(at)
    assert len(captions) == min(24, len(expected))
    first = expected.iloc[0]
    assert captions[0].startswith(f"{first['kind']} · true {first['class_name']} · p={first['prob']:.3f}")
    assert first["patient"] in captions[0]
    assert [c for img in at.image for c in img.captions][-2:] == ["Original", "Grad-CAM: evidence for PNEUMONIA"]
    assert at.download_button[0].label.startswith("Download")


@pytest.mark.parametrize("kind", ["false negative", "false positive"])
def test_filter_by_kind(run_copy, kind):  # noqa: F811
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    at.radio(key="mistakes_kind").set_value(kind).run()
    assert not at.exception
    if at.success:  # no mistake of this kind at this threshold
        return
    assert set(at.dataframe[0].value["kind"]) == {kind}
    assert all(c.startswith(kind) for c in gallery_captions(at))


def test_uses_threshold_from_thresholds_page(run_copy):  # noqa: F811
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT)
    at.session_state["threshold"] = 0.999
    at.session_state["threshold_run"] = str(run_copy)
    at.run()
    assert not at.exception
    assert at.metric[0].value == "0.999"
    expected = mistakes(runs.read_predictions(run_copy, "test"), 0.999)
    assert list(at.dataframe[0].value["path"]) == list(expected["path"])


def test_missing_image_file_is_reported_not_raised(run_copy):  # noqa: F811
    csv = run_copy / "predictions_test.csv"
    df = runs.read_predictions(run_copy, "test")
    # The most confident mistake of all, and the one Grad-CAM opens first: a positive scored 0.
    df.loc[0, ["path", "label", "prob"]] = [str(run_copy / "gone" / "missing.jpeg"), 1, 0.0]
    df.to_csv(csv, index=False)
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    assert any(c.value.startswith("file missing or unreadable: missing.jpeg") for c in at.caption)
    assert any("missing.jpeg" in e.value for e in at.error)
