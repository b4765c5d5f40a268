"""External validation: a finished run evaluated on another folder of X-rays, saved in the run directory.

The folder may have split folders or not, and its class folders may carry other names than the run's
(`No_findings`, `Bacterial`, `Viral`): each folder maps onto one of the run's two classes, case-insensitively
by name, else through a class map given by the user (`No_findings=NORMAL,Pneumonia=PNEUMONIA`), or is
ignored. Predictions land in `<run>/external/<name>/predictions.csv`, next to a `summary.json` that says
what was evaluated and what to beware of (patients or files shared with the run's training data, a
threshold that may not transfer), so every view that reads prediction sets (Thresholds, Mistakes, the
operating metrics) can read this one as `external:<name>`. A saved evaluation is never replaced without
consent (`replace=True`), and the writers of one run's evaluations take turns (a lock on
`<run>/external/`).
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import tempfile
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from . import dataset, runs
from .bootstrap import METRIC_KEYS, METRIC_LABELS, format_interval
from .cache import decode_images
from .dataset import IMAGE_EXTENSIONS, METADATA_FIELDS, SPLIT_NAMES, DatasetError, patient_id
from .labels import LabelSpec, scan_labeled
from .metrics import (
    TARGET_DEFAULTS,
    THRESHOLD_TARGETS,
    chance_level_warning,
    choose_threshold,
    describe_rule,
    metrics_at_threshold,
)
from .ood import folder_shift, image_gate, verdict_from_score
from .operating import PredictionSet, bootstrap_for, load_set, ranking_only, set_summary

IGNORE = "ignore"
SPLIT_CHOICES = ("all",) + SPLIT_NAMES
SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "predictions.csv"
PREDICTION_COLUMNS = ("path", "patient", "label", "class_name", "source_class", "prob", "prob_uncalibrated",
                      "ood_score", "ood_flag", "ood_reason")
# Splits of the run whose images the model learnt from or was selected on.
SEEN_SPLITS = ("train", "val")
EXAMPLES = 5

Progress = Callable[[int, int], None]


# ---------------------------------------------------------------- class maps

CLASS_MAP_SYNTAX = ("Write the map as 'No_findings=NORMAL,Pneumonia=PNEUMONIA' (a folder may also be '=ignore'); "
                    'quote a name that holds a comma, an equals sign, a double quote or spaces at its ends as a JSON '
                    'string: "a,b"=NORMAL.')
MAX_CLASS_MAP_BYTES = 1 << 20  # a map names folders: a larger file is not one
_JSON = json.JSONDecoder()


def quote_map_name(name: str) -> str:
    """A folder or class name as parse_class_map reads it back: as it is when it can be, else a JSON string."""
    plain = (name and name == name.strip() and name.isprintable() and not name.startswith('"')
             and not any(c in name for c in ",="))
    if plain:
        return name
    # Lone surrogates (file names that are not UTF-8) only survive as \\u escapes.
    return json.dumps(name, ensure_ascii=not name.isprintable())


def _map_token(text: str, start: int) -> tuple[str, int, bool]:
    """(name, index after it, quoted) from `start`: a JSON string when it begins with '"', else the text up to
    the next ',' or '=', stripped."""
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == '"':
        try:
            value, end = _JSON.raw_decode(text, i)
        except ValueError:
            raise ValueError(f"The class map has an unclosed or malformed quoted name at character {i + 1} "
                             f"({_shown(text[i:i + 30])}). {CLASS_MAP_SYNTAX}") from None
        while end < len(text) and text[end].isspace():
            end += 1
        if end < len(text) and text[end] not in ",=":
            raise ValueError(f"The class map has text after the quoted name {_shown(text[i:end])}. {CLASS_MAP_SYNTAX}")
        return value, end, True
    end = i
    while end < len(text) and text[end] not in ",=":
        end += 1
    return text[i:end].strip(), end, False


def _add_map_entry(out: dict[str, str], folder: str, target: str, where: str) -> None:
    """One FOLDER=CLASS entry; a folder named twice (ignoring case) must name the same class."""
    if not folder or not target.strip():
        raise ValueError(f"{where} is not FOLDER=CLASS. {CLASS_MAP_SYNTAX}")
    target = target.strip()
    previous = next((f for f in out if f.lower() == folder.lower()), None)
    if previous is None:
        out[folder] = target
    elif out[previous].lower() != target.lower():  # a repeated entry keeps its first spelling
        raise ValueError(f"The class map names the folder {quote_map_name(folder)} twice, as "
                         f"'{out[previous]}' and '{target}'.")


def parse_class_map(text: str) -> dict[str, str]:
    """'No_findings=NORMAL,Pneumonia=PNEUMONIA' -> {'No_findings': 'NORMAL', 'Pneumonia': 'PNEUMONIA'}; a name in
    double quotes is a JSON string, so it may hold ',', '=', '"' or spaces at its ends ('" a,b "=NORMAL').
    An empty text is an empty map. Raises ValueError naming the entry that is not FOLDER=CLASS."""
    text = text or ""
    out: dict[str, str] = {}
    i = 0
    while i < len(text):
        start = i
        folder, i, quoted = _map_token(text, i)
        if i >= len(text) or text[i] == ",":
            if folder or quoted:  # a name without '=CLASS'
                raise ValueError(f"Class map entry {_shown(text[start:i].strip())} is not FOLDER=CLASS. "
                                 f"{CLASS_MAP_SYNTAX}")
            i += 1  # an empty entry, e.g. a trailing comma
            continue
        target, i, _ = _map_token(text, i + 1)
        if i < len(text) and text[i] == "=":
            raise ValueError(f"Class map entry {_shown(text[start:].split(',')[0].strip())} has two '=': quote a "
                             f"name that holds one. {CLASS_MAP_SYNTAX}")
        _add_map_entry(out, folder, target, f"Class map entry {_shown(text[start:i].strip())}")
        i += 1
    if text.strip() and not out:
        raise ValueError(f"The class map {_shown(text)} has no FOLDER=CLASS entry. {CLASS_MAP_SYNTAX}")
    return out


def format_class_map(class_map: dict[str, str]) -> str:
    """The inverse of parse_class_map: 'No_findings=NORMAL,Pneumonia=PNEUMONIA', names quoted where needed."""
    return ",".join(f"{quote_map_name(folder)}={quote_map_name(target)}" for folder, target in class_map.items())


def read_class_map_file(path: str | os.PathLike) -> dict[str, str]:
    """A class map from a file: a JSON object {"folder": "CLASS"} or CSV rows folder,class (an optional header row
    'folder,class'); names are taken exactly as written (CSV quoting keeps commas and spaces). Raises
    FileNotFoundError or ValueError naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Class map file not found: {path}")
    if path.stat().st_size > MAX_CLASS_MAP_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CLASS_MAP_BYTES >> 20} MB: it is not a class map.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    if text.strip().startswith("{"):
        try:
            pairs = json.loads(text, object_pairs_hook=lambda items: items)  # keeps a repeated key
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON ({e}).") from None
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in pairs):
            raise ValueError(f'{path}: every value must be a class name in quotes, e.g. {{"No_findings": "NORMAL"}}.')
        entries = [(folder, target, f"{path}: entry {quote_map_name(folder)}") for folder, target in pairs]
    else:
        rows = [(k, row) for k, row in enumerate(csv.reader(io.StringIO(text)), 1) if any(c.strip() for c in row)]
        if rows and [c.strip().lower() for c in rows[0][1]] == ["folder", "class"]:
            rows = rows[1:]
        entries = []
        for k, row in rows:
            if len(row) != 2:
                raise ValueError(f"{path}, line {k}: {len(row)} columns, expected two (folder,class). Quote a folder "
                                 'name that holds a comma: "a,b",NORMAL.')
            entries.append((row[0], row[1], f"{path}, line {k}"))
    out: dict[str, str] = {}
    for folder, target, where in entries:
        _add_map_entry(out, folder, target, where)
    if not out:
        raise ValueError(f"{path} maps no folder: write one folder,class row per class folder (CSV) or a JSON object "
                         '{"No_findings": "NORMAL"}.')
    return out


def _shown(text: str, limit: int = 80) -> str:
    """Text from a user or a file inside a one-line message: quoted, control characters escaped, cut."""
    text = text if len(text) <= limit else text[:limit] + "…"
    return json.dumps(text, ensure_ascii=not text.isprintable()) if not text.isprintable() else f"'{text}'"


