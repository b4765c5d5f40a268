"""The decoded-image cache: every image decoded once (in parallel), converted to one channel, resized and
stored as uint8 on disk, keyed by the file's path, size and mtime.

Layout: one shard folder per (dataset root, size) holding numbered chunks, each a pair
`chunk-NNNNNN.npy` (up to CHUNK_IMAGES images, (n, S, S) uint8) and `chunk-NNNNNN.json` (the entries it
commits: path -> file key, row, sha256, header fields, or a content verdict). A chunk is never rewritten:
appending writes the next chunk, the .npy first and the .json after it, each through a temporary file and
os.replace, so a run killed at any moment keeps every finished chunk and decodes only the rest next time.
Separate chunk files (not one preallocated memmap) because the number of images is unknown when decoding
starts, a file can be made to appear whole or not at all, and a reader's memory map of a finished chunk
stays valid while another process appends. Per-chunk indexes (not one index rewritten after every chunk)
keep each write proportional to a chunk, not to the whole dataset. Images are read through
np.load(mmap_mode="r"): only the pages of the images asked for come into memory.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TextIO

import numpy as np

from . import dataset
from .dataset import PREPROCESSING_VERSION, READ_ERROR_PREFIX, load_grayscale, open_regular_file

if TYPE_CHECKING:
    from .streaming import MappedImages

# ~100 MB per chunk at 224 px: a kill loses at most one chunk's work, and 100,000 images make ~50 files.
CHUNK_IMAGES = 2048
CACHE_LAYOUT = 2  # 2: append-only chunks (1, a single images.npy rewritten on every append, is ignored)
MAX_META_FIELDS = 32
MAX_META_CHARS = 256
MAX_ERROR_CHARS = 2000
_CHUNK_FILE = re.compile(r"^chunk-(\d{6,})\.(npy|json)$")
_TEMPORARY = re.compile(r"^chunk-\d{6,}\.tmp\.(npy|json)$")

Decoded = tuple["np.ndarray | None", "str | None", str, dict[str, str]]


def _clean_meta(meta: object) -> dict[str, str]:
    """The header fields worth keeping: str -> str, few and short (anything else is dropped)."""
    if not isinstance(meta, dict):
        return {}
    return {k: v for k, v in list(meta.items())[:MAX_META_FIELDS]
            if isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_META_CHARS and len(v) <= MAX_META_CHARS}


def _decode_chunk(args: tuple[list[str], int]) -> list[Decoded]:
    """(pixels or None, error or None, sha256 of the file, header fields) per path; each file is read once.
    A read failure gives an empty sha256 and an error starting with READ_ERROR_PREFIX."""
    paths, size = args
    out: list[Decoded] = []
    for p in paths:
        try:
            with open_regular_file(p) as f:
                data = f.read()
        except OSError as e:
            out.append((None, READ_ERROR_PREFIX + (e.strerror or str(e)), "", {}))
            continue
        except ValueError as e:  # not a regular file, or it could not be opened
            out.append((None, str(e), "", {}))
            continue
        digest = hashlib.sha256(data).hexdigest()
        try:
            pixels = load_grayscale(data, size)
        except ValueError as e:
            out.append((None, str(e), digest, {}))
            continue
        try:
            meta = _clean_meta(dataset.image_metadata(data))
        except ValueError:  # a header that decodes but whose fields do not: the pixels are still good
            meta = {}
        out.append((pixels, None, digest, meta))
    return out


def _file_key(path: str) -> list | None:
    """(byte size, mtime) that identifies a file's version; None when it cannot be looked at now."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def default_cache_dir() -> Path:
    return Path(os.environ.get("CXR_CACHE_DIR", Path.home() / ".cache" / "cxr-workbench"))


def gather_rows(chunks: list[np.ndarray], where: np.ndarray, positions, size: int) -> np.ndarray:
    """uint8 (k, size, size): the images at `positions` of `where` ((n, 2): chunk, row), read chunk by chunk in
    row order (sequential reads on the memory maps), then put back in the order asked for."""
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    out = np.empty((len(pos), size, size), np.uint8)
    if not len(pos):
        return out
    sel = where[pos]
    order = np.lexsort((sel[:, 1], sel[:, 0]))
    sorted_sel = sel[order]
    starts = np.flatnonzero(np.diff(sorted_sel[:, 0])) + 1
    for group in np.split(np.arange(len(order)), starts):
        out[order[group]] = chunks[int(sorted_sel[group[0], 0])][sorted_sel[group, 1]]
    return out


