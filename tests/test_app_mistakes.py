"""Mistakes page (AppTest): renders with and without runs; FN/FP sorted by confidence, filters, every
prediction set of the run (external ones included), the operating threshold by default and an explicit
preview of another, a damaged threshold.json, missing files, and a Grad-CAM that always names its image."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from bad_inputs import as_read
from conftest import evaluate_training_copies
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1.element_tree import Caption, Image

from core import runs
from core.metrics import mistakes

PAGE = str(Path(__file__).resolve().parents[1] / "views" / "4_Mistakes.py")
TIMEOUT = 120
CAM_CAPTION = re.compile(r"^(?P<file>[^ ]+) · true (?P<true>\w+) · P\(PNEUMONIA\) (?P<prob>[0-9.]+) · "
                         r"(?P<kind>false \w+) — "
                         r"Grad-CAM, (?P<rows>\d+)×(?P<cols>\d+) map from backbone\.[\w.]+: ")


def gallery_captions(at: AppTest) -> list[str]:
    return [as_read(c) for img in at.image for c in img.captions if as_read(c).startswith("false ")]


def cam_caption(at: AppTest) -> re.Match:
    captions = [as_read(c) for img in at.image for c in img.captions if "Grad-CAM" in as_read(c)]
    assert len(captions) == 1, captions
    match = CAM_CAPTION.match(captions[0])
    assert match, captions[0]
    return match


def assert_cam_names_the_chosen_image(at: AppTest, predictions: pd.DataFrame) -> str:
    """The caption over the map describes the image the picker holds (file, true class, probability, kind),
    and the original beside it is that file too. Returns the chosen path."""
    chosen = at.selectbox(key="mistakes_cam").value
    row = predictions[predictions["path"] == chosen].iloc[0]
    match = cam_caption(at)
    assert match["file"] == Path(chosen).name
    assert match["true"] == row["class_name"] and match["prob"] == f"{row['prob']:.3f}"
    assert match["kind"] == ("false negative" if row["label"] == 1 else "false positive")
    assert f"Original: {Path(chosen).name}" in [as_read(c) for img in at.image for c in img.captions]
    return chosen


def test_no_runs_shows_hint(empty_runs_dir):  # noqa: F811
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert "No finished runs" in at.info[0].value


def test_lists_mistakes_most_confident_first(run_copy):  # noqa: F811
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    operating = runs.operating_point(run_copy)
    expected = mistakes(runs.read_predictions(run_copy, "test"), operating.threshold)
    assert len(expected) > 0, "the tiny fixture model should make mistakes on test"
    assert at.selectbox(key="mistakes_set").value == "test"
    table = at.dataframe[0].value
    assert list(table["path"]) == list(expected["path"])
    assert set(table["kind"]) <= {"false negative", "false positive"}
    assert list(table["confidence"]) == sorted(table["confidence"], reverse=True)
    captions = gallery_captions(at)
    assert len(captions) == min(24, len(expected))
    first = expected.iloc[0]
    assert captions[0].startswith(f"{first['kind']} · true {first['class_name']} · P(PNEUMONIA) {first['prob']:.3f}")
    assert first["patient"] in captions[0]
    # Grad-CAM opens on the most confident mistake, at the 64 px fixture's 8×8 map, in viridis by default.
    match = cam_caption(at)
    assert match["file"] == Path(first["path"]).name and (match["rows"], match["cols"]) == ("8", "8")
    assert at.selectbox(key="mistakes_colour_map").value == "viridis"
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


def threshold_with_both_kinds(predictions: pd.DataFrame) -> float:
    """A threshold at which the run makes false negatives and false positives (several of each)."""
    for threshold in np.quantile(predictions["prob"], np.linspace(0.2, 0.8, 13)):
        wrong = mistakes(predictions, float(threshold))
        if min((wrong["kind"] == k).sum() for k in ("false negative", "false positive")) >= 2:
            return float(threshold)
    pytest.fail("the fixture run makes no threshold with both kinds of mistake")


def test_grad_cam_names_its_own_image_after_the_filter_changes(run_copy):  # noqa: F811
    """Regression: the picker kept a position, so after a filter change one image's name, label and
    probability sat over another image's map."""
    predictions = runs.read_predictions(run_copy, "test")
    threshold = threshold_with_both_kinds(predictions)
    runs.save_threshold(run_copy, threshold, chosen_on="val", target="manual")
    wrong = mistakes(predictions, threshold)
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    assert_cam_names_the_chosen_image(at, predictions)

    # A false positive that is not first in the list, then only false negatives: it is not among them.
    positive_rows = wrong.index[wrong["kind"] == "false positive"]
    picked = wrong.at[positive_rows[1], "path"]
    at.selectbox(key="mistakes_cam").set_value(picked).run()
    assert assert_cam_names_the_chosen_image(at, predictions) == picked
    at.radio(key="mistakes_kind").set_value("false negative").run()
    assert not at.exception, at.exception
    shown = assert_cam_names_the_chosen_image(at, predictions)
    assert shown == wrong[wrong["kind"] == "false negative"].iloc[0]["path"]

    # Back to the false positives: it opens on the first one; picking the second, then showing both kinds,
    # keeps that image (its position in the list changes, its caption does not).
    at.radio(key="mistakes_kind").set_value("false positive").run()
    assert assert_cam_names_the_chosen_image(at, predictions) == wrong.at[positive_rows[0], "path"]
    at.selectbox(key="mistakes_cam").set_value(picked).run()
    at.radio(key="mistakes_kind").set_value("both").run()
    assert not at.exception, at.exception
    assert assert_cam_names_the_chosen_image(at, predictions) == picked


