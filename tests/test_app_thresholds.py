"""Thresholds page (AppTest): renders with and without runs; rules fitted on validation, intervals beside
every figure, validation and test curves overlaid, the shift warning, calibration, subgroups, and saving
the operating threshold that every other view then uses."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from bad_inputs import as_read
from conftest import evaluate_training_copies, rank_at_chance, rank_well
from streamlit.testing.v1 import AppTest

from core import runs
from core.bootstrap import format_interval
from core.metrics import metrics_at_threshold
from core.operating import load_set, run_summary, set_summary
from core.subgroups import NO_METADATA, prepare_subgroups, set_groups, subgroup_table

PAGE = str(Path(__file__).resolve().parents[1] / "views" / "3_Thresholds.py")
TIMEOUT = 120  # the first run in a process imports torch


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def chart(at: AppTest, title_start: str) -> dict:
    return next(f for f in charts(at) if f["layout"]["title"]["text"].startswith(title_start))


def operating_view(at: AppTest) -> dict:
    """What the live view (curves, operating points, confusion matrices) was given to draw."""
    return json.loads(at.get("bidi_component")[0].proto.json)


def curve_names(at: AppTest, chart_name: str) -> list[str]:
    return [c["name"] for c in operating_view(at)[chart_name]["curves"]]


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def rates(at: AppTest) -> pd.DataFrame:
    return at.dataframe[0].value


def confusion(at: AppTest, set_label: str) -> list[list[int]]:
    return next(m["counts"] for m in operating_view(at)["matrices"] if m["title"].startswith(f"{set_label} (n="))


@pytest.fixture
def page(run_copy) -> AppTest:  # noqa: F811
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def test_no_runs_shows_hint(empty_runs_dir):  # noqa: F811
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert "No finished runs" in at.info[0].value


def test_opens_at_the_operating_threshold_with_intervals(page, run_copy):  # noqa: F811
    operating = runs.operating_point(run_copy)
    assert metric(page, "Threshold on this page") == f"{operating.threshold:.3f}"
    assert any(operating.describe() in as_read(i.value) for i in page.info)
    table = rates(page)
    assert list(table.columns) == ["validation", "test"]
    expected = run_summary(run_copy)["sets"]
    for key, label in (("auc", "AUC"), ("specificity", "Specificity"), ("npv", "NPV")):
        for name, column in (("val", "validation"), ("test", "test")):
            assert table.loc[label, column] == format_interval(expected[name]["metrics"][key])
    assert "[" in table.loc["Sensitivity (recall)", "test"]  # an interval beside the figure
    val = runs.read_predictions(run_copy, "val")
    m = metrics_at_threshold(val["label"].to_numpy(), val["prob"].to_numpy(), operating.threshold)
    assert confusion(page, "validation") == [[m["tn"], m["fp"]], [m["fn"], m["tp"]]]


def test_validation_and_test_curves_overlaid(page):
    names = curve_names(page, "roc")
    assert any(n.startswith("validation (AUC ") for n in names) and any(n.startswith("test (AUC ") for n in names)
    assert any(n.startswith("test (PR-AUC ") for n in curve_names(page, "pr"))
    markers = {m["name"] for m in operating_view(page)["markers"]}
    threshold = metric(page, "Threshold on this page")
    assert markers == {f"validation at {threshold}", f"test at {threshold}"}


def test_recall_rule_is_fitted_on_validation(page, run_copy):  # noqa: F811
    page.radio(key="thr_mode").set_value("recall").run()
    page.number_input(key="thr_x_recall").set_value(0.95).run()
    assert not page.exception
    threshold = page.slider(key="thr_slider").value
    val = runs.read_predictions(run_copy, "val")
    m = metrics_at_threshold(val["label"].to_numpy(), val["prob"].to_numpy(), threshold)
    assert m["sensitivity"] >= 0.95
    assert rates(page).loc["Sensitivity (recall)", "validation"].startswith(f"{m['sensitivity']:.3f} [")


@pytest.mark.parametrize("rule", ["cost", "ppv", "npv", "best_f1", "youden", "specificity"])
def test_every_rule_renders(page, rule):
    page.radio(key="thr_mode").set_value(rule).run()
    assert not page.exception, page.exception
    assert 0 <= page.slider(key="thr_slider").value <= 1


def test_fitting_on_test_warns(page):
    page.radio(key="thr_split").set_value("test").run()
    assert not page.exception
    assert any("fitting the threshold on **test**" in w.value for w in page.warning)


def test_shift_warning_when_test_is_outside_validation_intervals(run_copy):  # noqa: F811
    # Make validation perfectly separated: test's AUC then lies outside validation's interval.
    val = pd.read_csv(run_copy / "predictions_val.csv")
    val["prob"] = val["label"] * 0.8 + 0.1
    val.to_csv(run_copy / "predictions_val.csv", index=False)
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception
    [shift] = [as_read(w.value) for w in at.warning if "Validation does not represent test" in w.value]
    # The run's folder has no test split: test is carved like validation, and the warning says so (not Kermany's).
    assert "both carved by patient from the same images" in shift and "Kermany" not in shift


def test_calibration_before_and_after(page):
    reliability = chart(page, "Reliability diagram")
    names = [t.get("name", "") for t in reliability["data"]]
    assert any("before scaling (ECE" in n for n in names) and any("after scaling (ECE" in n for n in names)
    assert "10 equal-width bins" in reliability["layout"]["title"]["text"]
    table = next(d.value for d in page.dataframe if "ECE before" in d.value.index)
    assert set(table.columns) == {"validation", "test"}
    briers = table.loc[["Brier before", "Brier after"]].to_numpy().ravel()
    assert all(re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", cell) for cell in briers)
    assert all(re.fullmatch(r"\d\.\d{3}", cell) for cell in table.loc[["ECE before", "ECE after"]].to_numpy().ravel())
    assert any("Temperature" in c.value for c in page.caption)


def subgroups_shown(at: AppTest) -> pd.DataFrame:
    return next(d.value for d in at.dataframe if "grouping" in d.value.columns)


def test_kermany_subgroups_with_intervals(page):
    table = subgroups_shown(page)
    assert {"pneumonia subtype", "normal series"} <= set(table["grouping"])
    assert set(table.loc[table["grouping"] == "pneumonia subtype", "group"]) == {"bacterial", "viral"}
    assert any(as_read(c.value) == NO_METADATA for c in page.caption)  # predictions without metadata say so


def add_metadata(run_dir: Path) -> pd.DataFrame:
    """Image metadata as the dataset writes it into the predictions files; the test set's table."""
    for name in ("val", "test"):
        path = runs.predictions_path(run_dir, name)
        table = pd.read_csv(path)
        rows = range(len(table))
        table["age"] = [(2, 9, 30, 52, 77, "")[i % 6] for i in rows]
        table["sex"] = [("F", "M", "")[i % 3] for i in rows]
        table["view"] = [("PA", "AP")[i % 2] for i in rows]
        table.to_csv(path, index=False)
    return table