@dataclass
class DecodedImages:
    """The decoded images of the requested paths that could be read, memory-mapped from the cache.

    `images` materialises all of them (for small datasets); `gather` and `mapped` read only a subset."""
    ok_indices: list[int]  # positions in the requested path list
    failed: dict[str, str]  # path -> reason
    sha256: list[str]  # per requested path, for finding identical files
    decoded_now: int  # images decoded in this call (0 when everything came from the cache)
    metadata: list[dict[str, str]]  # per requested path: DICOM header fields kept, {} for other formats
    size: int
    chunks: list[np.ndarray] = field(repr=False)  # memory-mapped (n, size, size) uint8 chunk arrays
    where: np.ndarray = field(repr=False)  # (len(ok_indices), 2) int64: chunk (in `chunks`), row

    @functools.cached_property
    def images(self) -> np.ndarray:
        """(n_ok, size, size) uint8, all in memory."""
        return self.gather(np.arange(len(self.ok_indices)))

    def gather(self, positions) -> np.ndarray:
        """uint8 (k, size, size): the images of these positions in `ok_indices`, in that order."""
        return gather_rows(self.chunks, self.where, positions, self.size)

    def mapped(self, positions=None) -> MappedImages:
        """These ok images (default: all) as a torch-indexable (k, 1, size, size) uint8 view read on demand."""
        from .streaming import MappedImages

        return MappedImages(self, np.arange(len(self.ok_indices)) if positions is None else positions)


def _valid_key(key: object) -> bool:
    return (isinstance(key, list) and len(key) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in key))


def _valid_entry(entry: object, n_rows: int) -> bool:
    if not isinstance(entry, dict) or not _valid_key(entry.get("key")):
        return False
    sha = entry.get("sha256", "")
    if not isinstance(sha, str) or len(sha) > 64:
        return False
    if "meta" in entry and (not isinstance(entry["meta"], dict) or _clean_meta(entry["meta"]) != entry["meta"]):
        return False
    if "error" in entry:
        return isinstance(entry["error"], str) and len(entry["error"]) <= MAX_ERROR_CHARS and "row" not in entry
    row = entry.get("row")
    return isinstance(row, int) and not isinstance(row, bool) and 0 <= row < n_rows


@dataclass
class _Shard:
    entries: dict[str, dict]  # path -> entry; an image entry carries "chunk" (its chunk id)
    arrays: dict[int, np.ndarray]  # chunk id -> memory-mapped images
    next_id: int


def _load_chunk_array(path: Path, size: int) -> np.ndarray | None:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[1:] != (size, size):
        return None
    return arr


def _read_shard(shard: Path, size: int) -> _Shard:
    """The shard's valid entries, newest chunk first to win. A damaged chunk or entry is left out (and so
    decoded again), entry by entry where only some entries are damaged."""
    ids: set[int] = set()
    try:
        names = os.listdir(shard)
    except OSError:
        names = []
    for name in names:
        m = _CHUNK_FILE.match(name)
        if m:
            ids.add(int(m.group(1)))
    entries: dict[str, dict] = {}
    arrays: dict[int, np.ndarray] = {}
    for cid in sorted(ids):
        try:
            index = json.loads((shard / f"chunk-{cid:06d}.json").read_text())
        except (ValueError, OSError, UnicodeDecodeError):
            continue
        if not isinstance(index, dict) or not isinstance(index.get("entries"), dict):
            continue
        arr = _load_chunk_array(shard / f"chunk-{cid:06d}.npy", size)
        n_rows = len(arr) if arr is not None else 0
        if arr is not None:
            arrays[cid] = arr
        for path, entry in index["entries"].items():
            if _valid_entry(entry, n_rows):
                entries[path] = {**entry, "chunk": cid} if "row" in entry else entry
    return _Shard(entries, arrays, max(ids, default=-1) + 1)


_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _cache_write_error(shard: Path, e: OSError) -> OSError:
    return OSError(e.errno, f"could not write the decoded-image cache in {shard} ({e.strerror or e}); free "
                            "space there, or choose another cache folder (--cache-dir or CXR_CACHE_DIR)")