def suggest_class_map(folders: list[str], run_classes: list[str]) -> dict[str, str | None]:
    """Folder -> the run's class of the same name (case-insensitive), None where no name matches."""
    by_lower = {c.lower(): c for c in run_classes}
    return {f: by_lower.get(f.lower()) for f in folders}


def resolve_class_map(folders: list[str], run_classes: list[str], class_map: dict[str, str] | None,
                      root: str = "") -> dict[str, str]:
    """Folder -> one of `run_classes` or 'ignore', for every folder found. The user's map wins over a name
    match; keys and values match case-insensitively. Raises DatasetError for a map entry naming no folder
    or no class of the run, and for a folder neither matched nor mapped."""
    class_map = class_map or {}
    where = f" under {root}" if root else ""
    classes_by_lower = {c.lower(): c for c in run_classes}
    allowed = ", ".join(run_classes)
    folders_by_lower = {f.lower(): f for f in folders}
    user: dict[str, str] = {}
    for key, target in class_map.items():
        if key.lower() not in folders_by_lower:
            raise DatasetError(f"The class map names the folder {_shown(key)}, but there is no such class "
                               f"folder{where} (folders found: "
                               f"{', '.join(quote_map_name(f) for f in folders) or 'none'}).")
        if target.lower() == IGNORE:
            user[key.lower()] = IGNORE
        elif target.lower() in classes_by_lower:
            user[key.lower()] = classes_by_lower[target.lower()]
        else:
            raise DatasetError(f"The class map sends {_shown(key)} to {_shown(target)}, which is not a class "
                               f"of this run ({allowed}) nor '{IGNORE}'.")
    resolved: dict[str, str] = {}
    unmapped = []
    for folder in folders:
        target = user.get(folder.lower()) or classes_by_lower.get(folder.lower())
        if target is None:
            unmapped.append(folder)
        else:
            resolved[folder] = target
    if unmapped:
        choices = "<" + "|".join(run_classes + [IGNORE]) + ">"
        suggestion = ",".join(f"{quote_map_name(f)}={quote_map_name(resolved[f]) if f in resolved else choices}"
                              for f in folders)
        names = ", ".join(_shown(f) for f in unmapped)
        raise DatasetError(
            f"Unmapped class folder{'s' if len(unmapped) > 1 else ''}{where}: {names} (the run's classes are "
            f"{allowed}). Map every folder to a class of the run or to '{IGNORE}': --class-map "
            f"{shlex.quote(suggestion)}, or --class-map-file FILE with one folder,class row per folder (on the "
            f"External data page: one choice per folder). Folders found: "
            f"{', '.join(quote_map_name(f) for f in folders)}.")
    if all(t == IGNORE for t in resolved.values()):
        raise DatasetError(f"Every class folder{where} is mapped to '{IGNORE}': nothing is left to evaluate.")
    return resolved


# ---------------------------------------------------------------- scanning

@dataclass(frozen=True)
class ExternalLayout:
    """What a folder holds before any class map: its dataset root, split folders and class folder names."""

    root: str
    splits: list[str]  # split folders present (train/val/test), [] without split folders
    folders_by_split: dict[str, list[str]]  # split ('all' without split folders) -> class folder names

    def folders(self, split: str = "all") -> list[str]:
        """Class folder names in `split`, or in every split for 'all' (first seen first)."""
        if split != "all":
            return list(self.folders_by_split.get(split, []))
        names: list[str] = []
        for folder_names in self.folders_by_split.values():
            names += [f for f in folder_names if f not in names]
        return names


def describe_folder(data: str | os.PathLike) -> ExternalLayout:
    """Find the dataset root (through wrapper folders), its split folders and class folders."""
    path = Path(data).expanduser()
    if not str(data).strip():
        raise DatasetError("No folder given: point to a folder of X-rays with one sub-folder per class.")
    if not path.exists():
        raise DatasetError(f"Folder not found: {path}")
    if not path.is_dir():
        raise DatasetError(f"Not a folder: {path}. Point to the folder that holds one sub-folder per class "
                           "(or train/val/test folders).")
    # The layout rules of scan_dataset (wrapper folders, split aliases, hidden folders), so both agree.
    root = dataset._find_dataset_root(path.resolve())
    split_dirs = dataset._split_dirs(root)
    layout = {s: split_dirs[s] for s in SPLIT_NAMES if s in split_dirs} if split_dirs else {"all": root}
    folders_by_split = {}
    for split, d in layout.items():
        names = [c.name for c in dataset._subdirs(d)]
        if not names:
            raise DatasetError(f"No class folders in {d}. Expected one sub-folder per class (e.g. {d}/NORMAL and "
                               f"{d}/PNEUMONIA), each holding images.")
        folders_by_split[split] = names
    return ExternalLayout(str(root), [s for s in SPLIT_NAMES if s in split_dirs], folders_by_split)


@dataclass(frozen=True)
class ExternalRecord:
    path: str  # absolute path
    patient: str
    label: int  # 1 = the run's positive class
    class_name: str  # the run's class name
    source_class: str  # the folder name, or "<CLASS> (label file)"
    split: str | None  # the folder's split folder (or the label file's split), None without splits
    metadata: dict[str, str] = field(default_factory=dict, compare=False, hash=False)  # age, sex, view, site


@dataclass
class ExternalIndex:
    root: str
    split: str  # 'all' or one split folder
    splits_found: list[str]
    run_classes: list[str]  # [negative, positive]
    class_map: dict[str, str]  # every class folder found -> a run class or 'ignore'
    records: list[ExternalRecord]
    ignored_folders: list[dict] = field(default_factory=list)  # {"folder", "path", "files"} mapped to 'ignore'
    ignored_files: list[str] = field(default_factory=list)  # files without an image extension
    empty_folders: list[str] = field(default_factory=list)  # class folders holding no image
    unusable: dict[str, str] = field(default_factory=dict)  # escaped path -> why (see DatasetIndex.unusable)
    label_file: str = ""  # the label file the records come from ("" for class folders)
    labels: str = ""  # how it was read (format and policies)
    patients_from: str = ""  # the label file's patient column, when it has one

    def counts(self) -> dict[str, int]:
        """Images per run class."""
        return class_counts([r.class_name for r in self.records], self.run_classes)

    def folder_counts(self) -> dict[str, int]:
        """Images per source folder (mapped folders only)."""
        out: dict[str, int] = {}
        for r in self.records:
            out[r.source_class] = out.get(r.source_class, 0) + 1
        return out

    def folder_notes(self) -> list[str]:
        return [f"The class folder {p} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})."
                for p in self.empty_folders]

    def warnings(self) -> list[str]:
        """Empty class folders, and a missing class (AUC undefined)."""
        one_class = one_class_warning(self.counts(), self.run_classes)
        return self.folder_notes() + ([one_class] if one_class else [])


def class_counts(class_names: list[str], run_classes: list[str]) -> dict[str, int]:
    return {c: sum(1 for n in class_names if n == c) for c in run_classes}


def one_class_warning(counts: dict[str, int], run_classes: list[str]) -> str | None:
    """Why AUC is undefined when a class is missing, and which rate remains readable."""
    negative, positive = run_classes
    if counts.get(negative, 0) and counts.get(positive, 0):
        return None
    if not counts.get(negative, 0) and not counts.get(positive, 0):
        return "No images to evaluate."
    present, missing = (positive, negative) if counts.get(positive, 0) else (negative, positive)
    readable = "sensitivity" if present == positive else "specificity"
    return (f"Only {present} images (no {missing}): AUC, PR-AUC and the threshold rules are undefined on this set; "
            f"only its {readable} can be read.")


