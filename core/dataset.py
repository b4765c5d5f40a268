"""Chest X-ray folders: scanning, patient ids, patient-grouped splits, leakage, decoding and caching.

A dataset is a folder-per-class tree, either with official splits
(`<root>/{train,val,test}/<CLASS>/*`, the Kaggle/Kermany layout) or without (`<root>/<CLASS>/*`).
Images are decoded once, converted to one channel, resized and cached as uint8 on disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff"}
SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
# Bump when decoding or resizing changes, so stale caches are not reused.
PREPROCESSING_VERSION = 1
NOT_AN_IMAGE = "not an image file (no known image format)"
# Decompression-bomb guard: X-rays are at most a few thousand pixels a side.
MAX_IMAGE_PIXELS = 100_000_000

_PATIENT_PATTERNS = [
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)-\d+", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-\d+", re.IGNORECASE),
]


class DatasetError(ValueError):
    """A dataset folder that cannot be used, with a message that names the path and the fix."""


@dataclass(frozen=True)
class ImageRecord:
    path: str  # absolute path
    class_name: str
    label: int  # 1 = positive class
    patient: str
    official_split: str | None  # train/val/test from the folder layout, None without split folders


@dataclass
class DatasetIndex:
    root: str
    classes: list[str]  # class folder names, the positive class last
    positive_class: str
    has_official_splits: bool
    records: list[ImageRecord]
    ignored_files: list[str] = field(default_factory=list)  # files without an image extension

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per official split (or 'all') and class."""
        out: dict[str, dict[str, int]] = {}
        for r in self.records:
            split = r.official_split or "all"
            out.setdefault(split, {c: 0 for c in self.classes})
            out[split][r.class_name] += 1
        return out


def patient_id(file_name: str) -> str:
    """Patient id from a Kermany file name; the file stem when no id is found (one file = one patient)."""
    stem = Path(file_name).stem
    for pattern in _PATIENT_PATTERNS:
        m = pattern.match(stem)
        if m:
            return m.group(1).upper() if not m.group(1).lower().startswith("person") else m.group(1).lower()
    return stem


def _is_hidden(name: str) -> bool:
    """Dot files and OS clutter such as __MACOSX from zip archives."""
    return name.startswith(".") or name.startswith("__")


def _subdirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not _is_hidden(d.name))


