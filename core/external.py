"""External validation: a finished run evaluated on another folder of X-rays, saved in the run directory.

The folder may have split folders or not, and its class folders may carry other names than the run's
(`No_findings`, `Bacterial`, `Viral`): each folder maps onto one of the run's two classes, case-insensitively
by name, else through a class map given by the user (`No_findings=NORMAL,Pneumonia=PNEUMONIA`), or is
ignored. Predictions land in `<run>/external/<name>/predictions.csv`, next to a `summary.json` that says
what was evaluated and what to beware of (patients or files shared with the run's training data, a
threshold that may not transfer), so every view that reads prediction sets (Thresholds, Mistakes, the
operating metrics) can read this one as `external:<name>`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from . import dataset, runs
from .bootstrap import METRIC_KEYS, METRIC_LABELS, format_interval
from .dataset import IMAGE_EXTENSIONS, SPLIT_NAMES, DatasetError, decode_images, patient_id
from .metrics import choose_threshold, describe_rule, metrics_at_threshold
from .operating import PredictionSet, bootstrap_for, load_set, ranking_only, set_summary

IGNORE = "ignore"
SPLIT_CHOICES = ("all",) + SPLIT_NAMES
SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "predictions.csv"
PREDICTION_COLUMNS = ("path", "patient", "label", "class_name", "source_class", "prob", "prob_uncalibrated")
# Splits of the run whose images the model learnt from or was selected on.
SEEN_SPLITS = ("train", "val")
EXAMPLES = 5

Progress = Callable[[int, int], None]


# ---------------------------------------------------------------- class maps

def parse_class_map(text: str) -> dict[str, str]:
    """'No_findings=NORMAL,Pneumonia=PNEUMONIA' -> {'No_findings': 'NORMAL', 'Pneumonia': 'PNEUMONIA'}.
    An empty text is an empty map. Raises ValueError naming the entry that is not FOLDER=CLASS."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for raw in (text or "").split(","):
        entry = raw.strip()
        if not entry:
            continue
        folder, sep, target = (part.strip() for part in entry.partition("="))
        if not sep or not folder or not target or "=" in target:
            raise ValueError(f"Class map entry '{entry}' is not FOLDER=CLASS. Write the map as "
                             "'No_findings=NORMAL,Pneumonia=PNEUMONIA' (a folder may also be '=ignore').")
        previous = seen.get(folder.lower())
        if previous is not None and out[previous].lower() != target.lower():
            raise ValueError(f"The class map names the folder '{folder}' twice, as '{out[previous]}' and "
                             f"'{target}'.")
        if previous is None:  # a repeated entry keeps its first spelling
            seen[folder.lower()] = folder
            out[folder] = target
    if text and text.strip() and not out:
        raise ValueError(f"The class map '{text}' has no FOLDER=CLASS entry. Write it as "
                         "'No_findings=NORMAL,Pneumonia=PNEUMONIA'.")
    return out


def format_class_map(class_map: dict[str, str]) -> str:
    """The inverse of parse_class_map: 'No_findings=NORMAL,Pneumonia=PNEUMONIA'."""
    return ",".join(f"{folder}={target}" for folder, target in class_map.items())


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
            raise DatasetError(f"The class map names the folder '{key}', but there is no such class folder{where} "
                               f"(folders found: {', '.join(folders) or 'none'}).")
        if target.lower() == IGNORE:
            user[key.lower()] = IGNORE
        elif target.lower() in classes_by_lower:
            user[key.lower()] = classes_by_lower[target.lower()]
        else:
            raise DatasetError(f"The class map sends '{key}' to '{target}', which is not a class of this run "
                               f"({allowed}) nor '{IGNORE}'.")
    resolved: dict[str, str] = {}
    unmapped = []
    for folder in folders:
        target = user.get(folder.lower()) or classes_by_lower.get(folder.lower())
        if target is None:
            unmapped.append(folder)
        else:
            resolved[folder] = target
    if unmapped:
        choices = "|".join(run_classes + [IGNORE])
        syntax = ",".join(f"{f}={resolved[f]}" if f in resolved else f"{f}=<{choices}>" for f in folders)
        names = ", ".join(f"'{f}'" for f in unmapped)
        raise DatasetError(
            f"Unmapped class folder{'s' if len(unmapped) > 1 else ''}{where}: {names} (the run's classes are "
            f"{allowed}). Map every folder to a class of the run or to '{IGNORE}': --class-map {syntax} "
            f"(on the External data page: one choice per folder). Folders found: {', '.join(folders)}.")
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
    source_class: str  # the folder name
    split: str | None  # the folder's split folder, None without split folders


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
    classes = (runs.read_json(run_dir / "data_report.json", {}) or {}).get("classes")
    if isinstance(classes, list) and len(classes) == 2:
        return [str(c) for c in classes]
    raise ValueError(f"{run_dir} names no two classes (neither best.safetensors nor data_report.json): "
                     "is it a finished run?")