def scan_external(data: str, run_classes: list[str], class_map: dict[str, str] | None,
                  split: str = "all") -> ExternalIndex:
    """Index a folder of X-rays (with or without split folders) against the run's classes
    [negative, positive]. Raises DatasetError with the path and the fix for layouts it cannot use."""
    if split not in SPLIT_CHOICES:
        raise DatasetError(f"Unknown split '{split}': choose one of {', '.join(SPLIT_CHOICES)}.")
    if len(run_classes) != 2:
        raise ValueError(f"A run has two classes [negative, positive], not {run_classes}.")
    layout = describe_folder(data)
    root = Path(layout.root)
    if split != "all" and not layout.splits:
        raise DatasetError(f"{root} has no split folders (train/val/test): evaluate it with split 'all'.")
    if split != "all" and split not in layout.splits:
        raise DatasetError(f"{root} has no '{split}' split folder (found: {', '.join(layout.splits)}).")
    folders = layout.folders(split)
    # One map serves the whole tree: an entry for a folder of another split folder is not an error here.
    in_split = {f.lower() for f in folders}
    elsewhere = {f.lower() for f in layout.folders()} - in_split
    used_map = {k: v for k, v in (class_map or {}).items() if k.lower() not in elsewhere}
    resolved = resolve_class_map(folders, run_classes, used_map, str(root))
    split_dirs = dataset._split_dirs(root)
    chosen = [split] if split != "all" else (layout.splits or ["all"])

    index = ExternalIndex(str(root), split, layout.splits, list(run_classes), resolved, [])
    ignored_by_folder: dict[str, dict] = {}
    for split_name in chosen:
        base = split_dirs[split_name] if layout.splits else root
        # Loose files beside the class folders are not images of any class: list them, never guess.
        index.ignored_files += [dataset.display_path(f) for f in sorted(base.iterdir())
                                if f.is_file() and not f.name.startswith(".")]
        for class_dir in dataset._subdirs(base, index.unusable):
            target = resolved[class_dir.name]
            images, other = dataset._class_files(class_dir, index.unusable)
            if target == IGNORE:
                entry = ignored_by_folder.setdefault(class_dir.name, {"folder": class_dir.name, "paths": [],
                                                                      "files": 0})
                entry["paths"].append(str(class_dir))
                entry["files"] += len(images) + len(other)
                continue
            index.ignored_files += [str(f) for f in other]
            if not images:
                index.empty_folders.append(str(class_dir))
            label = run_classes.index(target)
            index.records += [ExternalRecord(str(f), _external_patient(f, Path(root)), label, target, class_dir.name,
                                             split_name if layout.splits else None) for f in images]
    index.ignored_folders = list(ignored_by_folder.values())
    if not index.records:
        raise DatasetError(f"No images to evaluate in {root}" + (f" (split '{split}')" if split != "all" else "")
                           + f": looked for {', '.join(sorted(IMAGE_EXTENSIONS))} in the mapped class folders.")
    return index


def scan_external_labeled(data: str, run_classes: list[str], spec: LabelSpec, split: str = "all") -> ExternalIndex:
    """Index the images a label file lists under `data` against the run's classes: the file's negative label is
    the run's negative class, its positive label the positive class (see core.labels)."""
    if split not in SPLIT_CHOICES:
        raise DatasetError(f"Unknown split '{split}': choose one of {', '.join(SPLIT_CHOICES)}.")
    if len(run_classes) != 2:
        raise ValueError(f"A run has two classes [negative, positive], not {run_classes}.")
    labeled = scan_labeled(data, spec)
    splits_found = sorted({r.official_split for r in labeled.records if r.official_split},
                          key=SPLIT_NAMES.index)
    if split != "all" and split not in splits_found:
        raise DatasetError(f"{dataset.display_path(spec.file)} gives no '{split}' split"
                           + (f" (found: {', '.join(splits_found)})" if splits_found else " (no split column)") + ".")
    records = [ExternalRecord(r.path, r.patient, r.label, run_classes[r.label], f"{r.class_name} (label file)",
                              r.official_split, r.metadata)
               for r in labeled.records if split == "all" or r.official_split == split]
    return ExternalIndex(labeled.root, split, splits_found, list(run_classes), {}, records, unusable=labeled.unusable,
                         label_file=labeled.label_file, labels=labeled.labels, patients_from=labeled.patients_from)


# ---------------------------------------------------------------- the run

def run_classes(run_dir: str | os.PathLike) -> list[str]:
    """The run's [negative, positive] class names: from best.safetensors, else data_report.json."""
    run_dir = Path(run_dir)
    checkpoint = run_dir / "best.safetensors"
    if checkpoint.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(checkpoint), framework="pt") as f:
                classes = json.loads((f.metadata() or {}).get("classes", "null"))
            if isinstance(classes, list) and len(classes) == 2:
                return [str(c) for c in classes]
        except (SafetensorError, OSError, ValueError):
            pass  # fall back to the data report below
    report = runs.read_json(run_dir / "data_report.json", {})
    classes = report.get("classes") if isinstance(report, dict) else None  # a damaged report may be a list
    if isinstance(classes, list) and len(classes) == 2:
        return [str(c) for c in classes]
    raise ValueError(f"{run_dir} names no two classes (neither best.safetensors nor data_report.json): "
                     "is it a finished run?")


# ---------------------------------------------------------------- names and where evaluations are kept

MAX_NAME_LENGTH = 64  # a folder name: the OS limits its length
NAME_RULE = "letters, digits, '_', '.' and '-', not starting or ending with '_', '.' or '-'"
MAX_SAME_NAME = 99  # default names '<folder>-2' ... '<folder>-99'
STAGING_DIR = runs.EXTERNAL_STAGING_DIR  # hidden: no view lists it; files are written there, then moved into place


def sanitize_name(name: str) -> str:
    """Letters, digits, '_', '.' and '-' only, at most MAX_NAME_LENGTH; never hidden, never '.' or '..';
    'external' when nothing is left."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip()).strip("._-")[:MAX_NAME_LENGTH].rstrip("._-")
    return cleaned or "external"


def check_name(name: str) -> str:
    """A name given by the user, as it will be saved (never silently changed): ValueError when it is longer than
    MAX_NAME_LENGTH or holds other characters than NAME_RULE allows, suggesting one that it could be."""
    text = name.strip()
    if not text:
        raise ValueError("The evaluation name is empty: give one, or leave it out to use the folder's name.")
    if len(text) > MAX_NAME_LENGTH:
        raise ValueError(f"The evaluation name {_shown(text, 40)} is {len(text)} characters long: at most "
                         f"{MAX_NAME_LENGTH}.")
    if sanitize_name(text) != text:
        raise ValueError(f"The evaluation name {_shown(text)} can hold only {NAME_RULE}: "
                         f"'{sanitize_name(text)}', say.")
    return text


def _folder_name(data: str | os.PathLike, split: str) -> str:
    base = Path(str(data).rstrip("/\\") or ".").expanduser().resolve().name
    return base if split == "all" else f"{base}-{split}"


def default_name(data: str | os.PathLike, split: str = "all") -> str:
    """The folder's name (with the split when one is chosen), sanitised."""
    return sanitize_name(_folder_name(data, split))


def _numbered(name: str, k: int) -> str:
    """'<name>-<k>', cut so that it stays within MAX_NAME_LENGTH."""
    suffix = f"-{k}"
    return name[:MAX_NAME_LENGTH - len(suffix)].rstrip("._-") + suffix


def external_dir(run_dir: str | os.PathLike, name: str) -> Path:
    """`<run>/external/<name>`; raises ValueError for a name that is not already sanitised (no paths)."""
    if not name or sanitize_name(name) != name:
        raise ValueError(f"{_shown(name)} is not an evaluation name ({NAME_RULE}).")
    return Path(run_dir) / runs.EXTERNAL_DIR / name


def set_name(name: str) -> str:
    """The prediction-set name other views read: 'external:<name>'."""
    return runs.EXTERNAL_PREFIX + name


def _taken(run_dir: Path, name: str) -> bool:
    target = external_dir(run_dir, name)
    return target.exists() or target.is_symlink()


def _evaluated_folder(run_dir: Path, name: str) -> tuple[Any, Any] | None:
    """(root, split) of a saved evaluation; None when its summary cannot be read."""
    try:
        summary = read_external(run_dir, name)
    except (FileNotFoundError, ValueError):
        return None
    return summary.get("root"), summary.get("split")


def _describe_saved(run_dir: Path, name: str) -> str:
    try:
        summary = read_external(run_dir, name)
    except (FileNotFoundError, ValueError):
        return "its summary.json is missing or damaged"
    return (f"an evaluation of {summary.get('root', '?')} (split {summary.get('split', '?')}), evaluated "
            f"{summary.get('created', '?')}")


