"""The decoded-image cache: decode once, remember verdicts, rebuild what is damaged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import write_bad_images
from conftest import make_xray, write_dataset

from core.cache import decode_images
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


def test_parallel_decode_matches_serial(tmp_path):
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


def test_a_damaged_cache_is_rebuilt_not_trusted(tmp_path):
    root = write_dataset(tmp_path / "d", {"NORMAL": 3, "PNEUMONIA": 3}, splits=None)
    paths = sorted(str(p) for p in root.rglob("*.jpeg"))
    first = decode_images(paths, 32, tmp_path / "cache", workers=1)
    index_file = next((tmp_path / "cache").rglob("index.json"))
    entries = json.loads(index_file.read_text())
    entries[str(Path(paths[0]).resolve())]["row"] = 10**6  # points outside the images
    entries[str(Path(paths[1]).resolve())] = "abc"
    index_file.write_text(json.dumps(entries))
    second = decode_images(paths, 32, tmp_path / "cache", workers=1)
    assert second.decoded_now == 2 and np.array_equal(second.images, first.images)
    index_file.write_bytes(b"\x00\xff garbage")
    third = decode_images(paths, 32, tmp_path / "cache", workers=1)
    assert third.decoded_now == 6 and np.array_equal(third.images, first.images)


def test_a_cache_that_cannot_be_written_says_where_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "d", {"NORMAL": 2, "PNEUMONIA": 2}, splits=None)
    paths = sorted(str(p) for p in root.rglob("*.jpeg"))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left on device.*another cache folder"):
        decode_images(paths, 32, tmp_path / "cache", workers=1)
    assert not list((tmp_path / "cache").rglob("*.tmp*"))
