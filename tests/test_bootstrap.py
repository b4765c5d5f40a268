"""Patient bootstrap: weighted metrics equal scikit-learn's, resampling is by patient, intervals have the
width statistics predicts, and they are reproducible."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from core.bootstrap import (
    METRIC_KEYS,
    PatientBootstrap,
    format_interval,
    intervals_at_threshold,
    rates_from_counts,
    weighted_counts,
    weighted_ranking_metrics,
)

rng = np.random.default_rng(0)
N = 300
LABELS = (rng.random(N) < 0.6).astype(int)
PROBS = np.clip(rng.normal(0.35 + 0.3 * LABELS, 0.2), 0, 1).round(2)  # rounded: many ties
PATIENTS = np.array([f"p{i // 3}" for i in range(N)])


def test_weighted_ranking_metrics_equal_sklearn_with_ties():
    boot = PatientBootstrap(PATIENTS, N, n_resamples=5, seed=1)
    got = weighted_ranking_metrics(LABELS, PROBS, boot.weights)
    for i, w in enumerate(boot.weights):
        assert got["auc"][i] == pytest.approx(roc_auc_score(LABELS, PROBS, sample_weight=w))
        assert got["pr_auc"][i] == pytest.approx(average_precision_score(LABELS, PROBS, sample_weight=w))


def test_weighted_counts_equal_a_resample_made_by_hand():
    boot = PatientBootstrap(PATIENTS, N, n_resamples=3, seed=2)
    tp, fp, fn, tn = weighted_counts(LABELS, PROBS, 0.5, boot.weights)
    for i, w in enumerate(boot.weights):
        rows = np.repeat(np.arange(N), w.astype(int))  # the resample as a list of images
        pred, y = PROBS[rows] >= 0.5, LABELS[rows]
        assert (tp[i], fp[i], fn[i], tn[i]) == ((pred & (y == 1)).sum(), (pred & (y == 0)).sum(),
                                                (~pred & (y == 1)).sum(), (~pred & (y == 0)).sum())


def test_resampling_is_by_patient():
    boot = PatientBootstrap(PATIENTS, N, n_resamples=200, seed=0)
    assert boot.n_patients == N // 3
    for w in boot.weights[:50]:
        per_patient = {}
        for p, weight in zip(PATIENTS, w):
            per_patient.setdefault(p, set()).add(weight)
        assert all(len(v) == 1 for v in per_patient.values())  # a patient's images move together
    assert np.allclose(boot.weights.sum(1), N)  # equal-sized patients: every resample has N images


def test_clustered_images_widen_the_interval():
    """Ten identical copies per patient carry the information of one image: a by-image bootstrap would
    give an interval about sqrt(10) times too narrow; the patient bootstrap does not."""
    n_patients = 60
    labels = np.repeat((np.arange(n_patients) % 2), 10)
    probs = np.repeat(np.random.default_rng(3).random(n_patients) * 0.5 + 0.25 * (np.arange(n_patients) % 2), 10)
    patients = np.repeat([f"p{i}" for i in range(n_patients)], 10)
    by_patient = intervals_at_threshold(labels, probs, 0.5, PatientBootstrap(patients, len(labels)))
    by_image = intervals_at_threshold(labels, probs, 0.5, PatientBootstrap(None, len(labels)))
    width = {name: s["metrics"]["sensitivity"].high - s["metrics"]["sensitivity"].low
             for name, s in (("patient", by_patient), ("image", by_image))}
    assert width["patient"] > 2.2 * width["image"]
    assert by_patient["n_patients"] == n_patients and by_image["n_patients"] == len(labels)


def test_specificity_interval_has_the_binomial_width():
    """234 negatives, one image each, specificity 0.70: the normal approximation gives +-0.059."""
    labels = np.r_[np.zeros(234, int), np.ones(390, int)]
    probs = np.r_[np.where(np.arange(234) < 164, 0.2, 0.8), np.full(390, 0.9)]  # 164/234 = 0.701 true negatives
    summary = intervals_at_threshold(labels, probs, 0.5, PatientBootstrap(None, len(labels), seed=0))
    spec = summary["metrics"]["specificity"]
    assert spec.value == pytest.approx(164 / 234)
    half = 1.96 * np.sqrt(0.7 * 0.3 / 234)
    assert spec.high - spec.low == pytest.approx(2 * half, rel=0.15)
    assert spec.low < spec.value < spec.high


def test_every_metric_has_a_point_and_interval_and_is_reproducible():
    a = intervals_at_threshold(LABELS, PROBS, 0.5, PatientBootstrap(PATIENTS, N, seed=7))
    b = intervals_at_threshold(LABELS, PROBS, 0.5, PatientBootstrap(PATIENTS, N, seed=7))
    assert set(a["metrics"]) == set(METRIC_KEYS)
    assert a["n_resamples"] >= 1000
    for key, iv in a["metrics"].items():
        assert iv.low <= iv.value <= iv.high, key
        assert (iv.low, iv.high) == (b["metrics"][key].low, b["metrics"][key].high)
    point = rates_from_counts(a["counts"]["tp"], a["counts"]["fp"], a["counts"]["fn"], a["counts"]["tn"])
    assert a["metrics"]["sensitivity"].value == pytest.approx(float(point["sensitivity"]))


def test_undefined_metrics_and_formatting():
    labels = np.zeros(20, int)  # no positives: sensitivity and AUC undefined
    s = intervals_at_threshold(labels, np.linspace(0, 1, 20), 0.5, PatientBootstrap(None, 20))
    assert format_interval(s["metrics"]["sensitivity"]) == "—"
    assert format_interval(s["metrics"]["auc"]) == "—"
    assert format_interval(s["metrics"]["specificity"]).startswith("0.500 [")
    with pytest.raises(ValueError):
        PatientBootstrap(["a"], 3)


@pytest.mark.parametrize("cumulative", [True, False])
def test_threshold_counts_equal_counting_every_image_at_every_threshold(cumulative, monkeypatch):
    """The Thresholds page looks resampled counts up in cumulative tables (or counts, for sets too large for
    them): the same numbers as weighted_counts at any threshold, including exactly at a tied probability."""
    import core.bootstrap as bootstrap

    if not cumulative:
        monkeypatch.setattr(bootstrap, "CUMULATIVE_CELLS", 0)
    boot = PatientBootstrap(PATIENTS, N, n_resamples=300)
    counts = bootstrap.ThresholdCounts(LABELS, PROBS, boot)
    assert counts.cumulative is cumulative
    for threshold in (-0.1, 0.0, 0.3, PROBS[0], np.nextafter(PROBS[0], 1), 0.5, 1.0, 1.5):
        looked_up = counts(threshold)
        counted = weighted_counts(LABELS, PROBS, threshold, boot.weights)
        for a, b in zip(looked_up, counted):
            np.testing.assert_array_equal(np.asarray(a, float), np.asarray(b, float))
    with_counts = intervals_at_threshold(LABELS, PROBS, 0.4, boot, counts=counts)
    without = intervals_at_threshold(LABELS, PROBS, 0.4, boot)
    assert {k: v.as_dict() for k, v in with_counts["metrics"].items()} == \
        {k: v.as_dict() for k, v in without["metrics"].items()}


def test_threshold_counts_of_an_empty_or_one_class_set():
    from core.bootstrap import ThresholdCounts

    empty = ThresholdCounts(np.array([], int), np.array([]), PatientBootstrap(None, 0, n_resamples=20))
    assert [c.tolist() for c in empty(0.5)] == [[0] * 20] * 4
    ones = ThresholdCounts(np.ones(4, int), np.array([0.1, 0.4, 0.6, 0.9]), PatientBootstrap(None, 4, 20))
    tp, fp, fn, tn = ones(0.5)
    assert (tp + fn == 4).all() and not fp.any() and not tn.any()


def test_a_rate_without_mistakes_gets_the_exact_interval_over_its_patients():
    # 8 normal patients of 3 images each, none flagged: every resample says specificity 1.0, yet 8 patients
    # cannot show a specificity above 0.63 (Clopper-Pearson, 8 of 8).
    labels = np.array([0] * 24 + [1] * 30)
    probs = np.r_[np.full(24, 0.1), np.linspace(0.05, 0.9, 30)]
    patients = [f"n{i // 3}" for i in range(24)] + [f"p{i}" for i in range(30)]
    boot = PatientBootstrap(patients, len(labels), n_resamples=500)
    metrics = intervals_at_threshold(labels, probs, 0.5, boot)["metrics"]
    specificity = metrics["specificity"]
    assert specificity.value == 1.0
    assert specificity.low == pytest.approx(0.025 ** (1 / 8))  # by patients (8), not images (24: 0.858)
    assert specificity.high == 1.0
    assert metrics["ppv"].value == 1.0 and metrics["ppv"].low < 1.0  # no false alarm either
    sensitivity = metrics["sensitivity"]  # mistakes here: the bootstrap's own interval
    assert 0 < sensitivity.low < sensitivity.value < sensitivity.high < 1

    none_right = intervals_at_threshold(labels, probs, 0.0, boot)["metrics"]["specificity"]  # all flagged
    assert none_right.value == 0.0
    assert none_right.low == 0.0 and none_right.high == pytest.approx(1 - 0.025 ** (1 / 8))