def test_external_sets_are_offered(run_copy):  # noqa: F811
    external = run_copy / runs.EXTERNAL_DIR / "demo"
    external.mkdir(parents=True)
    predictions = runs.read_predictions(run_copy, "test")
    predictions.iloc[: len(predictions) // 2].to_csv(external / "predictions.csv", index=False)
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    picker = at.selectbox(key="mistakes_set")
    assert picker.options == ["validation", "test", "external: demo"] and picker.value == "test"
    picker.set_value("external:demo").run()
    assert not at.exception, at.exception
    expected = mistakes(runs.read_predictions(run_copy, "external:demo"), runs.operating_threshold(run_copy))
    assert list(at.dataframe[0].value["path"]) == list(expected["path"])
    assert any(f"among {len(predictions) // 2} external: demo images" in as_read(c.value) for c in at.caption)
    assert_cam_names_the_chosen_image(at, predictions)


def test_operating_threshold_by_default_and_an_explicit_preview(run_copy):  # noqa: F811
    runs.save_threshold(run_copy, 0.42, chosen_on="val", target="recall ≥ 0.950", rule="recall", value=0.95)
    operating = runs.operating_point(run_copy)
    predictions = runs.read_predictions(run_copy, "test")
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT)
    at.session_state["threshold"] = 0.999  # the Thresholds page's old hand-over is no longer read
    at.session_state["threshold_run"] = str(run_copy)
    at.run()
    assert not at.exception, at.exception
    assert at.metric[0].value == "0.420" and not at.warning
    assert any(operating.describe() in as_read(c.value) for c in at.caption)
    assert list(at.dataframe[0].value["path"]) == list(mistakes(predictions, 0.42)["path"])

    at.toggle(key="mistakes_preview").set_value(True).run()
    at.slider(key="mistakes_preview_threshold").set_value(0.999).run()
    assert not at.exception, at.exception
    preview = next(i.value for i in at.info if i.value.startswith("Previewing"))
    assert "the mistakes it would make" in preview and "Nothing is saved" in preview
    assert "operating threshold stays" in preview and operating.describe() in as_read(preview)
    assert list(at.dataframe[0].value["path"]) == list(mistakes(predictions, 0.999)["path"])

    at.toggle(key="mistakes_preview").set_value(False).run()
    assert not any(i.value.startswith("Previewing") for i in at.info) and at.metric[0].value == "0.420"
    assert list(at.dataframe[0].value["path"]) == list(mistakes(predictions, 0.42)["path"])


def test_damaged_threshold_file_is_an_error_not_a_traceback(run_copy):  # noqa: F811
    (run_copy / "threshold.json").write_text("{not json")
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    assert "threshold.json is damaged" in as_read(at.error[0].value)
    assert not at.dataframe and not at.image


def test_missing_image_file_is_reported_not_raised(run_copy):  # noqa: F811
    csv = run_copy / "predictions_test.csv"
    df = runs.read_predictions(run_copy, "test")
    # The most confident mistake of all, and the one Grad-CAM opens first: a positive scored 0.
    df.loc[0, ["path", "label", "prob"]] = [str(run_copy / "gone" / "missing.jpeg"), 1, 0.0]
    df.to_csv(csv, index=False)
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    assert any(as_read(c.value).startswith("file missing or unreadable: missing.jpeg") for c in at.caption)
    assert any("missing.jpeg" in as_read(e.value) for e in at.error)


