"""Paired tests for study arms: DeLong against an independent placement-value implementation, Holm against
hand-computed values, and the arm bootstrap on known separations."""

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from core.significance import compare_arms, delong_test, holm_adjust, mean_interval, verdict


def _delong_by_definition(y, a, b):
    """DeLong 1988 written from its definition: placement values psi(x_i, y_j) by a double loop."""
    y = np.asarray(y).astype(bool)
    comps_pos, comps_neg, aucs = [], [], []
    for s in (np.asarray(a, float), np.asarray(b, float)):
        pos, neg = s[y], s[~y]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        aucs.append(psi.mean())
        comps_pos.append(psi.mean(axis=1))
        comps_neg.append(psi.mean(axis=0))
    m, n = y.sum(), (~y).sum()
    s10, s01 = np.cov(comps_pos), np.cov(comps_neg)
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    z = (aucs[0] - aucs[1]) / np.sqrt(var)
    return aucs, z, 2 * stats.norm.sf(abs(z))


def test_delong_matches_the_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    a = np.round(y * 0.8 + rng.normal(0, 1, 300), 1)  # rounding makes ties
    b = np.round(y * 0.4 + rng.normal(0, 1, 300) + 0.3 * a, 1)
    result = delong_test(y, a, b)
    aucs, z, p = _delong_by_definition(y, a, b)
    assert result["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert result["auc_b"] == pytest.approx(aucs[1], abs=1e-12)
    assert result["z"] == pytest.approx(z, rel=1e-9)
    assert result["p"] == pytest.approx(p, rel=1e-9)
    assert result["low"] < result["difference"] < result["high"]


def test_delong_identical_scores_have_no_difference():
    y = [0, 0, 1, 1, 0, 1]
    s = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    assert delong_test(y, s, s)["p"] == 1.0


def test_delong_refuses_a_single_class():
    with pytest.raises(ValueError, match="two images of each class"):
        delong_test([1, 1, 1, 0], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1])


def test_holm_against_hand_computed_values():
    # sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm_adjust([]) == []


def _study(rng, n=400):
    y = rng.integers(0, 2, n)
    patients = [f"p{i // 2}" for i in range(n)]  # two images per patient
    strong = [y * 2.0 + rng.normal(0, 1, n) for _ in range(3)]
    strong_again = [y * 2.0 + rng.normal(0, 1, n) for _ in range(3)]
    weak = [y * 0.3 + rng.normal(0, 1, n) for _ in range(3)]
    return y, patients, {"strong": strong, "strong-again": strong_again, "weak": weak}


def test_compare_arms_finds_a_real_difference_and_not_a_null_one():
    y, patients, arms = _study(np.random.default_rng(2))
    pairs = {(p["a"], p["b"]): p for p in compare_arms(y, patients, arms, n_resamples=500)}
    assert set(pairs) == {("strong", "strong-again"), ("strong", "weak"), ("strong-again", "weak")}
    real = pairs[("strong", "weak")]
    assert real["difference"] > 0.2 and real["low"] > 0 and real["p_holm"] < 0.05
    assert "strong has a higher test AUC than weak" in real["verdict"]
    null = pairs[("strong", "strong-again")]
    assert null["low"] < 0 < null["high"] and null["p_holm"] > 0.05
    assert "no evidence of a difference" in null["verdict"]
    assert null["p_holm"] >= null["p"]
    expected = np.mean([roc_auc_score(y, s) for s in arms["weak"]])
    assert real["auc_b"] == pytest.approx(expected)


def test_compare_arms_refuses_arms_on_different_test_sets():
    y, patients, arms = _study(np.random.default_rng(3))
    arms["weak"][0] = arms["weak"][0][:-1]
    with pytest.raises(ValueError, match="share the test set"):
        compare_arms(y, patients, arms, n_resamples=50)


def test_verdict_wording():
    pair = {"a": "partial", "b": "full", "difference": 0.004, "low": -0.010, "high": 0.018, "p_holm": 0.61}
    assert verdict(pair) == ("partial vs full: +0.004 [-0.010, +0.018], p = 0.61 (Holm): "
                             "no evidence of a difference in test AUC")


def test_mean_interval_is_a_t_interval():
    iv = mean_interval([0.90, 0.92, 0.94])
    assert iv["mean"] == pytest.approx(0.92) and iv["sd"] == pytest.approx(0.02)
    assert iv["high"] - iv["mean"] == pytest.approx(stats.t.ppf(0.975, 2) * 0.02 / np.sqrt(3))
    assert np.isnan(mean_interval([0.9])["low"])


def test_seed_spread_widens_the_interval_and_one_seed_says_it_is_not_included():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 300)
    base = y * 1.5 + rng.normal(0, 1, 300)
    steady = [base + rng.normal(0, 0.05, 300) for _ in range(3)]
    shaky = [y * (1.5 + k) + rng.normal(0, 1, 300) for k in (-1.0, 0.0, 1.0)]  # seeds differ a lot
    narrow = compare_arms(y, None, {"a": steady, "b": [base] * 3}, n_resamples=300)[0]
    wide = compare_arms(y, None, {"a": shaky, "b": [base] * 3}, n_resamples=300)[0]
    assert (wide["high"] - wide["low"]) > 2 * (narrow["high"] - narrow["low"])
    assert wide["seed_variance"] and wide["df"] < 10
    one = compare_arms(y, None, {"a": steady[:1], "b": shaky}, n_resamples=300)[0]
    assert not one["seed_variance"] and np.isnan(one["delong_p"])  # unequal seeds: no ensemble DeLong


def test_compare_arms_without_two_images_of_a_class_still_answers():
    y = np.array([1, 1, 1, 1, 0])
    pairs = compare_arms(y, None, {"a": [np.linspace(0, 1, 5)], "b": [np.linspace(1, 0, 5)]}, n_resamples=100)
    assert np.isnan(pairs[0]["delong_p"]) and np.isfinite(pairs[0]["difference"])
