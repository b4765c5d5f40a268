"""Subgroup metrics with patient-bootstrap intervals: Kermany's groups from file names (bacterial vs
viral pneumonia, the two NORMAL series), or any grouping from a user's CSV (a path column plus group
columns)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .bootstrap import Interval, PatientBootstrap, intervals_at_threshold, ranking_intervals

_SUBTYPE = re.compile(r"^person\d+_(bacteria|virus)_", re.IGNORECASE)
_SERIES = re.compile(r"^(NORMAL2-IM|IM)-\d+-", re.IGNORECASE)
MIN_GROUP_IMAGES = 5  # smaller groups are listed but get no interval
PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "image_path")


def kermany_groups(paths: pd.Series) -> pd.DataFrame:
    """Group columns from Kermany file names; empty when no file name follows Kermany's patterns.
    `pneumonia subtype`: bacterial / viral (pneumonia images only); `normal series`: IM- or NORMAL2-IM-
    (the two acquisition series of the normal images)."""
    names = paths.map(lambda p: Path(str(p)).name)
    subtype = names.map(lambda n: {"bacteria": "bacterial", "virus": "viral"}.get(
        m.group(1).lower()) if (m := _SUBTYPE.match(n)) else None)
    series = names.map(lambda n: (m.group(1).upper() + "-") if (m := _SERIES.match(n)) else None)
    out = pd.DataFrame(index=paths.index)
    if subtype.notna().any():
        out["pneumonia subtype"] = subtype
    if series.notna().any():
        out["normal series"] = series
    return out


def groups_from_csv(paths: pd.Series, csv_path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Group columns from a CSV with one row per image: a path column (path, file, filename, ...) matched
    by full path, else by file name, plus the group columns (all other columns unless `columns`)."""
    try:
        table = pd.read_csv(csv_path, dtype=str)
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot read the groups CSV {csv_path}: {e}") from None
    key = next((c for c in table.columns if c.strip().lower() in PATH_COLUMNS), None)
    if key is None:
        raise ValueError(f"{csv_path} needs a column naming the image ({', '.join(PATH_COLUMNS)}); "
                         f"it has {', '.join(table.columns)}.")
    table = table.dropna(subset=[key])
    group_columns = columns or [c for c in table.columns if c != key]
    missing = [c for c in group_columns if c not in table.columns]
    if missing or not group_columns:
        raise ValueError(f"{csv_path}: group columns {missing or '(none)'} not found; it has "
                         f"{', '.join(table.columns)}.")
    by_path = table.drop_duplicates(key).set_index(key)[group_columns]
    names = table.assign(_name=table[key].map(lambda p: Path(p).name)).drop_duplicates("_name")
    by_name = names.set_index("_name")[group_columns]
    full = by_path.reindex(paths.astype(str).to_numpy())
    short = by_name.reindex(paths.map(lambda p: Path(str(p)).name).to_numpy())
    merged = full.where(full.notna(), short.to_numpy())
    merged.index = paths.index
    if merged.isna().all().all():
        raise ValueError(f"No image of this set is named in {csv_path} (matched by path, then file name).")
    return merged


@dataclass
class Subgroup:
    grouping: str
    group: str
    labels: np.ndarray
    probs: np.ndarray
    boot: PatientBootstrap | None  # None below MIN_GROUP_IMAGES: no interval
    ranking: dict[str, Interval] | None


def prepare_subgroups(labels: np.ndarray, probs: np.ndarray, patients: np.ndarray | None, groups: pd.DataFrame,
                      n_resamples: int = 2000, seed: int = 0) -> list[Subgroup]:
    """Each group's images with its own patient resamples and AUC interval: the threshold-free part,
    computed once so that a threshold change only recounts."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=float)
    out = []
    for column in groups.columns:
        values = groups[column]
        for value in sorted(values.dropna().unique(), key=str):
            mask = (values == value).to_numpy()
            boot = ranking = None
            if mask.sum() >= MIN_GROUP_IMAGES:
                boot = PatientBootstrap(None if patients is None else patients[mask], int(mask.sum()),
                                        n_resamples, seed)
                ranking = ranking_intervals(labels[mask], probs[mask], boot)
            out.append(Subgroup(column, str(value), labels[mask], probs[mask], boot, ranking))
    return out


def subgroup_table(subgroups: list[Subgroup], threshold: float) -> pd.DataFrame:
    """One row per (grouping, group): images, positives, negatives, and sensitivity, specificity and
    AUC with 95% patient-bootstrap intervals where the group holds the classes they need."""
    rows = []
    for g in subgroups:
        row = {"grouping": g.grouping, "group": g.group, "images": int(len(g.labels)),
               "positives": int(g.labels.sum()), "negatives": int((g.labels == 0).sum())}
        if g.boot is not None:
            summary = intervals_at_threshold(g.labels, g.probs, threshold, g.boot, g.ranking)
            for key in ("sensitivity", "specificity", "auc"):
                row[key] = summary["metrics"][key].as_dict()
        rows.append(row)
    return pd.DataFrame(rows)
