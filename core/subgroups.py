"""Subgroup metrics with patient-bootstrap intervals: Kermany's groups from file names (bacterial vs
viral pneumonia, the two NORMAL series), the image metadata a predictions file carries (age band, sex, view
position, site), and any grouping from a user's CSV (a path column plus group columns)."""

from __future__ import annotations

import io
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .bootstrap import Interval, PatientBootstrap, ThresholdCounts, intervals_at_threshold, ranking_intervals

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


MAX_GROUPS_CSV_BYTES = 50 * 2**20  # a row per image: a million images fit in far less
MAX_GROUP_COLUMNS = 20
MAX_GROUPS_PER_COLUMN = 100  # more distinct values is an identifier (a patient id), not a grouping
EXAMPLES = 3


@dataclass
class GroupsTable:
    """A validated groups CSV: one row per image path (`key` column) with its group columns."""

    path: str
    key: str
    table: pd.DataFrame  # the key column and the group columns, one row per path
    notes: list[str]  # what was tidied on the way (identical duplicate rows, rows without a path)


def _examples(items: list[str]) -> str:
    shown = ", ".join(items[:EXAMPLES])
    return shown + (f" and {len(items) - EXAMPLES} more" if len(items) > EXAMPLES else "")


def read_csv_text_table(csv_path: str, where: str, blank_as_missing: bool = False) -> pd.DataFrame:
    """An untrusted CSV (regular file, size-capped, text) as a table of strings; ValueError naming `where` when it
    cannot be read, is empty or does not parse. Blank cells are '' (or missing, with `blank_as_missing`)."""
    try:
        text = _text_of(csv_path)
    except ValueError as e:
        raise ValueError(f"Cannot read {where}: {e}.") from None
    if not text.strip():
        raise ValueError(f"Cannot read {where}: it is empty.")
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False,
                           na_values=[""] if blank_as_missing else None)
    except Exception as e:  # pandas raises several parser error types
        raise ValueError(f"Cannot read {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}.") from None


