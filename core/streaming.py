"""Training on datasets larger than memory: a split's images read on demand from the memory-mapped
decoded-image cache, and a background thread that reads the next batches while the current one trains."""

from __future__ import annotations

import os
import queue
import threading
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

if TYPE_CHECKING:
    from .cache import DecodedImages

MEMORY_SHARE = 0.5  # of the memory available now: the rest is for the model, the batches and everyone else


class MappedImages:
    """A drop-in for a split's (N, 1, S, S) uint8 image tensor where only the indexing the trainer does is
    needed: len(), .shape, .dtype and [indices] / [slice] / [int], each returning a uint8 torch tensor read
    from the cache's memory-mapped chunks (nothing else is held in memory)."""

    dtype = torch.uint8

    def __init__(self, decoded: DecodedImages, positions) -> None:
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        n_ok = len(decoded.ok_indices)
        if len(pos) and (pos.min() < 0 or pos.max() >= n_ok):
            raise IndexError(f"image positions must lie in 0..{n_ok - 1}")
        self.decoded = decoded
        self.positions = pos  # positions in decoded.ok_indices

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.positions), 1, self.decoded.size, self.decoded.size))

    def _select(self, key) -> np.ndarray | int:
        if isinstance(key, slice):
            return self.positions[key]
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return int(self.positions[key])
        if isinstance(key, torch.Tensor):
            key = key.detach().cpu().numpy()
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (len(self.positions),):
                raise IndexError(f"a boolean mask must have {len(self.positions)} entries, not {idx.shape}")
            idx = np.flatnonzero(idx)
        elif not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"index images with integers, a slice or a boolean mask, not {idx.dtype}")
        return self.positions[idx.reshape(-1)]

    def __getitem__(self, key) -> torch.Tensor:
        sel = self._select(key)
        if isinstance(sel, int):
            return torch.from_numpy(self.decoded.gather([sel])[0]).unsqueeze(0)  # (1, S, S), as a tensor gives
        return torch.from_numpy(self.decoded.gather(sel)).unsqueeze(1)

    def __repr__(self) -> str:
        return f"MappedImages(shape={tuple(self.shape)}, chunks={len(self.decoded.chunks)})"


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


class BatchPrefetcher:
    """Yields (step, indices, images[indices]) for steps start..stop-1 of `order` (a permutation), each batch
    gathered `depth` steps ahead on a background thread. Use it as a context manager: leaving the block (the
    loop finished, broke, or raised, StopRequested included) stops and joins the thread; an error in the
    thread is raised in the loop. `shard=(rank, world)`: this process's share of each batch (every world-th image
    from rank on), for distributed training. `pin`: batches in pinned memory, for non-blocking copies to a GPU."""

    def __init__(self, images, order: torch.Tensor, batch_size: int, start: int = 0, stop: int | None = None,
                 depth: int = 2, shard: tuple[int, int] = (0, 1), pin: bool = False) -> None:
        if batch_size < 1 or depth < 1:
            raise ValueError("batch_size and depth must be at least 1")
        self.images = images
        self.order = order
        self.batch_size = batch_size
        self.start = start
        self.stop = stop if stop is not None else -(-len(order) // batch_size)
        self.rank, self.world = shard
        self.pin = pin
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self, item) -> bool:
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for step in range(self.start, self.stop):
                if self._stopping.is_set():
                    return
                idx = self.order[step * self.batch_size:(step + 1) * self.batch_size][self.rank::self.world]
                batch = self.images[idx]
                if not self._put((step, idx, batch.pin_memory() if self.pin else batch)):
                    return
            self._put(_DONE)
        except BaseException as e:  # handed to the training loop, which raises it
            self._put(_Failed(e))

    def __enter__(self) -> BatchPrefetcher:
        self._thread = threading.Thread(target=self._work, name="batch-prefetch", daemon=True)
        self._thread.start()
        return self

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        if self._thread is None:
            raise RuntimeError("use BatchPrefetcher in a with block")
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:  # unblock a worker waiting on a full queue
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
            self._thread = None

    def __exit__(self, *exc) -> None:
        self.close()


def fits_in_memory(n_images: int, size: int, budget_bytes: int) -> bool:
    """Whether n_images uint8 images of size x size fit in budget_bytes."""
    return n_images * size * size <= budget_bytes


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget() -> int:
    """Bytes of images training may hold in memory: half of the memory available now (1 GiB when unknown)."""
    available = _available_memory()
    return int(available * MEMORY_SHARE) if available else 1 << 30
