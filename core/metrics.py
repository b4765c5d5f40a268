"""Binary-classification metrics and decision thresholds (scikit-learn underneath)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

THRESHOLD_TARGETS = ("youden", "best_f1", "recall", "specificity", "cost", "ppv", "npv")
# Default target values of the rules that take one.
TARGET_DEFAULTS = {"recall": 0.95, "specificity": 0.90, "cost": 5.0, "ppv": 0.90, "npv": 0.95}


def safe_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC, NaN when only one class is present (a tiny validation batch, say)."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, probs))


def metrics_at_threshold(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """Confusion matrix and the rates clinicians read, predicting positive when prob >= threshold."""
    labels = np.asarray(labels).astype(int)
    pred = (np.asarray(probs) >= threshold).astype(int)
    tp = int(((pred == 1) & (labels == 1)).sum())
    tn = int(((pred == 0) & (labels == 0)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "threshold": float(threshold), "tp": tp, "tn": tn, "fp": fp, "fn": fn,
        "accuracy": ratio(tp + tn, len(labels)), "sensitivity": recall, "specificity": ratio(tn, tn + fp),
        "precision": precision, "npv": ratio(tn, tn + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "auc": safe_auc(labels, probs),
    }


def roc_points(labels: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)  # every candidate threshold
    return {"fpr": fpr, "tpr": tpr, "threshold": np.clip(thresholds, 0, 1)}


def _candidates(labels: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """ROC points usable as thresholds in [0, 1]. roc_curve's first point (threshold +inf: nothing positive)
    becomes threshold 1.0, which still calls images with probability exactly 1.0 positive: it is dropped
    then, so that a rule never promises a rate its threshold does not give."""
    pts = roc_points(labels, probs)
    if len(pts["threshold"]) > 1 and np.max(probs) >= 1.0:
        pts = {k: v[1:] for k, v in pts.items()}
    return pts


def pr_points(labels: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    precision, recall, thresholds = precision_recall_curve(labels, probs)
    # sklearn returns one more precision/recall point than thresholds (recall 0 at threshold > max).
    # "auc" is average precision (the step-wise area), the PR-AUC every view and interval uses.
    return {"precision": precision, "recall": recall, "threshold": np.append(thresholds, 1.0),
            "auc": float(average_precision_score(labels, probs))}


def threshold_for_recall(labels: np.ndarray, probs: np.ndarray, target: float) -> float:
    """Highest threshold whose sensitivity is at least `target` (fewest false positives)."""
    pts = _candidates(labels, np.asarray(probs))
    ok = np.nonzero(pts["tpr"] >= target)[0]
    return float(pts["threshold"][ok[0]]) if len(ok) else 0.0


def threshold_for_specificity(labels: np.ndarray, probs: np.ndarray, target: float) -> float:
    """Lowest threshold whose specificity is at least `target` (most sensitivity)."""
    pts = _candidates(labels, np.asarray(probs))
    ok = np.nonzero(1 - pts["fpr"] >= target)[0]
    return float(pts["threshold"][ok[-1]]) if len(ok) else 1.0


def threshold_youden(labels: np.ndarray, probs: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1."""
    pts = _candidates(labels, np.asarray(probs))
    return float(pts["threshold"][int(np.argmax(pts["tpr"] - pts["fpr"]))])


def threshold_best_f1(labels: np.ndarray, probs: np.ndarray) -> float:
    pts = pr_points(labels, probs)
    p, r = pts["precision"][:-1], pts["recall"][:-1]
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return float(pts["threshold"][int(np.argmax(f1))])


def threshold_for_cost(labels: np.ndarray, probs: np.ndarray, cost_ratio: float) -> float:
    """Threshold minimising the expected cost when a missed positive costs `cost_ratio` false alarms:
    cost_ratio * FN + FP over every candidate threshold (the highest one on ties)."""
    labels = np.asarray(labels).astype(int)
    pts = _candidates(labels, np.asarray(probs))
    n_pos, n_neg = int(labels.sum()), int((labels == 0).sum())
    cost = cost_ratio * (1 - pts["tpr"]) * n_pos + pts["fpr"] * n_neg
    return float(pts["threshold"][int(np.argmin(cost))])


def threshold_for_ppv(labels: np.ndarray, probs: np.ndarray, target: float) -> float:
    """Lowest threshold whose PPV (precision) is at least `target` (most sensitivity); 1.0 when none is.
    PPV depends on prevalence: a threshold fitted at one prevalence gives another PPV at another."""
    pts = pr_points(labels, probs)
    ok = np.nonzero(pts["precision"][:-1] >= target)[0]
    return float(pts["threshold"][ok[0]]) if len(ok) else 1.0