def default_name(data: str | os.PathLike, split: str = "all") -> str:
    """The folder's name (with the split when one is chosen), sanitised."""
    base = Path(str(data).rstrip("/\\") or ".").expanduser().resolve().name
    return sanitize_name(base if split == "all" else f"{base}-{split}")


MAX_NAME_LENGTH = 64  # a folder name: the OS limits its length


def sanitize_name(name: str) -> str:
    """Letters, digits, '_', '.' and '-' only, at most MAX_NAME_LENGTH; never hidden, never '.' or '..';
    'external' when nothing is left."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip()).strip("._-")[:MAX_NAME_LENGTH].rstrip("._-")
    return cleaned or "external"


def external_dir(run_dir: str | os.PathLike, name: str) -> Path:
    """`<run>/external/<name>`; raises ValueError for a name that is not already sanitised (no paths)."""
    if not name or sanitize_name(name) != name:
        raise ValueError(f"'{name}' is not an evaluation name (letters, digits, '_', '.' and '-' only).")
    return Path(run_dir) / runs.EXTERNAL_DIR / name


def set_name(name: str) -> str:
    """The prediction-set name other views read: 'external:<name>'."""
    return runs.EXTERNAL_PREFIX + name


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)  # readers never see a half-written file
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, data: Any) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(_json_ready(data), indent=2)))


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
    if not overlap.get("checked"):
        return [f"Could not check whether these images overlap the run's training data: {overlap.get('reason')}."]
    out = []
    meaningless = ("Its AUC and rates mean nothing as external validation: the model has seen these "
                   "patients during training or model selection.")
    patients = overlap["shared_patients"]
    if patients["images"]:
        out.append(f"Not independent of the run: {patients['images']} of {n_images} images belong to "
                   f"{patients['patients']} patients who are in the run's training or validation data "
                   f"(e.g. {', '.join(patients['examples'])}). {meaningless}")
    identical = overlap["identical_files"]
    if identical["images"]:
        a, b = identical["examples"][0]
        out.append(f"{identical['images']} of {n_images} files are byte-identical to the run's training or "
                   f"validation images (e.g. {a} = {b}). Those images were trained on or used to choose the model "
                   "and threshold.")
    names = overlap["same_file_names"]
    if names["images"]:
        out.append(f"{names['images']} of {n_images} files have the same names as the run's training or validation "
                   f"images (e.g. {', '.join(names['examples'])}): if they are the same images re-saved, this set is "
                   "not independent of the run.")
    return out


THRESHOLD_TRANSFER_WARNING = (
    "A threshold chosen on the run's own validation data rarely transfers to another site (other scanners, "
    "patients and prevalence): read the rates at the operating threshold with care, and re-pick the threshold on "
    "part of this set and read the rest (Re-pick the threshold on the External data page, or "
    "--refit-threshold RULE[:VALUE] on the command line).")


# ---------------------------------------------------------------- evaluation

def evaluate_external(run_dir: str | os.PathLike, data: str, class_map: dict[str, str] | None = None,
                      name: str | None = None, split: str = "all", device: str = "auto",
                      progress: Progress | None = None) -> dict:
    """Score the run's best checkpoint on a folder of X-rays and save the predictions and a summary under
    `<run>/external/<name>/` (an evaluation of the same name is replaced). Returns the summary plus
    "predictions" (a DataFrame), "dir" and "metrics" (every metric with its 95% patient-bootstrap interval at
    the run's operating threshold)."""
    import torch

    from .predict import load_run_model
    from .trainer import compute_logits, positive_probs, select_device, uses_bf16

    run_dir = Path(run_dir)
    config = runs.read_config(run_dir)
    classes = run_classes(run_dir)
    operating = runs.operating_point(run_dir)  # a damaged threshold.json stops here, before any work
    index = scan_external(data, classes, class_map, split)
    name = sanitize_name(name) if name and name.strip() else default_name(data, split)
    target = external_dir(run_dir, name)

    dev = select_device(device)
    loaded = load_run_model(run_dir, dev)
    if [c.lower() for c in loaded.classes] != [c.lower() for c in classes]:
        raise ValueError(f"{run_dir}: the checkpoint's classes {loaded.classes} differ from {classes}.")
    paths = [r.path for r in index.records]
    decoded = decode_images(paths, loaded.image_size, config.get("cache_dir") or None,
                            config.get("decode_workers") or None, progress=progress, root=index.root)
    kept = [index.records[i] for i in decoded.ok_indices]
    if not kept:
        raise DatasetError(f"None of the {len(paths)} images in {index.root} could be read "
                           f"(e.g. {next(iter(decoded.failed.items()))[0]}: {next(iter(decoded.failed.values()))}).")
    images = torch.from_numpy(decoded.images).unsqueeze(1)
    logits = compute_logits(loaded.model, images, dev, loaded.mean, loaded.std,
                            uses_bf16(dev, config.get("precision", "auto")))
    predictions = pd.DataFrame({
        "path": [r.path for r in kept], "patient": [r.patient for r in kept], "label": [r.label for r in kept],
        "class_name": [r.class_name for r in kept], "source_class": [r.source_class for r in kept],
        "prob": positive_probs(logits, loaded.temperature), "prob_uncalibrated": positive_probs(logits),
    }, columns=list(PREDICTION_COLUMNS))

    hashes = [decoded.sha256[i] or _sha256_file(index.records[i].path) for i in decoded.ok_indices]
    overlap = training_overlap(run_dir, list(predictions["path"]), list(predictions["patient"]), hashes)
    counts = class_counts(list(predictions["class_name"]), classes)
    # The class check runs on the images read, not found: unreadable files can empty a class.
    one_class = one_class_warning(counts, classes)
    warnings = index.folder_notes() + ([one_class] if one_class else []) + overlap_warnings(overlap, len(predictions))
    warnings.append(THRESHOLD_TRANSFER_WARNING)

    summary = {
        "name": name, "set": set_name(name), "data": str(data), "root": index.root, "split": split,
        "splits_found": index.splits_found, "class_map": index.class_map, "classes": classes,
        "counts": counts, "counts_by_folder": class_counts(list(predictions["source_class"]),
                                                           sorted(set(predictions["source_class"]))),
        "n": int(len(predictions)), "n_patients": int(predictions["patient"].nunique()),
        "n_found": len(paths),
        "skipped": [{"path": p, "reason": r} for p, r in decoded.failed.items()]
        + [{"path": p, "reason": r} for p, r in index.unusable.items()],
        "ignored_folders": index.ignored_folders, "ignored_files": index.ignored_files,
        "created": _now(), "run": run_dir.name, "arch": loaded.arch, "image_size": loaded.image_size,
        "threshold": {"value": operating.threshold, "source": operating.source, "rule": operating.rule,
                      "chosen_on": operating.chosen_on, "described": operating.describe()},
        "overlap": overlap, "warnings": warnings,
    }
    target.mkdir(parents=True, exist_ok=True)
    _write_atomic(target / PREDICTIONS_FILE, lambda tmp: predictions.to_csv(tmp, index=False))
    metrics = set_summary(load_set(run_dir, set_name(name)), operating.threshold)
    summary["metrics"] = _json_ready(metrics)
    _write_json(target / SUMMARY_FILE, summary)
    return {**summary, "dir": str(target), "predictions": predictions}


def read_external(run_dir: str | os.PathLike, name: str) -> dict:
    """The summary.json of one evaluation; raises FileNotFoundError or ValueError naming the file."""
    path = external_dir(run_dir, name) / SUMMARY_FILE
    if not path.exists():
        raise FileNotFoundError(f"No external evaluation '{name}' in {run_dir} ({path} is missing).")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}): evaluate the folder again, or delete "
                         "this evaluation.") from e
    if not isinstance(summary, dict):
        raise ValueError(f"{path} is damaged (not a JSON object): evaluate the folder again, or delete this "
                         "evaluation.")
    return _checked_summary(summary, path)