def suggest_name(run_dir: str | os.PathLike, data: str | os.PathLike, split: str, root: str) -> str:
    """The name an evaluation of `data` gets by default: the folder's name, or '<name>-2', '-3', ... when an
    evaluation of another folder (dataset root `root` and `split` differ) holds it. An evaluation of the same
    folder keeps the name (replacing it needs consent)."""
    base = default_name(data, split)
    for k in range(1, MAX_SAME_NAME + 1):
        candidate = base if k == 1 else _numbered(base, k)
        if not _taken(Path(run_dir), candidate) or _evaluated_folder(Path(run_dir), candidate) == (root, split):
            return candidate
    raise ValueError(f"{MAX_SAME_NAME} evaluations are already named after {base}: give this one a name.")


def choose_name(run_dir: str | os.PathLike, name: str | None, data: str | os.PathLike, split: str, root: str,
                replace: bool = False) -> tuple[str, str | None]:
    """(the name to save under, a note when it is not the folder's own name). A given name is checked as is; a
    taken name is refused unless `replace`, and without a name, an evaluation of another folder is never
    replaced: the new one gets a numbered name."""
    run_dir = Path(run_dir)
    if name is not None and name.strip():
        chosen = check_name(name)
        if _taken(run_dir, chosen) and not replace:
            saved = _describe_saved(run_dir, chosen)
            raise ValueError(f"An evaluation named '{chosen}' already exists in this run ({saved}): nothing was "
                             "replaced. Give another name, or replace it (--replace; on the External data page, "
                             "tick Replace).")
        return chosen, None
    chosen = suggest_name(run_dir, data, split, root)
    if _taken(run_dir, chosen) and not replace:
        raise ValueError(f"This folder was already evaluated as '{chosen}' ({_describe_saved(run_dir, chosen)}): "
                         "nothing was replaced. Replace it (--replace; on the External data page, tick Replace), "
                         "or give this evaluation another name (--name).")
    base, folder = default_name(data, split), _folder_name(data, split)
    notes = []
    if base != folder:
        notes.append(f"the folder's name {_shown(folder, 40)} holds other characters than {NAME_RULE}, or is "
                     f"longer than {MAX_NAME_LENGTH}")
    if chosen != base:
        notes.append(f"'{base}' holds {_describe_saved(run_dir, base)}")
    return chosen, (f"Saved as '{chosen}': {'; '.join(notes)}." if notes else None)


@contextmanager
def _writers_lock(run_dir: Path) -> Iterator[Path]:
    """One writer of a run's evaluations at a time (the CLI, the page, a second command): deciding a name and
    moving files into place happen under this lock, so two evaluations never both claim one name. The lock is
    taken on the `external/` folder itself, so it leaves no file behind, and ends with the process."""
    base = Path(run_dir) / runs.EXTERNAL_DIR
    base.mkdir(exist_ok=True)
    handle = os.open(base, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield base
    finally:
        os.close(handle)  # releases the lock


def _save_evaluation(base: Path, name: str, predictions: pd.DataFrame, summary: dict, replace: bool) -> Path:
    """Write both files in a hidden staging folder, then move it into place in one rename: a reader sees the old
    evaluation or the new one, never a mix; an existing one is only replaced when `replace`. Call under
    _writers_lock."""
    target = base / name
    if (target.exists() or target.is_symlink()) and not replace:
        raise ValueError(f"An evaluation named '{name}' was saved meanwhile: nothing was replaced.")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ValueError(f"{target} is not an evaluation folder: nothing was replaced.")
    staging_root = base / STAGING_DIR
    staging_root.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=staging_root))
    replaced = staging_root / f"{staging.name}.replaced"
    try:
        predictions.to_csv(staging / PREDICTIONS_FILE, index=False)
        (staging / SUMMARY_FILE).write_text(json.dumps(_json_ready(summary), indent=2))
        if target.exists():
            os.rename(target, replaced)
            try:
                os.rename(staging, target)
            except OSError:
                os.rename(replaced, target)
                raise
        else:
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)
        with suppress(OSError):
            staging_root.rmdir()  # empty unless a killed writer left files there
    return target


def _write_json(path: Path, data: Any) -> None:
    runs.write_file_atomic(path, lambda tmp: tmp.write_text(json.dumps(_json_ready(data), indent=2)))


def _json_ready(value: Any) -> Any:
    """NaN and infinity as null: summary.json stays strict JSON for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return _json_ready(value.item())
    return value


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------- overlap with the run's own data

def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _seen_rows(run_dir: Path) -> pd.DataFrame | None:
    """The run's train/val rows of split.csv (path, patient, sha256), hashing files of older runs that
    predate the sha256 column; None when split.csv is missing or unreadable."""
    try:
        table = pd.read_csv(run_dir / "split.csv", dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    if not {"path", "split"} <= set(table.columns):
        return None
    seen = table[table["split"].isin(SEEN_SPLITS)].reset_index(drop=True)
    if "patient" not in seen:
        seen["patient"] = [patient_id(Path(p).name) for p in seen["path"]]
    if "sha256" not in seen:
        seen["sha256"] = ""
    missing = seen["sha256"] == ""
    hashes = []
    for p in seen.loc[missing, "path"]:
        try:
            hashes.append(_sha256_file(p))
        except OSError:
            hashes.append("")  # moved or deleted since training: only its patient id is compared
    seen.loc[missing, "sha256"] = hashes
    return seen


def _named_patient(path: str) -> bool:
    """Whether the file name carries a recognised patient id (not just its own stem)."""
    return patient_id(Path(path).name) != Path(path).stem


def _external_patient(path: Path, root: Path) -> str:
    """The patient id in the file name (person<N>, IM-<N>), else the file's path under the folder: without
    an id, `NORMAL/1.png` and `PNEUMONIA/1.png` are two patients, not one."""
    if _named_patient(str(path)):
        return patient_id(path.name)
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def training_overlap(run_dir: str | os.PathLike, paths: list[str], patients: list[str],
                     hashes: list[str]) -> dict:
    """Patients and byte-identical files the external images share with the run's training and validation
    data. Patient ids read from file names (person<N>, IM-<N>) are compared as patients; files whose name
    carries no id are compared by name, which is weaker evidence."""
    seen = _seen_rows(Path(run_dir))
    if seen is None:
        return {"checked": False, "reason": f"{Path(run_dir) / 'split.csv'} is missing or unreadable"}
    seen_patients = {p for p, path in zip(seen["patient"], seen["path"]) if _named_patient(path)}
    seen_stems = {Path(p).stem.lower() for p in seen["path"] if not _named_patient(p)}
    seen_hash = {h: p for h, p in zip(seen["sha256"], seen["path"]) if h}

    shared_patients: dict[str, int] = {}
    same_names: list[str] = []
    identical: list[list[str]] = []
    for path, patient, digest in zip(paths, patients, hashes):
        if _named_patient(path):
            if patient in seen_patients:
                shared_patients[patient] = shared_patients.get(patient, 0) + 1
        elif Path(path).stem.lower() in seen_stems:
            same_names.append(path)
        if digest and digest in seen_hash:
            identical.append([path, seen_hash[digest]])
    return {
        "checked": True, "run_images": int(len(seen)), "run_files_hashed": int((seen["sha256"] != "").sum()),
        "shared_patients": {"patients": len(shared_patients), "images": sum(shared_patients.values()),
                            "examples": sorted(shared_patients)[:EXAMPLES]},
        "same_file_names": {"images": len(same_names), "examples": [Path(p).name for p in same_names[:EXAMPLES]]},
        "identical_files": {"images": len(identical),
                            "examples": [[Path(a).name, b] for a, b in identical[:EXAMPLES]]},
    }


def overlap_warnings(overlap: dict, n_images: int) -> list[str]:
    """What training_overlap found, in words; a record read back from a damaged summary may lack any part."""
    if not overlap.get("checked"):
        return [f"Could not check whether these images overlap the run's training data: {overlap.get('reason')}."]
    out = []
    meaningless = ("Its AUC and rates mean nothing as external validation: the model has seen these "
                   "patients during training or model selection.")
    patients = overlap.get("shared_patients") or {}
    if patients.get("images"):
        out.append(f"Not independent of the run: {patients['images']} of {n_images} images belong to "
                   f"{patients.get('patients', '?')} patients who are in the run's training or validation data "
                   f"(e.g. {', '.join(patients.get('examples') or ['?'])}). {meaningless}")
    identical = overlap.get("identical_files") or {}
    if identical.get("images"):
        a, b = ((identical.get("examples") or [[]])[0] + ["?", "?"])[:2]
        out.append(f"{identical['images']} of {n_images} files are byte-identical to the run's training or "
                   f"validation images (e.g. {a} = {b}). Those images were trained on or used to choose the model "
                   "and threshold.")
    names = overlap.get("same_file_names") or {}
    if names.get("images"):
        out.append(f"{names['images']} of {n_images} files have the same names as the run's training or validation "
                   f"images (e.g. {', '.join(names.get('examples') or ['?'])}): if they are the same images "
                   "re-saved, this set is not independent of the run.")
    return out


def not_independent(summary: dict) -> str | None:
    """One line when an evaluation's images overlap the run's training or validation data (patients, or
    byte-identical files), for views that show the set beside the run's own; None when none was found."""
    overlap = summary.get("overlap") or {}
    if not overlap.get("checked"):
        return None
    n, found = summary.get("n", "?"), []
    patients = overlap.get("shared_patients") or {}
    if patients.get("images"):
        found.append(f"{patients['images']} of {n} images are of {patients.get('patients', '?')} patients in its "
                     "training or validation data")
    identical = overlap.get("identical_files") or {}
    if identical.get("images"):
        found.append(f"{identical['images']} of {n} files are identical to its training or validation images")
    return "not independent of the run: " + "; ".join(found) if found else None


