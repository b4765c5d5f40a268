"""Batch prediction: a folder, a CSV label file or a .zip of hundreds to thousands of images, predicted with
the same decoding, image gate, calibration, operating threshold and out-of-distribution score as one image at a
time (core.predict), but decoded in parallel and passed through the model 64 images at a time.

Every file is accounted for: predicted, unreadable (with the decoder's reason) or skipped (with why: not an
image, a member of a zip too large or compressed like a zip bomb). Zips are read in memory, never extracted:
a member's name, "../x.png" included, is only ever a name.
"""

from __future__ import annotations

import io
import os
import stat
import sys
import zipfile
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from .dataset import IMAGE_EXTENSIONS, display_path
from .predict import MAX_UPLOAD_BYTES, LoadedModel, read_image
from .subgroups import PATH_COLUMNS

BATCH_SIZE = 64  # images per forward pass
DECODE_CHUNK = 16  # files per task sent to a decoding process
MIN_FOR_PROCESSES = 48  # fewer files decode faster in this process than a pool starts
LABEL_COLUMNS = ("label", "class", "diagnosis", "finding", "target", "ground_truth", "truth")
# Zips: each member is held to the single-upload limit; these bound what a whole archive may cost.
MAX_ZIP_MEMBERS = 50_000
MAX_ZIP_TOTAL_BYTES = 20 * 2**30  # uncompressed, as declared; reading never goes past a member's declaration
MAX_COMPRESSION_RATIO = 100  # images barely compress; a member that shrinks 100:1 (and is over 1 MB) is a bomb
RATIO_CHECK_BYTES = 2**20
MAX_LABEL_CSV_BYTES = 50 * 2**20
# Uploads on the page: each file (a zip too) within the single-upload limit (the server's own, in
# .streamlit/config.toml), all of them together at most this.
MAX_BATCH_UPLOAD_BYTES = 512 * 2**20
ZIP_SUFFIX, CSV_SUFFIX = ".zip", ".csv"
LIMIT_MB = MAX_UPLOAD_BYTES // 2**20
CSV_COLUMNS = ("file", "label", "probability", "decision", "threshold", "applicable", "ood_score", "ood_reason",
               "error")
# First bytes of files that are certainly not images, for files without an extension (DICOM files often have
# none, so those are tried unless they are one of these).
_NOT_IMAGE_MAGIC = ((b"PK\x03\x04", "a zip archive"), (b"%PDF", "a PDF document"), (b"\x7fELF", "a program"),
                    (b"\x1f\x8b", "a gzip archive"), (b"7z\xbc\xaf", "a 7z archive"), (b"Rar!", "a RAR archive"),
                    (b"SQLite format 3", "an SQLite database"), (b"\x89HDF", "an HDF5 file"))
SNIFF_BYTES = 4096

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ImageInput:
    """One file to predict: on disk (`path`), a member of an archive (`archive`, `member`: read on demand) or
    bytes already in memory (`data`, an upload)."""

    name: str  # what the user reads: a path, or archive.zip/member
    path: str | None = None
    archive: int | None = None  # index into BatchInputs.archives
    member: zipfile.ZipInfo | None = None
    data: bytes | None = None
    label: str | None = None


@dataclass
class BatchInputs:
    """What a set of sources holds: the files to predict, those skipped with the reason, and how many hidden
    entries were left out. Holds the zips open until closed (use it as a context manager)."""

    items: list[ImageInput] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    hidden: int = 0  # dot files, __MACOSX and the like, left out silently but counted
    archives: list[zipfile.ZipFile] = field(default_factory=list)
    has_labels: bool = False

    def extend(self, other: BatchInputs) -> None:
        offset = len(self.archives)
        self.items += [item if item.archive is None else
                       ImageInput(item.name, archive=item.archive + offset, member=item.member, label=item.label)
                       for item in other.items]
        self.skipped += other.skipped
        self.hidden += other.hidden
        self.archives += other.archives
        self.has_labels |= other.has_labels

    def source(self, item: ImageInput) -> str | bytes:
        """What the decoder reads: the path, or the bytes (a zip member is read here, within its limits).
        ValueError says why a member cannot be read."""
        if item.path is not None:
            return item.path
        if item.data is not None:
            return item.data
        assert item.archive is not None and item.member is not None
        return read_member(self.archives[item.archive], item.member)

    def close(self) -> None:
        for archive in self.archives:
            archive.close()

    def __enter__(self) -> BatchInputs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- what the sources hold

