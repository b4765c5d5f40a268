"""Chest X-ray folders: scanning, patient ids, patient-grouped splits, leakage, decoding and caching.

A dataset is a folder-per-class tree, either with official splits
(`<root>/{train,val,test}/<CLASS>/*`, the Kaggle/Kermany layout) or without (`<root>/<CLASS>/*`).
Images are decoded once, converted to one channel, resized and cached as uint8 on disk.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import stat
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
from PIL import Image, ImageChops, UnidentifiedImageError

from .dicom import DICOM_EXTENSIONS, PREAMBLE_BYTES, has_dicom_preamble, header_fields, read_dicom

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
# Files with other names are images too when they hold the DICOM magic: hospital exports name files by their
# UID (1.2.840.113619.2.55.504) or give them no extension at all.
SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
# Bump when decoding or resizing changes, so stale caches are not reused.
PREPROCESSING_VERSION = 4  # 3: multi-frame images and all-NaN float images refused; 4: DICOM, header fields
NOT_AN_IMAGE = "not an image file (no known image format)"
# Decompression-bomb guard, checked from the header before any pixel is decoded. The largest flat-panel
# detectors give about 4,300 x 4,300 = 18.5 megapixels; 40 keeps the worst decode (RGBA) near 0.5 GB.
MAX_IMAGE_PIXELS = 40_000_000

_PATIENT_PATTERNS = [
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)-\d+", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-\d+", re.IGNORECASE),
    re.compile(r"^(\d{8})_\d{3}$"),  # NIH ChestX-ray14: <patient>_<follow-up>.png
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
    # Kept header or label-file fields: patient age (years), sex, view position, site; only those present.
    metadata: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class DatasetIndex:
    root: str
    classes: list[str]  # class folder names, the positive class last
    positive_class: str
    has_official_splits: bool
    records: list[ImageRecord]
    ignored_files: list[str] = field(default_factory=list)  # files without an image extension
    # Entries that cannot be used, listed rather than dropped: escaped path -> why (a name that is not
    # UTF-8, a broken or looping link, a link to a folder, something that is not a regular file).
    unusable: dict[str, str] = field(default_factory=dict)
    label_file: str = ""  # the label file the records come from ("" for class folders)
    labels: str = ""  # how the label file was read (format and policies), for reports
    patients_from: str = ""  # where patient ids come from when not from file names

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


def display_path(path: str | os.PathLike) -> str:
    """A path that can be printed, stored as JSON and shown on a page: bytes of a name that is not UTF-8
    (kept by Python as surrogates), and control characters, are written as \\xNN escapes."""
    text = os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")
    # Control characters (a newline in a name) would break a one-line message or a table row; C1 controls
    # (\x80-\x9f, e.g. an 8-bit CSI) drive some terminals too.
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: f"\\x{ord(m.group()):02x}", text)


def has_valid_name(path: str | os.PathLike) -> bool:
    """Whether the path is valid UTF-8 (anything else cannot be written to JSON, CSV or a page)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


BAD_NAME = "its name is not valid UTF-8: rename it to use it"
HIDDEN = "hidden (the name starts with '.' or '__')"


def _subdirs(p: Path, unusable: dict[str, str] | None = None) -> list[Path]:
    """Visible sub-folders, sorted. Folders with a name that is not UTF-8 are left out and, when
    `unusable` is given, listed there."""
    out = []
    for d in p.iterdir():
        if _is_hidden(d.name) or not d.is_dir():
            continue
        if not has_valid_name(d):
            if unusable is not None:
                unusable[display_path(d)] = "folder " + BAD_NAME
            continue
        out.append(d)
    return sorted(out)


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


def _unusable_reason(f: Path) -> str | None:
    """Why an entry of a class folder cannot be read as a file, or None for a regular file or a folder
    (folders are walked into)."""
    if not has_valid_name(f):
        return BAD_NAME
    try:
        if f.is_symlink():
            if not f.exists():
                return "broken symbolic link (its target is missing, or the link loops)"
            if f.is_dir():
                return "symbolic link to a folder (not followed: links can loop)"
        if f.is_dir() or f.is_file():
            return None
        return "not a regular file (a device, socket or pipe)"
    except OSError as e:
        return f"cannot be inspected: {e.strerror or e}"


