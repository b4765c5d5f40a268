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


def _cost(threshold: float, k: float) -> float:
    m = metrics_at_threshold(LABELS, PROBS, threshold)
    return k * m["fn"] + m["fp"]


@pytest.mark.parametrize("k", [0.2, 1.0, 5.0, 50.0])
def test_cost_rule_minimises_expected_cost(k):
    t = choose_threshold(LABELS, PROBS, "cost", k)
    best = min(_cost(c, k) for c in np.unique(np.r_[PROBS, 1.0]))
    assert _cost(t, k) == pytest.approx(best)


def test_higher_cost_of_a_miss_lowers_the_threshold():
    assert choose_threshold(LABELS, PROBS, "cost", 20) <= choose_threshold(LABELS, PROBS, "cost", 1)


@pytest.mark.parametrize("target", [0.6, 0.75, 0.9])
def test_ppv_rule_reaches_the_target_with_most_sensitivity(target):
    t = choose_threshold(LABELS, PROBS, "ppv", target)
    assert metrics_at_threshold(LABELS, PROBS, t)["precision"] >= target
    lower = np.unique(PROBS[PROBS < t])
    assert all(metrics_at_threshold(LABELS, PROBS, c)["precision"] < target for c in lower)


@pytest.mark.parametrize("target", [0.6, 0.8, 0.95])
def test_npv_rule_reaches_the_target_with_most_specificity(target):
    t = choose_threshold(LABELS, PROBS, "npv", target)
    m = metrics_at_threshold(LABELS, PROBS, t)
    # Unreachable: no negative prediction at all (threshold 0), the only way to make no wrong one.
    assert m["npv"] >= target or (t == 0.0 and m["tn"] + m["fn"] == 0)
    higher = np.unique(PROBS[PROBS > t])
    assert all(not metrics_at_threshold(LABELS, PROBS, c)["npv"] >= target for c in higher)


@pytest.mark.parametrize("rule,value", [("recall", 1.5), ("ppv", -0.1), ("cost", 0), ("cost", float("nan")),
                                        ("nonsense", None)])
def test_bad_rule_values_are_refused(rule, value):
    with pytest.raises(ValueError):
        choose_threshold(LABELS, PROBS, rule, value)


def test_rules_keep_their_promise_when_probabilities_reach_one():
    labels = np.array([0, 1, 1, 1, 0, 0, 0])
    probs = np.array([1.0, 0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    t = choose_threshold(labels, probs, "specificity", 1.0)
    assert t == 1.0 or metrics_at_threshold(labels, probs, t)["specificity"] >= 1.0
    for rule, value in (("specificity", 0.75), ("recall", 1.0), ("npv", 1.0)):
        t = choose_threshold(labels, probs, rule, value)
        m = metrics_at_threshold(labels, probs, t)
        key = {"specificity": "specificity", "recall": "sensitivity", "npv": "npv"}[rule]
        assert m[key] >= value, (rule, t, m)