def _is_hidden(name: str) -> bool:
    """Dot files and OS clutter such as __MACOSX from zip archives (as dataset scanning leaves them out)."""
    return name.startswith(".") or name.startswith("__")


def _not_an_image(head: bytes) -> str | None:
    """Why a file without an extension is certainly not an image, from its first bytes; None: try it."""
    for magic, what in _NOT_IMAGE_MAGIC:
        if head.startswith(magic):
            return what
    if head and b"\0" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start < len(head) - 3:  # not just a character cut at the end of the sample
                return None
        return "a text file"
    return None


def _skip_reason(name: str, head: Callable[[], bytes]) -> str | None:
    """Why a file in a folder or zip is not tried (None: try it): its extension names another kind of file, or
    it has none and its first bytes say what it is."""
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return None
    if suffix == ZIP_SUFFIX:
        return "a zip inside a folder or zip is not opened: give it on its own"
    if suffix:
        return f"not an image file ({suffix}; images are {', '.join(sorted(IMAGE_EXTENSIONS))})"
    try:
        what = _not_an_image(head())
    except (OSError, ValueError):
        return None  # the decoder will say why it cannot be read
    return f"not an image file ({what})" if what else None


def _file_head(path: str) -> bytes:
    from .dataset import open_regular_file

    with open_regular_file(path) as f:
        return f.read(SNIFF_BYTES)


def scan_folder(root: str | os.PathLike) -> BatchInputs:
    """Every visible file under `root`, sorted, recursively (links to folders are listed, not followed)."""
    found = BatchInputs()

    def unreadable(error: OSError) -> None:
        found.skipped.append((display_path(error.filename or root), f"folder not readable ({error.strerror})"))

    for folder, subdirs, files in os.walk(root, onerror=unreadable):
        visible = sorted(d for d in subdirs if not _is_hidden(d))
        found.hidden += len(subdirs) - len(visible)
        subdirs[:] = []
        for d in visible:
            if os.path.islink(os.path.join(folder, d)):
                found.skipped.append((display_path(os.path.join(folder, d)), "a link to a folder: not followed"))
            else:
                subdirs.append(d)
        for name in sorted(files):
            if _is_hidden(name):
                found.hidden += 1
                continue
            path = os.path.join(folder, name)
            reason = _skip_reason(name, partial(_file_head, path))
            if reason:
                found.skipped.append((display_path(path), reason))
            else:
                found.items.append(ImageInput(display_path(path), path=path))
    return found


def read_label_csv(csv_path: str | os.PathLike) -> BatchInputs:
    """The images a CSV lists: a path column (path, file, filename, ... any case), relative paths taken from
    the CSV's folder, and a label column (label, class, diagnosis, ...) carried along when there is one.
    ValueError (one line) when the file is not a readable CSV or has no path column."""
    from .subgroups import read_csv_text_table

    csv_path = str(csv_path)
    shown = display_path(csv_path)
    table = read_csv_text_table(csv_path, f"the label file {shown}")
    by_name = {str(c).strip().lower(): c for c in reversed(table.columns)}
    key = next((by_name[n] for n in PATH_COLUMNS if n in by_name), None)
    if key is None:
        columns = ", ".join(str(c) for c in table.columns[:5])
        raise ValueError(f"{shown} needs a column naming the image ({', '.join(PATH_COLUMNS)}); it has {columns}.")
    label = next((by_name[n] for n in LABEL_COLUMNS if n in by_name and by_name[n] != key), None)
    folder = Path(csv_path).parent
    found = BatchInputs(has_labels=label is not None)
    for line, row in enumerate(table.to_dict("records"), start=2):
        given = str(row[key]).strip()
        if not given:
            found.skipped.append((f"{shown} line {line}", "no image path in this row"))
            continue
        path = str(folder / given)  # an absolute path stays as it is
        found.items.append(ImageInput(display_path(path), path=path,
                                      label=str(row[label]) if label is not None else None))
    return found


