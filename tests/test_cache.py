"""The decoded-image cache: decode once, remember verdicts, rebuild what is damaged."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import write_bad_images
from conftest import make_xray, write_dataset

from core import cache
from core.cache import DecodeProgress, decode_images
from core.dataset import scan_dataset


def test_corrupt_and_fake_images_are_skipped_and_reported_and_cache_avoids_second_decode(tmp_path):
    root = write_dataset(tmp_path / "d", {"NORMAL": 6, "PNEUMONIA": 6}, splits=None)
    good = sorted((root / "NORMAL").glob("*.jpeg"))
    (root / "NORMAL" / "notes.jpeg").write_text("this is not an image")
    truncated = root / "PNEUMONIA" / "truncated.jpeg"
    truncated.write_bytes(good[0].read_bytes()[:200])
    paths = [str(p) for p in sorted(root.rglob("*.jpeg"))]
    cache = tmp_path / "cache"

    first = decode_images(paths, 32, cache, workers=1)
    assert set(first.failed) == {str(root / "NORMAL" / "notes.jpeg"), str(truncated)}
    assert first.failed[str(root / "NORMAL" / "notes.jpeg")] == "not an image file (no known image format)"
    assert "truncated" in first.failed[str(truncated)].lower()
    assert len(first.ok_indices) == 12 and first.images.shape == (12, 32, 32)
    assert first.decoded_now == 14

    second = decode_images(paths, 32, cache, workers=1)
    assert second.decoded_now == 0
    assert np.array_equal(first.images, second.images) and second.failed == first.failed

    make_xray(48, 1, seed=99).save(good[1])  # a changed file is decoded again, on its own
    third = decode_images(paths, 32, cache, workers=1)
    assert third.decoded_now == 1
    assert not np.array_equal(third.images[1], first.images[1])


def test_parallel_decode_matches_serial(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "CHUNK_IMAGES", 7)  # parallel results committed over several chunks, in order
    root = write_dataset(tmp_path / "d", {"NORMAL": 20, "PNEUMONIA": 20}, splits=None)
    paths = [str(p) for p in sorted(root.rglob("*.jpeg"))]
    serial = decode_images(paths, 24, tmp_path / "c1", workers=1)
    parallel = decode_images(paths, 24, tmp_path / "c2", workers=2)
    assert np.array_equal(serial.images, parallel.images)


def test_every_bad_image_kind_is_skipped_with_its_reason_and_the_good_ones_decode(tmp_path):
    root = write_dataset(tmp_path / "d", {"NORMAL": 4, "PNEUMONIA": 4}, splits=None)
    expected = write_bad_images(root / "NORMAL")
    paths = [r.path for r in scan_dataset(root).records]
    decoded = decode_images(paths, 32, tmp_path / "cache", workers=1)
    assert len(decoded.ok_indices) == 8
    assert set(decoded.failed) == set(expected)
    for path, words in expected.items():
        assert words in decoded.failed[path].lower(), (path, decoded.failed[path])


def test_a_read_failure_is_retried_next_time_but_a_content_verdict_is_cached(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "d", {"NORMAL": 3, "PNEUMONIA": 3}, splits=None)
    (root / "NORMAL" / "fake.jpeg").write_text("not an image")
    paths = sorted(str(p) for p in root.rglob("*.jpeg"))
    locked = paths[0]
    real_open = os.open

    def denied(path, *args, **kwargs):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    first = decode_images(paths, 32, tmp_path / "cache", workers=1)
    assert "Permission denied" in first.failed[locked] and len(first.failed) == 2
    monkeypatch.undo()  # the user fixes the permissions
    second = decode_images(paths, 32, tmp_path / "cache", workers=1)
    assert set(second.failed) == {str(root / "NORMAL" / "fake.jpeg")}
    assert second.decoded_now == 1 and len(second.ok_indices) == 6


def _chunk_indexes(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("chunk-*[0-9].json"))


def test_a_damaged_cache_is_rebuilt_entry_by_entry_not_trusted(tmp_path):
    root = write_dataset(tmp_path / "d", {"NORMAL": 3, "PNEUMONIA": 3}, splits=None)
    paths = sorted(str(p) for p in root.rglob("*.jpeg"))
    first = decode_images(paths, 32, tmp_path / "cache", workers=1)
    index_file = _chunk_indexes(tmp_path / "cache")[0]
    index = json.loads(index_file.read_text())
    index["entries"][str(Path(paths[0]).resolve())]["row"] = 10**6  # points outside the images
    index["entries"][str(Path(paths[1]).resolve())] = "abc"
    index["entries"][str(Path(paths[2]).resolve())]["meta"] = {"PatientID": 5}
    index["entries"][str(Path(paths[3]).resolve())]["key"] = [1e30, float("nan")]
    index_file.write_text(json.dumps(index))
    second = decode_images(paths, 32, tmp_path / "cache", workers=1)
    assert second.decoded_now == 4 and np.array_equal(second.images, first.images)
    for f in _chunk_indexes(tmp_path / "cache"):
        f.write_bytes(b"\x00\xff garbage")
    third = decode_images(paths, 32, tmp_path / "cache", workers=1)
    assert third.decoded_now == 6 and np.array_equal(third.images, first.images)
    for f in (tmp_path / "cache").rglob("chunk-*[0-9].npy"):
        f.write_bytes(f.read_bytes()[:100])  # truncated images: their entries cannot be trusted
    fourth = decode_images(paths, 32, tmp_path / "cache", workers=1)
    assert fourth.decoded_now == 6 and np.array_equal(fourth.images, first.images)
    assert decode_images(paths, 32, tmp_path / "cache", workers=1).decoded_now == 0


def test_images_spread_over_chunks_read_back_in_order_and_subsets_are_read_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "CHUNK_IMAGES", 4)
    root = write_dataset(tmp_path / "d", {"NORMAL": 7, "PNEUMONIA": 7}, splits=None)
    paths = sorted(str(p) for p in root.rglob("*.jpeg"))
    decoded = decode_images(paths, 24, tmp_path / "cache", workers=1)
    assert len(_chunk_indexes(tmp_path / "cache")) == 4 and len(decoded.chunks) == 4
    expected = np.stack([cache.load_grayscale(p, 24) for p in paths])
    picked = [13, 0, 5, 4, 13]
    assert np.array_equal(decoded.gather(picked), expected[picked])
    assert "images" not in vars(decoded)  # a subset does not materialise the rest
    mapped = decoded.mapped([2, 9, 11])
    assert mapped.shape == (3, 1, 24, 24) and len(mapped) == 3
    assert np.array_equal(mapped[np.array([2, 0])].numpy()[:, 0], expected[[11, 2]])
    assert np.array_equal(decoded.images, expected)

    paths.append(str(root / "NORMAL" / "added.jpeg"))  # appending writes a new chunk, old ones stay as they were
    make_xray(48, 0, seed=5).save(paths[-1])
    before = {f: f.stat().st_mtime_ns for f in (tmp_path / "cache").rglob("chunk-*")}
    again = decode_images(paths, 24, tmp_path / "cache", workers=1)
    assert again.decoded_now == 1 and len(again.ok_indices) == 15
    assert all(f.stat().st_mtime_ns == t for f, t in before.items())
    assert np.array_equal(again.images[:14], expected)


def test_header_fields_are_kept_per_file_and_come_back_from_the_cache(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "d", {"NORMAL": 2, "PNEUMONIA": 2}, splits=None)
    (root / "NORMAL" / "fake.jpeg").write_text("not an image")
    paths = sorted(str(p) for p in root.rglob("*.jpeg"))
    monkeypatch.setattr(cache.dataset, "image_metadata",
                        lambda data: {"PatientAge": "061Y", "bad": 5} if len(data) % 2 else {})
    first = decode_images(paths, 32, tmp_path / "cache", workers=1)
    expected = [{} if i not in first.ok_indices or Path(p).stat().st_size % 2 == 0 else {"PatientAge": "061Y"}
                for i, p in enumerate(paths)]
    assert first.metadata == expected and any(expected)
    monkeypatch.setattr(cache.dataset, "image_metadata", lambda data: {})
    second = decode_images(paths, 32, tmp_path / "cache", workers=1)
    assert second.decoded_now == 0 and second.metadata == expected


def _disk_full_after(n_calls: int):
    real_save, calls = np.save, []

    def save(f, arr, **kwargs):
        calls.append(1)
        if len(calls) > n_calls:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        real_save(f, arr, **kwargs)
    return save


def test_a_cache_that_cannot_be_written_says_where_keeps_finished_chunks_and_leaves_no_temporary_files(
        tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "CHUNK_IMAGES", 3)
    root = write_dataset(tmp_path / "d", {"NORMAL": 3, "PNEUMONIA": 3}, splits=None)
    paths = sorted(str(p) for p in root.rglob("*.jpeg"))
    monkeypatch.setattr(np, "save", _disk_full_after(1))
    where = re.escape(str(tmp_path / "cache"))
    with pytest.raises(OSError, match=f"{where}.*No space left on device.*another cache folder"):
        decode_images(paths, 32, tmp_path / "cache", workers=1)
    assert not list((tmp_path / "cache").rglob("*.tmp*"))
    monkeypatch.undo()
    monkeypatch.setattr(cache, "CHUNK_IMAGES", 3)
    assert decode_images(paths, 32, tmp_path / "cache", workers=1).decoded_now == 3  # the first chunk was kept

    def no_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_fsync)
    with pytest.raises(OSError, match="No space left on device.*another cache folder"):
        decode_images(paths, 32, tmp_path / "other", workers=1)
    assert not [f for f in (tmp_path / "other").rglob("*") if f.is_file() and f.name != "lock"]


SLOW_DECODE = """
import sys, time
from core import cache
cache.CHUNK_IMAGES = 4
real = cache.load_grayscale
def slow(data, size):
    time.sleep(float(sys.argv[2]))
    return real(data, size)