def _text_of(csv_path: str) -> str:
    """The file's text, refused with a one-line reason when it is not a regular file, too large, binary or
    not UTF-8."""
    from .dataset import open_regular_file

    try:
        with open_regular_file(csv_path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_GROUPS_CSV_BYTES:
                raise ValueError(f"it is {size / 2**20:.0f} MB; a groups CSV is at most "
                                 f"{MAX_GROUPS_CSV_BYTES // 2**20} MB")
            data = f.read(MAX_GROUPS_CSV_BYTES + 1)
    except OSError as e:
        raise ValueError(e.strerror or str(e)) from None
    if b"\0" in data:
        raise ValueError("it is a binary file, not a CSV")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text (save the CSV as UTF-8)") from None


def read_groups_csv(csv_path: str | Path, columns: list[str] | None = None) -> GroupsTable:
    """A groups CSV read as untrusted: a path column (path, file, filename, ...) plus group columns (all other
    columns unless `columns`). Raises ValueError with a one-line message naming the file for a missing,
    non-regular, huge, binary or empty file, a missing path or group column, a column with too many distinct
    values to be a grouping, and a path listed twice with different groups (which row is right cannot be
    known); identical duplicate rows are counted once and said so in `notes`."""
    csv_path = str(csv_path)
    where = f"the groups CSV {csv_path}"
    table = read_csv_text_table(csv_path, where, blank_as_missing=True)
    names = [str(c) for c in table.columns]
    key = next((c for c in table.columns if str(c).strip().lower() in PATH_COLUMNS), None)
    if key is None:
        raise ValueError(f"{csv_path} needs a column naming the image ({', '.join(PATH_COLUMNS)}); "
                         f"it has {_examples(names)}.")
    group_columns = list(columns) if columns else [c for c in table.columns if c != key]
    missing = [c for c in group_columns if c not in table.columns or c == key]
    if missing or not group_columns:
        raise ValueError(f"{csv_path}: group columns {missing or '(none)'} not found; it has {_examples(names)}.")
    if len(group_columns) > MAX_GROUP_COLUMNS:
        raise ValueError(f"{csv_path} has {len(group_columns)} group columns; at most {MAX_GROUP_COLUMNS} (name the "
                         "ones to use).")
    notes = []
    table = table[[key, *group_columns]].assign(**{key: table[key].str.strip()})
    no_path = int(table[key].isna().sum() + (table[key] == "").sum())
    table = table[table[key].notna() & (table[key] != "")]
    if no_path:
        notes.append(f"{no_path} row{'s' * (no_path != 1)} without a path skipped")
    if table.empty:
        raise ValueError(f"{csv_path} lists no image (no row has a path).")
    for column in group_columns:
        distinct = table[column].nunique(dropna=True)
        if distinct > MAX_GROUPS_PER_COLUMN:
            raise ValueError(f"{csv_path}: the column {column!r} has {distinct:,} distinct values; a grouping has at "
                             f"most {MAX_GROUPS_PER_COLUMN} (an identifier such as a patient id is not a grouping).")
    filled = table.fillna({c: "\0missing" for c in group_columns})  # NaN never equals NaN: compare a marker
    unique_rows = filled.drop_duplicates()
    conflicting = unique_rows[key][unique_rows[key].duplicated()].unique().tolist()
    if conflicting:
        raise ValueError(f"{csv_path} lists {len(conflicting)} image path{'s' * (len(conflicting) != 1)} more than "
                         f"once with different groups ({_examples(conflicting)}): keep one row per image.")
    repeated = len(table) - len(unique_rows)
    if repeated:
        notes.append(f"{repeated} repeated row{'s' * (repeated != 1)} (same path, same groups) counted once")
    table = table.loc[unique_rows.index].reset_index(drop=True)
    return GroupsTable(csv_path, key, table, notes)


def groups_from_csv(paths: pd.Series, csv_path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Group columns for `paths` from a groups CSV (see read_groups_csv), matched by full path, else by file
    name. A file name the CSV gives different groups under different folders is refused when an image needs
    it. What was tidied is in the result's attrs["notes"]."""
    groups = read_groups_csv(csv_path, columns)
    csv_path, key, table = groups.path, groups.key, groups.table
    group_columns = [c for c in table.columns if c != key]
    by_path = table.set_index(key)[group_columns]
    named = table.assign(_name=table[key].map(lambda p: Path(p).name))
    marked = named.fillna({c: "\0missing" for c in group_columns})
    distinct = marked.drop_duplicates(["_name", *group_columns])
    ambiguous = set(distinct["_name"][distinct["_name"].duplicated()])
    by_name = named.drop_duplicates("_name").set_index("_name")[group_columns]
    full = by_path.reindex(paths.astype(str).to_numpy())
    file_names = paths.map(lambda p: Path(str(p)).name)
    needs_name = full.isna().all(axis=1).to_numpy() & file_names.isin(ambiguous).to_numpy()
    if needs_name.any():
        clashing = sorted(set(file_names[needs_name]))
        raise ValueError(f"{csv_path} gives different groups to files of the same name in different folders "
                         f"({_examples(clashing)}), and this set's images are not listed by their full path: list "
                         "them by full path.")
    short = by_name.reindex(file_names.to_numpy())
    merged = full.where(full.notna(), short.to_numpy())
    merged.index = paths.index
    if merged.isna().all().all():
        raise ValueError(f"No image of this set is named in {csv_path} (matched by path, then file name).")
    merged.attrs["notes"] = list(groups.notes)
    return merged


# The image metadata a predictions file may carry (read from a label file or DICOM headers, normalised when the
# dataset is read; see core.runs.read_predictions), and the grouping each gives.
METADATA_GROUPINGS = {"age": "age band", "sex": "sex", "view": "view position", "site": "site"}
UNKNOWN = "unknown"
MAX_GROUP_TEXT = 40  # characters of a group's name: text from a file is cut, never as wide as it likes
MAX_AGE = 120  # years; an older age is a damaged field
# Age bands in years, [low, high). 18 separates children from adults, the shift a model trained on one transfers
# worst across (Kermany's images are of 1-5-year-olds); under 5 is where most childhood pneumonia is, and viral;
# 65 is the usual geriatric cut-off (the highest pneumonia risk, the most bedside AP films); 40 splits the
# working-age adults in two of similar size.
AGE_BANDS = ((0, 5, "0-4"), (5, 18, "5-17"), (18, 40, "18-39"), (40, 65, "40-64"), (65, MAX_AGE, "65+"))
NO_METADATA = ("No image metadata in these predictions: age, sex, view position and site come from a label file "
               "(NIH's Data_Entry_2017.csv, CheXpert's train.csv) or DICOM headers; folders of PNG/JPEG images, and "
               "predictions written before this version, carry none.")


def group_text(value: object) -> str | None:
    """A group's name from untrusted text: control and format characters (a terminal's escape codes, a
    right-to-left override) become spaces, runs of spaces one, and it is cut to MAX_GROUP_TEXT characters;
    None when blank."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)[:4 * MAX_GROUP_TEXT]  # no need to clean what is cut anyway
    text = " ".join("".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text).split())
    if not text:
        return None
    return text if len(text) <= MAX_GROUP_TEXT else text[:MAX_GROUP_TEXT - 1] + "…"


def age_band(value: object) -> str:
    """The band (AGE_BANDS) of an age in years; UNKNOWN for a blank, text, a negative age or one over MAX_AGE."""
    try:
        years = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return UNKNOWN
    return next((label for low, high, label in AGE_BANDS if low <= years < high or years == high == MAX_AGE),
                UNKNOWN)


def metadata_groups(frame: pd.DataFrame) -> pd.DataFrame:
    """Group columns from a set's image metadata, rows aligned with `frame`: "age band" (from `age`, AGE_BANDS),
    "sex", "view position" (from `view`) and "site", each only when its column is there and holds at least one
    known value. An image without a value (blank, or an age that is no age) is in the group "unknown", so every
    grouping counts every image. The groups are ordered (ages by band, text alphabetically, unknown last). A text
    column with more than MAX_GROUPS_PER_COLUMN distinct values is an identifier, not a grouping: it is left out
    and said so in attrs["notes"]."""
    out = pd.DataFrame(index=frame.index)
    notes = []
    for column, grouping in METADATA_GROUPINGS.items():
        if column not in frame:
            continue
        if column == "age":
            values = frame[column].map(age_band)
            order = [label for _, _, label in AGE_BANDS]
        else:
            values = frame[column].map(lambda v: group_text(v) or UNKNOWN)
            order = sorted(set(values) - {UNKNOWN})
            if len(order) > MAX_GROUPS_PER_COLUMN:
                notes.append(f"Image metadata: {grouping} has {len(order):,} distinct values, more than a grouping "
                             f"has ({MAX_GROUPS_PER_COLUMN}): left out")
                continue
        if (values == UNKNOWN).all():
            continue
        out[grouping] = pd.Categorical(values, categories=[*order, UNKNOWN], ordered=True)
    out.attrs["notes"] = notes
    return out


def set_groups(frame: pd.DataFrame, groups_csv: str | Path | None = None,
               columns: list[str] | None = None) -> pd.DataFrame:
    """Every grouping of a set's images (`frame`: its predictions, path column and any metadata), rows aligned
    with it: Kermany's groups from file names, the image metadata (metadata_groups), and a user's groups CSV when
    given (groups_from_csv; its values cleaned as group names, an image it does not name in no group of it; a
    column of it replaces an automatic grouping of the same name). What was tidied or left out is in
    attrs["notes"]; raises ValueError for an unusable CSV."""
    metadata = metadata_groups(frame)
    automatic = pd.concat([kermany_groups(frame["path"]), metadata], axis=1)
    notes = list(metadata.attrs.get("notes", []))
    parts = [automatic]
    if groups_csv:
        from_csv = groups_from_csv(frame["path"], groups_csv, columns)
        notes += [f"Groups CSV: {note}" for note in from_csv.attrs.get("notes", [])]
        replaced = [c for c in from_csv.columns if c in automatic.columns]
        notes += [f"Groups CSV: its column {c!r} replaces the automatic grouping of that name" for c in replaced]
        parts = [automatic.drop(columns=replaced),
                 from_csv.apply(lambda values: values.map(group_text).astype(object))]
    groups = pd.concat(parts, axis=1)
    groups.attrs = {"notes": notes}
    return groups


def _groups_in_order(values: pd.Series) -> list:
    """The groups present in a column: in the categories' order (age bands), else alphabetically."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        present = set(values.dropna())
        return [c for c in values.cat.categories if c in present]
    return sorted(values.dropna().unique(), key=str)


@dataclass
class Subgroup:
    grouping: str
    group: str
    labels: np.ndarray
    probs: np.ndarray
    boot: PatientBootstrap | None  # None below MIN_GROUP_IMAGES: no interval
    ranking: dict[str, Interval] | None
    counts: ThresholdCounts | None = None  # the resampled counts at any threshold, looked up at each step


def prepare_subgroups(labels: np.ndarray, probs: np.ndarray, patients: np.ndarray | None, groups: pd.DataFrame,
                      n_resamples: int = 2000, seed: int = 0) -> list[Subgroup]:
    """Each group's images with its own patient resamples and AUC interval: the threshold-free part,
    computed once so that a threshold change only recounts."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=float)
    out = []
    for column in groups.columns:
        values = groups[column]
        for value in _groups_in_order(values):
            mask = (values == value).to_numpy()
            boot = ranking = counts = None
            if mask.sum() >= MIN_GROUP_IMAGES:
                boot = PatientBootstrap(None if patients is None else patients[mask], int(mask.sum()),
                                        n_resamples, seed)
                ranking = ranking_intervals(labels[mask], probs[mask], boot)
                counts = ThresholdCounts(labels[mask], probs[mask], boot)
            out.append(Subgroup(column, str(value), labels[mask], probs[mask], boot, ranking, counts))
    return out


def subgroup_table(subgroups: list[Subgroup], threshold: float) -> pd.DataFrame:
    """One row per (grouping, group): images, positives, negatives, and sensitivity, specificity and
    AUC with 95% patient-bootstrap intervals where the group holds the classes they need."""
    rows = []
    for g in subgroups:
        row = {"grouping": g.grouping, "group": g.group, "images": int(len(g.labels)),
               "positives": int(g.labels.sum()), "negatives": int((g.labels == 0).sum())}
        if g.boot is not None:
            summary = intervals_at_threshold(g.labels, g.probs, threshold, g.boot, g.ranking, g.counts)
            for key in ("sensitivity", "specificity", "auc"):
                row[key] = summary["metrics"][key].as_dict()
        rows.append(row)
    return pd.DataFrame(rows)