def overlap_with_run(run_dir: str | os.PathLike, name: str) -> str | None:
    """not_independent() of a prediction set ('external:<name>'); None for the run's own sets, an evaluation
    without overlap, or one whose summary cannot be read (its own page says why)."""
    if not name.startswith(runs.EXTERNAL_PREFIX):
        return None
    try:
        return not_independent(read_external(run_dir, name.removeprefix(runs.EXTERNAL_PREFIX)))
    except (FileNotFoundError, ValueError):
        return None


def set_origin(run_dir: str | os.PathLike, name: str) -> str:
    """Where a prediction set's images come from beside the run's validation images, said where validation's
    rates do not hold on that set (a shift warning): test is the folder's own test split or carved from the same
    pool as validation; an external folder comes from elsewhere, or overlaps the run's own data."""
    if name == "test":
        report = runs.read_json(Path(run_dir) / "data_report.json", {})
        official = report.get("official_counts") if isinstance(report, dict) else None
        if isinstance(official, dict) and "test" in official:
            return ("Validation is carved by patient from the folder's training images; test is the folder's own "
                    "test split, which may come from other patients, dates or machines")
        return ("Validation and test are both carved by patient from the same images: a gap this large comes "
                "from a few unusual patients or chance more often than from another population")
    overlap = overlap_with_run(run_dir, name)
    if overlap:
        return f"This folder is {overlap}: its numbers are not external validation"
    return "This folder comes from elsewhere (other scanners, patients, prevalence)"


THRESHOLD_TRANSFER_WARNING = (
    "A threshold chosen on the run's own validation data rarely transfers to another site (other scanners, "
    "patients and prevalence): read the rates at the operating threshold with care, and re-pick the threshold on "
    "part of this set and read the rest (\"Re-pick the threshold on part of this set\" on the dashboard's External "
    "page, or --refit-threshold RULE[:VALUE] on the command line).")


# ---------------------------------------------------------------- evaluation