cache.load_grayscale = slow
paths = sys.argv[3:]
print(cache.decode_images(paths, 32, sys.argv[1], workers=1).decoded_now)
"""


def _slow_decode(cache_dir: Path, paths: list[str], seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_DECODE, str(cache_dir), str(seconds), *paths],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)


def test_a_run_killed_while_decoding_resumes_without_decoding_finished_chunks_again(tmp_path):
    root = write_dataset(tmp_path / "d", {"NORMAL": 6, "PNEUMONIA": 6}, splits=None)
    paths = sorted(str(p) for p in root.rglob("*.jpeg"))
    proc = _slow_decode(tmp_path / "cache", paths, 0.3)
    deadline = time.time() + 60
    while not _chunk_indexes(tmp_path / "cache") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = sum(len(json.loads(f.read_text())["entries"]) for f in _chunk_indexes(tmp_path / "cache"))
    assert 4 <= committed < 12
    resumed = decode_images(paths, 32, tmp_path / "cache", workers=1)
    assert resumed.decoded_now == 12 - committed
    assert np.array_equal(resumed.images, decode_images(paths, 32, tmp_path / "fresh", workers=1).images)
    assert not list((tmp_path / "cache").rglob("*.tmp*"))


def test_two_processes_decoding_the_same_folder_take_turns_and_leave_one_sound_cache(tmp_path):
    root = write_dataset(tmp_path / "d", {"NORMAL": 6, "PNEUMONIA": 6}, splits=None)
    paths = sorted(str(p) for p in root.rglob("*.jpeg"))
    procs = [_slow_decode(tmp_path / "cache", paths, 0.05) for _ in range(2)]
    counts = sorted(int(p.communicate(timeout=120)[0]) for p in procs)
    assert counts == [0, 12]  # the second waited for the first and found its images
    again = decode_images(paths, 32, tmp_path / "cache", workers=1)
    assert again.decoded_now == 0
    assert np.array_equal(again.images, decode_images(paths, 32, tmp_path / "fresh", workers=1).images)


def test_progress_line_gives_images_done_rate_and_time_left():
    now = [100.0]
    out = io.StringIO()
    report = DecodeProgress(out, every=5, clock=lambda: now[0])
    report(0, 1000)
    now[0] += 2
    report(200, 1000)  # within `every` of the last line: not shown
    now[0] += 8
    report(500, 1000)
    now[0] += 10
    report(1000, 1000)
    lines = out.getvalue().splitlines()
    assert lines[1] == "decoding 500/1,000 images, 50 images/s, 10s left"
    assert lines[-1] == "decoding 1,000/1,000 images, 50 images/s" and len(lines) == 3