def test_metadata_subgroups_with_intervals_at_the_pages_threshold(run_copy):  # noqa: F811
    add_metadata(run_copy)
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    shown = subgroups_shown(at)
    assert {"age band", "sex", "view position"} <= set(shown["grouping"])
    rows = shown.set_index(["grouping", "group"])
    assert [g for k, g in rows.index if k == "age band"] == ["0-4", "5-17", "18-39", "40-64", "65+", "unknown"]
    assert [g for k, g in rows.index if k == "sex"] == ["F", "M", "unknown"]
    assert not any(as_read(c.value) == NO_METADATA for c in at.caption)
    pset = load_set(run_copy, "test")
    threshold = runs.operating_point(run_copy).threshold
    expected = subgroup_table(prepare_subgroups(pset.labels, pset.probs, pset.patients, set_groups(pset.frame)),
                              threshold).set_index(["grouping", "group"])
    for key in (("age band", "65+"), ("sex", "F"), ("view position", "AP")):
        assert rows.loc[key, "images"] == expected.loc[key, "images"] >= 5
        for metric_key in ("sensitivity", "specificity", "auc"):
            assert rows.loc[key, metric_key] == format_interval(expected.loc[key, metric_key]), (key, metric_key)
        assert "[" in rows.loc[key, "specificity"] or "[" in rows.loc[key, "sensitivity"]  # with its interval
    # A threshold moved on the page moves the groups' rates with it.
    at.slider(key="thr_slider").set_value(0.999).run()
    moved = subgroups_shown(at).set_index(["grouping", "group"])
    assert moved.loc[("view position", "AP"), "sensitivity"].startswith("0.000")


def test_save_updates_the_operating_point(page, run_copy):  # noqa: F811
    rank_well(run_copy, "val")  # a threshold is only saved from a set the model ranks better than chance
    page.run()
    page.radio(key="thr_mode").set_value("specificity").run()
    chosen = page.slider(key="thr_slider").value
    page.button[0].click().run()
    assert not page.exception
    saved = json.loads((run_copy / "threshold.json").read_text())
    assert saved["threshold"] == pytest.approx(chosen)
    assert saved["chosen_on"] == "val" and saved["rule"] == "specificity" and saved["value"] == 0.9
    op = runs.operating_point(run_copy)
    assert op.source == "saved" and op.threshold == pytest.approx(chosen)
    assert "specificity ≥ 0.900 on validation" in op.describe()
    assert metric(page, "Operating threshold") == f"{chosen:.3f}"
    # Everyone reads the same numbers at it.
    test = set_summary(load_set(run_copy, "test"), op.threshold)
    assert rates(page).loc["Specificity", "test"] == format_interval(test["metrics"]["specificity"])