def _split_dirs(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in _subdirs(root):
        split = SPLIT_ALIASES.get(d.name.lower())
        if split and split not in found:
            found[split] = d
    return found


def _find_dataset_root(root: Path) -> Path:
    """Descend through single wrapper folders such as the Kaggle zip's `chest_xray/chest_xray`."""
    current = root
    for _ in range(3):
        if _split_dirs(current):
            return current
        subs = _subdirs(current)
        has_files = any(f.is_file() for f in current.iterdir())
        if len(subs) == 1 and not has_files and not any(f.is_file() for f in subs[0].iterdir()):
            current = subs[0]
            continue
        if len(subs) == 1 and not has_files and _split_dirs(subs[0]):
            current = subs[0]
            continue
        return current
    return current


def _class_files(class_dir: Path) -> tuple[list[Path], list[Path]]:
    images, ignored = [], []
    for f in sorted(class_dir.rglob("*")):
        if not f.is_file() or any(_is_hidden(part) for part in f.relative_to(class_dir).parts):
            continue
        (images if f.suffix.lower() in IMAGE_EXTENSIONS else ignored).append(f)
    return images, ignored


def scan_dataset(root: str | os.PathLike, positive_class: str | None = None) -> DatasetIndex:
    """Index a folder-per-class tree. Raises DatasetError with the offending path on bad layouts."""
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise DatasetError(f"Dataset folder not found: {root_path}")
    if not root_path.is_dir():
        raise DatasetError(f"Not a folder: {root_path}. Point to the folder that holds train/val/test "
                           "or one sub-folder per class.")
    root_path = _find_dataset_root(root_path.resolve())
    split_dirs = _split_dirs(root_path)
    layout: dict[str | None, Path] = dict(split_dirs) if split_dirs else {None: root_path}

    class_names: set[str] = set()
    per_split_classes: dict[str | None, list[Path]] = {}
    for split, d in layout.items():
        classes = _subdirs(d)
        if not classes:
            raise DatasetError(
                f"No class folders in {d}. Expected one sub-folder per class, e.g. {d}/NORMAL and "
                f"{d}/PNEUMONIA, each holding images.")
        per_split_classes[split] = classes
        class_names.update(c.name for c in classes)
    if len(class_names) < 2:
        raise DatasetError(f"Found only the class {sorted(class_names)} under {root_path}; "
                           "a classifier needs at least two class folders (e.g. NORMAL and PNEUMONIA).")
    if len(class_names) > 2:
        raise DatasetError(f"Found {len(class_names)} class folders under {root_path} "
                           f"({', '.join(sorted(class_names))}); this tool trains binary classifiers: "
                           "keep exactly two class folders.")
    if positive_class is None:
        positive_class = "PNEUMONIA" if "PNEUMONIA" in class_names else sorted(class_names)[-1]
    if positive_class not in class_names:
        raise DatasetError(f"Positive class '{positive_class}' is not one of the class folders "
                           f"{sorted(class_names)} in {root_path}.")
    classes = sorted(c for c in class_names if c != positive_class) + [positive_class]

    records: list[ImageRecord] = []
    ignored: list[str] = []
    for split, class_dirs in per_split_classes.items():
        for class_dir in class_dirs:
            images, other = _class_files(class_dir)
            ignored.extend(str(f) for f in other)
            if not images:
                raise DatasetError(f"The class folder {class_dir} holds no images "
                                   f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))}).")
            label = classes.index(class_dir.name)
            for f in images:
                records.append(ImageRecord(str(f), class_dir.name, label, patient_id(f.name), split))
    return DatasetIndex(str(root_path), classes, positive_class, bool(split_dirs), records, ignored)


# ---------------------------------------------------------------- splits

def assign_splits(index: DatasetIndex, val_fraction: float = 0.15, test_fraction: float = 0.15,
                  seed: int = 0) -> list[str]:
    """Split name per record. The official test split is kept as the benchmark; validation is carved
    out of train (plus the tiny official val) grouped by patient and stratified by label. A tree
    without split folders gets test the same way."""
    from sklearn.model_selection import StratifiedGroupKFold

    n = len(index.records)
    splits = ["train"] * n
    pool = []
    for i, r in enumerate(index.records):
        if r.official_split == "test":
            splits[i] = "test"
        else:
            pool.append(i)

    def carve(candidates: list[int], fraction: float, name: str, salt: int) -> list[int]:
        if fraction <= 0 or len(candidates) < 4:
            return candidates
        labels = np.array([index.records[i].label for i in candidates])
        groups = np.array([index.records[i].patient for i in candidates])
        n_splits = max(2, round(1 / fraction))
        if len(set(groups)) < n_splits or np.bincount(labels, minlength=2).min() < n_splits:
            raise DatasetError(f"Too few patients or images per class in {index.root} to carve a "
                               f"{name} split of {fraction:.0%} grouped by patient.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns when groups make exact stratification impossible
            folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + salt)
            _, held = next(folds.split(np.zeros(len(candidates)), labels, groups))
        held_set = {candidates[j] for j in held}
        for i in held_set:
            splits[i] = name
        return [i for i in candidates if i not in held_set]

    if not index.has_official_splits or not any(r.official_split == "test" for r in index.records):
        pool = carve(pool, test_fraction, "test", salt=1)
    carve(pool, val_fraction, "val", salt=0)
    return splits