def _class_files(class_dir: Path, unusable: dict[str, str] | None = None) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under a class folder. Entries that cannot be used are listed in
    `unusable` with the reason, never dropped silently."""
    images, ignored = [], []
    for f in sorted(class_dir.rglob("*")):
        parts = f.relative_to(class_dir).parts
        if any(_is_hidden(part) for part in parts):
            # Report the hidden folder once, and hidden image-like files; skip OS clutter like .DS_Store.
            if _is_hidden(parts[-1]) and not any(_is_hidden(p) for p in parts[:-1]) and unusable is not None:
                if f.is_dir() and not f.is_symlink():
                    unusable[display_path(f)] = HIDDEN + " folder: skipped with everything in it"
                elif f.suffix.lower() in IMAGE_EXTENSIONS:
                    unusable[display_path(f)] = HIDDEN + " file: skipped (macOS writes '._' copies that are not images)"
            continue
        reason = _unusable_reason(f)
        if reason is not None:
            if unusable is not None:
                unusable[display_path(f)] = reason
            continue
        if f.is_dir():
            continue
        (images if is_image_file(f) else ignored).append(f)
    return images, ignored


def is_image_file(path: Path) -> bool:
    """An image by its extension, or a DICOM file by its content whatever its name."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with open_regular_file(path) as f:
            return has_dicom_preamble(f.read(PREAMBLE_BYTES))
    except (OSError, ValueError):
        return False


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
    unusable: dict[str, str] = {}
    ignored: list[str] = []
    # What lies beside the folders that are read (loose files, folders that are not splits) is listed.
    beside = [root_path] + (list(layout.values()) if split_dirs else [])
    for folder in beside:
        for entry in sorted(folder.iterdir()):
            if _is_hidden(entry.name) or entry in layout.values():
                continue
            if folder == root_path and split_dirs and entry.is_dir():
                unusable[display_path(entry)] = ("folder that is not a split folder (train, val, test): skipped"
                                                 if has_valid_name(entry) else "folder " + BAD_NAME)
            elif not entry.is_dir() and has_valid_name(entry) and not entry.is_symlink() and entry.is_file():
                if entry.suffix.lower() in IMAGE_EXTENSIONS:
                    unusable[display_path(entry)] = "image outside the class folders (its class is unknown): skipped"
                else:
                    ignored.append(str(entry))
            elif not entry.is_dir():
                unusable[display_path(entry)] = _unusable_reason(entry) or "not a regular file"
    for split, d in layout.items():
        classes = _subdirs(d, unusable)
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
    empty: list[Path] = []
    for split, class_dirs in per_split_classes.items():
        for class_dir in class_dirs:
            images, other = _class_files(class_dir, unusable)
            ignored.extend(str(f) for f in other)
            if not images:
                empty.append(class_dir)
                unusable[display_path(class_dir)] = "class folder without images"
            label = classes.index(class_dir.name)
            for f in images:
                records.append(ImageRecord(str(f), class_dir.name, label, patient_id(f.name), split))
    for class_name in classes:
        if not any(r.class_name == class_name for r in records):
            folders = ", ".join(str(d) for d in empty if d.name == class_name)
            raise DatasetError(f"The class folder {folders} holds no images "
                               f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return DatasetIndex(str(root_path), classes, positive_class, bool(split_dirs), records, ignored, unusable)


METADATA_FIELDS = ("age", "sex", "view", "site")  # what subgroups read; nothing else of a header is kept


def with_header_fields(index: DatasetIndex, headers: list[dict[str, str]]) -> DatasetIndex:
    """The index with what decoding read from each file's header (DICOM: patient, age, sex, view): the header's
    patient id replaces one guessed from the file name (a label file's patient column wins over both), and its
    fields fill metadata the label file does not give."""
    records, from_header = [], 0
    for record, header in zip(index.records, headers):
        patient = record.patient
        if header.get("patient") and not index.patients_from:
            patient, from_header = header["patient"], from_header + 1
        metadata = {**{k: header[k] for k in METADATA_FIELDS if header.get(k)}, **record.metadata}
        records.append(dataclasses.replace(record, patient=patient, metadata=metadata))
    patients_from = index.patients_from
    if from_header:
        patients_from = ("the DICOM PatientID tag" if from_header == len(records)
                         else f"the DICOM PatientID tag ({from_header} images), file names (the rest)")
    return dataclasses.replace(index, records=records, patients_from=patients_from)


def metadata_columns(records: list[ImageRecord]) -> dict[str, list[str]]:
    """One column per metadata field that any record has ('' where a record lacks it)."""
    return {k: [r.metadata.get(k, "") for r in records] for k in METADATA_FIELDS
            if any(r.metadata.get(k) for r in records)}


# ---------------------------------------------------------------- splits

def assign_splits(index: DatasetIndex, val_fraction: float = 0.15, test_fraction: float = 0.15,
                  seed: int = 0) -> list[str]:
    """Split name per record. The official test split is kept as the benchmark; validation is carved
    out of train (plus the tiny official val) grouped by patient and stratified by label. A tree
    without split folders gets test the same way."""
    from sklearn.model_selection import StratifiedGroupKFold

    official = {r.official_split for r in index.records}
    if index.has_official_splits and "train" not in official:
        found = ", ".join(s for s in SPLIT_NAMES if s in official)
        raise DatasetError(f"{index.root} has split folders ({found}) but no train folder with images: add "
                           f"{index.root}/train/<CLASS>/..., or point to a folder with one sub-folder per class "
                           "and no split folders.")
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
        missing = [c for c_i, c in enumerate(index.classes) if not (labels == c_i).any()]
        if missing:
            where = "train and val folders" if index.has_official_splits else "class folders"
            raise DatasetError(f"No {', '.join(missing)} images in the {where} of {index.root}: training needs "
                               f"images of both classes ({' and '.join(index.classes)}).")
        n_splits = max(2, round(1 / fraction))
        if len(set(groups)) < n_splits or np.bincount(labels, minlength=2).min() < n_splits:
            per_class = ", ".join(f"{c} {n}" for c, n in zip(index.classes, np.bincount(labels, minlength=2)))
            raise DatasetError(f"Too few patients or images per class in {index.root} to carve a {name} split of "
                               f"{fraction:.0%} grouped by patient: it needs at least {n_splits} patients and "
                               f"{n_splits} images of each class; found {len(set(groups))} patients ({per_class} "
                               "images).")
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
    order = {name: i for i, name in enumerate(SPLIT_NAMES)}  # train, val, test, then others by name
    names = sorted(patients, key=lambda s: (order.get(s, len(order)), s))
    shared_patients = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = patients[a] & patients[b]
            shared_patients[f"{a}-{b}"] = {"count": len(both), "examples": sorted(both)[:10]}
    report: dict = {"patients_per_split": {s: len(patients[s]) for s in names},
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
        finite = np.isfinite(arr)
        if not finite.any():
            raise ValueError("image has no finite pixel values (all NaN or infinite)")
        lo, hi = float(arr[finite].min()), float(arr[finite].max())
        arr = np.where(finite, arr, lo)  # NaN or infinite pixels (no data) read as the darkest value
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.round().astype(np.uint8))
    if img.mode == "L":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become black, the background of a radiograph: gray x alpha, which is compositing
        # over black (within 2 gray levels of rounding) at half the time and memory of alpha_composite.
        gray, alpha = img.convert("LA").split()
        return ImageChops.multiply(gray, alpha)
    return img.convert("RGB").convert("L")


class ImageTooLargeError(ValueError):
    """An image whose header declares more than MAX_IMAGE_PIXELS pixels; nothing of it was decoded."""


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """Open a path for reading only when it is a regular file (a link to one is fine). A FIFO, a device, a
    socket or a folder is refused with a ValueError instead of blocking forever or reading without end:
    paths in a predictions or groups file are untrusted. The check is made on the opened descriptor
    (O_NONBLOCK, so opening a FIFO returns at once), so the file cannot be swapped between check and read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise ValueError("not a regular file (a folder)") from None
    except OSError as e:
        raise ValueError(READ_ERROR_PREFIX + (e.strerror or str(e))) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a device, socket or pipe"
            raise ValueError(f"not a regular file ({kind})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def open_image(source: str | os.PathLike | bytes | BinaryIO) -> Iterator[Image.Image]:
    """Open an image (a path, raw bytes or a file object) reading its header only, and refuse it before
    anything is decoded when it declares more than MAX_IMAGE_PIXELS pixels. Pillow's own guard only
    warns between one and two times its limit; here the limit is hard. A path must name a regular file
    (see open_regular_file). Raises ValueError with a reason."""
    with ExitStack() as files:
        name = ""
        if isinstance(source, (str, os.PathLike)):
            name = os.fspath(source)
            source = files.enter_context(open_regular_file(source))
        if _is_dicom(source, name):
            with read_dicom(source, MAX_IMAGE_PIXELS) as img:
                yield img
            return
        with _open_checked(source) as img:
            yield img


def _is_dicom(source: bytes | BinaryIO, name: str = "") -> bool:
    """DICOM by its magic bytes, or by a .dcm name (older files have no preamble)."""
    if Path(name).suffix.lower() in DICOM_EXTENSIONS:
        return True
    if isinstance(source, bytes):
        return has_dicom_preamble(source[:PREAMBLE_BYTES])
    try:
        position = source.tell()
        head = source.read(PREAMBLE_BYTES)
        source.seek(position)
    except (OSError, AttributeError, ValueError):
        return False
    return has_dicom_preamble(head)


@contextmanager
def _open_checked(source: bytes | BinaryIO) -> Iterator[Image.Image]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except UnidentifiedImageError:
        # PIL's own message names an in-memory buffer object, which says nothing to a user.
        raise ValueError(NOT_AN_IMAGE) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"image too large: its header declares more than "
                                 f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels; refused before decoding") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    with img:
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageTooLargeError(f"image too large: {width} x {height} pixels (limit "
                                     f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels); refused before decoding")
        if width < 1 or height < 1:
            raise ValueError(f"image has no pixels ({width} x {height})")
        frames = getattr(img, "n_frames", 1)
        if isinstance(frames, int) and frames > 1:  # which frame is the X-ray is anyone's guess
            raise ValueError(f"image has {frames} frames (an animation or a stack): give one still image")
        yield img


def load_grayscale(path: str | os.PathLike | bytes | BinaryIO, size: int | None = None,
                   inspect: Callable[[Image.Image, tuple[int, int]], None] | None = None) -> np.ndarray:
    """Decode one image (a path, raw bytes or a file object) to a uint8 (size, size) array, stretched as
    the Kermany 224 release is. `inspect(image, (width, height))` is called with the decoded image before
    conversion and the file's own size (the prediction gate looks at colour and shape without decoding twice).
    Raises ValueError with a readable reason for unreadable files."""
    try:
        with open_image(path) as img:
            original_size = img.size
            if size is not None and img.format == "JPEG":
                # Let libjpeg downscale by a power of two while decoding: large originals decode ~4x faster.
                img.draft("L" if img.mode == "L" else "RGB", (size, size))
            img.load()
            if inspect is not None:
                inspect(img, original_size)
            gray = to_grayscale_uint8(img)
            if size is not None and gray.size != (size, size):
                gray = gray.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
            return np.asarray(gray, dtype=np.uint8).copy()
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    except MemoryError:
        raise ValueError("not enough memory to decode this image") from None


def image_metadata(data: bytes) -> dict[str, str]:
    """What is kept of a file's header besides its pixels: for DICOM the patient id (`patient`), age in years
    (`age`), `sex` and view position (`view`), those present (no other tag: these are patient data); {} for other
    formats."""
    # A DICOM file without the preamble starts with its first tag, of group 0002 or 0008 (little endian).
    if has_dicom_preamble(data[:PREAMBLE_BYTES]) or data[:2] in (b"\x02\x00", b"\x08\x00"):
        return header_fields(data)
    return {}


def load_thumbnail(path: str | os.PathLike, max_px: int) -> np.ndarray:
    """A grayscale copy at most `max_px` a side, aspect kept (for galleries). Raises ValueError like
    load_grayscale."""
    try:
        with open_image(path) as img:
            if img.format == "JPEG":
                img.draft("L" if img.mode == "L" else "RGB", (max_px, max_px))  # decode large originals fast
            gray = to_grayscale_uint8(img)
            gray.thumbnail((max_px, max_px))
            return np.asarray(gray, dtype=np.uint8).copy()
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None


# A file that could not be read (permission denied, I/O error, gone) may be readable next time: such
# verdicts are reported but never cached. Verdicts about a file's content are cached.
READ_ERROR_PREFIX = "could not read the file: "


def image_summary(paths: list[str], limit: int = 400) -> list[dict]:
    """Width, height, mode and format of up to `limit` files (headers only, nothing decoded)."""
    out = []
    for p in paths[:limit]:
        try:
            with open_image(p) as img:
                out.append({"path": p, "width": img.width, "height": img.height, "mode": img.mode,
                            "format": img.format})
        except (OSError, ValueError) as e:
            out.append({"path": p, "width": None, "height": None, "mode": None, "format": None,
                        "error": str(e)})
    return out
