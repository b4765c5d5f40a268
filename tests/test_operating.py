"""The one operating point: saved threshold over the training one, damaged files refused, every set's
metrics at it, and the validation-vs-test shift warning."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core import runs
from core.bootstrap import format_interval
from core.operating import load_set, run_summary, shift_warnings


@pytest.fixture
def run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    (run_dir / "report.json").write_text(json.dumps({"threshold": 0.4, "threshold_rule": "youden on validation"}))
    rng = np.random.default_rng(0)
    for name, shift in (("val", 0.0), ("test", 0.25)):
        labels = np.r_[np.ones(150, int), np.zeros(100, int)]
        probs = np.clip(labels * 0.5 + rng.normal(0.25 + shift * (1 - labels), 0.12, 250), 0, 1)
        pd.DataFrame({"path": [f"/x/{name}{i}.png" for i in range(250)], "patient": [f"p{i // 2}" for i in range(250)],
                      "label": labels, "class_name": np.where(labels, "PNEUMONIA", "NORMAL"),
                      "prob": probs}).to_csv(run_dir / f"predictions_{name}.csv", index=False)
    return run_dir


def test_training_threshold_then_saved_threshold(run):
    op = runs.operating_point(run)
    assert (op.threshold, op.source, op.chosen_on) == (0.4, "training", "val")
    assert op.describe() == "0.400 (chosen at the end of training; Youden on validation)"
    runs.save_threshold(run, 0.62, chosen_on="val", target="recall ≥ 0.950", rule="recall", value=0.95)
    op = runs.operating_point(run)
    assert op.describe() == "0.620 (saved; recall ≥ 0.950 on validation)"
    summary = run_summary(run)
    assert summary["threshold"] == 0.62 and set(summary["sets"]) == {"val", "test"}
    test = summary["sets"]["test"]
    assert test["threshold"] == 0.62 and test["n_patients"] == 125 and test["patients_known"]
    labels, probs = load_set(run, "test").labels, load_set(run, "test").probs
    spec = ((probs < 0.62) & (labels == 0)).sum() / (labels == 0).sum()
    assert test["metrics"]["specificity"]["value"] == pytest.approx(spec)


@pytest.mark.parametrize("content", ['{"threshold": NaN}', '{"threshold": 1.5}', '{"threshold": "abc"}',
                                     "not json", '[0.5]', '{"threshold": true}'])
def test_damaged_saved_threshold_is_refused(run, content):
    (run / "threshold.json").write_text(content)
    with pytest.raises(ValueError, match="threshold.json is damaged"):
        runs.operating_point(run)


@pytest.mark.parametrize("value", [float("nan"), -0.1, 1.01, float("inf")])
def test_saving_a_non_probability_is_refused(run, value):
    with pytest.raises(ValueError):
        runs.save_threshold(run, value, chosen_on="val", target="manual")


def test_a_damaged_predictions_file_does_not_stop_the_others(run):
    (run / "predictions_test.csv").write_text("path,label,prob\n/x.png,7,0.5\n")
    summary = run_summary(run)
    assert "val" in summary["sets"] and "label column" in summary["errors"]["test"]


def test_shift_warning_names_what_falls_outside(run):
    summary = run_summary(run)
    warnings = shift_warnings(summary["sets"]["val"], summary["sets"]["test"])
    assert any(w.startswith("test specificity") and "outside validation's 95% interval" in w for w in warnings)
    assert shift_warnings(summary["sets"]["val"], summary["sets"]["val"]) == []
    assert format_interval(summary["sets"]["val"]["metrics"]["auc"]).count("[") == 1


def test_probabilities_survive_the_csv_round_trip(tmp_path):
    """The training report and the views read the same images on the same side of the threshold."""
    import torch

    from core.metrics import choose_threshold
    from core.trainer import positive_probs

    logits = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    probs = positive_probs(logits, 1.3)
    labels = np.arange(500) % 2
    threshold = choose_threshold(labels, probs, "youden")
    pd.DataFrame({"path": [f"/x/{i}.png" for i in range(500)], "label": labels, "prob": probs}).to_csv(
        tmp_path / "predictions_val.csv", index=False)
    back = runs.read_predictions(tmp_path, "val")["prob"].to_numpy()
    assert np.array_equal(back, probs)
    assert ((back >= threshold) == (probs >= threshold)).all()


def test_no_shift_warning_against_an_interval_of_no_width():
    """Validation's sensitivity 1.0 in every resample is an interval [1, 1]: a test sensitivity of 0.997 is not a
    shift worth a warning (seen at an extreme threshold), while a real gap still is."""
    def summary(sens: dict) -> dict:
        return {"metrics": {"sensitivity": sens, "auc": {"value": 0.9, "low": 0.85, "high": 0.95}}}

    assert shift_warnings(summary({"value": 1.0, "low": 1.0, "high": 1.0}),
                          summary({"value": 0.997, "low": 0.99, "high": 1.0})) == []
    (warning,) = shift_warnings(summary({"value": 0.95, "low": 0.93, "high": 0.97}),
                                summary({"value": 0.80, "low": 0.75, "high": 0.85}))
    assert warning.startswith("test sensitivity 0.800 lies outside")