_SUMMARY_TYPES = {"class_map": dict, "counts_by_folder": dict, "counts": dict, "threshold": dict, "overlap": dict,
                  "refit": dict, "warnings": list, "skipped": list, "ignored_files": list, "ignored_folders": list}
_REFIT_KEYS = {"rule_described": str, "threshold": (int, float), "operating_threshold": (int, float), "fit": dict,
               "read": dict, "at_operating": dict, "at_refit": dict}


def _checked_summary(summary: dict, path: Path) -> dict:
    """Fields of the wrong type are dropped and named in a warning, so one damaged field never breaks a view."""
    damaged = [k for k, kind in _SUMMARY_TYPES.items() if k in summary and not isinstance(summary[k], kind)]
    for key in damaged:
        summary.pop(key)
    refit = summary.get("refit")
    if isinstance(refit, dict) and not all(isinstance(refit.get(k), kind) for k, kind in _REFIT_KEYS.items()):
        summary.pop("refit")
        damaged.append("refit")
    summary["warnings"] = [w for w in summary.get("warnings", []) if isinstance(w, str)]
    summary["ignored_folders"] = [f for f in summary.get("ignored_folders", []) if isinstance(f, dict)]
    for key in ("skipped", "ignored_files"):
        if key in summary:
            summary[key] = [v for v in summary[key] if isinstance(v, (str, dict))]
    if damaged:
        summary["warnings"].append(f"{path} has damaged fields ({', '.join(damaged)}): they are not shown. "
                                   "Evaluate the folder again to rewrite it.")
    return summary


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
            n = summary.get("n")
            warnings = summary.get("warnings")
            entry.update(n=n if isinstance(n, int) else None, created=str(summary.get("created") or "") or None,
                         root=summary.get("root") or summary.get("data"), split=summary.get("split"),
                         warnings=[str(w) for w in warnings] if isinstance(warnings, list) else [],
                         refit=summary.get("refit") if isinstance(summary.get("refit"), dict) else None)
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
    if not target.is_dir():
        raise FileNotFoundError(f"No external evaluation '{name}' in {run_dir}.")
    shutil.rmtree(target)


