"""Streaming a split from the memory-mapped cache: indexing like a tensor, batches read ahead, memory budget."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import write_dataset

from core import cache
from core.cache import decode_images
from core.streaming import BatchPrefetcher, MappedImages, default_memory_budget, fits_in_memory


@pytest.fixture
def decoded(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "CHUNK_IMAGES", 5)  # several chunks, so reads cross chunk boundaries
    root = write_dataset(tmp_path / "d", {"NORMAL": 9, "PNEUMONIA": 9}, splits=None)
    return decode_images(sorted(str(p) for p in root.rglob("*.jpeg")), 16, tmp_path / "cache", workers=1)


def test_mapped_images_index_like_the_in_memory_tensor(decoded):
    positions = np.array([17, 3, 8, 0, 12, 5, 9])
    tensor = torch.from_numpy(decoded.images[positions]).unsqueeze(1)
    mapped = decoded.mapped(positions)
    assert isinstance(mapped, MappedImages)
    assert mapped.shape == tensor.shape and len(mapped) == len(tensor) and mapped.dtype == torch.uint8
    for key in (torch.tensor([6, 0, 3, 3]), np.array([2, 1]), slice(2, 6), slice(None, None, 2), 4, -1,
                torch.tensor([True, False, True, False, False, True, True])):
        got, want = mapped[key], tensor[key]
        assert got.dtype == torch.uint8 and torch.equal(got, want), key
    assert mapped[torch.tensor([], dtype=torch.long)].shape == (0, 1, 16, 16)
    with pytest.raises(IndexError):
        mapped[torch.tensor([0.5])]
    with pytest.raises(IndexError):
        decoded.mapped([18])


def test_prefetcher_gives_the_batches_of_the_permutation_from_a_given_step(decoded):
    images = decoded.mapped()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    with BatchPrefetcher(images, perm, 4, start=1) as batches:
        got = list(batches)
    assert [s for s, _, _ in got] == [1, 2, 3, 4]
    for step, idx, batch in got:
        assert torch.equal(idx, perm[step * 4:(step + 1) * 4])
        assert torch.equal(batch, torch.from_numpy(decoded.images[idx.numpy()]).unsqueeze(1))


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "batch-prefetch"]


def test_prefetcher_stops_its_thread_on_early_exit_and_on_an_error_in_the_loop(decoded):
    images = decoded.mapped()
    perm = torch.arange(len(images))
    with BatchPrefetcher(images, perm, 1, depth=1) as batches:
        for step, _, _ in batches:
            if step == 2:
                break
    assert not _prefetch_threads()

    class StopRequested(Exception):
        pass

    with pytest.raises(StopRequested), BatchPrefetcher(images, perm, 1, depth=1) as batches:
        for _ in batches:
            raise StopRequested()
    assert not _prefetch_threads()


def test_an_error_reading_a_batch_is_raised_in_the_training_loop(decoded):
    class Broken:
        def __getitem__(self, idx):
            raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"), BatchPrefetcher(Broken(), torch.arange(8), 2) as b:
        list(b)
    assert not _prefetch_threads()


def test_memory_budget_decides_what_fits():
    assert fits_in_memory(1000, 128, 1000 * 128 * 128)
    assert not fits_in_memory(1001, 128, 1000 * 128 * 128)
    budget = default_memory_budget()
    assert 0 < budget < 1 << 50
