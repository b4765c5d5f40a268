"""Calibration: ECE and Brier against hand-computed values, the reliability bins, and recovering the
probabilities before temperature scaling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.bootstrap import PatientBootstrap
from core.calibration import (
    brier_score,
    calibration_summary,
    calibration_table,
    expected_calibration_error,
    reliability_bins,
    resampled_brier,
    temperature_note,
    uncalibrated_probs,
)


def test_ece_by_hand():
    # Bin [0.1, 0.2): probs 0.15 x4, 1 positive of 4 -> |0.25 - 0.15| = 0.10, weight 0.4
    # Bin [0.9, 1.0]: probs 0.95 x6, 6 positives -> |1 - 0.95| = 0.05, weight 0.6
    labels = np.array([1, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    probs = np.array([0.15] * 4 + [0.95] * 6)
    assert expected_calibration_error(labels, probs) == pytest.approx(0.4 * 0.10 + 0.6 * 0.05)
    bins = reliability_bins(labels, probs)
    assert list(bins["count"]) == [4, 6] and bins["observed_positive"].tolist() == [0.25, 1.0]
    assert brier_score(labels, probs) == pytest.approx(np.mean((probs - labels) ** 2))


def test_probability_one_falls_in_the_last_bin():
    bins = reliability_bins(np.array([1, 1]), np.array([1.0, 0.999]))
    assert len(bins) == 1 and bins["bin_low"][0] == pytest.approx(0.9)


def test_perfectly_calibrated_scores_have_small_ece():
    rng = np.random.default_rng(0)
    probs = rng.random(20000)
    labels = (rng.random(20000) < probs).astype(int)
    assert expected_calibration_error(labels, probs) < 0.02


def test_uncalibrated_probabilities_are_recovered_exactly():
    margin = np.array([-3.0, -0.5, 0.0, 1.2, 4.0])
    temperature = 2.5
    raw = 1 / (1 + np.exp(-margin))
    calibrated = 1 / (1 + np.exp(-margin / temperature))
    frame = pd.DataFrame({"prob": calibrated})
    assert uncalibrated_probs(frame, temperature) == pytest.approx(raw)
    frame["prob_uncalibrated"] = raw
    assert uncalibrated_probs(frame, 99.0) == pytest.approx(raw)  # the saved column wins


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    rng = np.random.default_rng(1)
    margin = rng.normal(0, 2, 5000)
    labels = (rng.random(5000) < 1 / (1 + np.exp(-margin))).astype(int)
    overconfident = 1 / (1 + np.exp(-3 * margin))
    summary = calibration_summary(labels, 1 / (1 + np.exp(-margin)), overconfident)
    assert summary["after"]["ece"] < summary["before"]["ece"]
    assert summary["after"]["brier"] < summary["before"]["brier"]
    assert summary["binning"] == "10 equal-width bins"


def test_temperature_note_says_fitted_or_refused():
    assert "T = 1.500" in temperature_note({"temperature": 1.5, "temperature_fit": {"fitted": True}})
    refused = temperature_note({"temperature": 1.0, "temperature_fit": {"fitted": False, "note": "separated"}})
    assert "refused" in refused and "separated" in refused
    assert "No temperature" in temperature_note({"temperature": "abc"})


def test_bin_edges_are_exact():
    bins = reliability_bins(np.array([0, 1, 0]), np.array([0.3, 0.6, 0.7]))
    assert bins["bin_low"].round(6).tolist() == [0.3, 0.6, 0.7]


def test_each_resample_s_brier_score_is_that_of_its_images_counted_as_drawn():
    rng = np.random.default_rng(1)
    labels = (rng.random(90) < 0.4).astype(int)
    probs = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1)
    patients = [f"p{i // 3}" for i in range(90)]
    boot = PatientBootstrap(patients, 90, n_resamples=50, seed=4)
    resampled = resampled_brier(labels, probs, boot)
    for r in (0, 17, 49):  # resample r as the images it drew, each repeated as often as its patient was drawn
        drawn = np.repeat(np.arange(90), boot.weights[r])
        assert resampled[r] == pytest.approx(brier_score(labels[drawn], probs[drawn]))


def test_the_brier_score_carries_a_patient_interval_that_narrows_with_more_patients():
    rng = np.random.default_rng(2)
    widths = []
    for n in (60, 2000):
        labels = (rng.random(n) < 0.4).astype(int)
        probs = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1)
        summary = calibration_summary(labels, probs, probs ** 0.8, boot=PatientBootstrap(None, n, 500))
        for when in ("before", "after"):
            iv = summary[when]["brier_interval"]
            assert iv.value == summary[when]["brier"] and iv.low <= iv.value <= iv.high
            assert "ece_interval" not in summary[when]  # ECE is biased upward: no percentile interval
        widths.append(summary["after"]["brier_interval"].high - summary["after"]["brier_interval"].low)
        table = calibration_table({"test": summary})
        assert list(table.index) == ["ECE before", "ECE after", "Brier before", "Brier after"]
        assert table.loc["ECE after", "test"] == f"{summary['after']['ece']:.3f}"
        assert table.loc["Brier after", "test"] == (f"{summary['after']['brier']:.3f} "
                                                    f"[{summary['after']['brier_interval'].low:.3f}, "
                                                    f"{summary['after']['brier_interval'].high:.3f}]")
    assert widths[1] < widths[0] / 3
    assert calibration_table({"test": calibration_summary(labels, probs, probs)}).loc["Brier after", "test"].endswith(
        "[—]")  # without resamples: no interval, and the table says so
