"""Datasets given as a label file plus a folder of images: a generic CSV (a path and a label column), or the files
of the public chest X-ray datasets as they are downloaded (RSNA Pneumonia Detection, NIH ChestX-ray14, CheXpert).

A label file becomes the same DatasetIndex a folder-per-class tree gives (classes NORMAL and PNEUMONIA, where
NORMAL means "negative for pneumonia in this file"), so everything downstream reads it unchanged. Nothing is
dropped silently: rows whose image is missing, images without a row, contradictory duplicate rows, unknown label
values and rows a policy leaves out are listed with the reason.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import LABEL_FORMATS
from .dataset import (
    SPLIT_ALIASES,
    DatasetError,
    DatasetIndex,
    ImageRecord,
    display_path,
    has_valid_name,
    is_image_file,
    open_regular_file,
    patient_id,
    scan_dataset,
)

FORMATS = LABEL_FORMATS
UNCERTAIN_POLICIES = ("ignore", "positive", "negative")
OTHER_FINDINGS_POLICIES = ("exclude", "negative")
CLASSES = ["NORMAL", "PNEUMONIA"]
MAX_LABEL_FILE_BYTES = 512 * 2**20  # CheXpert's train.csv is about 30 MB, NIH's Data_Entry 8 MB
MAX_FIELD = 256  # longer cells are cut (they are shown and stored)
METADATA = ("age", "sex", "view", "site")
# Column names recognised in a generic CSV (compared without case, spaces, '_' and '/').
PATH_NAMES = ("path", "file", "filename", "image", "imagepath", "imageindex", "dicom")
LABEL_NAMES = ("label", "class", "target", "pneumonia", "classname", "y")
PATIENT_NAMES = ("patient", "patientid", "subject", "subjectid")
SPLIT_NAMES_COL = ("split", "set", "fold", "partition")
METADATA_NAMES = {"age": ("age", "patientage"), "sex": ("sex", "gender", "patientsex", "patientgender"),
                  "view": ("view", "viewposition", "appa", "projection"),
                  "site": ("site", "hospital", "institution", "center", "centre")}
DEFAULT_POSITIVE = ("1", "1.0", "true", "yes", "positive", "pneumonia")
DEFAULT_NEGATIVE = ("0", "0.0", "false", "no", "negative", "normal")
FORMAT_HELP = {
    "csv": "any CSV: a path column and a label column (options name them when the names are not obvious)",
    "rsna": "RSNA Pneumonia Detection: stage_2_train_labels.csv (patientId, Target) over <patientId>.dcm files",
    "nih": "NIH ChestX-ray14: Data_Entry_2017.csv (Image Index, Finding Labels, Patient ID, Patient Age, "
           "Patient Gender, View Position) over the PNG folder",
    "chexpert": "CheXpert: train.csv or valid.csv (Path, Sex, Age, Frontal/Lateral, AP/PA, Pneumonia) under the "
                "folder that holds the Path column's first folder",
}


@dataclass(frozen=True)
class LabelSpec:
    """How to read a label file. Empty strings take the format's defaults."""

    file: str
    format: str = "csv"
    path_col: str = ""
    label_col: str = ""
    patient_col: str = ""
    split_col: str = ""
    positive_value: str = ""  # comma-separated values that mean positive
    negative_value: str = ""
    uncertain: str = "ignore"  # CheXpert's -1
    other_findings: str = "exclude"  # NIH images with findings other than pneumonia

    def describe(self) -> str:
        """One line for reports: the file, format and the policies that decided labels."""
        words = [f"label file {display_path(self.file)} ({self.format})"]
        if self.format == "chexpert":
            words.append(f"uncertain (-1) pneumonia labels: {self.uncertain}")
        if self.format == "nih":
            words.append("images with other findings and no pneumonia: "
                         + ("counted as negative" if self.other_findings == "negative" else "left out"))
        return "; ".join(words)


