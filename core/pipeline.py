"""The input pipeline: the dataset prepared once (scanned, decoded through the cache, split by patient), and the
batches the model sees: gathered from memory, from the cache's memory maps, or from the GPU itself, then augmented
and normalised on the device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from .augment import AugmentParams, augment_batch
from .cache import decode_images
from .config import TrainConfig
from .dataset import (
    DatasetIndex,
    assign_splits,
    leakage_report,
    metadata_columns,
    with_header_fields,
)
from .device import autocast, to_device_without_waiting
from .labels import load_index, spec_from
from .model import Classifier
from .streaming import BatchPrefetcher, MappedImages, default_memory_budget, fits_in_memory


@dataclass
class SplitTensors:
    images: torch.Tensor | MappedImages  # (N, 1, S, S) uint8: in memory, or read from the cache's memory maps
    labels: torch.Tensor  # (N,) int64
    table: pd.DataFrame  # path, patient, label, class_name for these rows


@dataclass
class PreparedData:
    index: DatasetIndex
    split_table: pd.DataFrame  # every file found: path, split (or "skipped"), label, class_name, patient
    splits: dict[str, SplitTensors]
    report: dict


def prepare_data(config: TrainConfig, progress=None, processes_sharing_memory: int = 1,
                 budget_bytes: int | None = None) -> PreparedData:
    """Scan (class folders or a label file), decode (cached), take patient ids and metadata from DICOM headers,
    split by patient and report: counts, skipped files, leakage. `processes_sharing_memory`: the processes of a
    torchrun job on this machine, each holding its own copy of the images, share the memory budget.
    `budget_bytes`: this process's budget as another process worked it out (rank 0, for every rank)."""
    index = load_index(config.data, spec_from(config), config.positive_class or None)
    paths = [r.path for r in index.records]
    decoded = decode_images(paths, config.image_size, config.cache_dir or None,
                            config.decode_workers or None, progress=progress, root=index.root)
    index = with_header_fields(index, decoded.metadata)
    split_names = assign_splits(index, config.val_fraction, config.test_fraction, config.data_split_seed)
    table = pd.DataFrame({
        "path": paths, "split": split_names, "label": [r.label for r in index.records],
        "class_name": [r.class_name for r in index.records], "patient": [r.patient for r in index.records],
        "official_split": [r.official_split or "" for r in index.records],
        "sha256": decoded.sha256,  # lets a later external evaluation find files shared with this run
    })
    for key, column in metadata_columns(index.records).items():  # age, sex, view, site: subgroups read them
        table[key] = column
    ok = np.zeros(len(paths), bool)
    ok[decoded.ok_indices] = True
    row_of = np.full(len(paths), -1)
    row_of[decoded.ok_indices] = np.arange(len(decoded.ok_indices))
    table.loc[~ok, "split"] = "skipped"

    splits: dict[str, SplitTensors] = {}
    # Images stay in memory when they fit the budget; a larger set is read batch by batch from the cache's
    # memory maps (a prefetching thread keeps the next batches ready).
    if budget_bytes is None:
        budget = int(config.memory_budget_gb * 2**30) if config.memory_budget_gb > 0 else default_memory_budget()
        budget //= max(1, processes_sharing_memory)
    else:
        budget = budget_bytes
    in_memory = fits_in_memory(len(decoded.ok_indices), config.image_size, budget)
    for name in ("train", "val", "test"):
        mask = (table["split"] == name).to_numpy()
        rows = row_of[mask]
        sub = table[mask].reset_index(drop=True)
        images = torch.from_numpy(decoded.gather(rows)).unsqueeze(1) if in_memory else decoded.mapped(rows)
        splits[name] = SplitTensors(images, torch.tensor(sub["label"].to_numpy(), dtype=torch.long), sub)
    if len(splits["train"].labels) == 0 or len(splits["val"].labels) == 0:
        raise ValueError(f"No readable training or validation images in {index.root}.")
    used = table["split"] != "skipped"
    counts = {s: {c: int(((table["split"] == s) & (table["class_name"] == c)).sum()) for c in index.classes}
              for s in ("train", "val", "test")}
    official = index.counts() if index.has_official_splits else {}
    report = {
        "root": index.root, "classes": index.classes, "positive_class": index.positive_class,
        "label_file": index.label_file, "labels": index.labels, "patients_from": index.patients_from or "file names",
        "image_size": config.image_size, "counts": counts, "official_counts": official,
        "skipped": [{"path": p, "reason": r} for p, r in decoded.failed.items()],
        "ignored_non_image_files": index.ignored_files,
        "unusable_entries": [{"path": p, "reason": r} for p, r in index.unusable.items()],
        "decoded_now": decoded.decoded_now, "from_cache": len(paths) - decoded.decoded_now,
        "images_in_memory": in_memory, "memory_budget_bytes": budget,
        "processes_sharing_memory": max(1, processes_sharing_memory),
        "leakage": leakage_report([r for r, u in zip(index.records, used) if u],
                                  list(table.loc[used, "split"]),
                                  [h for h, u in zip(decoded.sha256, used) if u]),
    }
    if index.has_official_splits:
        report["leakage_official_splits"] = leakage_report(
            index.records, [r.official_split or "" for r in index.records], decoded.sha256)
    return PreparedData(index, table, splits, report)