def _zip_name(archive_name: str, member: str) -> str:
    return f"{archive_name}/{display_path(member)}"


def open_zip(source: str | os.PathLike | bytes, name: str | None = None) -> BatchInputs:
    """The members of a zip (a path, or bytes of an upload), read in memory later and never extracted. The
    archive is refused as a whole (ValueError) when it is not a zip, holds more than MAX_ZIP_MEMBERS entries or
    declares more than MAX_ZIP_TOTAL_BYTES uncompressed; a member larger than a single upload, compressed like
    a zip bomb or encrypted is listed as skipped."""
    shown = name if name is not None else display_path(source) if not isinstance(source, bytes) else "upload.zip"
    try:
        archive = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{shown} is not a readable zip ({e}).") from None
    try:
        infos = archive.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise ValueError(f"{shown} holds {len(infos):,} entries; at most {MAX_ZIP_MEMBERS:,} (split it, or give "
                             "the folder).")
        total = sum(info.file_size for info in infos)
        if total > MAX_ZIP_TOTAL_BYTES:
            raise ValueError(f"{shown} declares {total / 2**30:,.1f} GB uncompressed; at most "
                             f"{MAX_ZIP_TOTAL_BYTES // 2**30} GB (a zip bomb, or give the folder instead).")
    except BaseException:
        archive.close()
        raise
    found = BatchInputs(archives=[archive])
    for info in infos:
        if info.is_dir():
            continue
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if any(_is_hidden(part) for part in parts if part not in (".", "..")):  # "../x.png" is just a name
            found.hidden += 1
            continue
        member_name = _zip_name(shown, info.filename)
        reason = _member_refusal(info) or _skip_reason(info.filename, partial(_member_head, archive, info))
        if reason:
            found.skipped.append((member_name, reason))
        else:
            found.items.append(ImageInput(member_name, archive=0, member=info))
    return found