@contextmanager
def _shard_lock(shard: Path) -> Iterator[None]:
    """One writer per shard: across processes a POSIX lock on shard/lock (not inherited by forked decode
    workers, and released by the kernel when its process dies, even by SIGKILL), within one process a
    threading lock (POSIX locks do not exclude threads of the same process)."""
    with _thread_locks_guard:
        thread_lock = _thread_locks.setdefault(os.path.abspath(shard), threading.Lock())
    with thread_lock:
        try:
            shard.mkdir(parents=True, exist_ok=True)
            fd = os.open(shard / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _cache_write_error(shard, e) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def _write_atomic(target: Path, write: Callable[[object], None]) -> None:
    tmp = target.with_name(target.name.replace(".", ".tmp.", 1))
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, target)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def _commit_chunk(shard: Path, cid: int, rows: list[np.ndarray], entries: dict[str, dict], size: int) -> None:
    """Write one chunk: images first, then the index that makes them count. On failure (disk full, read-only)
    nothing half-written is left and the OSError names the folder."""
    try:
        if rows:
            _write_atomic(shard / f"chunk-{cid:06d}.npy", lambda f: np.save(f, np.stack(rows), allow_pickle=False))
        text = json.dumps({"rows": len(rows), "size": size, "entries": entries}, ensure_ascii=True)
        _write_atomic(shard / f"chunk-{cid:06d}.json", lambda f: f.write(text.encode()))
    except OSError as e:
        raise _cache_write_error(shard, e) from None


def _remove_temporaries(shard: Path) -> None:
    """Half-written chunk files of a killed run (only called while holding the shard's lock)."""
    try:
        names = os.listdir(shard)
    except OSError:
        return
    for name in names:
        if _TEMPORARY.match(name):
            try:
                (shard / name).unlink()
            except OSError:
                pass


