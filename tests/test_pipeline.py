"""The batches the model sees (core.pipeline.TrainBatches): the epoch's permutation from a given step, each batch
once and whole, copied to the device one step ahead, and nothing left running when a step stops the epoch."""

from __future__ import annotations

import contextlib
import threading

import torch

from core.pipeline import DeviceCopies, TrainBatches

CPU = torch.device("cpu")


def _numbered_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value i, and its label is i % 2: a batch says which images it holds."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return images, torch.arange(n) % 2


def test_each_step_gets_its_batch_of_the_permutation_from_the_step_asked_for():
    images, labels = _numbered_images(10)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    batches = TrainBatches(images, labels, CPU, batch_size=4)
    got = list(batches.epoch(order, 1, 3))
    assert [step for step, _, _ in got] == [1, 2]
    for step, x, y in got:
        want = order[step * 4:(step + 1) * 4]
        assert torch.equal((x[:, 0, 0, 0] * 255).round().long(), want)  # mean 0, std 1: the values / 255
        assert torch.equal(y, want % 2)
    assert got[-1][1].shape[0] == 2  # the last batch holds what is left


def test_a_distributed_rank_gets_every_world_th_image_of_each_batch():
    images, labels = _numbered_images(8)
    order = torch.arange(8)
    rank1 = list(TrainBatches(images, labels, CPU, batch_size=4, shard=(1, 2)).epoch(order, 0, 2))
    assert [(x[:, 0, 0, 0] * 255).round().long().tolist() for _, x, _ in rank1] == [[1, 3], [5, 7]]


def test_stopping_in_the_middle_of_an_epoch_leaves_no_thread_reading_batches():
    images, labels = _numbered_images(40)
    batches = TrainBatches(images, labels, CPU, batch_size=2)
    with contextlib.closing(batches.epoch(torch.arange(40), 0, 20)) as steps:
        for step, _, _ in steps:
            if step == 3:
                break
    assert not [t for t in threading.enumerate() if t.name == "batch-prefetch"]


def test_copies_off_a_gpu_are_the_tensors_themselves():
    copies = DeviceCopies(CPU)
    x, y = torch.ones(2, 1, 4, 4), torch.tensor([0, 1])
    staged = copies.start(x, y)
    assert copies.stream is None and staged[1] is None
    assert all(a is b for a, b in zip(copies.ready(staged), (x, y)))


def test_the_processes_of_a_torchrun_job_on_one_machine_share_the_memory_budget(tmp_path):
    # Each process holds its own copy of the images: 8 processes each taking the whole budget would hold 8 copies.
    from conftest import write_dataset

    from core.config import config_from_preset
    from core.pipeline import prepare_data

    data = write_dataset(tmp_path / "xrays", {"NORMAL": 24, "PNEUMONIA": 24}, splits=None)
    images_bytes = 48 * 32 * 32
    config = config_from_preset("tiny", data=str(data), image_size=32, decode_workers=1,
                                cache_dir=str(tmp_path / "cache"), memory_budget_gb=1.5 * images_bytes / 2**30)
    alone = prepare_data(config)
    shared = prepare_data(config, processes_sharing_memory=2)
    assert alone.report["images_in_memory"] and not shared.report["images_in_memory"]
    assert shared.report["processes_sharing_memory"] == 2
    assert shared.report["memory_budget_bytes"] == alone.report["memory_budget_bytes"] // 2
    for split in ("train", "val"):  # streamed or not, the same images
        assert torch.equal(shared.splits[split].images[:], alone.splits[split].images)