def _member_refusal(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member is not read at all, from what the archive declares."""
    if info.flag_bits & 0x1:
        return "encrypted in the zip: cannot be read"
    if info.file_size > MAX_UPLOAD_BYTES:
        return f"larger than {LIMIT_MB} MB uncompressed ({info.file_size / 2**20:,.0f} MB)"
    if info.file_size > RATIO_CHECK_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(1, info.compress_size):
        return (f"compressed {info.file_size / max(1, info.compress_size):,.0f} to 1, like a zip bomb (images "
                "barely compress): not read")
    return None


def _member_head(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        with archive.open(info) as f:
            return f.read(SNIFF_BYTES)
    except Exception as e:  # zipfile raises many types for damaged members
        raise ValueError(str(e)) from None


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes, never more than it declares nor than a single upload. ValueError for a damaged,
    truncated or lying member."""
    refusal = _member_refusal(info)
    if refusal:
        raise ValueError(refusal)
    try:
        with archive.open(info) as f:
            data = f.read(MAX_UPLOAD_BYTES + 1)
    except Exception as e:  # BadZipFile (CRC), zlib.error, EOFError, NotImplementedError (compression) ...
        raise ValueError(f"damaged in the zip ({type(e).__name__}: {e})") from None
    if len(data) != info.file_size:
        raise ValueError(f"the zip declares {info.file_size:,} bytes but holds {len(data):,}: damaged, or a zip bomb")
    return data


def collect_inputs(sources: list[str], uploads: list[tuple[str, bytes]] | None = None) -> BatchInputs:
    """The images that sources on disk hold: folders (recursively), CSV label files, zips and single files
    (tried whatever their extension), then `uploads` (see inputs_from_uploads). ValueError (one line) for a source
    that does not exist or cannot be read as what it is, before any model is loaded."""
    found = BatchInputs()
    try:
        for source in sources:
            shown = display_path(source)
            try:
                mode = os.stat(source).st_mode
            except OSError as e:
                raise ValueError(f"{shown}: {e.strerror or e} (give a folder, a CSV label file, a .zip or image "
                                 "files).") from None
            suffix = Path(source).suffix.lower()
            if stat.S_ISDIR(mode):
                found.extend(scan_folder(source))
            elif suffix == CSV_SUFFIX:
                found.extend(read_label_csv(source))
            elif suffix == ZIP_SUFFIX:
                if not stat.S_ISREG(mode):
                    raise ValueError(f"{shown} is not a regular file.")
                found.extend(open_zip(source))
            else:
                found.items.append(ImageInput(shown, path=str(source)))
        if uploads:
            found.extend(inputs_from_uploads(uploads))
    except BaseException:
        found.close()
        raise
    return found


def inputs_from_uploads(files: list[tuple[str, bytes]]) -> BatchInputs:
    """Uploaded files (name, bytes): images as they are, zips opened in memory. ValueError when together they
    exceed MAX_BATCH_UPLOAD_BYTES or a zip is refused."""
    total = sum(len(data) for _, data in files)
    if total > MAX_BATCH_UPLOAD_BYTES:
        raise ValueError(f"The uploads add up to {total / 2**20:,.0f} MB; at most {MAX_BATCH_UPLOAD_BYTES // 2**20} "
                         "MB at once (give a folder or zip on the server instead).")
    found = BatchInputs()
    try:
        for name, data in files:
            if name.lower().endswith(ZIP_SUFFIX):
                found.extend(open_zip(data, display_path(name)))
            else:
                found.items.append(ImageInput(display_path(name), data=data))
    except BaseException:
        found.close()
        raise
    return found


# ---------------------------------------------------------------- decoding

Decoded = tuple[np.ndarray | None, str | None, str | None]  # pixels, gate reason, error


def _decode_one(source: str | bytes, size: int) -> Decoded:
    """What predict.predict_image decodes: the size limit, the training preprocessing and the image gate on
    the decoded file, in one decode."""
    from .ood import gate_from_image

    gate: list[str | None] = []
    try:
        pixels = read_image(source, size, lambda img, original: gate.append(gate_from_image(img, original)))
    except ValueError as e:
        return None, None, str(e)
    except Exception as e:  # one file's failure must not cost the others of a long batch
        return None, None, f"could not be decoded ({type(e).__name__}: {e})"
    return pixels, gate[0] if gate else None, None


def _decode_chunk(args: tuple[list[str | bytes | ValueError], int]) -> list[Decoded]:
    sources, size = args
    return [(None, None, str(s)) if isinstance(s, ValueError) else _decode_one(s, size) for s in sources]


def default_workers() -> int:
    """Decoding processes: the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _decoded(inputs: BatchInputs, size: int, workers: int) -> Iterator[Decoded]:
    """Each item's decode, in order. With several workers, up to 2 chunks per worker are decoded ahead while
    the caller runs the model; zip members are read here (the archive stays in this process)."""

    def sources(chunk: list[ImageInput]) -> list[str | bytes | ValueError]:
        out: list[str | bytes | ValueError] = []
        for item in chunk:
            try:
                out.append(inputs.source(item))
            except ValueError as e:
                out.append(e)
        return out

    chunks = [inputs.items[i:i + DECODE_CHUNK] for i in range(0, len(inputs.items), DECODE_CHUNK)]
    if workers <= 1 or len(inputs.items) < MIN_FOR_PROCESSES:
        for chunk in chunks:
            yield from _decode_chunk((sources(chunk), size))
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future] = deque()
        todo = iter(chunks)
        for chunk in todo:
            pending.append(pool.submit(_decode_chunk, (sources(chunk), size)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            done = pending.popleft().result()
            chunk = next(todo, None)
            if chunk is not None:
                pending.append(pool.submit(_decode_chunk, (sources(chunk), size)))
            yield from done


# ---------------------------------------------------------------- prediction

@dataclass
class BatchResult:
    """One row per file tried (predicted or unreadable), the files skipped, and the folder verdict."""

    rows: list[dict]  # file, label, probability, decision, threshold, applicable, ood_score, ood_reason, error
    skipped: list[tuple[str, str]]
    hidden: int
    classes: list[str]  # [negative, positive]
    threshold: float
    has_labels: bool
    shift: dict | None  # ood.folder_shift's verdict over every predicted image; None for fewer than two
    ood_fitted: bool

    @property
    def predicted(self) -> list[dict]:
        return [r for r in self.rows if r["error"] is None]

    @property
    def unreadable(self) -> list[dict]:
        return [r for r in self.rows if r["error"] is not None]

    def frame(self) -> pd.DataFrame:
        """The CSV: a row per file tried, then a row per file skipped (its reason in `error`)."""
        skipped = [{"file": name, "error": f"skipped: {why}"} for name, why in self.skipped]
        columns = [c for c in CSV_COLUMNS if c != "label" or self.has_labels]
        return pd.DataFrame(self.rows + skipped, columns=columns)

    def table(self) -> pd.DataFrame:
        """The predicted images as the page shows them: the decision at the operating threshold, or "not
        applicable" with the out-of-distribution verdict saying why (the CSV keeps the model's call)."""
        rows = [{"probability": r["probability"],
                 "decision": r["decision"] if r["applicable"] else "not applicable",
                 "file": r["file"], "OOD verdict": _verdict_text(r), "label": r["label"]} for r in self.predicted]
        columns = ["probability", "decision", "file", "OOD verdict"] + ["label"] * self.has_labels
        return pd.DataFrame(rows, columns=columns)

    def left_out(self) -> pd.DataFrame:
        """Files not predicted, with the reason: unreadable first, then skipped."""
        rows = [{"file": r["file"], "reason": r["error"]} for r in self.unreadable]
        rows += [{"file": name, "reason": f"skipped: {why}"} for name, why in self.skipped]
        return pd.DataFrame(rows, columns=["file", "reason"])

    def csv_bytes(self) -> bytes:
        return self.frame().to_csv(index=False).encode("utf-8")

    def counts(self) -> dict[str, int]:
        """Predicted images per decision that applies, and those whose decision does not apply."""
        applies = Counter(r["decision"] for r in self.predicted if r["applicable"])
        out = {c: applies.get(c, 0) for c in reversed(self.classes)}
        out["not applicable"] = sum(not r["applicable"] for r in self.predicted)
        return out

    def summary_lines(self) -> list[str]:
        n = len(self.predicted)
        decisions = ", ".join(f"{k} {v}" for k, v in self.counts().items())
        lines = [f"{n} image{'s' * (n != 1)} predicted at the operating threshold {self.threshold:.3f}"
                 + (f": {decisions}" if n else ".")]
        unreadable, skipped = len(self.unreadable), len(self.skipped)
        lines.append(f"{unreadable} unreadable, {skipped} skipped (not images, or refused in a zip)"
                     + (f", {self.hidden} hidden entries left out" if self.hidden else "") + ".")
        if not self.ood_fitted:
            lines.append("This run has no out-of-distribution score: only the image checks ran (python -m core "
                         "fit-ood RUN fits it).")
        if self.shift is not None:
            lines.append(("WARNING: " if self.shift.get("shifted") else "") + f"these {self.shift['n']} images: "
                         + self.shift["verdict"])
        return lines


def _verdict_text(row: dict) -> str:
    if row["ood_reason"]:
        return row["ood_reason"]
    return f"like the training data (score {row['ood_score']:.2f})"


def _ood_reason(ood) -> str:
    if ood.reason:
        return ood.reason
    return "" if ood.score is not None else "not checked (no out-of-distribution score)"


def predict_batch(loaded: LoadedModel, inputs: BatchInputs, batch_size: int = BATCH_SIZE,
                  workers: int | None = None, progress: Progress | None = None,
                  folder_verdict: bool = True) -> BatchResult:
    """Predict every item of `inputs` as predict.predict_image would (same decode and gate, same calibrated
    probability to float32 rounding, same threshold and out-of-distribution verdict), `batch_size` images per
    forward pass, decoded by `workers` processes (default: one per core). `progress(done, total)` after each
    batch. `folder_verdict`: the two-sample test over all predicted images (ood.folder_shift), a fixed cost of
    a fraction of a second to a few seconds."""
    import torch

    from . import cam
    from .ood import folder_shift, verdict_from_score

    total = len(inputs.items)
    workers = default_workers() if workers is None else workers
    rows: list[dict] = []
    features_kept: list[np.ndarray] = []
    flags: list[bool] = []
    gated = 0
    waiting: list[tuple[int, np.ndarray, str | None]] = []  # (row, pixels, gate)

    def run_model() -> None:
        nonlocal gated
        if not waiting:
            return
        x = torch.from_numpy(np.stack([p for _, p, _ in waiting])).float().div_(255.0)[:, None]
        x = ((x - loaded.mean) / loaded.std).to(loaded.device)
        with cam.MODEL_LOCK, torch.inference_mode():  # as predict_pixels: the model is shared by the pages
            features = loaded.model.backbone(x)
            logits = loaded.model.head(features).float().cpu()
        probs = torch.softmax(logits / loaded.temperature, dim=1)[:, 1].tolist()
        features_np = features.float().cpu().numpy()
        scores = loaded.ood.scores(features_np) if loaded.ood is not None else [None] * len(waiting)
        for (row, _, gate), prob, score in zip(waiting, probs, scores):
            ood = verdict_from_score(gate, None if score is None else float(score), loaded.ood)
            positive = prob >= loaded.threshold
            rows[row].update(probability=float(prob), decision=loaded.classes[1] if positive else loaded.classes[0],
                             threshold=loaded.threshold, applicable=not ood.flagged, ood_score=ood.score,
                             ood_reason=_ood_reason(ood), error=None)
            flags.append(ood.flagged)
            gated += bool(gate)
        features_kept.append(features_np)
        waiting.clear()
        if progress:
            progress(len(rows), total)

    for item, (pixels, gate, error) in zip(inputs.items, _decoded(inputs, loaded.image_size, workers)):
        rows.append({"file": item.name, "label": item.label, "probability": None, "decision": None,
                     "threshold": None, "applicable": None, "ood_score": None, "ood_reason": None, "error": error})
        if pixels is not None:
            waiting.append((len(rows) - 1, pixels, gate))
            if len(waiting) >= batch_size:
                run_model()
        elif progress and len(rows) % batch_size == 0:
            progress(len(rows), total)
    run_model()
    if progress:
        progress(total, total)
    shift = None
    if folder_verdict and len(flags) >= 2:
        shift = folder_shift(loaded.ood, np.concatenate(features_kept), np.array(flags), gated=gated)
    return BatchResult(rows, list(inputs.skipped), inputs.hidden, list(loaded.classes), loaded.threshold,
                       inputs.has_labels, shift, loaded.ood is not None)


# ---------------------------------------------------------------- command line

def cli_batch_predict(args) -> int:
    """`python -m core predict RUN SOURCES... --out FILE.csv [--force] [--json]`: every image of the sources to
    one CSV, with a progress bar on stderr and a summary; exit 1 when nothing could be predicted."""
    import json

    from tqdm import tqdm

    from . import runs
    from .predict import load_run_model

    out = runs.check_output_file(args.out, args.force, suffixes=(CSV_SUFFIX,))  # before anything is loaded
    with collect_inputs(args.images) as inputs:
        if not inputs.items:
            first = f" ({inputs.skipped[0][0]}: {inputs.skipped[0][1]})" if inputs.skipped else ""
            raise ValueError(f"Nothing to predict: no image in {', '.join(display_path(s) for s in args.images)}"
                             f"{first}.")
        loaded = load_run_model(args.run)
        with tqdm(total=len(inputs.items), unit="img", file=sys.stderr, disable=None, mininterval=0.5) as bar:
            result = predict_batch(loaded, inputs, progress=lambda done, total: bar.update(done - bar.n))
    runs.check_output_file(out, args.force, suffixes=(CSV_SUFFIX,))  # again, just before replacing
    runs.write_file_atomic(out, lambda tmp: result.frame().to_csv(tmp, index=False))
    if args.json:
        print(json.dumps({"out": str(out), "predicted": len(result.predicted), "decisions": result.counts(),
                          "unreadable": [{"file": r["file"], "error": r["error"]} for r in result.unreadable],
                          "skipped": [{"file": f, "reason": why} for f, why in result.skipped],
                          "folder": result.shift}, indent=2, default=str))
    else:
        print("\n".join(result.summary_lines() + [f"predictions written to {display_path(out)}"]))
        for row in result.unreadable[:20]:
            print(f"  unreadable: {row['file']}: {row['error']}")
        if len(result.unreadable) > 20:
            print(f"  ... and {len(result.unreadable) - 20} more unreadable (all in the CSV)")
    return 0 if result.predicted else 1
