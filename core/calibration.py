"""Calibration: reliability bins, expected calibration error and Brier score, before and after the
temperature scaling fitted on validation at the end of training."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import brier_score_loss

N_BINS = 10  # equal-width bins over [0, 1]; stated wherever ECE is shown


def reliability_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> pd.DataFrame:
    """Per equal-width bin of predicted probability: images, mean predicted probability and observed
    share of positives (empty bins left out). sklearn's calibration_curve gives the same means but not
    the counts, which ECE and the diagram's hover need."""
    labels = np.asarray(labels, dtype=float)
    probs = np.asarray(probs, dtype=float)
    edges = np.arange(n_bins + 1) / n_bins  # exact edges: linspace puts 0.3 at 0.30000000000000004
    which = np.clip(np.digitize(probs, edges[1:-1], right=False), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    mean_prob = np.bincount(which, probs, minlength=n_bins) / np.maximum(count, 1)
    observed = np.bincount(which, labels, minlength=n_bins) / np.maximum(count, 1)
    frame = pd.DataFrame({"bin_low": edges[:-1], "bin_high": edges[1:], "count": count,
                          "mean_predicted": mean_prob, "observed_positive": observed})
    return frame[frame["count"] > 0].reset_index(drop=True)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> float:
    """Sum over bins of |observed share of positives - mean predicted probability|, weighted by the
    bin's share of images (the binary form of Guo et al. 2017)."""
    bins = reliability_bins(labels, probs, n_bins)
    if bins.empty:
        return float("nan")
    weight = bins["count"] / bins["count"].sum()
    return float((weight * (bins["observed_positive"] - bins["mean_predicted"]).abs()).sum())


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    if len(labels) == 0:
        return float("nan")
    return float(brier_score_loss(np.asarray(labels, dtype=int), np.asarray(probs, dtype=float), pos_label=1))


def uncalibrated_probs(frame: pd.DataFrame, temperature: float) -> np.ndarray:
    """Probabilities before temperature scaling: the saved column, else recovered exactly from the
    calibrated ones (p = sigmoid(margin / T), so the raw sigmoid(margin) = sigmoid(T * logit(p)))."""
    if "prob_uncalibrated" in frame:
        raw = pd.to_numeric(frame["prob_uncalibrated"], errors="coerce").to_numpy(dtype=float)
        if np.all(np.isfinite(raw)):
            return raw
    p = np.clip(frame["prob"].to_numpy(dtype=float), 1e-12, 1 - 1e-12)
    return 1.0 / (1.0 + np.exp(-temperature * np.log(p / (1 - p))))


def calibration_summary(labels: np.ndarray, calibrated: np.ndarray, uncalibrated: np.ndarray,
                        n_bins: int = N_BINS) -> dict:
    """ECE and Brier score before and after temperature scaling, with the reliability bins of both."""
    out = {"n_bins": n_bins, "binning": f"{n_bins} equal-width bins"}
    for key, probs in (("before", uncalibrated), ("after", calibrated)):
        out[key] = {"ece": expected_calibration_error(labels, probs, n_bins), "brier": brier_score(labels, probs),
                    "bins": reliability_bins(labels, probs, n_bins)}
    return out


def temperature_note(report: dict) -> str:
    """The fitted temperature in words, or why the fit was refused."""
    t = report.get("temperature")
    fit = report.get("temperature_fit") if isinstance(report.get("temperature_fit"), dict) else {}
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        return "No temperature recorded for this run: probabilities are shown as saved."
    if fit.get("fitted") is False:
        return f"Temperature scaling was refused ({fit.get('note') or 'no reason recorded'}): T = 1, " \
               "probabilities are the model's own."
    return (f"Temperature T = {t:.3f}, fitted on validation (probability = softmax(logits / T)); "
            f"{'T > 1 softens' if t > 1 else 'T < 1 sharpens'} the model's probabilities. The ranking, AUC "
            "and the meaning of the threshold do not change.")