def leakage_report(records: list[ImageRecord], splits: list[str],
                   hashes: list[str] | None = None) -> dict:
    """Patients and byte-identical files that occur in more than one split."""
    patients: dict[str, set[str]] = {}
    for r, s in zip(records, splits):
        patients.setdefault(s, set()).add(r.patient)
    names = sorted(patients)
    shared_patients = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = patients[a] & patients[b]
            shared_patients[f"{a}-{b}"] = {"count": len(both), "examples": sorted(both)[:10]}
    report: dict = {"patients_per_split": {s: len(p) for s, p in patients.items()},
                    "shared_patients": shared_patients}
    if hashes is not None:
        by_hash: dict[str, list[int]] = {}
        for i, h in enumerate(hashes):
            if h:
                by_hash.setdefault(h, []).append(i)
        groups = [ix for ix in by_hash.values() if len(ix) > 1]
        cross = [ix for ix in groups if len({splits[i] for i in ix}) > 1]
        report["identical_file_groups"] = len(groups)
        report["identical_files_across_splits"] = len(cross)
        report["identical_across_examples"] = [
            [f"{splits[i]}:{records[i].path}" for i in ix] for ix in cross[:10]]
    return report


# ---------------------------------------------------------------- decoding

def to_grayscale_uint8(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGB, RGBA, CMYK, I;16, I, F) to 8-bit single channel."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.round().astype(np.uint8))
    if img.mode == "L":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become black, the background of a radiograph.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    return img.convert("RGB").convert("L")


