"""Metrics of a run at its one operating threshold, with patient-bootstrap intervals, for every view.

Every view (Train's summary, Compare, Thresholds, `runs`, `evaluate`, the report) reads its numbers from
here, computed from the saved per-image predictions: saving a threshold changes them all at once,
without retraining.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import runs
from .bootstrap import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    Interval,
    PatientBootstrap,
    ThresholdCounts,
    format_interval,
    intervals_at_threshold,
    ranking_intervals,
    summary_to_json,
)


@dataclass
class PredictionSet:
    """One set of per-image predictions (val, test or an external folder) ready for metrics."""

    name: str
    frame: pd.DataFrame  # path, label, prob, and patient / class_name when known
    labels: np.ndarray
    probs: np.ndarray
    patients: np.ndarray | None
    class_names: list[str]  # [negative, positive]

    @property
    def both_classes(self) -> bool:
        return len(np.unique(self.labels)) == 2


def class_names_of(df: pd.DataFrame, run_dir: Path) -> list[str]:
    """[negative, positive] names: from the predictions, else the run's data report."""
    if "class_name" in df:
        by_label = df.drop_duplicates("label").set_index("label")["class_name"]
        if 0 in by_label.index and 1 in by_label.index:
            return [str(by_label[0]), str(by_label[1])]
    report = runs.read_json(Path(run_dir) / "data_report.json", {})
    classes = report.get("classes") if isinstance(report, dict) else None  # a damaged report may be a list
    if isinstance(classes, list) and len(classes) == 2:
        return [str(c) for c in classes]
    return ["negative", "positive"]


def load_set(run_dir: Path, name: str) -> PredictionSet:
    """One set's predictions, checked (runs.read_predictions); an external set's row count is also checked
    against its summary.json, as the run's own sets are against split.csv, so a cut-short file is refused."""
    df = runs.read_predictions(Path(run_dir), name)
    if name.startswith(runs.EXTERNAL_PREFIX):
        from .external import check_prediction_count  # external imports this module

        check_prediction_count(run_dir, name[len(runs.EXTERNAL_PREFIX):], len(df))
    patients = df["patient"].to_numpy(dtype=str) if "patient" in df and (df["patient"] != "").all() else None
    return PredictionSet(name, df, df["label"].to_numpy(dtype=int), df["prob"].to_numpy(dtype=float), patients,
                         class_names_of(df, Path(run_dir)))


def bootstrap_for(pset: PredictionSet, n_resamples: int = DEFAULT_RESAMPLES,
                  seed: int = DEFAULT_SEED) -> PatientBootstrap:
    return PatientBootstrap(pset.patients, len(pset.labels), n_resamples, seed)


def set_summary(pset: PredictionSet, threshold: float, boot: PatientBootstrap | None = None,
                ranking: dict[str, Interval] | None = None, counts: ThresholdCounts | None = None) -> dict:
    """Every metric with its 95% interval at `threshold` (JSON-ready), for one prediction set; `ranking` and
    `counts` (of the same set and resamples) spare interactive views the threshold-free work."""
    boot = boot or bootstrap_for(pset)
    summary = intervals_at_threshold(pset.labels, pset.probs, threshold, boot, ranking, counts)
    return {"set": pset.name, "patients_known": pset.patients is not None, **summary_to_json(summary)}


def run_summary(run_dir: Path, sets: list[str] | None = None, threshold: float | None = None) -> dict:
    """{"operating": OperatingPoint, "threshold": used, "sets": {name: summary}, "errors": {name: message}}
    at the run's operating threshold (or `threshold` when given). A missing or damaged predictions file is
    reported under "errors"; it does not stop the other sets."""
    run_dir = Path(run_dir)
    op = runs.operating_point(run_dir)
    used = op.threshold if threshold is None else float(threshold)
    out: dict = {"operating": op, "threshold": used, "sets": {}, "errors": {}}
    for name in sets if sets is not None else runs.prediction_sets(run_dir):
        try:
            out["sets"][name] = set_summary(load_set(run_dir, name), used)
        except (FileNotFoundError, ValueError) as e:
            out["errors"][name] = str(e)
    return out


# How far a set's estimate must lie from an interval of no width (every validation resample gave the same value)
# to be called a shift: outside such an interval by a single image is noise, not a different population.
DEGENERATE_MARGIN = 0.01


def shift_warnings(val: dict, test: dict, other_name: str = "test") -> list[str]:
    """Where `test`'s estimate falls outside validation's 95% interval (AUC, and the sensitivity and
    specificity at the operating threshold): validation then does not represent that set."""
    out = []
    for key, label in (("auc", "AUC"), ("sensitivity", "sensitivity"), ("specificity", "specificity")):
        v, t = val["metrics"].get(key) or {}, test["metrics"].get(key) or {}
        value, low, high = t.get("value"), v.get("low"), v.get("high")
        if None in (value, low, high) or not np.all(np.isfinite([value, low, high])):
            continue
        if high - low < 1e-12 and abs(value - low) <= DEGENERATE_MARGIN:
            continue  # every resample alike (e.g. sensitivity 1.0): a hair off it is not a shift
        if not low <= value <= high:
            out.append(f"{other_name} {label} {value:.3f} lies outside validation's 95% interval "
                       f"[{low:.3f}, {high:.3f}]")
    return out


def ranking_only(pset: PredictionSet, boot: PatientBootstrap) -> dict[str, Interval]:
    """AUC and PR-AUC with intervals: threshold-free, so cached once per set by interactive views."""
    return ranking_intervals(pset.labels, pset.probs, boot)


def curve_data(pset: PredictionSet, ranking: dict[str, Interval] | None, colour: str | None = None) -> dict:
    """ROC and PR points of a set for core.figures, with AUC / PR-AUC (and intervals when given)."""
    from .metrics import pr_points, roc_points

    if not pset.both_classes:
        return {"roc": None, "pr": None}
    roc, pr = roc_points(pset.labels, pset.probs), pr_points(pset.labels, pset.probs)
    auc = ranking["auc"].as_dict() if ranking else float(np.nan)
    pr_auc = ranking["pr_auc"].as_dict() if ranking else pr["auc"]
    return {"roc": {**roc, "auc": auc, "colour": colour},
            "pr": {**pr, "auc": pr_auc, "prevalence": float(np.mean(pset.labels)), "colour": colour}}


def format_metric(summary: dict, key: str, digits: int = 3) -> str:
    return format_interval((summary.get("metrics") or {}).get(key), digits)
