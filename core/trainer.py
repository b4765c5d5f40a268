"""Training: the loop, written as torchvision's classification reference writes it (`train_one_epoch`, `evaluate`),
and `train`, which sets a run up, runs the epochs and finishes it.

The loop's collaborators are beside it, each changeable on its own:
- core.device: the device and the precision (bf16 autocast);
- core.pipeline: the data (scanned, decoded through the cache, split by patient) and the batches the model sees
  (`TrainBatches`: in memory, on the GPU, or streamed from the cache's memory maps);
- core.checkpoint: the best weights (safetensors) and the resumable state (last.pt);
- core.bookkeeping: the run folder, the queue, environment.json, and what other processes follow while it trains
  (status, metrics, log, stop requests: `StepRecorder`);
- core.finalize: calibration, the operating threshold, the out-of-distribution score, predictions and report.

The trainer owns the run directory (see core.runs). Everything another process needs to follow the run is written
there as it happens.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import runs
from .augment import AugmentParams
from .bookkeeping import ProgressBar, StepRecorder, create_run, environment_info, record_command, training_slot
from .cache import DecodeProgress
from .checkpoint import TrainingState, checkpoint_metadata, load_resume_state, load_weights_into, save_weights
from .config import TrainConfig
from .device import (
    autocast,
    available_devices,
    choose_fast_kernels,
    device_names,
    maybe_compile,
    optimizer_options,
    select_device,
    uses_bf16,
)
from .distributed import SINGLE, Distributed, WholeBatchLoss, whole_batch_norm
from .finalize import finalize_run, fit_temperature, positive_probs
from .metrics import safe_auc
from .model import Classifier, apply_strategy, build_model, count_parameters, normalization, set_train_mode
from .pipeline import PreparedData, TrainBatches, compute_logits, features_and_logits, prepare_data

# Callers import these from here (the trainer's public names before its collaborators had their own modules).
__all__ = ["StopRequested", "available_devices", "compute_logits", "create_run", "device_names", "evaluate",
           "failure_reason", "features_and_logits", "fit_temperature", "load_resume_state", "load_weights_into",
           "positive_probs", "prepare_data", "select_device", "train", "train_one_epoch", "uses_bf16"]
# Steps between host synchronisations on a GPU (figures written, stop request read); a CPU never waits for itself.
GPU_RECORD_EVERY = 20


class StopRequested(Exception):
    """Raised inside the loop when a STOP file appears; the run is saved and marked stopped."""


@dataclass
class EpochFigures:
    """What one pass over (part of) an epoch's training steps measured."""

    loss_sum: float
    correct: int
    seen: int
    train_auc: float
    seconds: float


def train_one_epoch(net: torch.nn.Module, batches: TrainBatches, order: torch.Tensor, start: int, stop: int,
                    optimizer: torch.optim.Optimizer, scheduler, loss_fn: torch.nn.Module, device: torch.device,
                    bf16: bool, recorder: StepRecorder, epoch: int, progress: dict,
                    on_stop=None, dist: Distributed = SINGLE) -> EpochFigures:
    """Steps start..stop-1 of one epoch in `order`. Loss, accuracy and train-AUC inputs stay on the device and are
    read every recorder.every steps; `progress` (the run's counters) is updated as they are. A stop request read
    between steps calls `on_stop` (which saves the resumable state) and raises StopRequested."""
    figures = EpochFigures(0.0, 0, 0, float("nan"), 0.0)
    started, probs, labels = time.time(), [], []

    def flush() -> None:
        status = {"images_per_s": figures.seen / max(time.time() - started, 1e-9),
                  "elapsed": progress["elapsed_now"]()}
        for loss, hits, n in recorder.flush(epoch, progress["global_step"], status):
            figures.loss_sum, figures.correct, figures.seen = figures.loss_sum + loss * n, figures.correct + hits, \
                figures.seen + n
            progress["loss_sum"] += loss * n
            progress["correct"] += hits
            progress["seen"] += n

    with contextlib.closing(batches.epoch(order, start, stop)) as steps:
        for step, x, y in steps:
            if recorder.stop_due(step):
                flush()
                progress["step_in_epoch"] = step
                if on_stop is not None:
                    on_stop()
                raise StopRequested()
            with autocast(device, bf16):
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                scheduler.step()
            probs.append(torch.softmax(logits.detach().float(), 1)[:, 1])
            labels.append(y)
            recorder.add(step, loss, (logits.argmax(1) == y).sum(), len(y), optimizer.param_groups[0]["lr"])
            progress["global_step"] += 1
            progress["step_in_epoch"] = step + 1
            if recorder.due(step):
                flush()
    flush()
    figures.seconds = time.time() - started
    if labels:  # every rank's images of this epoch
        figures.train_auc = safe_auc(dist.gather(torch.cat(labels)).numpy(), dist.gather(torch.cat(probs)).numpy())
    return figures