@dataclass(frozen=True)
class RefitRequest:
    """Re-pick the threshold with `rule` (and its target `value`) on `fraction` of a set's patients, seeded."""

    rule: str
    value: float | None = None
    fraction: float = 0.5
    seed: int = 0

    def check(self) -> None:
        """ValueError for a rule, value or fraction that cannot be used, before any work."""
        check_refit_rule(self.rule, self.value)
        fraction = self.fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ValueError(f"The fit fraction is a share of the patients strictly between 0 and 1, not {fraction}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"The seed is a whole number from 0 to 2**32 - 1, not {self.seed}.")


def evaluate_external(run_dir: str | os.PathLike, data: str, class_map: dict[str, str] | None = None,
                      name: str | None = None, split: str = "all", device: str = "auto",
                      progress: Progress | None = None, replace: bool = False,
                      refit: RefitRequest | None = None, labels: LabelSpec | None = None) -> dict:
    """Score the run's best checkpoint on a folder of X-rays and save the predictions and a summary under
    `<run>/external/<name>/`. A saved evaluation is replaced only with `replace`. Without `name` the folder's
    name is used, numbered ('<name>-2') when an evaluation of another folder holds it (see choose_name). With
    `refit`, the threshold is also re-picked on part of the set and saved with it: a re-pick that cannot be
    done saves nothing. With `labels`, the images and their classes come from a label file over `data` (no class
    map then). Everything is checked before the model is loaded. Returns the summary plus
    "predictions" (a DataFrame), "dir", "name_note" (why the name is not the folder's, or None) and "metrics"
    (every metric with its 95% patient-bootstrap interval at the run's operating threshold)."""
    run_dir = Path(run_dir)
    if refit is not None:
        refit.check()
    config = runs.read_config(run_dir)
    classes = run_classes(run_dir)
    operating = runs.operating_point(run_dir)  # a damaged threshold.json stops here, before any work
    if labels is not None and class_map:
        raise ValueError("A class map goes with class folders; with a label file the file's labels give the classes.")
    index = (scan_external_labeled(data, classes, labels, split) if labels is not None
             else scan_external(data, classes, class_map, split))
    choose_name(run_dir, name, data, split, index.root, replace)  # a taken name is refused before any work
    if refit is not None:
        _check_splittable(default_name(data, split) if not name else name.strip(),
                          np.array([r.label for r in index.records]), np.array([r.patient for r in index.records]),
                          refit)
    with _writers_lock(run_dir) as base:
        # Again under the lock: another process may have saved under this name since.
        chosen, note = choose_name(run_dir, name, data, split, index.root, replace)
        predictions, decoded, loaded, hashes, shift = _score(run_dir, config, classes, index, device, progress)
        pset = PredictionSet(set_name(chosen), predictions, predictions["label"].to_numpy(dtype=int),
                             # float32 as the file holds them, so that these figures equal a later reading's
                             predictions["prob"].to_numpy(dtype=np.float32).astype(np.float64),
                             predictions["patient"].to_numpy(dtype=str), list(classes))
        summary = _summary(run_dir, chosen, data, split, index, predictions, decoded, loaded, hashes)
        summary["threshold"] = {"value": operating.threshold, "source": operating.source, "rule": operating.rule,
                                "chosen_on": operating.chosen_on, "described": operating.describe()}
        summary["metrics"] = set_summary(pset, operating.threshold)
        summary["ood"] = shift
        if loaded.ood_error:
            summary["warnings"].insert(0, loaded.ood_error)
        if shift.get("shifted"):
            summary["warnings"].insert(0, shift["verdict"])
        if refit is not None:
            try:
                summary["refit"] = _refit_result(pset, refit, operating.threshold)
            except ChanceLevelError as e:  # the evaluation stands; the re-pick would mean nothing
                summary["refit_refused"] = str(e)
        target = _save_evaluation(base, chosen, predictions, summary, replace)
    return {**_json_ready(summary), "dir": str(target), "predictions": predictions, "name_note": note}


def _score(run_dir: Path, config: dict, classes: list[str], index: ExternalIndex, device: str,
           progress: Progress | None) -> tuple[pd.DataFrame, Any, Any, list[str], dict]:
    """(predictions, the decoding result, the loaded model, each kept image's sha256, the folder's
    out-of-distribution verdict): the indexed images scored by the run's best checkpoint, each with the model's
    verdict on whether it is like the training data; unreadable images are left out (and listed by the decoding
    result)."""
    import torch

    from .predict import load_run_model
    from .trainer import features_and_logits, positive_probs, select_device, uses_bf16

    dev = select_device(device)
    loaded = load_run_model(run_dir, dev)
    if [c.lower() for c in loaded.classes] != [c.lower() for c in classes]:
        raise ValueError(f"{run_dir}: the checkpoint's classes {loaded.classes} differ from {classes}.")
    paths = [r.path for r in index.records]
    decoded = decode_images(paths, loaded.image_size, config.get("cache_dir") or None,
                            config.get("decode_workers") or None, progress=progress, root=index.root)
    kept = [_with_header(index.records[i], decoded.metadata[i], bool(index.patients_from))
            for i in decoded.ok_indices]
    if not kept:
        raise DatasetError(f"None of the {len(paths)} images in {index.root} could be read "
                           f"(e.g. {next(iter(decoded.failed.items()))[0]}: {next(iter(decoded.failed.values()))}).")
    images = torch.from_numpy(decoded.images).unsqueeze(1)
    features, logits = features_and_logits(loaded.model, images, dev, loaded.mean, loaded.std,
                                           uses_bf16(dev, config.get("precision", "auto")))
    gates = [_gate(r.path) for r in kept]
    scores = loaded.ood.scores(features) if loaded.ood is not None else np.full(len(kept), np.nan)
    verdicts = [verdict_from_score(gate, float(score), loaded.ood) for gate, score in zip(gates, scores)]
    predictions = pd.DataFrame({
        "path": [r.path for r in kept], "patient": [r.patient for r in kept], "label": [r.label for r in kept],
        "class_name": [r.class_name for r in kept], "source_class": [r.source_class for r in kept],
        "prob": positive_probs(logits, loaded.temperature), "prob_uncalibrated": positive_probs(logits),
        # Without the run's score, no image is called like the training data: the flag stays empty.
        "ood_score": scores, "ood_flag": [v.flagged if loaded.ood is not None else None for v in verdicts],
        "ood_reason": [v.reason or "" for v in verdicts],
    }, columns=list(PREDICTION_COLUMNS))
    for key in METADATA_FIELDS:  # age, sex, view, site: the subgroups of Thresholds and the report
        if any(r.metadata.get(key) for r in kept):
            predictions[key] = [r.metadata.get(key, "") for r in kept]
    hashes = [decoded.sha256[i] or _sha256_file(index.records[i].path) for i in decoded.ok_indices]
    shift = folder_shift(loaded.ood, features, np.array([v.flagged for v in verdicts]), gated=sum(map(bool, gates)))
    return predictions, decoded, loaded, hashes, shift


def _with_header(record: ExternalRecord, header: dict[str, str], patient_from_file: bool) -> ExternalRecord:
    """The record with its DICOM header's patient id (unless a label file's column gave one) and fields."""
    patient = header.get("patient") if header.get("patient") and not patient_from_file else record.patient
    metadata = {**{k: header[k] for k in METADATA_FIELDS if header.get(k)}, **record.metadata}
    return dataclasses.replace(record, patient=patient, metadata=metadata)


def _gate(path: str) -> str | None:
    """The image gate for an image the decoder read (a failure here is a file changed since: no verdict)."""
    try:
        return image_gate(path)
    except ValueError:
        return None


def _summary(run_dir: Path, name: str, data: str, split: str, index: ExternalIndex, predictions: pd.DataFrame,
             decoded: Any, loaded: Any, hashes: list[str]) -> dict:
    """What was evaluated, what was left out, and what to beware of (summary.json, without the metrics)."""
    classes = index.run_classes
    overlap = training_overlap(run_dir, list(predictions["path"]), list(predictions["patient"]), hashes)
    counts = class_counts(list(predictions["class_name"]), classes)
    # The class check runs on the images read, not found: unreadable files can empty a class.
    one_class = one_class_warning(counts, classes)
    warnings = index.folder_notes() + ([one_class] if one_class else []) + overlap_warnings(overlap, len(predictions))
    warnings.append(THRESHOLD_TRANSFER_WARNING)
    return {
        "name": name, "set": set_name(name), "data": str(data), "root": index.root, "split": split,
        "splits_found": index.splits_found, "class_map": index.class_map, "classes": classes,
        "counts": counts, "counts_by_folder": class_counts(list(predictions["source_class"]),
                                                           sorted(set(predictions["source_class"]))),
        "n": int(len(predictions)), "n_patients": int(predictions["patient"].nunique()),
        "n_found": len(index.records),
        "skipped": [{"path": p, "reason": r} for p, r in decoded.failed.items()]
        + [{"path": p, "reason": r} for p, r in index.unusable.items()],
        "ignored_folders": index.ignored_folders, "ignored_files": index.ignored_files,
        "label_file": index.label_file, "labels": index.labels,
        "created": _now(), "run": run_dir.name, "arch": loaded.arch, "image_size": loaded.image_size,
        "overlap": overlap, "warnings": warnings,
    }


# ---------------------------------------------------------------- reading saved evaluations

MAX_COUNT = 10**9  # images, patients, files: more than any folder holds
MAX_TARGET = 1e6  # a refit rule's value: a proportion, or a cost ratio


class _Damaged(ValueError):
    """A summary.json field that is not of the type or range this version writes."""


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Damaged
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise _Damaged
    return value


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise _Damaged
    return value


def _unit(value: Any) -> float:
    """A probability, threshold or rate: a number in [0, 1] (NaN and infinity fail the comparison)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise _Damaged
    return float(value)


def _share(value: Any) -> float:
    if _unit(value) in (0.0, 1.0):
        raise _Damaged
    return float(value)


def _target(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_TARGET:
        raise _Damaged
    return float(value)


def _finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < 1e12:
        raise _Damaged
    return float(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Damaged
    return value


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise _Damaged
        return value
    return check


def _list_of(check: Callable[[Any], Any]) -> Callable[[Any], list]:
    def check_list(value: Any) -> list:
        if not isinstance(value, list):
            raise _Damaged
        return [check(v) for v in value]
    return check_list


def _map_of(check: Callable[[Any], Any]) -> Callable[[Any], dict]:
    def check_map(value: Any) -> dict:
        if not isinstance(value, dict):
            raise _Damaged
        return {_text(k): check(v) for k, v in value.items()}
    return check_map


def _record(required: dict[str, Callable[[Any], Any]],
            optional: dict[str, Callable[[Any], Any]] | None = None) -> Callable[[Any], dict]:
    """An object with every `required` key (and the `optional` ones it has) valid; other keys are dropped."""
    def check(value: Any) -> dict:
        if not isinstance(value, dict) or not required.keys() <= value.keys():
            raise _Damaged
        fields = {**required, **{k: c for k, c in (optional or {}).items() if k in value}}
        return {key: field_check(value[key]) for key, field_check in fields.items()}
    return check


_INTERVAL = _record({"value": _optional(_unit), "low": _optional(_unit), "high": _optional(_unit)})
_SET_SUMMARY = _record(
    {"threshold": _unit, "n": _count, "n_patients": _count, "n_resamples": _count, "seed": _seed,
     "counts": _record({k: _count for k in ("tp", "fp", "fn", "tn")}),
     "metrics": _record({k: _INTERVAL for k in METRIC_KEYS})},
    {"set": _text, "patients_known": _flag})
_FIT_METRICS = _record({"threshold": _unit, **{k: _count for k in ("tp", "tn", "fp", "fn")},
                        **{k: _optional(_unit) for k in ("accuracy", "sensitivity", "specificity", "precision",
                                                          "npv", "f1", "auc")}})
_REFIT = _record(
    {"rule": _one_of(*THRESHOLD_TARGETS), "value": _optional(_target), "rule_described": _text, "fraction": _share,
     "seed": _seed, "threshold": _unit, "operating_threshold": _unit,
     "fit": _record({"n": _count, "n_patients": _count, "metrics": _FIT_METRICS}),
     "read": _record({"n": _count, "n_patients": _count}), "at_operating": _SET_SUMMARY, "at_refit": _SET_SUMMARY},
    {"created": _text})
_EXAMPLES = _record({"images": _count, "examples": _list_of(_text)})
_OVERLAP = _record({"checked": _flag}, {
    "reason": _text, "run_images": _count, "run_files_hashed": _count,
    "shared_patients": _record({"patients": _count, "images": _count, "examples": _list_of(_text)}),
    "same_file_names": _EXAMPLES,
    "identical_files": _record({"images": _count, "examples": _list_of(_list_of(_text))})})
_OOD = _record({"n": _count, "flagged": _count, "gated": _count, "verdict": _text}, {
    "flagged_share": _optional(_unit), "flagged_ci": _list_of(_optional(_unit)), "expected_share": _optional(_unit),
    "shifted": _optional(_flag),
    "test": _optional(_record({"p_value": _unit, "n_folder": _count, "n_reference": _count, "permutations": _count},
                              {"mmd2": _optional(_finite), "bandwidth": _optional(_finite)}))})
# Every field read_external returns, with its check: a field not listed here is not returned.
_SUMMARY_FIELDS: dict[str, Callable[[Any], Any]] = {
    "name": _text, "set": _text, "data": _text, "root": _text, "split": _one_of(*SPLIT_CHOICES),
    "splits_found": _list_of(_one_of(*SPLIT_NAMES)), "class_map": _map_of(_text), "classes": _list_of(_text),
    "counts": _map_of(_count), "counts_by_folder": _map_of(_count), "n": _count, "n_patients": _count,
    "n_found": _count, "created": _text, "run": _text, "arch": _text, "image_size": _count,
    "label_file": _text, "labels": _text,
    "threshold": _record({}, {"value": _unit, "source": _text, "rule": _optional(_text),
                              "chosen_on": _optional(_text), "described": _text}),
    "overlap": _OVERLAP, "metrics": _SET_SUMMARY, "refit": _REFIT, "ood": _OOD, "refit_refused": _text,
}
# Lists whose valid entries are kept when others are damaged.
_SUMMARY_LISTS: dict[str, Callable[[Any], Any]] = {
    "warnings": _text, "ignored_files": _text,
    "skipped": _record({"path": _text, "reason": _text}),
    "ignored_folders": _record({"folder": _text, "files": _count}, {"paths": _list_of(_text)}),
}


def _checked_summary(raw: dict, path: Path) -> dict:
    """Every field checked for type and range; a damaged one is dropped and named in one warning, so that a
    damaged file never breaks a view nor shows a number that cannot be."""
    summary: dict = {}
    damaged = []
    for key, check in _SUMMARY_FIELDS.items():
        if key in raw:
            try:
                summary[key] = check(raw[key])
            except (_Damaged, RecursionError):
                damaged.append(key)
    if summary.get("classes") is not None and len(summary["classes"]) != 2:
        damaged.append("classes")
        summary.pop("classes")
    for key, check in _SUMMARY_LISTS.items():
        if key not in raw:
            continue
        entries = raw[key] if isinstance(raw[key], list) else [raw[key]]
        kept = []
        for entry in entries:
            try:
                kept.append(check(entry))
            except _Damaged:
                pass
        summary[key] = kept
        if len(kept) < len(entries) or not isinstance(raw[key], list):
            damaged.append(key)
    summary.setdefault("warnings", [])
    if damaged:
        summary["warnings"].append(f"{path} has damaged fields ({', '.join(damaged)}): they are not shown. "
                                   "Evaluate the folder again to rewrite it.")
    return summary


def _read_summary_file(run_dir: str | os.PathLike, name: str) -> tuple[dict, Path]:
    """The summary.json of one evaluation as written (unchecked) and its path."""
    path = external_dir(run_dir, name) / SUMMARY_FILE
    if not path.exists():
        raise FileNotFoundError(f"No external evaluation '{name}' in {run_dir} ({path} is missing).")
    try:
        # Only a regular file, and only so much of it: a FIFO would block the page, /dev/zero fill the memory.
        with dataset.open_regular_file(path) as f:
            raw = f.read(runs.MAX_JSON_BYTES + 1)
        if len(raw) > runs.MAX_JSON_BYTES:
            raise ValueError(f"larger than {runs.MAX_JSON_BYTES >> 20} MB")
        summary = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise ValueError(f"{dataset.display_path(path)} is damaged ({type(e).__name__}: {str(e)[:200]}): evaluate "
                         "the folder again, or delete this evaluation.") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path} is damaged (not a JSON object): evaluate the folder again, or delete this "
                         "evaluation.")
    return summary, path


def read_external(run_dir: str | os.PathLike, name: str) -> dict:
    """The summary.json of one evaluation, every field checked (see _checked_summary); raises FileNotFoundError
    or ValueError naming the file when it is missing or not a JSON object."""
    raw, path = _read_summary_file(run_dir, name)
    return _checked_summary(raw, path)


def check_prediction_count(run_dir: str | os.PathLike, name: str, rows: int) -> None:
    """ValueError when the evaluation's predictions.csv has another number of rows than its summary.json
    counts (a file cut short or edited); nothing to compare with when the summary is unreadable."""
    try:
        expected = read_external(run_dir, name).get("n")
    except (FileNotFoundError, ValueError):
        return
    if expected is not None and expected != rows:
        raise ValueError(f"{external_dir(run_dir, name) / PREDICTIONS_FILE} has {rows} rows but summary.json counts "
                         f"{expected} images: the file is truncated or was edited. Evaluate the folder again to "
                         "rewrite it.")


def list_external(run_dir: str | os.PathLike) -> list[dict]:
    """One entry per evaluation, newest first: name, set, n, created, data root, split, warnings, refit;
    a missing or damaged summary.json gives an entry with 'damaged' True and the reason in 'error'."""
    base = Path(run_dir) / runs.EXTERNAL_DIR
    if not base.is_dir():
        return []
    out = []
    for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entry: dict = {"name": d.name, "set": set_name(d.name), "n": None, "created": None, "root": None,
                       "split": None, "warnings": [], "refit": None, "damaged": False, "error": None,
                       "has_predictions": (d / PREDICTIONS_FILE).is_file()}
        try:
            summary = read_external(run_dir, d.name)
            entry.update(n=summary.get("n"), created=summary.get("created") or None,
                         root=summary.get("root") or summary.get("data"), split=summary.get("split"),
                         warnings=summary["warnings"], refit=summary.get("refit"))
        except (FileNotFoundError, ValueError) as e:
            entry.update(damaged=True, error=str(e))
        if not entry["damaged"] and not entry["has_predictions"]:
            entry.update(damaged=True, error=f"{d / PREDICTIONS_FILE} is missing: evaluate the folder again, or "
                                             "delete this evaluation.")
        out.append(entry)
    # Newest first; damaged entries last, where they are still listed so that they can be deleted.
    return sorted(out, key=lambda e: (not e["damaged"], e["created"] or ""), reverse=True)


def delete_external(run_dir: str | os.PathLike, name: str) -> None:
    """Remove `<run>/external/<name>/`; FileNotFoundError when there is no such evaluation."""
    target = external_dir(run_dir, name)
    if target.is_symlink() or not target.is_dir():
        raise FileNotFoundError(f"No external evaluation '{name}' in {run_dir}.")
    with _writers_lock(Path(run_dir)):
        shutil.rmtree(target)


# ---------------------------------------------------------------- re-picking the threshold

def check_refit_rule(rule: str, value: float | None) -> None:
    """ValueError for an unknown rule, a value given to a rule that takes none, or a value out of its range."""
    if rule not in THRESHOLD_TARGETS:
        raise ValueError(f"Unknown threshold rule {_shown(str(rule))}: write RULE[:VALUE] with RULE one of "
                         f"{', '.join(THRESHOLD_TARGETS)} (e.g. recall:0.95).")
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"The {rule} value {value!r} is not a finite number.")
    if rule not in TARGET_DEFAULTS:
        raise ValueError(f"The rule {rule} takes no value: write '{rule}' alone.")
    if rule == "cost" and not 0 < value <= MAX_TARGET:
        raise ValueError(f"A cost ratio is a positive number (a missed positive costs that many false alarms), "
                         f"not {value:g}.")
    if rule != "cost" and not 0 <= value <= 1:
        raise ValueError(f"A {rule} target is a proportion between 0 and 1, not {value:g}.")


def parse_refit_rule(text: str) -> tuple[str, float | None]:
    """'recall:0.9' -> ('recall', 0.9); 'youden' -> ('youden', None). Raises ValueError on bad input,
    including a value out of the rule's range."""
    rule, sep, raw = (text or "").strip().partition(":")
    rule = rule.strip().lower()
    value = None
    if sep:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{_shown(raw)} in {_shown(text)} is not a number: write RULE[:VALUE], "
                             "e.g. recall:0.95.") from None
    check_refit_rule(rule, value)
    return rule, value


