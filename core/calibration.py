"""Calibration: reliability bins, expected calibration error and Brier score, before and after the
temperature scaling fitted on validation at the end of training; the Brier score with its 95% interval from the
same patient resamples as every other figure (core.bootstrap)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import brier_score_loss

from .bootstrap import Interval, PatientBootstrap, format_interval, percentile_interval

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


def resampled_brier(labels: np.ndarray, probs: np.ndarray, boot: PatientBootstrap) -> np.ndarray:
    """The Brier score of every patient resample: image i counted w_i times, so sum_i w_i (p_i - y_i)^2 / sum_i w_i,
    one matrix product per chunk of resamples. (ECE gets no such interval: it sums absolute gaps, so resampling
    noise only adds to it, and its percentile interval misses a well-calibrated model's true ECE of 0 nearly
    always; 0 of 40 simulated sets of 300 images.)"""
    squared = (np.asarray(probs, dtype=np.float64) - np.asarray(labels, dtype=np.float64)) ** 2
    out = []
    step = max(1, 4_000_000 // max(len(squared), 1))  # resample rows per chunk: the weights' float copy stays small
    for start in range(0, boot.n_resamples, step):
        weights = boot.weights[start:start + step].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(weights @ squared / weights.sum(1))
    return np.concatenate(out)


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
                        n_bins: int = N_BINS, boot: PatientBootstrap | None = None) -> dict:
    """ECE and Brier score before and after temperature scaling, with the reliability bins of both; with `boot`
    (the set's patient resamples) also the Brier score's 95% interval ("brier_interval": Interval)."""
    out = {"n_bins": n_bins, "binning": f"{n_bins} equal-width bins"}
    for key, probs in (("before", uncalibrated), ("after", calibrated)):
        brier = brier_score(labels, probs)
        out[key] = {"ece": expected_calibration_error(labels, probs, n_bins), "brier": brier,
                    "bins": reliability_bins(labels, probs, n_bins)}
        if boot is not None:
            out[key]["brier_interval"] = Interval(brier, *percentile_interval(resampled_brier(labels, probs, boot)))
    return out


def calibration_table(summaries: dict[str, dict], digits: int = 3) -> pd.DataFrame:
    """ECE, and the Brier score as 'value [low, high]', before and after scaling (rows), one column per set, for
    the Thresholds page and the report: summaries[label] = calibration_summary(..., boot=...)."""
    def brier(c: dict) -> str:
        return format_interval(c.get("brier_interval") or Interval(c["brier"], float("nan"), float("nan")), digits)

    def ece(c: dict) -> str:
        return f"{c['ece']:.{digits}f}" if math.isfinite(c["ece"]) else "—"

    return pd.DataFrame({label: {"ECE before": ece(c["before"]), "ECE after": ece(c["after"]),
                                 "Brier before": brier(c["before"]), "Brier after": brier(c["after"])}
                         for label, c in summaries.items()})


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