@torch.no_grad()
def evaluate(net: torch.nn.Module, inputs, labels: torch.Tensor, device: torch.device, mean: float, std: float,
             bf16: bool, class_weights: torch.Tensor, features: bool = False, dist: Distributed = SINGLE) -> dict:
    """Validation loss, AUC and accuracy of `net` on uint8 images (or, `features`, on backbone features).
    Distributed: each rank computes the logits of its share of the images and every rank gets all of them, in
    order, so the figures (and so best epoch and early stopping) are the whole split's and the same on every rank.
    Every rank must call it; `net` is the bare model, not its DDP wrapper (no gradients to synchronise)."""
    dist.share_buffers(net)
    start, stop = dist.share(len(labels))
    if features:
        logits = net.eval()(inputs[start:stop].to(device)).float().cpu()
    else:
        logits = compute_logits(net, inputs, device, mean, std, bf16, rows=(start, stop))
    logits = dist.gather_rows(logits)
    auc = safe_auc(labels.numpy(), positive_probs(logits))
    return {"loss": float(F.cross_entropy(logits, labels, weight=class_weights)), "auc": auc,
            "accuracy": float((logits.argmax(1) == labels).float().mean())}


def train(config: TrainConfig | None = None, run_dir: Path | None = None, resume: bool = False,
          show_progress: bool = False, launched: bool = False, dist: Distributed = SINGLE) -> Path:
    """Train (or resume) a run and return its directory. Errors are recorded in status.json
    ('failed' with the message) and re-raised; a STOP request ends the run as 'stopped'. `launched`: started
    by the dashboard's launcher (recorded as such in environment.json). `dist`: this process's place in a
    distributed run (see core.distributed); only rank 0 writes the run folder."""
    if not dist.is_main:
        return _train_as_other_rank(Path(run_dir), resume, launched, dist)
    try:
        return _train_as_main(config, run_dir, resume, show_progress, launched, dist)
    except BaseException as e:  # wherever rank 0 fails, the other ranks stop waiting for it, with the reason
        with contextlib.suppress(Exception):  # the failure itself is what is raised
            dist.announce_failure(failure_reason(e))
        raise


def _train_as_other_rank(run_dir: Path, resume: bool, launched: bool, dist: Distributed) -> Path:
    """train() on the other ranks of a distributed run: rank 0 keeps the queue, status and log; these wait for it
    where it works alone, and train their share."""
    config = TrainConfig.load(run_dir / "config.json")
    try:
        if dist.wait_for_main("queue"):  # rank 0's answer once it leaves the queue: stopped while it waited
            raise StopRequested()
        _train(config, run_dir, resume, False, launched, dist)
    except StopRequested:
        dist.wait_for_main("stop recorded")  # until rank 0 has recorded the stop (see _train_as_main)
    return run_dir


