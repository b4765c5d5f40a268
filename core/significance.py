"""Paired comparisons of classifiers scored on the same test images: DeLong's test for two correlated ROC
AUCs, the difference between two arms of a study (a paired bootstrap of patients for the test set's share of
its uncertainty, the spread over training seeds for the rest), and Holm's correction across comparisons."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from scipy import stats

from .bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, PatientBootstrap, weighted_ranking_metrics

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


def compare_arms(labels: Sequence[int], patients: Sequence[str] | None, arm_scores: dict[str, list[np.ndarray]],
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> list[dict]:
    """Every pair of arms of a study, each arm a list of per-image test scores, one per training seed, all on
    the same images in the same order.

    The difference is in mean test AUC over seeds. Its variance has two parts: the test set's, from a paired
    bootstrap that resamples patients (the same draw for both arms, so they stay paired; seeds held fixed), and
    the training seeds', s_a^2/n_a + s_b^2/n_b from the spread of each arm's per-seed AUCs (all on the same test
    images, so that spread is training variation alone). The interval and p-value use Student's t with
    Welch-Satterthwaite degrees of freedom (normal when no arm has two seeds, and then seed variation is not in
    the interval: `seed_variance` says so). p-values are Holm-adjusted across the pairs. Where both arms have
    the same number of seeds, DeLong's test on their seed-averaged (ensemble) scores is given as a check.
    """
    y = np.asarray(labels).astype(int)
    arms = [a for a in arm_scores if arm_scores[a]]
    for arm in arms:
        for s in arm_scores[arm]:
            if len(s) != len(y):
                raise ValueError(f"{arm}: {len(s)} scores for {len(y)} test images; arms must share the test set.")
    boot = PatientBootstrap(patients, len(y), n_resamples, seed)
    resampled_mean: dict[str, np.ndarray] = {}
    per_seed: dict[str, np.ndarray] = {}
    for arm in arms:
        runs = [np.asarray(s, dtype=np.float64) for s in arm_scores[arm]]
        resampled_mean[arm] = np.stack([weighted_ranking_metrics(y, s, boot.weights)["auc"] for s in runs]).mean(0)
        per_seed[arm] = np.array([weighted_ranking_metrics(y, s, np.ones((1, len(y))))["auc"][0] for s in runs])
    pairs = []
    for a, b in itertools.combinations(arms, 2):
        difference = float(per_seed[a].mean() - per_seed[b].mean())
        d = resampled_mean[a] - resampled_mean[b]
        test_var = float(np.nanvar(d, ddof=1))
        seed_terms = [float(np.var(per_seed[x], ddof=1) / len(per_seed[x])) if len(per_seed[x]) > 1 else 0.0
                      for x in (a, b)]
        welch = sum(t**2 / (len(per_seed[x]) - 1) for t, x in zip(seed_terms, (a, b)) if len(per_seed[x]) > 1)
        total = test_var + sum(seed_terms)
        df = min(total**2 / welch, 1e6) if welch > 0 else np.inf
        se = float(np.sqrt(total))
        q = float(stats.t.ppf(0.975, df))
        if se > 0:
            p = float(2 * stats.t.sf(abs(difference) / se, df))
        else:
            p = 1.0 if difference == 0 else 0.0
        delong_p = float("nan")
        if len(per_seed[a]) == len(per_seed[b]):
            try:
                delong_p = delong_test(y, np.mean(arm_scores[a], axis=0), np.mean(arm_scores[b], axis=0))["p"]
            except ValueError:  # fewer than two images of a class: no DeLong
                pass
        pairs.append({"a": a, "b": b, "auc_a": float(per_seed[a].mean()), "auc_b": float(per_seed[b].mean()),
                      "difference": difference, "low": difference - q * se, "high": difference + q * se, "se": se,
                      "df": float(df), "p": p, "delong_p": delong_p, "n_seeds_a": len(per_seed[a]),
                      "n_seeds_b": len(per_seed[b]), "seed_variance": len(per_seed[a]) > 1 and len(per_seed[b]) > 1})
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
    caveat = "" if pair.get("seed_variance", True) else " (one seed in an arm: seed variation not included)"
    if not p < ALPHA:
        return f"{head}: no evidence of a difference in test AUC{caveat}"
    better, worse = (pair["a"], pair["b"]) if pair["difference"] > 0 else (pair["b"], pair["a"])
    return f"{head}: {better} has a higher test AUC than {worse}{caveat}"


def format_mean_interval(d: dict, digits: int = 3) -> str:
    """'0.954 ± 0.001 [0.951, 0.957]' from mean_interval; '' without values, '(1 seed)' with one."""
    if d["n"] == 0:
        return ""
    if d["n"] == 1:
        return f"{d['mean']:.{digits}f} (1 seed)"
    return f"{d['mean']:.{digits}f} ± {d['sd']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


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
