"""Figure builders: every figure is valid plotly (built here with validation on, which the dashboard
skips for speed) and shows what its title and legend say."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core import figures
from core.bootstrap import PatientBootstrap
from core.calibration import calibration_summary
from core.operating import PredictionSet, curve_data, ranking_only

rng = np.random.default_rng(0)
LABELS = rng.integers(0, 2, 200)
PROBS = np.clip(LABELS * 0.4 + rng.normal(0.3, 0.2, 200), 0, 1)


@pytest.fixture(autouse=True)
def validated(monkeypatch):
    monkeypatch.setattr(figures, "VALIDATE", True)


def _all_figures() -> dict:
    pset = PredictionSet("val", pd.DataFrame({"label": LABELS, "prob": PROBS}), LABELS, PROBS, None, ["N", "P"])
    curves = curve_data(pset, ranking_only(pset, PatientBootstrap(None, len(LABELS))), "#0072B2")
    marker = {"name": "at 0.5", "fpr": 0.2, "tpr": 0.8, "recall": 0.8, "precision": 0.7}
    epochs = pd.DataFrame({"epoch": [1, 2], "train_loss": [0.5, 0.3], "val_loss": [0.6, 0.4],
                           "train_accuracy": [0.7, 0.8], "val_accuracy": [0.7, 0.9], "val_auc": [0.8, 0.9]})
    steps = pd.DataFrame({"global_step": [1, 2], "step": [1, 2], "loss": [0.7, 0.6]})
    cal = calibration_summary(LABELS, PROBS, PROBS)
    return {"roc": lambda: figures.roc_figure({"v": curves["roc"]}, [marker]),
            "pr": lambda: figures.pr_figure({"v": curves["pr"]}, [marker]),
            "confusion": lambda: figures.confusion_figure({"tp": 1, "fp": 2, "fn": 3, "tn": 4}, ["N", "P"], "t"),
            "reliability": lambda: figures.reliability_figure({"v": {**cal, "colour": "#000000"}}),
            "epochs": lambda: figures.epoch_curves_figure({"a": epochs}, "val_auc", "t", "y"),
            "loss": lambda: figures.loss_figure(epochs, steps, 2), "score": lambda: figures.score_figure(epochs),
            "study": lambda: figures.study_seed_figure(
                [{"arm": "frozen", "seed": 0, "auc": 0.95}, {"arm": "frozen", "seed": 1, "auc": 0.96},
                 {"arm": "full", "seed": 0, "auc": 0.97}, {"arm": "full", "seed": 1, "state": "running"}],
                [{"arm": "frozen", "auc": {"mean": 0.955, "low": 0.9, "high": 1.0, "n": 2}},
                 {"arm": "full", "auc": {"mean": 0.97, "low": float("nan"), "high": float("nan"), "n": 1}}])}


@pytest.mark.parametrize("name", list(_all_figures()))
def test_unvalidated_figures_equal_validated_ones(name, monkeypatch):
    """The dashboard builds figures without plotly's validation (for speed); what reaches plotly.js must be
    exactly what validation would have made (e.g. titles as {"text": ...}: plotly.js draws no bare string)."""
    build = _all_figures()[name]
    validated = json.loads(build().to_json())
    monkeypatch.setattr(figures, "VALIDATE", False)
    fast = json.loads(build().to_json())
    assert fast == validated
    assert isinstance(fast["layout"]["title"], dict) and fast["layout"]["title"]["text"]


def test_roc_and_pr_overlay_sets_with_intervals_and_markers():
    pset = PredictionSet("val", pd.DataFrame({"label": LABELS, "prob": PROBS}), LABELS, PROBS, None, ["N", "P"])
    curves = curve_data(pset, ranking_only(pset, PatientBootstrap(None, len(LABELS))), "#0072B2")
    marker = {"name": "val at 0.5", "fpr": 0.2, "tpr": 0.8, "recall": 0.8, "precision": 0.7}
    roc = figures.roc_figure({"validation": curves["roc"], "test": curves["roc"]}, [marker])
    names = [t.name for t in roc.data]
    assert names[0] == "chance" and names[1].startswith("validation (AUC 0.") and "[" in names[1]
    assert names[-1] == "val at 0.5"
    pr = figures.pr_figure({"validation": curves["pr"]}, [marker])
    assert any(t.name.startswith("validation (PR-AUC") for t in pr.data)
    assert pr.data[0].y[0] == pytest.approx(LABELS.mean())  # chance line at the prevalence


def test_reliability_confusion_and_training_figures():
    cal = calibration_summary(LABELS, PROBS, np.clip(PROBS * 1.2, 0, 1))
    fig = figures.reliability_figure({"test": {**cal, "colour": "#D55E00"}})
    assert "10 equal-width bins" in fig.layout.title.text
    assert sum("before scaling" in t.name for t in fig.data) == 1
    assert sum("after scaling" in t.name for t in fig.data) == 1
    cm = figures.confusion_figure({"tp": 5, "fp": 1, "fn": 2, "tn": 7}, ["NORMAL", "PNEUMONIA"], "test")
    assert [list(r) for r in cm.data[0].z] == [[7, 1], [2, 5]]
    epochs = pd.DataFrame({"epoch": [1, 2], "train_loss": [0.5, 0.3], "val_loss": [0.6, 0.4],
                           "train_accuracy": [0.7, 0.8], "val_accuracy": [0.7, 0.9], "val_auc": [0.8, 0.9]})
    steps = pd.DataFrame({"global_step": [1, 2, 3], "step": [1, 2, 3], "loss": [0.7, 0.6, 0.5]})
    assert len(figures.loss_figure(epochs, steps, 3).data) == 3
    score = figures.score_figure(pd.DataFrame())
    assert tuple(score.layout.yaxis.range) == (0, 1.02)  # 0-1 before the first epoch too
    assert len(figures.epoch_curves_figure({"a": epochs, "b": epochs}, "val_auc", "t", "y").data) == 2


def test_the_toolbar_sits_in_the_top_margin_not_over_the_data():
    """Down the right edge the toolbar hid operating points and a confusion matrix's right column: every
    figure puts it across the top margin, with the title left-aligned under it."""
    for name, build in _all_figures().items():
        fig = build()
        assert fig.layout.modebar.orientation == "h", name
        assert fig.layout.margin.t >= figures.TOP_MARGIN, name
        assert fig.layout.title.x == 0 and fig.layout.title.xanchor == "left", name


def test_training_axes_stay_in_their_metrics_range_with_whole_epoch_ticks():
    # Early in training: one epoch record, a few steps, a single point per line.
    one = pd.DataFrame({"epoch": [1], "train_loss": [0.62], "val_loss": [0.58], "train_accuracy": [0.7],
                        "val_accuracy": [0.74], "val_auc": [0.81]})
    steps = pd.DataFrame({"global_step": [1, 2, 3], "step": [1, 2, 3], "loss": [0.7, 0.66, 0.64]})
    loss = figures.loss_figure(one, steps, 3)
    assert loss.layout.yaxis.range[0] == 0 and 0.7 < loss.layout.yaxis.range[1] < 0.8  # never below 0
    score = figures.score_figure(one)
    for fig in (loss, score):
        assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.tick0 == 0  # ticks 0, 1: no "0, 1, 1"
    assert tuple(score.layout.yaxis.range) == (0, 1.02)
    auc = figures.epoch_curves_figure({"a": one}, "val_auc", "t", "AUC", score=True)
    assert tuple(auc.layout.yaxis.range) == (0, 1.02)
    val_loss = figures.epoch_curves_figure({"a": one}, "val_loss", "t", "loss")
    assert val_loss.layout.yaxis.range[0] == 0
    long = pd.DataFrame({"epoch": range(1, 31), "val_auc": np.linspace(0.8, 0.97, 30)})
    assert figures.epoch_curves_figure({"a": long}, "val_auc", "t", "AUC", score=True).layout.xaxis.dtick == 3


def test_the_studys_auc_axis_ends_at_one():
    fig = _all_figures()["study"]()
    low, high = fig.layout.yaxis.range
    assert high == 1.02 and 0 <= low <= 0.9


def test_the_live_view_draws_thinned_curves_and_moves_only_markers_and_counts():
    pset = PredictionSet("val", pd.DataFrame({"label": LABELS, "prob": PROBS}), LABELS, PROBS, None, ["N", "P"])
    c = curve_data(pset, ranking_only(pset, PatientBootstrap(None, len(LABELS))), "#0072B2")
    curves = figures.operating_curves({"a <b>&": c["roc"]}, {"a <b>&": c["pr"]})
    roc = next(k for k in curves["roc"]["curves"] if k["label"] == "a <b>&")
    assert roc["name"].startswith("a <b>& (AUC 0.")  # plain text: the view writes it with textContent
    assert (roc["x"][0], roc["y"][0]) == (0.0, 0.0) and (roc["x"][-1], roc["y"][-1]) == (1.0, 1.0)
    assert len(roc["x"]) == len(roc["y"]) == len(roc["threshold"]) <= len(c["roc"]["fpr"])
    pr_names = [k["name"] for k in curves["pr"]["curves"]]
    assert pr_names[0].startswith("a <b>& chance (prevalence") and pr_names[1].startswith("a <b>& (PR-AUC ")
    assert figures.operating_curves({"a <b>&": c["roc"]}, {"a <b>&": c["pr"]})["curves_key"] == curves["curves_key"]
    assert figures.operating_curves({"b": c["roc"]}, {"b": c["pr"]})["curves_key"] != curves["curves_key"]

    counts = {"tp": 5, "fp": 1, "fn": 2, "tn": 7}
    view = figures.operating_view_data(curves, [{"name": "a at 0.5", "colour": "#000", "fpr": 0.1, "tpr": 0.7,
                                                 "recall": 0.7, "precision": float("nan")}],
                                       [{"title": "a (n=15)", "classes": ["N", "P"], "counts": counts}])
    assert view["curves_key"] == curves["curves_key"] and view["roc"] == curves["roc"]
    assert view["markers"][0]["precision"] is None  # undefined: left out of the PR chart
    assert view["matrices"][0]["counts"] == [[7, 1], [2, 5]]  # rows true class, columns predicted
    json.dumps(view, allow_nan=False)  # plain JSON for the browser


def test_thinning_keeps_the_curves_shape_within_a_grid_cell():
    x = np.sort(np.random.default_rng(1).random(20_000))
    y = np.sqrt(x)
    thinned = figures.thin_curve(x, y, 1 - x)
    assert len(thinned["x"]) < 1_100
    # Between kept points the dropped ones lie within one grid cell of the kept one before them.
    kept = np.searchsorted(x, thinned["x"][:-1])
    gaps = np.abs(np.interp(x, thinned["x"], thinned["y"]) - y)
    assert gaps.max() < 2 * figures.CURVE_GRID and kept[0] == 0
