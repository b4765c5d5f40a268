"""Paired comparisons of classifiers scored on the same test images: DeLong's test for two correlated ROC
AUCs, a paired bootstrap of patients (and of training seeds) for the difference between two arms of a study,
and Holm's correction across several comparisons."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from scipy import stats

from .bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, PatientBootstrap, percentile_interval, weighted_ranking_metrics

ALPHA = 0.05


def delong_test(labels: Sequence[int], scores_a: Sequence[float], scores_b: Sequence[float]) -> dict[str, float]:
    """DeLong, DeLong & Clarke-Pearson (1988) for two correlated AUCs on the same images, computed with the
    midrank algorithm of Sun & Xu (2014). Images are treated as independent. Returns both AUCs, their
    difference (a - b), its standard error, a 95% normal interval, z and the two-sided p-value."""
    y = np.asarray(labels).astype(bool)
    scores = np.stack([np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)])
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise ValueError("DeLong's test needs at least two images of each class.")
    pos, neg = scores[:, y], scores[:, ~y]
    aucs, v_pos, v_neg = [], [], []
    for k in range(2):
        rank_pos = stats.rankdata(pos[k])
        rank_neg = stats.rankdata(neg[k])
        rank_all = stats.rankdata(np.concatenate([pos[k], neg[k]]))
        aucs.append((rank_all[:m].sum() - m * (m + 1) / 2) / (m * n))
        v_pos.append((rank_all[:m] - rank_pos) / n)  # per positive: share of negatives it outranks
        v_neg.append(1.0 - (rank_all[m:] - rank_neg) / m)  # per negative: share of positives that outrank it
    cov = np.cov(np.array(v_pos)) / m + np.cov(np.array(v_neg)) / n
    diff = aucs[0] - aucs[1]
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = float(np.sqrt(max(var, 0.0)))
    if se == 0.0:
        z, p = (0.0, 1.0) if diff == 0 else (float(np.sign(diff) * np.inf), 0.0)
    else:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    q = stats.norm.ppf(0.975)
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": float(diff), "se": se,
            "low": float(diff - q * se), "high": float(diff + q * se), "z": float(z), "p": p}


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate), in the order given."""
    p = np.asarray(p_values, dtype=np.float64)
    k = len(p)
    order = np.argsort(p, kind="mergesort")
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (k - np.arange(k))))
    out = np.empty(k)
    out[order] = adjusted
    return out.tolist()


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided p-value of 'no difference' from bootstrap differences: twice the share on the far side of 0,
    with the +1 correction so it is never exactly 0 from a finite number of resamples."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return float("nan")
    below = (1 + np.sum(d <= 0)) / (len(d) + 1)
    above = (1 + np.sum(d >= 0)) / (len(d) + 1)
    return float(min(1.0, 2 * min(below, above)))


def compare_arms(labels: Sequence[int], patients: Sequence[str] | None, arm_scores: dict[str, list[np.ndarray]],
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> list[dict]:
    """Every pair of arms of a study, each arm a list of per-image test scores, one per training seed, all on
    the same images in the same order.

    The difference is in mean test AUC over seeds. Its interval and p-value come from a paired bootstrap that
    resamples patients (the same draw for both arms, so they stay paired) and, within each arm, its seeds: so
    the interval carries both test-set and training-seed variation. p-values are Holm-adjusted across the
    pairs. DeLong's test on the seed-averaged scores (images as independent) is given beside it as a check.
    """
    y = np.asarray(labels).astype(int)
    arms = [a for a in arm_scores if arm_scores[a]]
    for arm in arms:
        for s in arm_scores[arm]:
            if len(s) != len(y):
                raise ValueError(f"{arm}: {len(s)} scores for {len(y)} test images; arms must share the test set.")
    boot = PatientBootstrap(patients, len(y), n_resamples, seed)
    rng = np.random.default_rng(seed + 1)
    resampled_mean: dict[str, np.ndarray] = {}
    point: dict[str, float] = {}
    for arm in arms:
        runs = [np.asarray(s, dtype=np.float64) for s in arm_scores[arm]]
        per_run = np.stack([weighted_ranking_metrics(y, s, boot.weights)["auc"] for s in runs])  # seeds x R
        full = np.array([weighted_ranking_metrics(y, s, np.ones((1, len(y))))["auc"][0] for s in runs])
        point[arm] = float(full.mean())
        picks = rng.integers(0, len(runs), size=(n_resamples, len(runs)))  # seeds drawn with replacement
        resampled_mean[arm] = per_run[picks, np.arange(n_resamples)[:, None]].mean(axis=1)
    pairs = []
    for a, b in itertools.combinations(arms, 2):
        d = resampled_mean[a] - resampled_mean[b]
        low, high = percentile_interval(d)
        delong = delong_test(y, np.mean(arm_scores[a], axis=0), np.mean(arm_scores[b], axis=0))
        pairs.append({"a": a, "b": b, "auc_a": point[a], "auc_b": point[b], "difference": point[a] - point[b],
                      "low": low, "high": high, "p": bootstrap_p_value(d), "delong_p": delong["p"],
                      "n_seeds_a": len(arm_scores[a]), "n_seeds_b": len(arm_scores[b])})
    for pair, adjusted in zip(pairs, holm_adjust([p["p"] for p in pairs])):
        pair["p_holm"] = adjusted
        pair["verdict"] = verdict(pair)
    return pairs


def verdict(pair: dict) -> str:
    """One sentence: 'partial vs full: +0.004 [-0.010, 0.018], p = 0.61 (Holm): no evidence of a difference'."""
    p = pair["p_holm"]
    p_text = "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.01 else f"p = {p:.2f}"
    head = (f"{pair['a']} vs {pair['b']}: {pair['difference']:+.3f} [{pair['low']:+.3f}, {pair['high']:+.3f}], "
            f"{p_text} (Holm)")
    if not p < ALPHA:
        return f"{head}: no evidence of a difference in test AUC"
    better, worse = (pair["a"], pair["b"]) if pair["difference"] > 0 else (pair["b"], pair["a"])
    return f"{head}: {better} has the higher test AUC than {worse}"


def mean_interval(values: Sequence[float], low_bound: float = -np.inf, high_bound: float = np.inf
                  ) -> dict[str, float]:
    """Mean, standard deviation and the 95% t-interval of the mean of a few per-seed values, clipped to the
    values' own range (a rate's interval stays within [0, 1])."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": float("nan"), "sd": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    mean = float(v.mean())
    if len(v) == 1:
        return {"mean": mean, "sd": float("nan"), "low": float("nan"), "high": float("nan"), "n": 1}
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(v) - 1) * sd / np.sqrt(len(v)))
    return {"mean": mean, "sd": sd, "low": max(mean - half, low_bound), "high": min(mean + half, high_bound),
            "n": int(len(v))}
