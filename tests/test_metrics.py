from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix

from core.metrics import (
    choose_threshold,
    metrics_at_threshold,
    mistakes,
    pr_points,
    roc_points,
    threshold_for_recall,
    threshold_for_specificity,
)

rng = np.random.default_rng(0)
LABELS = rng.integers(0, 2, 500)
PROBS = np.clip(LABELS * 0.3 + rng.normal(0.35, 0.2, 500), 0, 1)


def test_metrics_match_sklearn_confusion_matrix():
    m = metrics_at_threshold(LABELS, PROBS, 0.5)
    tn, fp, fn, tp = confusion_matrix(LABELS, PROBS >= 0.5).ravel()
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 0.99])
def test_threshold_for_recall_reaches_the_target_with_fewest_false_positives(target):
    t = threshold_for_recall(LABELS, PROBS, target)
    assert metrics_at_threshold(LABELS, PROBS, t)["sensitivity"] >= target
    higher = np.unique(PROBS[PROBS > t])
    if len(higher):
        assert metrics_at_threshold(LABELS, PROBS, higher[0])["sensitivity"] < target


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_threshold_for_specificity_reaches_the_target(target):
    t = threshold_for_specificity(LABELS, PROBS, target)
    assert metrics_at_threshold(LABELS, PROBS, t)["specificity"] >= target


def test_choose_threshold_targets_and_curves():
    for target in ("youden", "best_f1", "recall", "specificity"):
        assert 0 <= choose_threshold(LABELS, PROBS, target) <= 1
    with pytest.raises(ValueError):
        choose_threshold(LABELS, PROBS, "magic")
    assert len(roc_points(LABELS, PROBS)["fpr"]) > 10
    pr = pr_points(LABELS, PROBS)
    assert len(pr["precision"]) == len(pr["threshold"])


def test_mistakes_are_false_negatives_and_positives_most_confident_first():
    df = pd.DataFrame({"path": list("abcde"), "label": [1, 0, 1, 0, 1], "prob": [0.05, 0.97, 0.45, 0.6, 0.9]})
    out = mistakes(df, 0.5)
    assert list(out["path"]) == ["b", "a", "d", "c"]
    assert list(out["kind"]) == ["false positive", "false negative", "false positive", "false negative"]
