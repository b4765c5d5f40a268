"""Confidence intervals by a bootstrap that resamples patients, not images.

Images of one patient are correlated (several views, follow-ups), so resampling images would make the
intervals too narrow. Each resample draws patients with replacement; an image then counts as many times
as its patient was drawn. The resamples are kept as one (resamples x images) weight matrix, so every
metric of every resample is a matrix product or a cumulative sum: a threshold change on 624 images with
2,000 resamples costs a few milliseconds. `scipy.stats.bootstrap` resamples observations, not clusters,
and calls the statistic once per resample, which is why this is written out here.

Intervals are percentile intervals (2.5th and 97.5th percentiles of the resampled statistic); resamples
in which a metric is undefined (no positives drawn, say) are left out of that metric's interval. A rate that is
0 or 1 on every resample (no mistake among the images it counts) would get a zero-width interval that hides how
few cases back it: it gets the Clopper-Pearson exact interval over the patients it counts instead (8 of 8
normal patients right: specificity 1.000 [0.631, 1.000]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import binomtest

DEFAULT_RESAMPLES = 2000
CHUNK_CELLS = 4_000_000  # resample rows are processed in chunks of about this many weights (memory bound)
DEFAULT_SEED = 0
CONFIDENCE = 0.95
# Rates read at a threshold, and the threshold-free summaries; the order is the order they are shown in.
RATE_KEYS = ("sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")
RANKING_KEYS = ("auc", "pr_auc")
METRIC_KEYS = RANKING_KEYS + RATE_KEYS
METRIC_LABELS = {"auc": "AUC", "pr_auc": "PR-AUC (average precision)", "sensitivity": "Sensitivity (recall)",
                 "specificity": "Specificity", "ppv": "PPV (precision)", "npv": "NPV", "f1": "F1",
                 "accuracy": "Accuracy"}


class PatientBootstrap:
    """Seeded patient resamples of one set of images, as per-image weights (resamples x images)."""

    def __init__(self, patients: Sequence[str] | None, n_images: int, n_resamples: int = DEFAULT_RESAMPLES,
                 seed: int = DEFAULT_SEED):
        if patients is None or len(patients) == 0:
            groups = np.arange(n_images)  # no patient ids: every image is its own patient
        else:
            if len(patients) != n_images:
                raise ValueError(f"{len(patients)} patient ids for {n_images} images.")
            _, groups = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
        self.n_images = n_images
        self.n_patients = int(groups.max()) + 1 if n_images else 0
        self.n_resamples = n_resamples
        self.seed = seed
        self.group_of_image = groups
        rng = np.random.default_rng(seed)
        g = max(self.n_patients, 1)
        # uint16: a patient is drawn at most g times, and 2 bytes per cell keep 2,000 resamples of 100,000
        # images at 400 MB; the draws are made in chunks of resamples so their int64 temporaries stay small.
        dtype = np.uint16 if g < 2**16 else np.uint32
        self.weights = np.zeros((n_resamples, n_images), dtype)
        step = max(1, CHUNK_CELLS // g)
        for start in range(0, n_resamples, step):
            rows = min(step, n_resamples - start)
            draws = rng.integers(0, g, size=(rows, g))
            # Row r of `counts` says how often each patient was drawn in resample start + r.
            flat = (draws + np.arange(rows)[:, None] * g).ravel()
            counts = np.bincount(flat, minlength=rows * g).reshape(rows, g).astype(dtype)
            if n_images:
                self.weights[start:start + rows] = counts[:, groups]


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def rates_from_counts(tp, fp, fn, tn) -> dict[str, np.ndarray]:
    """Clinical rates from confusion counts (arrays of any shape); NaN where a rate is undefined."""
    tp, fp, fn, tn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn, tn))
    return {"sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp), "ppv": _ratio(tp, tp + fp),
            "npv": _ratio(tn, tn + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "accuracy": _ratio(tp + tn, tp + tn + fp + fn)}


def _row_chunks(weights: np.ndarray):
    step = max(1, CHUNK_CELLS // max(weights.shape[1], 1))
    for start in range(0, len(weights), step):
        yield weights[start:start + step]


def weighted_counts(labels: np.ndarray, probs: np.ndarray, threshold: float,
                    weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tp, fp, fn, tn) per row of `weights`, predicting positive when prob >= threshold."""
    pos = np.asarray(labels) == 1
    pred = np.asarray(probs) >= threshold
    cells = np.stack([pred & pos, pred & ~pos, ~pred & pos, ~pred & ~pos], axis=1).astype(np.float32)
    # One matrix product per chunk for all its resamples and all four cells.
    counts = np.concatenate([chunk.astype(np.float32) @ cells for chunk in _row_chunks(np.atleast_2d(weights))])
    return counts[:, 0], counts[:, 1], counts[:, 2], counts[:, 3]