def test_missing_file_keeps_its_place_in_the_gallery(run_copy):  # noqa: F811
    """A missing file in the middle of a gallery column is said where its image would be, between the
    images before and after it."""
    csv = run_copy / "predictions_test.csv"
    df = runs.read_predictions(run_copy, "test")
    expected = mistakes(df, runs.operating_threshold(run_copy))
    assert len(expected) >= 9, "the fixture should make enough mistakes for two gallery rows and a third"
    gone = expected.at[4, "path"]  # the first column's second image
    df.loc[df["path"] == gone, "path"] = str(run_copy / "gone" / "missing.jpeg")
    df.to_csv(csv, index=False)
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    first_column = next(column for column in at.columns
                        if any(isinstance(node, Image) and as_read(node.captions[0]).startswith("false ")
                               for node in column))
    shown = []
    for node in first_column:
        if isinstance(node, Image):
            shown += [as_read(c) for c in node.captions]
        elif isinstance(node, Caption):
            shown.append(as_read(node.value))
    # Images 0, 4, 8, ... of the page, top to bottom; the missing one's name, then its caption, in its place.
    rows = expected.iloc[0:min(24, len(expected)):4]
    captions = [f"{r.kind} · true {r.class_name} · P(PNEUMONIA) {r.prob:.3f}" for r in rows.itertuples()]
    wanted = captions[:1] + ["file missing or unreadable: missing.jpeg"] + captions[1:]
    assert len(shown) == len(wanted) and all(text.startswith(w) for text, w in zip(shown, wanted)), shown


def test_colour_map_and_opacity_controls(run_copy):  # noqa: F811
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    viridis_url = at.image[-1].value[0]
    assert "JET (rainbow, not colour-blind safe)" in at.selectbox(key="mistakes_colour_map").options
    at.selectbox(key="mistakes_colour_map").set_value("jet").run()
    jet_url = at.image[-1].value[0]
    at.slider(key="mistakes_alpha").set_value(0.8).run()
    assert not at.exception, at.exception
    # Media URLs name the content: each change redraws the overlay, of the same image.
    assert len({viridis_url, jet_url, at.image[-1].value[0]}) == 3
    cam_caption(at)


def test_grad_cam_explains_a_checkpoint_written_since(run_copy):  # noqa: F811
    """Maps are cached per image; a run whose best.safetensors is rewritten (trained on in place) is explained by
    its new weights, not by the map cached for the old ones."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    before, image = at.image[-1].value[0], cam_caption(at)["file"]
    path = run_copy / "best.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(0)
    for tensor in tensors.values():
        if tensor.is_floating_point() and tensor.ndim > 1:
            tensor.add_(torch.randn(tensor.shape, generator=generator) * tensor.std())
    save_file(tensors, str(path), metadata=metadata)
    at.run()
    assert not at.exception, at.exception
    assert cam_caption(at)["file"] == image and at.image[-1].value[0] != before


def test_mistakes_of_images_like_or_unlike_the_training_data(run_copy):  # noqa: F811
    test = pd.read_csv(run_copy / "predictions_test.csv")
    test["ood_flag"] = [i % 2 == 0 for i in range(len(test))]
    test.to_csv(run_copy / "predictions_test.csv", index=False)
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    threshold = runs.operating_point(run_copy).threshold
    every = mistakes(test, threshold)
    assert len(at.dataframe[0].value) == len(every)
    at.radio(key="mistakes_ood").set_value("unlike").run()
    assert not at.exception, at.exception
    flagged = mistakes(test[test["ood_flag"]].reset_index(drop=True), threshold)
    listed = at.dataframe[0].value
    assert list(listed["path"]) == list(flagged["path"]) and listed["unlike_training"].all()
    assert all(c.endswith("unlike the training data") for c in gallery_captions(at))
    at.radio(key="mistakes_ood").set_value("like").run()
    assert not at.dataframe[0].value["unlike_training"].any()


def test_an_external_set_of_the_runs_own_images_says_so(run_copy, tmp_path):  # noqa: F811
    name = evaluate_training_copies(run_copy, tmp_path / "copies")
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not any("not independent" in w.value for w in at.warning)  # test, the run's own split
    at.selectbox(key="mistakes_set").set_value(name).run()
    assert not at.exception, at.exception
    assert any(as_read(w.value).startswith(f"{runs.set_label(name)} is not independent of the run: 6 of 6 files")
               for w in at.warning)