def patient_split(labels: np.ndarray, patients: np.ndarray, fraction: float, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(fit, read) image indices: `fraction` of the patients of each class to fit, the rest to read, seeded.
    Written out rather than sklearn's GroupShuffleSplit (which ignores labels, so a small set can leave a
    class out of one side) or StratifiedGroupKFold (which only gives 1/k fractions): patients are stratified
    by their majority label, and each side keeps at least one patient of every class that has two."""
    frame = pd.DataFrame({"patient": patients, "label": labels})
    patient_label = frame.groupby("patient")["label"].mean().round().astype(int)
    rng = np.random.default_rng(seed)
    fit_patients: set[str] = set()
    for label in sorted(patient_label.unique()):
        members = np.array(sorted(patient_label.index[patient_label == label]))
        rng.shuffle(members)
        n = len(members)
        k = int(round(fraction * n))
        if n >= 2:
            k = min(max(k, 1), n - 1)
        fit_patients.update(members[:k])
    in_fit = frame["patient"].isin(fit_patients).to_numpy()
    return np.flatnonzero(in_fit), np.flatnonzero(~in_fit)




def _check_splittable(name: str, labels: np.ndarray, patients: np.ndarray, request: RefitRequest
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(fit, read) indices of `request`'s patient split; ValueError when a side would lack a class."""
    if len(np.unique(labels)) < 2:
        raise ValueError(f"'{name}' holds images of one class only: re-picking a threshold needs images of both "
                         "classes. Nothing was saved.")
    fit, read = patient_split(labels, patients, float(request.fraction), request.seed)
    for part, rows in (("fit", fit), ("read", read)):
        if len(np.unique(labels[rows])) < 2:
            raise ValueError(f"The {part} part of '{name}' lacks a class: {len(np.unique(patients))} patients are "
                             "too few to split in two parts that both hold each class; evaluate a larger folder, or "
                             "without re-picking the threshold. Nothing was saved.")
    return fit, read