def _train_as_main(config: TrainConfig | None, run_dir: Path | None, resume: bool, show_progress: bool,
                   launched: bool, dist: Distributed) -> Path:
    """train() on rank 0 (or the only process): the run folder, the queue, and the run's end as it happened."""
    if run_dir is None:
        assert config is not None, "train() needs a config or an existing run directory"
        run_dir = create_run(config)
    run_dir = Path(run_dir)
    try:  # a damaged config.json marks the run failed with the reason, like any other error
        config = TrainConfig.load(run_dir / "config.json")
        config.validate()
    except (OSError, ValueError, TypeError) as e:
        message = f"{run_dir / 'config.json'} is damaged: {e}"
        runs.write_status(run_dir, state="failed", error=message)
        raise ValueError(message) from None
    if resume and runs.read_status(run_dir).get("state") not in runs.ACTIVE_STATES:
        runs.clear_stop(run_dir)  # resuming overrides an earlier stop; a just-launched, queued run keeps it
    previous = runs.read_status(run_dir)
    # A launched run keeps its place in the queue; a resumed one joins at the back.
    queued_at = previous.get("queued_at") if previous.get("state") == "queued" else None
    runs.write_status(run_dir, state="queued", pid=os.getpid(), error=None, queued_at=queued_at or time.time())
    try:
        with training_slot(run_dir):
            # The other ranks of a distributed run wait here for as long as the queue takes, and learn of a stop.
            if dist.wait_for_main("queue", runs.stop_requested(run_dir)):
                raise StopRequested()
            _train(config, run_dir, resume, show_progress, launched, dist)
    except StopRequested:
        runs.log(run_dir, "Stopped on request; resume continues from the saved checkpoint.")
        runs.write_status(run_dir, state="stopped")
        # Stopped in the queue or at a step, on every rank alike: none leaves the process group before this is
        # written (one failing on its way out would have torchrun end this process first).
        dist.wait_for_main("stop recorded")
    except KeyboardInterrupt:
        runs.log(run_dir, "Interrupted; resume continues from the last epoch checkpoint.")
        runs.write_status(run_dir, state="stopped")
        raise
    except BaseException as e:
        # Record the failure even when the disk is full or the folder read-only: each step on its own.
        with contextlib.suppress(OSError):
            runs.log(run_dir, "FAILED\n" + traceback.format_exc())
        runs.mark_failed(run_dir, failure_reason(e))
        removed = runs.remove_temporary_files(run_dir)
        if removed:
            with contextlib.suppress(OSError):
                runs.log(run_dir, f"Removed half-written files: {', '.join(removed)}")
        raise
    return run_dir