def spec_from(options: object) -> LabelSpec | None:
    """The LabelSpec of a TrainConfig or CLI namespace (attributes labels, labels_format, path_col, ...); None
    when no label file is given. Raises ValueError for an option that cannot be honoured."""
    file = getattr(options, "labels", "") or ""
    if not file:
        return None
    fmt = getattr(options, "labels_format", "") or "csv"
    if fmt not in FORMATS:
        raise ValueError(f"--labels-format must be one of {', '.join(FORMATS)}, not '{fmt}'.")
    uncertain = getattr(options, "uncertain", "") or "ignore"
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"--uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, not '{uncertain}'.")
    other = getattr(options, "other_findings", "") or "exclude"
    if other not in OTHER_FINDINGS_POLICIES:
        raise ValueError(f"--other-findings must be one of {', '.join(OTHER_FINDINGS_POLICIES)}, not '{other}'.")
    return LabelSpec(str(file), fmt, *(str(getattr(options, name, "") or "") for name in (
        "path_col", "label_col", "patient_col", "split_col", "positive_value", "negative_value")), uncertain, other)


def _norm(name: str) -> str:
    return re.sub(r"[\s_/\-]", "", name).lower()


def _find_column(columns: list[str], given: str, names: tuple[str, ...], what: str, option: str,
                 required: bool) -> str | None:
    if given:
        if given in columns:
            return given
        matches = [c for c in columns if c.strip().lower() == given.strip().lower()]
        if len(matches) == 1:
            return matches[0]
        raise DatasetError(f"{option} '{given}' is not a column of the label file (columns: "
                           f"{', '.join(columns[:30])}).")
    by_norm = {_norm(c): c for c in columns}
    for name in names:
        if name in by_norm:
            return by_norm[name]
    if required:
        raise DatasetError(f"No {what} column found in the label file (columns: {', '.join(columns[:30])}): name it "
                           f"with {option}.")
    return None