def load_grayscale(path: str | os.PathLike | bytes | BinaryIO, size: int | None = None) -> np.ndarray:
    """Decode one image (a path, raw bytes or a file object) to a uint8 (size, size) array, stretched as
    the Kermany 224 release is.
    Raises ValueError with a readable reason for unreadable files."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(path if not isinstance(path, bytes) else io.BytesIO(path)) as img:
            if size is not None and img.format == "JPEG":
                # Let libjpeg downscale by a power of two while decoding: large originals decode ~4x faster.
                img.draft("L" if img.mode == "L" else "RGB", (size, size))
            img.load()
            gray = to_grayscale_uint8(img)
            if size is not None and gray.size != (size, size):
                gray = gray.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
            return np.asarray(gray, dtype=np.uint8).copy()
    except UnidentifiedImageError:
        # PIL's own message names an in-memory buffer object, which says nothing to a user.
        raise ValueError(NOT_AN_IMAGE) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None


def _decode_chunk(args: tuple[list[str], int]) -> list[tuple[np.ndarray | None, str | None, str]]:
    """(pixels or None, error or None, sha256 of the file) per path; each file is read once."""
    paths, size = args
    out: list[tuple[np.ndarray | None, str | None, str]] = []
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            out.append((None, f"{type(e).__name__}: {e}", ""))
            continue
        digest = hashlib.sha256(data).hexdigest()
        try:
            out.append((load_grayscale(data, size), None, digest))
        except ValueError as e:
            out.append((None, str(e), digest))
    return out


def _file_key(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def default_cache_dir() -> Path:
    return Path(os.environ.get("CXR_CACHE_DIR", Path.home() / ".cache" / "cxr-workbench"))


@dataclass
class DecodedImages:
    images: np.ndarray  # (n_ok, size, size) uint8
    ok_indices: list[int]  # positions in the requested path list
    failed: dict[str, str]  # path -> reason
    sha256: list[str]  # per requested path, for finding identical files
    decoded_now: int  # images decoded in this call (0 when everything came from the cache)


def decode_images(paths: list[str], size: int, cache_dir: str | os.PathLike | None = None,
                  workers: int | None = None, progress=None, root: str | None = None) -> DecodedImages:
    """Decode images once, in parallel, and cache them as uint8 on disk.

    The cache is keyed by image size and each file's absolute path, byte size and mtime, so a second
    run on the same files decodes nothing and a changed or added file is decoded again on its own.
    Unreadable files are remembered too and reported, not retried. One cache shard per dataset
    `root` (default: the folder common to all paths) and size.
    """
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_root.mkdir(parents=True, exist_ok=True)
    abs_paths = [str(Path(p).resolve()) for p in paths]
    root = str(Path(root).resolve()) if root else (os.path.commonpath(abs_paths) if abs_paths else "")
    key_src = json.dumps({"v": PREPROCESSING_VERSION, "size": size, "root": root})
    shard = cache_root / f"{size}px-{hashlib.sha1(key_src.encode()).hexdigest()[:16]}"
    index_file, array_file = shard / "index.json", shard / "images.npy"

    cached: dict[str, dict] = {}
    stored = np.zeros((0, size, size), np.uint8)
    if index_file.exists() and array_file.exists():
        try:
            cached = json.loads(index_file.read_text())
            stored = np.load(array_file, mmap_mode="r")
        except (ValueError, OSError):
            cached, stored = {}, np.zeros((0, size, size), np.uint8)

    keys = [_file_key(p) for p in abs_paths]
    todo = [i for i, (p, k) in enumerate(zip(abs_paths, keys))
            if p not in cached or cached[p]["key"] != k]

    new_rows: list[np.ndarray] = []
    if todo:
        workers = workers or os.cpu_count() or 1
        todo_paths = [abs_paths[i] for i in todo]
        chunk = max(1, min(64, len(todo_paths) // (workers * 4) or 1))
        chunks = [todo_paths[i:i + chunk] for i in range(0, len(todo_paths), chunk)]
        results: list[tuple[np.ndarray | None, str | None, str]] = []
        if workers > 1 and len(todo_paths) > 32:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for part in pool.map(_decode_chunk, [(c, size) for c in chunks]):
                    results.extend(part)
                    if progress:
                        progress(len(results), len(todo_paths))
        else:
            for c in chunks:
                results.extend(_decode_chunk((c, size)))
                if progress:
                    progress(len(results), len(todo_paths))
        base = len(stored)
        for i, (arr, err, digest) in zip(todo, results):
            if err is None:
                cached[abs_paths[i]] = {"key": keys[i], "row": base + len(new_rows), "sha256": digest}
                new_rows.append(arr)
            else:
                cached[abs_paths[i]] = {"key": keys[i], "error": err, "sha256": digest}
        all_rows = np.concatenate([np.asarray(stored), np.stack(new_rows)]) if new_rows else np.asarray(stored)
        shard.mkdir(parents=True, exist_ok=True)
        tmp_array, tmp_index = shard / "images.tmp.npy", shard / "index.tmp.json"
        np.save(tmp_array, all_rows)
        tmp_index.write_text(json.dumps(cached))
        os.replace(tmp_array, array_file)  # atomic: a killed run never leaves a half-written cache
        os.replace(tmp_index, index_file)
        stored = all_rows

    ok_indices, rows, failed = [], [], {}
    for i, p in enumerate(abs_paths):
        entry = cached[p]
        if "error" in entry:
            failed[paths[i]] = entry["error"]
        else:
            ok_indices.append(i)
            rows.append(entry["row"])
    images = np.asarray(stored[np.array(rows, dtype=np.int64)]) if rows else np.zeros((0, size, size), np.uint8)
    return DecodedImages(images, ok_indices, failed, [cached[p].get("sha256", "") for p in abs_paths],
                         decoded_now=len(todo))


def image_summary(paths: list[str], limit: int = 400) -> list[dict]:
    """Width, height, mode and format of up to `limit` files (headers only, nothing decoded)."""
    out = []
    for p in paths[:limit]:
        try:
            with Image.open(p) as img:
                out.append({"path": p, "width": img.width, "height": img.height, "mode": img.mode,
                            "format": img.format})
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            out.append({"path": p, "width": None, "height": None, "mode": None, "format": None,
                        "error": f"{type(e).__name__}: {e}"})
    return out
