"""What only a CUDA GPU can show (skipped without one; run `pytest tests/test_gpu.py` when a GPU is lent): training
steps that never make the host wait for the GPU between recordings, and batches streamed through pinned memory and
a side stream that equal the batches gathered on the GPU itself. tests/test_trainer.py checks the first on the
'meta' device, which catches reads of device values but not a copy that blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core import pipeline
from core.augment import AugmentParams
from core.bookkeeping import ProgressBar, StepRecorder
from core.device import optimizer_options
from core.model import apply_strategy, build_model
from core.trainer import train_one_epoch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = torch.device("cuda")


def _images(n: int = 64, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=generator),
            torch.randint(0, 2, (n,), generator=generator))


def _epoch(model, optimizer, batches, recorder: StepRecorder, steps: int, progress: dict) -> None:
    progress.update(global_step=0, step_in_epoch=0, elapsed_now=lambda: 0.0, loss_sum=0.0, correct=0, seen=0)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.ones(2, device=GPU))
    train_one_epoch(model, batches, torch.randperm(len(batches)), 0, steps, optimizer, None, loss_fn, GPU, True,
                    recorder, 0, progress)


def test_training_steps_between_recordings_never_synchronise_with_the_gpu(tmp_path):
    model = build_model("resnet18", pretrained=False)
    optimizer = torch.optim.AdamW(apply_strategy(model, "full"), lr=1e-3, **optimizer_options(GPU))
    model.to(GPU).to(memory_format=torch.channels_last).train()
    images, labels = _images()
    batches = pipeline.TrainBatches(images, labels, GPU, 8, 0.5, 0.25, AugmentParams(),
                                    torch.Generator().manual_seed(0))
    assert batches.on_device
    progress: dict = {}
    _epoch(model, optimizer, batches, StepRecorder(tmp_path, 3, ProgressBar(False, 3, 0, ""), 3, 3), 3,
           progress)  # warm-up: cuDNN's and the allocator's first calls may wait
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        with pytest.raises(RuntimeError, match="synchroniz") as read:
            _epoch(model, optimizer, batches, StepRecorder(tmp_path, 3, ProgressBar(False, 5, 0, ""), 5, 5), 5,
                   progress)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    reader = [(Path(e.path).name, e.name) for e in read.traceback if Path(e.path).parent.name == "core"][-1]
    assert reader == ("bookkeeping.py", "flush") and progress["global_step"] == 3  # the recorder's read, 3 steps in


def test_batches_streamed_through_pinned_memory_and_a_side_stream_equal_the_batches_gathered_on_the_gpu(
        monkeypatch):
    images, labels = _images()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    on_gpu = pipeline.TrainBatches(images, labels, GPU, 8, 0.5, 0.25, AugmentParams(),
                                   torch.Generator().manual_seed(2))
    monkeypatch.setattr(pipeline, "fits_on_device", lambda images, device: False)
    streamed = pipeline.TrainBatches(images, labels, GPU, 8, 0.5, 0.25, AugmentParams(),
                                     torch.Generator().manual_seed(2))
    assert on_gpu.on_device and not streamed.on_device
    seen = 0
    for (step, x, y), (streamed_step, streamed_x, streamed_y) in zip(on_gpu.epoch(order, 0, 8),
                                                                       streamed.epoch(order, 0, 8)):
        assert step == streamed_step and streamed_x.device.type == "cuda"
        assert torch.equal(streamed_y, y) and torch.equal(streamed_x, x)
        seen += 1
    assert seen == 8