def read_label_rows(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a CSV label file read as text (untrusted: size-capped, a regular file only)."""
    try:
        with open_regular_file(path) as f:
            data = f.read(MAX_LABEL_FILE_BYTES + 1)
    except ValueError as e:
        raise DatasetError(f"Label file {display_path(path)}: {e}") from None
    if len(data) > MAX_LABEL_FILE_BYTES:
        raise DatasetError(f"Label file {display_path(path)} is larger than {MAX_LABEL_FILE_BYTES // 2**20} MB.")
    text = data.decode("utf-8-sig", errors="replace")
    if "\0" in text[:65536]:
        raise DatasetError(f"Label file {display_path(path)} is not a text (CSV) file.")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = []
        for raw in reader:
            rows.append({(k or "").strip(): (v if isinstance(v, str) else "").strip()[:MAX_FIELD]
                         for k, v in raw.items() if k is not None})
    except csv.Error as e:
        raise DatasetError(f"Label file {display_path(path)} is not a readable CSV ({e}).") from None
    if not columns or not rows:
        raise DatasetError(f"Label file {display_path(path)} has no rows (expected a header line and one row per "
                           "image).")
    return columns, rows


@dataclass
class _Columns:
    path: str
    label: str
    patient: str | None
    split: str | None
    metadata: dict[str, str] = field(default_factory=dict)


def _columns(spec: LabelSpec, columns: list[str]) -> _Columns:
    defaults = {"rsna": ("patientId", "Target", "patientId", ""),
                "nih": ("Image Index", "Finding Labels", "Patient ID", ""),
                "chexpert": ("Path", "Pneumonia", "", "")}.get(spec.format, ("", "", "", ""))
    path = _find_column(columns, spec.path_col or defaults[0], PATH_NAMES, "image path", "--path-col", True)
    label = _find_column(columns, spec.label_col or defaults[1], LABEL_NAMES, "label", "--label-col", True)
    patient = _find_column(columns, spec.patient_col or defaults[2], PATIENT_NAMES, "patient", "--patient-col",
                           bool(spec.patient_col))
    split = _find_column(columns, spec.split_col, SPLIT_NAMES_COL, "split", "--split-col", bool(spec.split_col))
    metadata = {}
    for key, names in METADATA_NAMES.items():
        found = _find_column(columns, "", names, key, "", False)
        if found and found not in (path, label, patient, split):
            metadata[key] = found
    if spec.format == "chexpert" and "Frontal/Lateral" in columns:
        metadata["lateral"] = "Frontal/Lateral"
    return _Columns(path, label, patient, split, metadata)


def _label(spec: LabelSpec, value: str) -> tuple[int | None, str | None]:
    """(0/1, None), or (None, why the row is left out)."""
    v = value.strip()
    if spec.format == "nih":
        findings = [f.strip().lower() for f in v.split("|") if f.strip()]
        if "pneumonia" in findings:
            return 1, None
        if findings == ["no finding"]:
            return 0, None
        if not findings:
            return None, "no Finding Labels"
        if spec.other_findings == "negative":
            return 0, None
        return None, f"other findings without pneumonia ({v[:80]}): left out (--other-findings negative counts them)"
    if spec.format == "chexpert":
        if v == "":
            return None, "no Pneumonia label (blank): left out"
        try:
            number = float(v)
        except ValueError:
            return None, f"unknown label value '{v[:40]}'"
        if number == 1:
            return 1, None
        if number == 0:
            return 0, None
        if number == -1:
            if spec.uncertain == "ignore":
                return None, "uncertain pneumonia label (-1): left out (--uncertain positive or negative uses it)"
            return int(spec.uncertain == "positive"), None
        return None, f"unknown label value '{v[:40]}'"
    positive = {x.strip().lower() for x in spec.positive_value.split(",") if x.strip()} or set(DEFAULT_POSITIVE)
    negative = {x.strip().lower() for x in spec.negative_value.split(",") if x.strip()} or set(DEFAULT_NEGATIVE)
    lowered = v.lower()
    if lowered in positive and lowered not in negative:
        return 1, None
    if lowered in negative:
        return 0, None
    if v == "":
        return None, "no label (blank)"
    return None, (f"unknown label value '{v[:40]}' (positive: {', '.join(sorted(positive))}; negative: "
                  f"{', '.join(sorted(negative))}; set --positive-value / --negative-value)")


def _image_candidates(root: Path, spec: LabelSpec, value: str) -> list[Path]:
    """Where a row's image may be: the path under the image root, RSNA's <patientId>.dcm, CheXpert's Path whose
    first folder is the dataset's own folder (the root itself or a folder in it)."""
    value = value.replace("\\", "/")
    if spec.format == "rsna" and not Path(value).suffix:
        value += ".dcm"
    rel = Path(value)
    if rel.is_absolute() or ".." in rel.parts:
        return []  # a label file points into its image root only
    out = [root / rel]
    for strip in (1, 2):
        if len(rel.parts) > strip:
            out.append(root / Path(*rel.parts[strip:]))
    return out


def _walk_images(root: Path) -> dict[str, Path]:
    """Every image file under the root by its path relative to the root (hidden entries skipped)."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        for name in filenames:
            if name.startswith((".", "__")):
                continue
            p = Path(dirpath) / name
            if has_valid_name(p) and is_image_file(p):
                found[str(p)] = p
    return found


def _flat_index(files: dict[str, Path]) -> dict[str, list[Path]]:
    by_name: dict[str, list[Path]] = {}
    for p in files.values():
        for key in {p.name, p.stem}:
            by_name.setdefault(key, []).append(p)
    return by_name


def _metadata(spec: LabelSpec, cols: _Columns, row: dict[str, str]) -> dict[str, str]:
    out = {}
    for key, column in cols.metadata.items():
        value = row.get(column, "").strip()
        if key == "age":
            m = re.fullmatch(r"(\d{1,3})(?:\.\d+)?\s*[Yy]?", value)  # NIH's older release writes 058Y
            value = str(int(m.group(1))) if m and int(m.group(1)) <= 120 else ""
        elif key == "sex":
            value = {"male": "M", "female": "F", "m": "M", "f": "F"}.get(value.lower(), value.upper()[:16])
        elif key == "lateral":
            continue
        else:
            value = value.upper() if key == "view" else value
        if value:
            out[key] = value
    if spec.format == "chexpert" and not out.get("view") and row.get("Frontal/Lateral", "").lower() == "lateral":
        out["view"] = "LATERAL"
    return out


def scan_labeled(root: str | os.PathLike, spec: LabelSpec) -> DatasetIndex:
    """Index the images a label file lists under an image root. Raises DatasetError for a file or folder that
    cannot be used at all; lists every row or image left out (DatasetIndex.unusable) with the reason."""
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DatasetError(f"Image folder not found: {display_path(root_path)} (with --labels, --data is the folder "
                           "the label file's paths are relative to).")
    root_path = root_path.resolve()
    label_file = Path(spec.file).expanduser()
    if not label_file.exists():
        raise DatasetError(f"Label file not found: {display_path(label_file)}")
    columns, rows = read_label_rows(label_file)
    cols = _columns(spec, columns)
    files = _walk_images(root_path)
    by_name = _flat_index(files)
    label_file_abs = str(label_file.resolve())

    unusable: dict[str, str] = {}
    chosen: dict[str, tuple[int, str, str | None, dict[str, str], int]] = {}  # path -> label, patient, split, meta, row
    conflicts: set[str] = set()
    mentioned: set[str] = set()  # images named by at least one row
    left_out: list[tuple[str, str, str]] = []  # (image, row, why) of rows that name an image but cannot be used
    for n, row in enumerate(rows, start=2):  # row 1 is the header
        where = f"{display_path(label_file)} row {n}"
        value = row.get(cols.path, "")
        if not value:
            unusable[f"{where}"] = f"no image path in column '{cols.path}'"
            continue
        label, why = _label(spec, row.get(cols.label, ""))
        candidates = _image_candidates(root_path, spec, value)
        image = next((c for c in candidates if str(c) in files), None)
        if image is None and len(Path(value).parts) == 1:
            same = by_name.get(value) or by_name.get(Path(value).stem) or []
            image = same[0] if len(same) == 1 else None
        if image is None:
            unusable[f"{where}: {value[:200]}"] = (f"image not found under {display_path(root_path)}"
                                                  if candidates else "path outside the image folder (absolute or "
                                                                     "with '..'): refused")
            continue
        key = str(image)
        mentioned.add(key)
        if label is None:
            left_out.append((key, where, why or ""))
            continue
        patient = row.get(cols.patient, "").strip() if cols.patient else ""
        if not patient and spec.format == "chexpert":  # CheXpert's paths name the patient's folder
            m = re.search(r"(?:^|/)(patient\d+)/", value.replace("\\", "/"))
            patient = m.group(1) if m else ""
        split = None
        if cols.split:
            raw = row.get(cols.split, "").strip().lower()
            split = SPLIT_ALIASES.get(raw)
            if split is None:
                left_out.append((key, where, f"unknown split '{raw[:40]}' in column '{cols.split}'"))
                continue
        meta = _metadata(spec, cols, row)
        if key in chosen:
            previous = chosen[key]
            if previous[0] != label or previous[2] != split:
                conflicts.add(key)
                unusable[display_path(key)] = (f"contradictory rows: row {previous[4]} says "
                                               f"{CLASSES[previous[0]]}, row {n} says {CLASSES[label]}"
                                               if previous[0] != label else
                                               f"contradictory rows: rows {previous[4]} and {n} give different splits")
            continue  # an identical duplicate (RSNA writes one row per box) is one image
        chosen[key] = (label, patient, split, meta, n)
    for key in conflicts:
        chosen.pop(key, None)
    for key, where, why in left_out:
        if key in chosen or key in conflicts:
            unusable[f"{where}: {display_path(key)}"] = f"{why}; the image's other row is used"
        else:
            unusable.setdefault(display_path(key), f"{why} ({where})")
    for key in files:
        if key not in mentioned:
            unusable[display_path(key)] = f"image without a row in {display_path(label_file)}"

    records = []
    for key, (label, patient, split, meta, _n) in sorted(chosen.items()):
        records.append(ImageRecord(key, CLASSES[label], label, patient or patient_id(Path(key).name), split,
                                   metadata=meta))
    if not records:
        raise DatasetError(f"No usable rows in {display_path(label_file)} for images under {display_path(root_path)}"
                           f" ({len(rows)} rows; {len(unusable)} left out, e.g. "
                           f"{'; '.join(f'{k}: {v}' for k, v in list(unusable.items())[:2])}).")
    for cls in (0, 1):
        if not any(r.label == cls for r in records):
            unknown = next((v for v in unusable.values() if v.startswith("unknown label value")), "")
            raise DatasetError(f"{display_path(label_file)} gives no {CLASSES[cls]} (label {cls}) image under "
                               f"{display_path(root_path)}: training and evaluation need both. Check the label "
                               "column and --positive-value / --negative-value" + (f"; e.g. {unknown}" if unknown
                                                                                   else "."))
    return DatasetIndex(str(root_path), list(CLASSES), CLASSES[1], cols.split is not None, records, [], unusable,
                        label_file=label_file_abs, labels=spec.describe(),
                        patients_from=f"column '{cols.patient}' of the label file" if cols.patient else
                        "the patientNNNNN folders of the paths" if spec.format == "chexpert" else "")


def load_index(root: str | os.PathLike, spec: LabelSpec | None = None,
               positive_class: str | None = None) -> DatasetIndex:
    """The dataset under `root`: from the label file when one is given, else from its class folders."""
    if spec is None:
        return scan_dataset(root, positive_class)
    return scan_labeled(root, spec)