def threshold_for_npv(labels: np.ndarray, probs: np.ndarray, target: float) -> float:
    """Highest threshold whose NPV is at least `target` (most specificity); 0.0 when none is."""
    labels = np.asarray(labels).astype(int)
    pts = _candidates(labels, np.asarray(probs))
    n_pos, n_neg = int(labels.sum()), int((labels == 0).sum())
    tn, fn = (1 - pts["fpr"]) * n_neg, (1 - pts["tpr"]) * n_pos
    npv = np.divide(tn, tn + fn, out=np.zeros_like(tn), where=(tn + fn) > 0)
    ok = np.nonzero(npv >= target)[0]
    return float(pts["threshold"][ok[0]]) if len(ok) else 0.0


def choose_threshold(labels: np.ndarray, probs: np.ndarray, target: str = "youden",
                     value: float | None = None) -> float:
    """One entry point for the threshold rules offered to users (fit them on validation)."""
    if target not in THRESHOLD_TARGETS:
        raise ValueError(f"Unknown threshold target '{target}'; choose from {', '.join(THRESHOLD_TARGETS)}.")
    if len(np.unique(labels)) < 2:
        return 0.5
    value = TARGET_DEFAULTS.get(target) if value is None else float(value)
    if target in ("recall", "specificity", "ppv", "npv") and not 0 <= value <= 1:
        raise ValueError(f"A {target} target is a proportion between 0 and 1, not {value}.")
    if target == "cost" and not (np.isfinite(value) and value > 0):
        raise ValueError(f"A cost ratio is a positive number (a missed positive costs that many false alarms), "
                         f"not {value}.")
    rules = {"youden": lambda: threshold_youden(labels, probs), "best_f1": lambda: threshold_best_f1(labels, probs),
             "recall": lambda: threshold_for_recall(labels, probs, value),
             "specificity": lambda: threshold_for_specificity(labels, probs, value),
             "cost": lambda: threshold_for_cost(labels, probs, value),
             "ppv": lambda: threshold_for_ppv(labels, probs, value),
             "npv": lambda: threshold_for_npv(labels, probs, value)}
    return rules[target]()


def describe_rule(target: str, value: float | None = None) -> str:
    """A rule in words, e.g. 'recall ≥ 0.950' or 'cost ratio 5 (a missed positive costs 5 false alarms)'."""
    if target in TARGET_DEFAULTS and value is None:
        value = TARGET_DEFAULTS[target]
    if target in ("recall", "specificity"):
        return f"{target} ≥ {value:.3f}"
    if target in ("ppv", "npv"):
        return f"{target.upper()} ≥ {value:.3f}"
    if target == "cost":
        return f"min cost, a missed positive costs {value:g} false alarms"
    return {"youden": "Youden (max sensitivity + specificity − 1)", "best_f1": "best F1",
            "manual": "set by hand"}.get(target, target)


def mistakes(predictions: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """False negatives and false positives at `threshold`, most confident mistakes first.

    `predictions` has columns label (1 = positive) and prob; the result adds `kind`
    ("false negative" / "false positive") and `confidence`, the probability the model gave to the
    wrong class.
    """
    pred = predictions["prob"] >= threshold
    wrong = predictions[pred != (predictions["label"] == 1)].copy()
    wrong["kind"] = np.where(wrong["label"] == 1, "false negative", "false positive")
    wrong["confidence"] = np.where(wrong["label"] == 1, 1 - wrong["prob"], wrong["prob"])
    return wrong.sort_values("confidence", ascending=False).reset_index(drop=True)


def chance_level_warning(auc: Any, label: str) -> str | None:
    """When a set's AUC interval (an Interval or its dict) includes 0.5, or lies below it: the model does not
    rank this population's images better than chance, which no threshold can fix. None otherwise."""
    value, low, high = (getattr(auc, "value", None), getattr(auc, "low", None), getattr(auc, "high", None)) \
        if not isinstance(auc, dict) else (auc.get("value"), auc.get("low"), auc.get("high"))
    numbers = (value, low, high)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        return None
    shown = f"AUC {value:.3f} [{low:.3f}, {high:.3f}]"
    if high < 0.5:
        return (f"The model ranks {label}'s images worse than chance ({shown}, below 0.5): on this population its "
                "scores point the wrong way. No threshold can fix that; do not use this model here.")
    if low <= 0.5:
        return (f"The model does not rank {label}'s images better than chance ({shown} includes 0.5). No threshold "
                "can fix that: every operating point on this set is close to a coin toss, so re-picking the "
                "threshold here is meaningless.")
    return None