def test_damaged_threshold_file_is_an_error_not_an_exception(run_copy):  # noqa: F811
    (run_copy / "threshold.json").write_text('{"threshold": NaN}')
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert "threshold.json is damaged" in as_read(at.error[0].value)


def test_external_set_is_selectable(run_copy):  # noqa: F811
    ext = run_copy / "external" / "demo"
    ext.mkdir(parents=True)
    shutil.copy(run_copy / "predictions_test.csv", ext / "predictions.csv")
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert "external: demo" in rates(at).columns
    at.multiselect(key="thr_curves").select("external:demo").run()
    assert not at.exception
    assert any(n.startswith("external: demo (AUC") for n in curve_names(at, "roc"))


def test_choice_survives_switching_pages(run_copy):  # noqa: F811
    app = Path(PAGE).parents[1] / "dashboard.py"
    at = AppTest.from_file(str(app), default_timeout=TIMEOUT).run()
    at.switch_page("views/3_Thresholds.py").run()
    at.radio(key="thr_mode").set_value("recall").run()
    at.number_input(key="thr_x_recall").set_value(0.99).run()
    chosen = at.slider(key="thr_slider").value
    at.switch_page("views/4_Mistakes.py").run()
    assert not at.exception
    at.switch_page("views/3_Thresholds.py").run()
    assert at.radio(key="thr_mode").value == "recall" and at.number_input(key="thr_x_recall").value == 0.99
    assert at.slider(key="thr_slider").value == chosen


def test_a_damaged_external_set_is_left_out_not_the_page(run_copy):  # noqa: F811
    ext = run_copy / "external" / "broken"
    ext.mkdir(parents=True)
    (ext / "predictions.csv").write_text("path,label,prob\n/x.png,1,abc\n")
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert not at.error  # validation and test are fine: the broken set is a warning, the page goes on
    assert any("external: broken left out" in as_read(w.value) for w in at.warning)
    assert list(rates(at).columns) == ["validation", "test"]


def test_a_groups_csv_with_conflicting_rows_is_refused_and_identical_ones_are_noted(page, run_copy, tmp_path):
    test = runs.read_predictions(run_copy, "test")
    first, second = test["path"].iloc[0], test["path"].iloc[1]
    csv = tmp_path / "groups.csv"
    csv.write_text(f"path,site\n{first},A\n{first},B\n{second},A\n")
    page.text_input(key="thr_groups_csv").input(str(csv)).run()
    assert not page.exception
    refused = " ".join(as_read(e.value) for e in page.error)
    assert "more than once with different groups" in refused and first in refused

    hostile = "<b>x</b> [link](http://x)"
    csv.write_text(f"path,site\n{first},A\n{first},A\n{second},\"{hostile}\"\n")
    page.text_input(key="thr_groups_csv").input(str(csv)).run()
    assert not page.exception and not page.error
    assert any("1 repeated row (same path, same groups) counted once" in as_read(i.value) for i in page.info)
    table = subgroups_shown(page)
    assert set(table.loc[table["grouping"] == "site", "group"]) == {"A", hostile}  # a table cell: shown as text


def test_a_set_ranked_no_better_than_chance_says_so_first_and_cannot_give_the_threshold(page, run_copy):  # noqa: F811
    rank_well(run_copy, "val")
    rank_at_chance(run_copy)
    auc = run_summary(run_copy)["sets"]["test"]["metrics"]["auc"]
    assert auc["low"] <= 0.5 <= auc["high"]
    page.run()
    said = [as_read(w.value) for w in page.warning]
    assert said[0].startswith("The model does not rank test's images better than chance")
    assert "No threshold can fix that" in said[0]
    page.radio(key="thr_split").set_value("test").run()
    assert not page.exception
    assert any("is meaningless" in as_read(w.value) for w in page.warning)
    assert page.button[0].disabled  # Save