def _decode_results(paths: list[str], size: int, workers: int) -> Iterator[list[Decoded]]:
    """Decoded files in order, a task (up to 64 files) at a time; at most 4 tasks per worker are in flight so
    memory stays bounded however many files there are."""
    task = max(1, min(64, len(paths) // (workers * 4) or 1))
    tasks = [paths[i:i + task] for i in range(0, len(paths), task)]
    if workers <= 1 or len(paths) <= 32:
        for t in tasks:
            yield _decode_chunk((t, size))
        return
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        pending: deque[Future] = deque()
        queued = iter(tasks)
        for t in queued:
            pending.append(pool.submit(_decode_chunk, (t, size)))
            if len(pending) >= workers * 4:
                break
        while pending:
            done = pending.popleft().result()
            nxt = next(queued, None)
            if nxt is not None:
                pending.append(pool.submit(_decode_chunk, (nxt, size)))
            yield done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_into_shard(shard: Path, store: _Shard, paths: list[str], keys: list[list], size: int, workers: int,
                       progress: Callable[[int, int], None] | None) -> dict[int, str]:
    """Decode `paths` and commit them chunk by chunk into the shard (its lock held); returns the read failures
    (by position in `paths`), which are not cached."""
    transient: dict[int, str] = {}
    rows: list[np.ndarray] = []
    pending: dict[str, dict] = {}

    def commit() -> None:
        cid = store.next_id
        _commit_chunk(shard, cid, rows, pending, size)
        store.next_id += 1
        if rows:
            store.arrays[cid] = np.load(shard / f"chunk-{cid:06d}.npy", mmap_mode="r", allow_pickle=False)
        for p, e in pending.items():
            store.entries[p] = {**e, "chunk": cid} if "row" in e else e
        rows.clear()
        pending.clear()

    done = 0
    if progress:
        progress(0, len(paths))
    for part in _decode_results(paths, size, workers):
        for arr, err, digest, meta in part:
            p, key = paths[done], keys[done]
            if err is None:
                entry = {"key": key, "row": len(rows), "sha256": digest}
                if meta:
                    entry["meta"] = meta
                pending[p] = entry
                rows.append(arr)
            elif err.startswith(READ_ERROR_PREFIX):
                transient[done] = err
            else:
                pending[p] = {"key": key, "error": err[:MAX_ERROR_CHARS], "sha256": digest}
            done += 1
            if len(rows) >= CHUNK_IMAGES:
                commit()
        if progress:
            progress(done, len(paths))
    if pending:
        commit()
    return transient


def decode_images(paths: list[str], size: int, cache_dir: str | os.PathLike | None = None,
                  workers: int | None = None, progress: Callable[[int, int], None] | None = None,
                  root: str | None = None) -> DecodedImages:
    """Decode images once, in parallel, and cache them as uint8 on disk.

    The cache is keyed by image size and each file's absolute path, byte size and mtime, so a second
    run on the same files decodes nothing and a changed or added file is decoded again on its own.
    Files whose content is unreadable are remembered too and reported, not retried; files that could
    not be read at all (permissions, I/O errors) are reported and retried next time. One cache shard per
    dataset `root` (default: the folder common to all paths) and size. Decoding commits every
    CHUNK_IMAGES images, so an interrupted run resumes where it stopped; two processes decoding the same
    root take turns (the second then finds the first one's images). `progress(done, total)` is called with
    the files decoded in this call (see DecodeProgress for a terminal line).
    """
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        raise ValueError(f"image size must be a whole number of pixels from 8 to 4096, not {size!r}")
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    abs_paths = [str(Path(p).resolve()) for p in paths]
    root = str(Path(root).resolve()) if root else (os.path.commonpath(abs_paths) if abs_paths else "")
    key_src = json.dumps({"v": PREPROCESSING_VERSION, "layout": CACHE_LAYOUT, "size": size, "root": root},
                         ensure_ascii=True)
    shard = cache_root / f"{size}px-{hashlib.sha1(key_src.encode()).hexdigest()[:16]}"
    keys = [_file_key(p) for p in abs_paths]

    def to_decode(store: _Shard) -> list[int]:
        return [i for i, (p, k) in enumerate(zip(abs_paths, keys))
                if k is not None and (p not in store.entries or store.entries[p]["key"] != k)]

    store = _read_shard(shard, size)
    todo = to_decode(store)
    transient: dict[int, str] = {}
    if todo:
        with _shard_lock(shard):
            store = _read_shard(shard, size)  # another process may have decoded them while this one waited
            todo = to_decode(store)
            if todo:
                _remove_temporaries(shard)
                failures = _decode_into_shard(shard, store, [abs_paths[i] for i in todo], [keys[i] for i in todo],
                                              size, workers or os.cpu_count() or 1, progress)
                transient = {todo[j]: err for j, err in failures.items()}
    for i, k in enumerate(keys):
        if k is None:
            transient[i] = READ_ERROR_PREFIX + "it vanished or cannot be looked at"

    chunk_ids = sorted(store.arrays)
    chunk_pos = {cid: n for n, cid in enumerate(chunk_ids)}
    ok_indices: list[int] = []
    where: list[tuple[int, int]] = []
    failed: dict[str, str] = {}
    sha256: list[str] = []
    metadata: list[dict[str, str]] = []
    for i, p in enumerate(abs_paths):
        entry = store.entries.get(p) if i not in transient else None
        sha256.append((entry or {}).get("sha256", ""))
        metadata.append(dict((entry or {}).get("meta", {})))
        if entry is None:
            failed[paths[i]] = transient[i]
        elif "error" in entry:
            failed[paths[i]] = entry["error"]
        else:
            ok_indices.append(i)
            where.append((chunk_pos[entry["chunk"]], entry["row"]))
    return DecodedImages(ok_indices, failed, sha256, decoded_now=len(todo), metadata=metadata, size=size,
                         chunks=[store.arrays[c] for c in chunk_ids],
                         where=np.array(where, dtype=np.int64).reshape(-1, 2))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class DecodeProgress:
    """A progress(done, total) callback for decode_images that prints images done/total, images/s and the
    time left: rewritten in place on a terminal, one line every `every` seconds (default 10) elsewhere."""

    def __init__(self, stream: TextIO | None = None, label: str = "decoding", every: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.label = label
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if every is not None else (0.5 if self.tty else 10.0)
        self.clock = clock
        self.started: float | None = None
        self.last_shown = -float("inf")

    def line(self, done: int, total: int) -> str:
        elapsed = self.clock() - (self.started if self.started is not None else self.clock())
        rate = done / elapsed if elapsed > 0 and done else 0.0
        left = f", {_duration((total - done) / rate)} left" if rate and done < total else ""
        return f"{self.label} {done:,}/{total:,} images, {rate:,.0f} images/s{left}"

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if self.started is None or done == 0:
            self.started = now
        finished = done >= total
        if not finished and now - self.last_shown < self.every:
            return
        self.last_shown = now
        text = self.line(done, total)
        if self.tty:
            self.stream.write("\r" + text + ("\n" if finished else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