def failure_reason(error: BaseException) -> str:
    """One line for status.json and the command line: what failed, and the file when the OS names one."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _optimizer_and_schedule(config: TrainConfig, params, total_steps: int, device: torch.device):
    opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(params, lr=config.lr, weight_decay=config.weight_decay, **optimizer_options(device))
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    elif config.schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=1)
    else:
        scheduler = None
    return optimizer, scheduler


def _prepare(config: TrainConfig, run_dir: Path, show_progress: bool, dist: Distributed) -> PreparedData:
    # The terminal's line (stderr) when shown; the status file gets the same words for the Train page.
    timing = DecodeProgress() if show_progress else DecodeProgress(stream=io.StringIO())

    def decode_progress(done: int, total: int) -> None:
        timing(done, total)
        runs.write_status(run_dir, phase=timing.line(done, total))

    data = prepare_data(config, progress=decode_progress, processes_sharing_memory=dist.local_world)
    data.split_table.to_csv(run_dir / "split.csv", index=False)
    (run_dir / "data_report.json").write_text(json.dumps(data.report, indent=2))
    runs.log(run_dir, f"Images per split and class: {data.report['counts']}; decoded now "
                      f"{data.report['decoded_now']}, from cache {data.report['from_cache']}; skipped "
                      f"{len(data.report['skipped'])}")
    for item in data.report["skipped"]:
        runs.log(run_dir, f"Skipped unreadable file {item['path']}: {item['reason']}")
    return data


def _train(config: TrainConfig, run_dir: Path, resume: bool, show_progress: bool, launched: bool = False,
           dist: Distributed = SINGLE) -> None:
    started = time.time()
    device = dist.device(select_device(config.device))
    bf16 = uses_bf16(device, config.precision)
    choose_fast_kernels(device)
    # Rank 0 alone writes the run folder; the other ranks of a distributed run train and stay silent.
    log = runs.log if dist.is_main else _silent
    status = runs.write_status if dist.is_main else _silent
    if dist.is_main:
        record_command(run_dir, config, launched, {**environment_info(device, bf16), "world_size": dist.world})
    status(run_dir, state="running", pid=os.getpid(), started=started, phase="preparing data", device=str(device),
           world_size=dist.world)
    resuming = resume and (run_dir / "last.pt").exists()
    log(run_dir, f"{'Resuming' if resuming else 'Starting'} on {device} (bf16 autocast: {bf16})"
                 + (f" x {dist.world} processes" if dist.active else "") + f"; data {config.data}")
    if dist.is_main:
        data = _prepare(config, run_dir, show_progress, dist)
    dist.wait_for_main("data decoded")  # however long decoding takes; the others then read it from the cache
    # Every rank takes rank 0's memory budget, worked out before any rank held the images: the others, reading the
    # memory left once rank 0 holds its copy, could stream where rank 0 does not (same steps, slower ranks).
    budget = dist.broadcast_object(data.report["memory_budget_bytes"] if dist.is_main else None)
    if not dist.is_main:
        data = prepare_data(config, processes_sharing_memory=dist.local_world, budget_bytes=budget)

    classes, train_labels = data.index.classes, data.splits["train"].labels
    weights = _class_weights(train_labels, classes, config.class_weights)
    # Distributed: the loss and (on CPUs) the batch norm statistics are the whole batch's, as in one process.
    on_device = weights.to(device)  # evaluate() takes the CPU copy: it scores logits gathered on the CPU
    loss_fn = WholeBatchLoss(on_device, dist) if dist.active else torch.nn.CrossEntropyLoss(weight=on_device)
    model, net, params, inputs, frozen = _trainable(config, data, device, bf16, dist, run_dir, log, status)
    mean, std = normalization(config.arch)

    steps_per_epoch = math.ceil(len(train_labels) / config.batch_size)
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs
    optimizer, scheduler = _optimizer_and_schedule(config, params, total_steps, device)
    aug = AugmentParams(config.aug_flip, config.aug_rotation, config.aug_scale, config.aug_shift,
                        config.aug_brightness, config.aug_contrast) if config.augment and not frozen else None
    aug_gen = torch.Generator().manual_seed(config.seed + 1)
    batches = TrainBatches(inputs["train"], train_labels, device, config.batch_size, mean, std, aug, aug_gen,
                           features=frozen, shard=(dist.rank, dist.world))

    progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_auc": -1.0, "best_epoch": 0,
                "stale_epochs": 0, "elapsed": 0.0, "loss_sum": 0.0, "correct": 0, "seen": 0}
    last_path, best_path = run_dir / "last.pt", run_dir / "best.safetensors"
    state = TrainingState(model, optimizer, scheduler, aug_gen, progress)
    if resuming:
        state.restore(last_path)
        log(run_dir, f"Resumed with {progress['epoch']}/{config.epochs} epochs done, at step "
                     f"{progress['step_in_epoch']}/{steps_per_epoch} of epoch {progress['epoch'] + 1}")

    session_start = time.time()
    progress["elapsed_now"] = lambda: progress["elapsed"] + time.time() - session_start

    def save_last() -> None:
        if not dist.is_main:
            return
        if progress["step_in_epoch"]:  # stopped mid-epoch: the page shows that step, not the last one recorded
            status(run_dir, epoch=progress["epoch"] + 1, step=progress["step_in_epoch"],
                   global_step=progress["global_step"])
        state.save(last_path, progress["elapsed_now"]())

    bar = ProgressBar(show_progress, total_steps, progress["global_step"], "training")
    recorder = StepRecorder(run_dir, GPU_RECORD_EVERY if device.type == "cuda" else 1, bar, steps_per_epoch,
                            total_steps, enabled=dist.is_main, dist=dist)
    status(run_dir, state="running", phase="training", epochs=config.epochs,
                      steps_per_epoch=steps_per_epoch, epoch=progress["epoch"],
                      best_val_auc=progress["best_auc"] if progress["best_auc"] >= 0 else None)
    try:
        while progress["epoch"] < config.epochs:
            epoch = progress["epoch"]
            order = torch.randperm(len(train_labels),
                                   generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
            if frozen:
                model.head.train()
            else:
                set_train_mode(model, config.strategy)
            trained = train_one_epoch(net, batches, order, progress["step_in_epoch"], steps_per_epoch, optimizer,
                                      scheduler, loss_fn, device, bf16, recorder, epoch, progress, save_last, dist)
            val = evaluate(model.head if frozen else model, inputs["val"], data.splits["val"].labels, device, mean,
                           std, bf16, weights, features=frozen, dist=dist)
            score = val["auc"] if math.isfinite(val["auc"]) else -val["loss"]
            improved = score > progress["best_auc"]
            if improved:
                progress["best_auc"], progress["best_epoch"], progress["stale_epochs"] = score, epoch + 1, 0
                if dist.is_main:
                    save_weights(model, best_path, checkpoint_metadata(config, classes, epoch=epoch + 1))
            else:
                progress["stale_epochs"] += 1
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(score)
            elapsed = progress["elapsed_now"]()
            record = _epoch_record(epoch, progress, trained, val, optimizer, improved, elapsed)
            if dist.is_main:
                runs.append_metrics(run_dir, record)
            log(run_dir, _epoch_line(record, config.epochs, trained.seconds))
            progress.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, correct=0, seen=0)
            save_last()
            status(run_dir, epoch=epoch + 1, best_val_auc=progress["best_auc"],
                              best_epoch=progress["best_epoch"], elapsed=elapsed)
            if config.patience and progress["stale_epochs"] >= config.patience:
                log(run_dir, f"Early stopping: no better validation AUC for {config.patience} epochs")
                break
    finally:
        bar.close()

    # Every rank reaches this point: the loop ended on every rank at the same epoch (the validation figures,
    # read for early stopping, are the same on all of them; a stop request raised StopRequested on all of them).
    status(run_dir, phase="final evaluation")
    report = finalize_run(run_dir, config, model, data, device, bf16, dist)
    if dist.is_main:  # each rank computed its share of the final logits and features; rank 0 writes the results
        status(run_dir, state="finished", phase="done", finished=time.time(), elapsed=progress["elapsed_now"]())
        test = report.get("test") or {}
        nan = float("nan")
        log(run_dir, f"Finished. Threshold {report['threshold']:.3f} chosen on validation (Youden). "
                     f"Test AUC {test.get('auc', nan):.4f}, sensitivity {test.get('sensitivity', nan):.3f}, "
                     f"specificity {test.get('specificity', nan):.3f}")
    # No rank leaves before rank 0 has written: one that exits early and fails on its way out (torchrun then ends
    # every process) would end rank 0 mid-write, and a finished run would be marked failed. Rank 0 alone fits the
    # calibration and the out-of-distribution score and writes the predictions: the others wait without a timeout.
    dist.wait_for_main("results written")


class Trainable(NamedTuple):
    """What the loop trains, and on what."""

    model: Classifier  # the whole model: evaluated, checkpointed
    net: torch.nn.Module  # what a step runs: the model or, frozen, its head; in DDP when distributed; compiled
    params: list  # the parameters the optimizer updates
    inputs: dict  # train and val inputs of `net`: uint8 images, or (frozen) backbone features
    frozen: bool


def _trainable(config: TrainConfig, data: PreparedData, device: torch.device, bf16: bool, dist: Distributed,
               run_dir: Path, log, status) -> Trainable:
    """The model from the config's seed, its strategy applied, on the device; frozen, the backbone's features
    computed once (the backbone cannot change) and the head trained on them."""
    torch.manual_seed(config.seed)
    model = build_model(config.arch, config.pretrained, config.weights_file, config.dropout)
    params = apply_strategy(model, config.strategy)
    model.to(device).to(memory_format=torch.channels_last)
    trainable, total = count_parameters(model)
    log(run_dir, f"{config.arch} ({'ImageNet' if config.pretrained and config.arch != 'smallcnn' else 'random'}"
                 f" init), strategy {config.strategy}: {trainable:,} of {total:,} parameters train")
    frozen = config.strategy == "frozen"
    if frozen:
        status(run_dir, phase="computing backbone features")
        t0 = time.time()
        mean, std = normalization(config.arch)
        inputs = {s: compute_logits(model, data.splits[s].images, device, mean, std, bf16, features_only=True)
                  for s in ("train", "val")}
        log(run_dir, f"Backbone features for {sum(len(v) for v in inputs.values())} images in "
                     f"{time.time() - t0:.1f}s")
        net: torch.nn.Module = model.head
    else:
        inputs = {s: data.splits[s].images for s in ("train", "val")}
        net = model
    if dist.active and device.type == "cpu" and not frozen:
        log(run_dir, f"Batch norm over the whole batch of all {dist.world} processes: "
                     f"{whole_batch_norm(model)} layers")
    if dist.active:  # gradients averaged over the ranks at every step
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    return Trainable(model, maybe_compile(net, config.compile, device), params, inputs, frozen)


def _class_weights(train_labels: torch.Tensor, classes: list[str], rule: str) -> torch.Tensor:
    """The loss's weight per class: 'inverse' to the class's share of the training split, else 1 each."""
    class_counts = torch.bincount(train_labels, minlength=2).float()
    if (class_counts == 0).any():
        raise ValueError(f"The training split has no images of class "
                         f"{classes[int((class_counts == 0).nonzero()[0])]}.")
    return (class_counts.sum() / (2 * class_counts)) if rule == "inverse" else torch.ones(2)


def _epoch_record(epoch: int, progress: dict, trained: EpochFigures, val: dict, optimizer: torch.optim.Optimizer,
                  improved: bool, elapsed: float) -> dict:
    """metrics.jsonl's line for an epoch (0-based `epoch`, just trained and validated)."""
    return {
        "kind": "epoch", "epoch": epoch + 1, "global_step": progress["global_step"],
        "train_loss": progress["loss_sum"] / max(progress["seen"], 1),
        "train_accuracy": progress["correct"] / max(progress["seen"], 1), "train_auc": trained.train_auc,
        "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_auc": val["auc"],
        "lr": optimizer.param_groups[0]["lr"], "images_per_s": trained.seen / max(trained.seconds, 1e-9),
        "epoch_seconds": trained.seconds, "elapsed": elapsed, "best": improved, "time": time.time()}


def _epoch_line(record: dict, epochs: int, seconds: float) -> str:
    """The log's line for an epoch record."""
    return (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.3f} | val loss {record['val_loss']:.4f} acc "
            f"{record['val_accuracy']:.3f} AUC {record['val_auc']:.4f}{' (best)' if record['best'] else ''} | "
            f"{record['images_per_s']:.0f} img/s, {seconds:.1f}s")


def _silent(*args, **kwargs) -> None:
    """What the other ranks of a distributed run write to the run folder: nothing."""