def test_sets_split_by_the_models_own_verdict_and_read_on_images_like_the_training_data(page, run_copy):  # noqa: F811
    test = pd.read_csv(run_copy / "predictions_test.csv")
    test["ood_flag"] = [i % 3 == 0 for i in range(len(test))]  # a third flagged, patients in both parts
    test.to_csv(run_copy / "predictions_test.csv", index=False)
    page.run()
    assert not page.exception, page.exception
    like = int((~test["ood_flag"]).sum())
    parts = [d.value for d in page.dataframe if any("like the training data" in str(c) for c in d.value.columns)]
    assert parts and list(parts[0].columns) == [f"like the training data ({like} images)",
                                                f"unlike it ({len(test) - like} images)"]
    assert rates(page).loc["Images", "test"].startswith(f"{len(test)} images")
    page.toggle(key="thr_ood_only").set_value(True).run()
    assert not page.exception, page.exception
    filtered = "test (like the training data only)"  # the column says it is part of the set
    assert list(rates(page).columns) == ["validation", filtered]
    assert rates(page).loc["Images", filtered].startswith(f"{like} images")
    kept = test[~test["ood_flag"]]
    threshold = runs.operating_point(run_copy).threshold
    expected = metrics_at_threshold(kept["label"].to_numpy(), kept["prob"].to_numpy(), threshold)
    assert rates(page).loc["Sensitivity (recall)", filtered].startswith(f"{expected['sensitivity']:.3f}")


def test_a_threshold_step_moves_the_operating_points_and_keeps_the_curves(page, run_copy):  # noqa: F811
    before = operating_view(page)
    page.radio(key="thr_mode").set_value("slider").run()
    page.slider(key="thr_slider").set_value(0.2).run()
    after = operating_view(page)
    assert after["curves_key"] == before["curves_key"] and after["roc"] == before["roc"]
    assert {m["name"] for m in after["markers"]} == {"validation at 0.200", "test at 0.200"}
    val = runs.read_predictions(run_copy, "val")
    m = metrics_at_threshold(val["label"].to_numpy(), val["prob"].to_numpy(), 0.2)
    marker = next(k for k in after["markers"] if k["name"].startswith("validation"))
    assert marker["tpr"] == pytest.approx(m["sensitivity"]) and marker["fpr"] == pytest.approx(1 - m["specificity"])
    assert confusion(page, "validation") == [[m["tn"], m["fp"]], [m["fn"], m["tp"]]]


def test_reading_on_images_like_the_training_data_leaves_validations_curves_whole(page, run_copy):  # noqa: F811
    for split in ("val", "test"):
        frame = pd.read_csv(run_copy / f"predictions_{split}.csv")
        frame["ood_flag"] = [i % 3 == 0 for i in range(len(frame))]
        frame.to_csv(run_copy / f"predictions_{split}.csv", index=False)
    page.run()
    before = {c["label"]: c["name"] for c in operating_view(page)["roc"]["curves"]}
    page.toggle(key="thr_ood_only").set_value(True).run()
    assert not page.exception, page.exception
    after = {c["label"]: c["name"] for c in operating_view(page)["roc"]["curves"]}
    assert after["validation"] == before["validation"]  # the threshold is fitted on all of validation
    assert after["test"] != before["test"]  # test is read on its images like the training data


def test_an_external_set_of_the_runs_own_images_is_never_called_external(run_copy, tmp_path):  # noqa: F811
    name = evaluate_training_copies(run_copy, tmp_path / "copies")
    # Validation separated perfectly and the set at chance: its shift warning must appear, and say where it is from.
    rank_well(run_copy, "val")
    val = pd.read_csv(run_copy / "predictions_val.csv")
    val["prob"] = val["label"] * 0.8 + 0.1
    val.to_csv(run_copy / "predictions_val.csv", index=False)
    evaluated = runs.predictions_path(run_copy, name)
    frame = pd.read_csv(evaluated, keep_default_na=False)
    frame["prob"] = np.linspace(0.2, 0.8, len(frame))[np.argsort(frame["label"].to_numpy(), kind="stable")]
    frame.to_csv(evaluated, index=False)
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception
    label = runs.set_label(name)
    [said] = [as_read(w.value) for w in at.warning if as_read(w.value).startswith(label)]
    assert said == (f"{label} is not independent of the run: 6 of 6 files are identical to its training or validation "
                    "images. Its numbers below are not external validation.")
    [shift] = [as_read(w.value) for w in at.warning if f"Validation does not represent {label}." in as_read(w.value)]
    assert "This folder is not independent of the run: 6 of 6 files are identical" in shift
    assert not any("comes from elsewhere" in as_read(w.value) for w in at.warning)


def test_a_threshold_set_by_hand_is_not_said_to_be_fitted(page):
    page.slider(key="thr_slider").set_value(0.123).run()
    assert not page.exception
    [heading] = [h.value for h in page.subheader if h.value.startswith("Metrics at threshold")]
    assert as_read(heading) == "Metrics at threshold 0.123 (set by hand)"
    page.radio(key="thr_mode").set_value("recall").run()
    [heading] = [h.value for h in page.subheader if h.value.startswith("Metrics at threshold")]
    assert as_read(heading).endswith(", fitted on validation)")