class ChanceLevelError(ValueError):
    """A re-pick asked on a set the model does not rank better than chance."""


def _refit_result(pset: PredictionSet, request: RefitRequest, operating_threshold: float) -> dict:
    """The threshold re-picked by `request` on a patient-grouped part of `pset`, and the other part read at
    the operating threshold and at the re-picked one (95% patient-bootstrap intervals), JSON-ready."""
    patients = pset.patients if pset.patients is not None else np.array([str(i) for i in range(len(pset.labels))])
    fit, read = _check_splittable(pset.name, pset.labels, patients, request)
    chance = chance_level_warning(ranking_only(pset, bootstrap_for(pset))["auc"], runs.set_label(pset.name))
    if chance:
        raise ChanceLevelError(f"{chance} The threshold was not re-picked.")
    threshold = choose_threshold(pset.labels[fit], pset.probs[fit], request.rule, request.value)
    read_set = PredictionSet(f"{pset.name} (read part)", pset.frame.iloc[read].reset_index(drop=True),
                             pset.labels[read], pset.probs[read],
                             pset.patients[read] if pset.patients is not None else None, pset.class_names)
    boot = bootstrap_for(read_set)
    ranking = ranking_only(read_set, boot)
    return _json_ready({
        "rule": request.rule, "value": request.value, "rule_described": describe_rule(request.rule, request.value),
        "fraction": float(request.fraction), "seed": int(request.seed), "threshold": float(threshold),
        "operating_threshold": float(operating_threshold),
        "fit": {"n": int(len(fit)), "n_patients": int(len(np.unique(patients[fit]))),
                "metrics": metrics_at_threshold(pset.labels[fit], pset.probs[fit], threshold)},
        "read": {"n": int(len(read)), "n_patients": int(len(np.unique(patients[read])))},
        "at_operating": set_summary(read_set, operating_threshold, boot, ranking),
        "at_refit": set_summary(read_set, threshold, boot, ranking),
        "created": _now(),
    })


def refit_threshold(run_dir: str | os.PathLike, name: str, rule: str, value: float | None = None,
                    fraction: float = 0.5, seed: int = 0) -> dict:
    """Re-pick the threshold on a patient-grouped part (`fraction` of the patients) of a saved external set with
    `rule` and read the rest, at the run's operating threshold and at the re-picked one (95% patient-bootstrap
    intervals). The result replaces the evaluation's earlier re-pick ("refit" in summary.json) and is returned;
    everything is checked before anything is written."""
    request = RefitRequest(rule, value, fraction, seed)
    request.check()
    run_dir = Path(run_dir)
    with _writers_lock(run_dir):  # the evaluation cannot be replaced while its summary is rewritten
        raw, path = _read_summary_file(run_dir, name)  # a damaged summary stops here, before anything is written
        pset = load_set(run_dir, set_name(name))
        result = _refit_result(pset, request, runs.operating_point(run_dir).threshold)
        raw["refit"] = result  # the file as written, with its other fields untouched
        _write_json(path, raw)
    return result


# ---------------------------------------------------------------- text

def metrics_table(summaries: dict[str, dict]) -> pd.DataFrame:
    """Metric rows (AUC, sensitivity, ...) x one column per summary, as 'value [low, high]' strings."""
    return pd.DataFrame({column: [format_interval((s.get("metrics") or {}).get(k)) for k in METRIC_KEYS]
                         for column, s in summaries.items()},
                        index=[METRIC_LABELS[k] for k in METRIC_KEYS])


def format_refit(refit: dict) -> str:
    """The re-picked threshold and the read part's metrics, from a checked "refit" (see read_external)."""
    lines = [f"Threshold re-picked on {refit['fit']['n']} images ({refit['fit']['n_patients']} patients, "
             f"{refit['fraction']:.0%} of the patients, seed {refit['seed']}) by {refit['rule_described']}: "
             f"{refit['threshold']:.4f} (operating threshold {refit['operating_threshold']:.4f}).",
             f"Read on the other {refit['read']['n']} images ({refit['read']['n_patients']} patients), "
             "95% patient-bootstrap intervals:"]
    table = metrics_table({f"at {refit['operating_threshold']:.3f} (operating)": refit["at_operating"],
                           f"at {refit['threshold']:.3f} (re-picked)": refit["at_refit"]})
    lines.append(table.to_string())
    return "\n".join(lines)


def format_external(result: dict, include_refit: bool = True) -> str:
    """What the command line prints after an external evaluation: counts, folders, skipped and ignored files,
    warnings, the re-picked threshold when the result holds one ("refit") and `include_refit`, and where it was
    saved. The metrics at the operating threshold are printed by the caller, as for the run's own sets."""
    counts = ", ".join(f"{c} {n}" for c, n in (result.get("counts") or {}).items())
    mapping = ", ".join(f"{quote_map_name(f)} -> {t}" for f, t in (result.get("class_map") or {}).items())
    chance = chance_level_warning(((result.get("metrics") or {}).get("metrics") or {}).get("auc"),
                                  f"'{result.get('name')}'")
    lines = [f"WARNING: {chance}"] if chance else []
    lines += [f"External evaluation '{result.get('name')}' of {result.get('root')} (split {result.get('split')}): "
              f"{result.get('n')} images ({counts}), {result.get('n_patients')} patients."]
    lines.append(f"Labels: {result['labels']}." if result.get("labels") else f"Folders: {mapping}.")
    shift = result.get("ood") or {}
    if shift.get("verdict") and not shift.get("shifted"):  # a shift is the first of the warnings below
        lines.append(f"Out-of-distribution check: {shift['verdict']}")
    for folder in result.get("ignored_folders") or []:
        lines.append(f"Ignored folder {quote_map_name(folder['folder'])} ({folder['files']} files).")
    if result.get("ignored_files"):
        lines.append(f"Ignored {len(result['ignored_files'])} files that are not images "
                     f"(e.g. {result['ignored_files'][0]}).")
    skipped = result.get("skipped") or []
    lines.append(f"Skipped {len(skipped)} unreadable or unusable files or rows" + (":" if skipped else "."))
    lines += [f"  {s['path']}: {s['reason']}" for s in skipped[:50]]
    if len(skipped) > 50:
        lines.append(f"  ... and {len(skipped) - 50:,} more (listed in the saved summary.json)")
    lines += [f"WARNING: {w}" for w in result.get("warnings") or []]
    if include_refit and result.get("refit"):
        lines.append(format_refit(result["refit"]))
    if result.get("refit_refused"):
        lines.append(f"Not re-picked: {result['refit_refused']}")
    if result.get("name_note"):
        lines.append(result["name_note"])
    if result.get("dir"):
        lines.append(f"Saved in {result['dir']} (set '{result.get('set')}' on the Thresholds and Mistakes pages).")
    return "\n".join(lines)