def to_model_input(batch_u8: torch.Tensor, device: torch.device, mean: float, std: float,
                   aug: AugmentParams | None, generator: torch.Generator | None, shard: tuple[int, int] = (0, 1),
                   batch_total: int | None = None) -> torch.Tensor:
    """uint8 images to the model's input on the device: scaled, augmented (training), normalised, channels-last.
    `shard`/`batch_total`: this rank's share of a distributed batch (see augment_batch)."""
    x = batch_u8.to(device, non_blocking=True).float().div_(255.0)
    if aug is not None and generator is not None:
        x = augment_batch(x, aug, generator, shard, batch_total)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def compute_logits(model: Classifier, images: torch.Tensor, device: torch.device, mean: float,
                   std: float, bf16: bool, batch_size: int = 128, features_only: bool = False,
                   rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Logits (or backbone features) for uint8 images, in eval mode, as float32 on the CPU. `rows` (start, stop):
    only those images (a distributed rank's share), batched from start; all of them by default."""
    model.eval()
    out = []
    net = model.backbone if features_only else model
    start, stop = rows if rows is not None else (0, len(images))
    for i in range(start, stop, batch_size):
        x = to_model_input(images[i:min(i + batch_size, stop)], device, mean, std, None, None)
        with autocast(device, bf16):
            out.append(net(x).float().cpu())
    dim = model.feature_dim if features_only else 2
    return torch.cat(out) if out else torch.zeros(0, dim)


def features_and_logits(model: Classifier, images: torch.Tensor, device: torch.device, mean: float, std: float,
                        bf16: bool, batch_size: int = 128,
                        rows: tuple[int, int] | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Backbone features (N, d) as float32 numpy and logits (N, 2) as a float32 CPU tensor. The logits are the
    model's forward at the run's precision (bf16 autocast where it trains so); the features are always computed
    in float32, the precision Predict and the ONNX graph score at, so that one image gets one verdict everywhere
    (a second pass only where bf16 is used). `rows`: only those images, as in compute_logits."""
    model.eval()
    feats, logits = [], []
    start, stop = rows if rows is not None else (0, len(images))
    with torch.no_grad():
        for i in range(start, stop, batch_size):
            x = to_model_input(images[i:min(i + batch_size, stop)], device, mean, std, None, None)
            with autocast(device, bf16):
                f = model.backbone(x)
                out = model.head(f)
            if bf16:
                f = model.backbone(x)
            feats.append(f.float().cpu())
            logits.append(out.float().cpu())
    if not feats:
        return np.zeros((0, model.feature_dim), np.float32), torch.zeros(0, 2)
    return torch.cat(feats).numpy(), torch.cat(logits)


# Share of a GPU's free memory that a split's uint8 images may take to be kept on the device.
DEVICE_IMAGES_SHARE = 0.5


def fits_on_device(images: torch.Tensor, device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info(device)
    return images.numel() * images.element_size() <= DEVICE_IMAGES_SHARE * free


class DeviceCopies:
    """Host batches copied to the device one batch ahead of the step that uses them. On a GPU the copy is issued on
    a side stream, so copying the next batch (from pinned memory, without blocking) overlaps the current step, and
    the compute stream waits for that copy alone (its event) where the batch is used; elsewhere it is a plain
    `.to(device)`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, *tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], object]:
        """The copies, and what `ready` needs to wait for them (a CUDA event; None off a GPU)."""
        if self.stream is None:
            return tuple(t.to(self.device) for t in tensors), None
        with torch.cuda.stream(self.stream):
            copies = tuple(t.to(self.device, non_blocking=True) for t in tensors)
            done = torch.cuda.Event()
            done.record(self.stream)
        return copies, done

    def ready(self, staged: tuple[tuple[torch.Tensor, ...], object]) -> tuple[torch.Tensor, ...]:
        """The copies, safe to use on the current stream (and not reused by the allocator before it is done)."""
        tensors, done = staged
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for t in tensors:
                t.record_stream(current)
        return tensors


class TrainBatches:
    """One split's training batches on the device, in the order of each epoch's permutation.

    Where the images live decides how a batch is gathered: on a GPU whose memory holds the split, the uint8 images
    are copied there once and each batch is gathered there; otherwise a background thread gathers the next batches
    from host memory or the cache's memory maps (in pinned memory when the device is a GPU), and each is copied to
    the device while the step before it runs (`DeviceCopies`). Batches are augmented and normalised on the device.
    Frozen-backbone training passes feature vectors (`features=True`), which are only moved. `shard=(rank, world)`:
    this process's share of every batch."""

    def __init__(self, images: torch.Tensor | MappedImages, labels: torch.Tensor, device: torch.device,
                 batch_size: int, mean: float = 0.0, std: float = 1.0, aug: AugmentParams | None = None,
                 aug_gen: torch.Generator | None = None, features: bool = False,
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.device, self.batch_size, self.features, self.shard = device, batch_size, features, shard
        self.mean, self.std, self.aug, self.aug_gen = mean, std, aug, aug_gen
        self.on_device = isinstance(images, torch.Tensor) and fits_on_device(images, device)
        self.images = images.to(device) if self.on_device else images
        self.labels = labels.to(device) if self.on_device else labels

    def __len__(self) -> int:
        return len(self.labels)

    def _prepare(self, batch: torch.Tensor, batch_total: int) -> torch.Tensor:
        if self.features:
            return batch
        return to_model_input(batch, self.device, self.mean, self.std, self.aug, self.aug_gen, self.shard, batch_total)

    def _total(self, order: torch.Tensor, step: int) -> int:
        """Images in the whole batch of `step` (all ranks together)."""
        return max(0, min(self.batch_size, len(order) - step * self.batch_size))

    def epoch(self, order: torch.Tensor, start: int, stop: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(step, x, y) for steps start..stop-1 of `order`."""
        if self.on_device:
            order = to_device_without_waiting(order, self.device)
            rank, world = self.shard
            for step in range(start, stop):
                idx = order[step * self.batch_size:(step + 1) * self.batch_size][rank::world]
                yield step, self._prepare(self.images[idx], self._total(order, step)), self.labels[idx]
            return
        copies = DeviceCopies(self.device)
        pin = self.device.type == "cuda"  # pinned host memory: copied to the GPU without blocking
        pending: tuple[int, tuple] | None = None
        with BatchPrefetcher(self.images, order, self.batch_size, start, stop, shard=self.shard, pin=pin) as batches:
            for step, idx, batch in batches:
                labels = self.labels[idx].pin_memory() if pin else self.labels[idx]
                staged = step, copies.start(batch, labels)
                if pending is not None:
                    yield self._ready(pending, copies, order)
                pending = staged
            if pending is not None:
                yield self._ready(pending, copies, order)

    def _ready(self, staged: tuple[int, tuple], copies: DeviceCopies,
               order: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        step, (batch, labels) = staged[0], copies.ready(staged[1])
        return step, self._prepare(batch, self._total(order, step)), labels