# Above this many cells (resamples x images) per table, ThresholdCounts counts at each call instead of keeping
# its two cumulative tables (4 bytes a cell each).
CUMULATIVE_CELLS = 10_000_000


class ThresholdCounts:
    """Resampled confusion counts (tp, fp, fn, tn per resample) of one set at any threshold, for views that ask
    again at every threshold step. Built once: the images sorted by probability and each resample's weights of
    positives and negatives summed cumulatively, so a threshold costs one lookup per resample instead of a pass
    over every image (weighted_counts): a Thresholds slider step recounts every set and subgroup. A set whose
    tables would pass CUMULATIVE_CELLS is counted by weighted_counts at each call; both give the same counts."""

    def __init__(self, labels: np.ndarray, probs: np.ndarray, boot: PatientBootstrap):
        self.labels = np.asarray(labels).astype(int)
        self.probs = np.asarray(probs, dtype=np.float64)
        self.boot = boot
        self.cumulative = boot.weights.size <= CUMULATIVE_CELLS
        if not self.cumulative:
            return
        order = np.argsort(-self.probs, kind="mergesort")
        self.descending = self.probs[order]
        positive = self.labels[order] == 1
        weights = boot.weights[:, order]
        shape = (len(weights), len(order) + 1)
        self.pos_above, self.neg_above = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        np.cumsum(np.where(positive, weights, 0), axis=1, out=self.pos_above[:, 1:])
        np.cumsum(np.where(positive, 0, weights), axis=1, out=self.neg_above[:, 1:])

    def __call__(self, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not self.cumulative:
            return weighted_counts(self.labels, self.probs, threshold, self.boot.weights)
        # Images with prob >= threshold are the first k of the descending order (negation is exact).
        k = int(np.searchsorted(-self.descending, -threshold, side="right"))
        tp, fp = self.pos_above[:, k], self.neg_above[:, k]
        return tp, fp, self.pos_above[:, -1] - tp, self.neg_above[:, -1] - fp


def weighted_ranking_metrics(labels: np.ndarray, probs: np.ndarray,
                             weights: np.ndarray) -> dict[str, np.ndarray]:
    """ROC AUC (ties count one half, as the Mann-Whitney statistic) and average precision (scikit-learn's
    definition) per row of `weights`."""
    labels = np.asarray(labels).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    weights = np.atleast_2d(weights)
    if len(labels) == 0:
        nan = np.full(len(weights), np.nan)
        return {"auc": nan, "pr_auc": nan.copy()}
    parts = [_ranking_chunk(labels, probs, chunk) for chunk in _row_chunks(weights)]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("auc", "pr_auc")}