# ---------------------------------------------------------------- re-picking the threshold

def parse_refit_rule(text: str) -> tuple[str, float | None]:
    """'recall:0.9' -> ('recall', 0.9); 'youden' -> ('youden', None). Raises ValueError on bad input."""
    from .metrics import THRESHOLD_TARGETS

    rule, sep, raw = (text or "").strip().partition(":")
    rule = rule.strip().lower()
    if rule not in THRESHOLD_TARGETS:
        raise ValueError(f"Unknown threshold rule '{rule}': write RULE[:VALUE] with RULE one of "
                         f"{', '.join(THRESHOLD_TARGETS)} (e.g. recall:0.95).")
    if not sep:
        return rule, None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"'{raw}' in '{text}' is not a number: write RULE[:VALUE], e.g. recall:0.95.") from None
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


def refit_threshold(run_dir: str | os.PathLike, name: str, rule: str, value: float | None = None,
                    fraction: float = 0.5, seed: int = 0) -> dict:
    """Re-pick the threshold on a patient-grouped part (`fraction` of the patients) of an external set with
    `rule` and read the rest, at the run's operating threshold and at the re-picked one (95% patient-bootstrap
    intervals). The result is saved in the evaluation's summary.json under "refit" and returned."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise ValueError(f"The fit fraction is a share of the patients strictly between 0 and 1, not {fraction}.")
    summary = read_external(run_dir, name)  # a damaged summary stops here, before anything is written
    pset = load_set(Path(run_dir), set_name(name))
    if not pset.both_classes:
        raise ValueError(f"'{name}' holds images of one class only: re-picking a threshold needs both "
                         f"{pset.class_names[0]} and {pset.class_names[1]} images.")
    patients = pset.patients if pset.patients is not None else np.array([str(i) for i in range(len(pset.labels))])
    fit, read = patient_split(pset.labels, patients, float(fraction), seed)
    for part, rows in (("fit", fit), ("read", read)):
        if len(np.unique(pset.labels[rows])) < 2:
            raise ValueError(f"The {part} part of '{name}' lacks a class: {len(np.unique(patients))} patients are too "
                             "few to split in two parts that both hold each class; evaluate a larger folder.")
    threshold = choose_threshold(pset.labels[fit], pset.probs[fit], rule, value)
    operating = runs.operating_point(Path(run_dir))
    read_set = PredictionSet(f"{pset.name} (read part)", pset.frame.iloc[read].reset_index(drop=True),
                             pset.labels[read], pset.probs[read],
                             pset.patients[read] if pset.patients is not None else None, pset.class_names)
    boot = bootstrap_for(read_set)
    ranking = ranking_only(read_set, boot)
    result = {
        "rule": rule, "value": value, "rule_described": describe_rule(rule, value), "fraction": float(fraction),
        "seed": int(seed), "threshold": float(threshold), "operating_threshold": operating.threshold,
        "fit": {"n": int(len(fit)), "n_patients": int(len(np.unique(patients[fit]))),
                "metrics": metrics_at_threshold(pset.labels[fit], pset.probs[fit], threshold)},
        "read": {"n": int(len(read)), "n_patients": int(len(np.unique(patients[read])))},
        "at_operating": set_summary(read_set, operating.threshold, boot, ranking),
        "at_refit": set_summary(read_set, threshold, boot, ranking),
        "created": _now(),
    }
    result = _json_ready(result)
    summary["refit"] = result
    _write_json(external_dir(run_dir, name) / SUMMARY_FILE, summary)
    return result


# ---------------------------------------------------------------- text

def metrics_table(summaries: dict[str, dict]) -> pd.DataFrame:
    """Metric rows (AUC, sensitivity, ...) x one column per summary, as 'value [low, high]' strings."""
    return pd.DataFrame({column: [format_interval((s.get("metrics") or {}).get(k)) for k in METRIC_KEYS]
                         for column, s in summaries.items()},
                        index=[METRIC_LABELS[k] for k in METRIC_KEYS])


def format_refit(refit: dict) -> str:
    lines = [f"Threshold re-picked on {refit['fit']['n']} images ({refit['fit']['n_patients']} patients, "
             f"{refit['fraction']:.0%} of the patients, seed {refit['seed']}) by {refit['rule_described']}: "
             f"{refit['threshold']:.4f} (operating threshold {refit['operating_threshold']:.4f}).",
             f"Read on the other {refit['read']['n']} images ({refit['read']['n_patients']} patients), "
             "95% patient-bootstrap intervals:"]
    table = metrics_table({f"at {refit['operating_threshold']:.3f} (operating)": refit["at_operating"],
                           f"at {refit['threshold']:.3f} (re-picked)": refit["at_refit"]})
    lines.append(table.to_string())
    return "\n".join(lines)


def format_external(result: dict, refit_only: bool = False) -> str:
    """What the command line prints after an external evaluation: counts, folders, skipped and ignored files,
    warnings, and the re-picked threshold when the result holds one ("refit"); only that with `refit_only`.
    The metrics at the operating threshold are printed by the caller, as for the run's own sets."""
    refit = format_refit(result["refit"]) if result.get("refit") else ""
    if refit_only:
        return refit
    counts = ", ".join(f"{c} {n}" for c, n in (result.get("counts") or {}).items())
    mapping = ", ".join(f"{f} -> {t}" for f, t in (result.get("class_map") or {}).items())
    lines = [f"External evaluation '{result.get('name')}' of {result.get('root')} (split {result.get('split')}): "
             f"{result.get('n')} images ({counts}), {result.get('n_patients')} patients.",
             f"Folders: {mapping}."]
    for folder in result.get("ignored_folders") or []:
        lines.append(f"Ignored folder {folder['folder']} ({folder['files']} files).")
    if result.get("ignored_files"):
        lines.append(f"Ignored {len(result['ignored_files'])} files that are not images "
                     f"(e.g. {result['ignored_files'][0]}).")
    skipped = result.get("skipped") or []
    lines.append(f"Skipped {len(skipped)} unreadable files" + (":" if skipped else "."))
    lines += [f"  {s['path']}: {s['reason']}" for s in skipped]
    lines += [f"WARNING: {w}" for w in result.get("warnings") or []]
    if refit:
        lines.append(refit)
    if result.get("dir"):
        lines.append(f"Saved in {result['dir']} (set '{result.get('set')}' on the Thresholds and Mistakes pages).")
    return "\n".join(lines)
