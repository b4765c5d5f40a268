"""The decoded-image cache: every image decoded once (in parallel), converted to one channel, resized and
stored as uint8 on disk, keyed by the file's path, size and mtime."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import PREPROCESSING_VERSION, READ_ERROR_PREFIX, load_grayscale, open_regular_file


def _decode_chunk(args: tuple[list[str], int]) -> list[tuple[np.ndarray | None, str | None, str]]:
    """(pixels or None, error or None, sha256 of the file) per path; each file is read once. A read
    failure gives an empty sha256 and an error starting with READ_ERROR_PREFIX."""
    paths, size = args
    out: list[tuple[np.ndarray | None, str | None, str]] = []
    for p in paths:
        try:
            with open_regular_file(p) as f:
                data = f.read()
        except OSError as e:
            out.append((None, READ_ERROR_PREFIX + (e.strerror or str(e)), ""))
            continue
        except ValueError as e:  # not a regular file, or it could not be opened
            out.append((None, str(e), ""))
            continue
        digest = hashlib.sha256(data).hexdigest()
        try:
            out.append((load_grayscale(data, size), None, digest))
        except ValueError as e:
            out.append((None, str(e), digest))
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


@dataclass
class DecodedImages:
    images: np.ndarray  # (n_ok, size, size) uint8
    ok_indices: list[int]  # positions in the requested path list
    failed: dict[str, str]  # path -> reason
    sha256: list[str]  # per requested path, for finding identical files
    decoded_now: int  # images decoded in this call (0 when everything came from the cache)


def _valid_cache_entry(entry: object, n_rows: int) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), list):
        return False
    if "error" in entry:
        return isinstance(entry["error"], str)
    row = entry.get("row")
    return isinstance(row, int) and not isinstance(row, bool) and 0 <= row < n_rows


def _read_cache(index_file: Path, array_file: Path, size: int) -> tuple[dict[str, dict], np.ndarray]:
    """The shard's index and images; a damaged shard reads as empty (and is rebuilt), entry by entry
    where only some entries are damaged."""
    empty = np.zeros((0, size, size), np.uint8)
    if not (index_file.exists() and array_file.exists()):
        return {}, empty
    try:
        cached = json.loads(index_file.read_text())
        stored = np.load(array_file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return {}, empty
    if not isinstance(cached, dict) or stored.dtype != np.uint8 or stored.shape[1:] != (size, size):
        return {}, empty
    return {p: e for p, e in cached.items() if _valid_cache_entry(e, len(stored))}, stored


def _write_cache(shard: Path, rows: np.ndarray, cached: dict[str, dict]) -> None:
    """Replace the shard atomically; on failure (disk full, read-only) remove the temporary files and
    raise OSError naming the folder."""
    tmp_array, tmp_index = shard / "images.tmp.npy", shard / "index.tmp.json"
    try:
        shard.mkdir(parents=True, exist_ok=True)
        np.save(tmp_array, rows)
        tmp_index.write_text(json.dumps(cached))
        os.replace(tmp_array, shard / "images.npy")  # atomic: a killed run never leaves a half-written cache
        os.replace(tmp_index, shard / "index.json")
    except OSError as e:
        for tmp in (tmp_array, tmp_index):
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        raise OSError(e.errno, f"could not write the decoded-image cache in {shard} ({e.strerror or e}); free "
                               "space there, or choose another cache folder (--cache-dir or CXR_CACHE_DIR)") from None


def decode_images(paths: list[str], size: int, cache_dir: str | os.PathLike | None = None,
                  workers: int | None = None, progress=None, root: str | None = None) -> DecodedImages:
    """Decode images once, in parallel, and cache them as uint8 on disk.

    The cache is keyed by image size and each file's absolute path, byte size and mtime, so a second
    run on the same files decodes nothing and a changed or added file is decoded again on its own.
    Files whose content is unreadable are remembered too and reported, not retried; files that could
    not be read at all (permissions, I/O errors) are reported and retried next time. One cache shard per
    dataset `root` (default: the folder common to all paths) and size.
    """
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    abs_paths = [str(Path(p).resolve()) for p in paths]
    root = str(Path(root).resolve()) if root else (os.path.commonpath(abs_paths) if abs_paths else "")
    key_src = json.dumps({"v": PREPROCESSING_VERSION, "size": size, "root": root}, ensure_ascii=True)
    shard = cache_root / f"{size}px-{hashlib.sha1(key_src.encode()).hexdigest()[:16]}"
    cached, stored = _read_cache(shard / "index.json", shard / "images.npy", size)

    keys = [_file_key(p) for p in abs_paths]
    unreachable = {i for i, k in enumerate(keys) if k is None}
    todo = [i for i, (p, k) in enumerate(zip(abs_paths, keys))
            if k is not None and (p not in cached or cached[p]["key"] != k)]

    transient: dict[int, str] = {i: READ_ERROR_PREFIX + "it vanished or cannot be looked at" for i in unreachable}
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
            elif err.startswith(READ_ERROR_PREFIX):
                transient[i] = err
                cached.pop(abs_paths[i], None)
            else:
                cached[abs_paths[i]] = {"key": keys[i], "error": err, "sha256": digest}
        all_rows = np.concatenate([np.asarray(stored), np.stack(new_rows)]) if new_rows else np.asarray(stored)
        _write_cache(shard, all_rows, cached)
        stored = all_rows

    ok_indices, rows, failed = [], [], {}
    for i, p in enumerate(abs_paths):
        entry = cached.get(p) if i not in transient else None
        if entry is None:
            failed[paths[i]] = transient[i]
        elif "error" in entry:
            failed[paths[i]] = entry["error"]
        else:
            ok_indices.append(i)
            rows.append(entry["row"])
    images = np.asarray(stored[np.array(rows, dtype=np.int64)]) if rows else np.zeros((0, size, size), np.uint8)
    return DecodedImages(images, ok_indices, failed,
                         [(cached.get(p) or {}).get("sha256", "") if i not in transient else ""
                          for i, p in enumerate(abs_paths)], decoded_now=len(todo))