def _ranking_chunk(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    order = np.argsort(probs, kind="mergesort")
    sorted_probs = probs[order]
    starts = np.flatnonzero(np.r_[True, sorted_probs[1:] != sorted_probs[:-1]])  # one group per distinct score
    w = weights[:, order].astype(np.float64)
    pos_w = np.add.reduceat(w * labels[order], starts, axis=1)
    neg_w = np.add.reduceat(w * ~labels[order], starts, axis=1)
    n_pos, n_neg = pos_w.sum(1), neg_w.sum(1)
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    auc = _ratio((pos_w * (neg_below + 0.5 * neg_w)).sum(1), n_pos * n_neg)
    # Average precision: walk thresholds from the highest score down.
    tp_cum = np.cumsum(pos_w[:, ::-1], axis=1)
    fp_cum = np.cumsum(neg_w[:, ::-1], axis=1)
    precision = _ratio(tp_cum, tp_cum + fp_cum)
    recall_step = pos_w[:, ::-1]
    ap = _ratio(np.nansum(recall_step * precision, axis=1), n_pos)
    return {"auc": auc, "pr_auc": ap}


@dataclass
class Interval:
    value: float  # on the images as they are
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if len(finite) < 10:  # too few defined resamples to say anything
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def intervals_at_threshold(labels: np.ndarray, probs: np.ndarray, threshold: float, boot: PatientBootstrap,
                           ranking: dict[str, Interval] | None = None,
                           counts: ThresholdCounts | None = None) -> dict:
    """Every metric of METRIC_KEYS with its 95% interval at `threshold`, plus the confusion counts.

    `ranking` (AUC and PR-AUC, which do not depend on the threshold) may be passed in from
    `ranking_intervals`, and `counts` (a ThresholdCounts of the same images and resamples), so that a threshold
    change only looks the rates up.
    """
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    ones = np.ones((1, len(labels)), np.float32)
    point = {k: float(v[0]) for k, v in rates_from_counts(*weighted_counts(labels, probs, threshold, ones)).items()}
    resampled = rates_from_counts(*(counts(threshold) if counts is not None
                                    else weighted_counts(labels, probs, threshold, boot.weights)))
    pred = probs >= threshold
    pos = labels == 1
    out: dict = {}
    for k in RATE_KEYS:
        low, high = percentile_interval(resampled[k])
        if point[k] in (0.0, 1.0) and low == high == point[k]:
            low, high = exact_interval_over_patients(point[k], boot.group_of_image[counted_images(k, pos, pred)])
        out[k] = Interval(point[k], low, high)
    out.update(ranking if ranking is not None else ranking_intervals(labels, probs, boot))
    counts = {"tp": int((pred & pos).sum()), "fp": int((pred & ~pos).sum()), "fn": int((~pred & pos).sum()),
              "tn": int((~pred & ~pos).sum())}
    return {"threshold": float(threshold), "n": int(len(labels)), "n_patients": boot.n_patients,
            "n_resamples": boot.n_resamples, "seed": boot.seed, "counts": counts,
            "metrics": {k: out[k] for k in METRIC_KEYS}}


def counted_images(rate: str, positive: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The images a rate's denominator counts (sensitivity: the positives; PPV: the predicted positives; ...)."""
    return {"sensitivity": positive, "specificity": ~positive, "ppv": predicted, "npv": ~predicted,
            "f1": positive | predicted, "accuracy": np.ones_like(positive)}[rate]


def exact_interval_over_patients(value: float, groups: np.ndarray,
                                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Clopper-Pearson interval of a rate of 0 or 1 over the patients (`groups`, one per image) it counts:
    every patient's images all right (or all wrong) is k = n (or 0) of n patients."""
    n = len(np.unique(groups))
    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(n if value == 1.0 else 0, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def ranking_intervals(labels: np.ndarray, probs: np.ndarray, boot: PatientBootstrap) -> dict[str, Interval]:
    labels = np.asarray(labels).astype(int)
    point = weighted_ranking_metrics(labels, probs, np.ones((1, len(labels))))
    resampled = weighted_ranking_metrics(labels, probs, boot.weights)
    return {k: Interval(float(point[k][0]), *percentile_interval(resampled[k])) for k in RANKING_KEYS}


def format_interval(iv: Interval | dict | None, digits: int = 3) -> str:
    """'0.701 [0.643, 0.757]'; a dash for an undefined value."""
    if iv is None:
        return "—"
    value, low, high = (iv.value, iv.low, iv.high) if isinstance(iv, Interval) else (
        iv.get("value"), iv.get("low"), iv.get("high"))
    if value is None or not np.isfinite(value):
        return "—"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"{value:.{digits}f} [—]"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def summary_to_json(summary: dict) -> dict:
    """The result of `intervals_at_threshold` with plain dicts instead of Interval objects."""
    return {**summary, "metrics": {k: v.as_dict() for k, v in summary["metrics"].items()}}
