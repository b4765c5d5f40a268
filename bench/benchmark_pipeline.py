"""Benchmark: a seed-style notebook pipeline against core's pipeline, in one run, each measured against the
machine's compute limit. Prints figures and floors (PASS/FAIL), asserts nothing.

Seed-style is what a typical notebook does: torchvision ImageFolder + per-image PIL transforms + a
DataLoader, fp32, a 3-channel torchvision resnet18. Core is core.trainer.train itself (decoded uint8
cache, batched augmentation on the device, channels_last, bf16 autocast where core.trainer.uses_bf16
says so), timed from the step records (CPU) or epoch records (CUDA) it writes to metrics.jsonl.

Compute limit: the device's matmul rate (a warmed-up n x n torch.matmul loop, best of a few timed windows, at
fp32 and, where the hardware has it natively, bf16) divided by the model's training FLOPs per image
(forward + backward of one real batch under torch.utils.flop_counter.FlopCounterMode, divided by its size).
Each pipeline's images/s is shown as a share of the limit at the precision it ran at.

Cases, per device (CPU, and CUDA when present):
  a  full fine-tuning of resnet18 at 224 px (batch 32 on CPU, 256 on CUDA): images/s after warm-up
  b  5-epoch frozen-backbone run end to end on a subset (--subset-train + --subset-val images):
     seed-style runs the backbone every epoch, core computes features once and trains the head on them
  c  the 'cpu' preset (smallcnn, 128 px, batch 64): core's images/s and share of the limit

Floors for (a): on a CPU core must reach 85% of the compute limit (without native bf16 both pipelines are
compute-bound, so their ratio means little), and with native bf16 also core >= 2x seed-style; on CUDA core >= 10x
seed-style, and >= 10,000 images/s on an H100/H200. (b): core >= 4x seed-style end to end.

ImageNet weights are not used (random init, no download); they do not change speed.

    .venv/bin/python bench/benchmark_pipeline.py [--quick] [--steps 8] [--device auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torchvision
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core import runs  # noqa: E402
from core.config import TrainConfig, config_from_preset  # noqa: E402
from core.device import COMPILE_MEASURED_FASTER, uses_bf16  # noqa: E402
from core.model import apply_strategy, build_model  # noqa: E402
from core.pipeline import prepare_data  # noqa: E402
from core.trainer import train  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "kermany_224"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
FLOOR_FROZEN = 4.0  # (b): core end to end against seed-style
FLOOR_SHARE_CPU = 0.85  # (a) on a CPU without native bf16: core's share of the compute limit
FLOOR_RATIO_CPU_BF16 = 2.0  # (a) on a CPU with native bf16: core against seed-style
FLOOR_RATIO_CUDA, FLOOR_IPS_HOPPER = 10.0, 10_000.0  # (a) on CUDA; images/s on an H100/H200
# Dense (no sparsity) bf16 tensor-core peak per GPU in TFLOPS, from NVIDIA's datasheets (their sparse figures
# halved). The first pattern that matches torch.cuda.get_device_name() wins, so the specific ones come first.
BF16_PEAK_TFLOPS = [
    (r"H200 NVL", 835.0), (r"\bH200\b", 989.0), (r"GH200", 989.0), (r"H100 NVL", 835.0),
    (r"H100 PCIe", 756.0), (r"\bH100\b", 989.0), (r"\bA100\b", 312.0), (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0), (r"\bL4\b", 121.0), (r"\bA30\b", 165.0), (r"\bA10\b", 125.0),
]


def say(msg: str) -> None:
    print(msg, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- machine and compute limit

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16_native() -> tuple[bool, str]:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16), and the evidence. Not
    torch.ops.mkldnn._is_mkldnn_bf16_supported(): that is true on any AVX512 CPU, where oneDNN emulates bf16."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
        found = sorted(flags & {"avx512_bf16", "amx_bf16"})
        return bool(found), "cpuinfo flags " + (", ".join(found) if found else "without avx512_bf16/amx_bf16")
    except (OSError, StopIteration):
        native = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                      or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        return native, "torch.cpu ISA check"


def bf16_native(device: str) -> bool:
    return torch.cuda.is_bf16_supported() if device == "cuda" else cpu_bf16_native()[0]


def matmul_gflops(device: str, dtype: torch.dtype, n: int, seconds: float, windows: int = 3) -> float:
    """The device's matmul rate at this precision: n x n products (2 n^3 FLOPs each) after two warm-up
    products, best of `windows` timed windows of about `seconds` each (the best, because other load on the
    machine only ever lowers a window's rate)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    chunk = 20 if device.startswith("cuda") else 1  # products queued between synchronisations
    for _ in range(2):
        torch.matmul(a, b, out=out)
    sync(device)
    best = 0.0
    for _ in range(windows):
        count, t0 = 0, time.perf_counter()
        while True:
            for _ in range(chunk):
                torch.matmul(a, b, out=out)
            sync(device)
            count += chunk
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
        best = max(best, 2 * n ** 3 * count / elapsed / 1e9)
    return best


def training_flops_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """FLOPs of one training step's forward and backward, per image: torch.utils.flop_counter counts a real
    step on a batch of input_shape[0] random images (2-class cross-entropy), divided by the batch size. It counts
    matmuls and convolutions (what the matmul rate measures), not normalisation, activations or the optimizer."""
    model.train()
    x = torch.randn(input_shape)
    y = torch.zeros(input_shape[0], dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / input_shape[0]


def images_per_s_limit(gflops: float, flops_per_image: float) -> float:
    return gflops * 1e9 / flops_per_image


def seed_flops_per_image(image_size: int) -> float:
    return training_flops_per_image(seed_model("cpu"), (2, 3, image_size, image_size))


def core_flops_per_image(arch: str, strategy: str, image_size: int) -> float:
    model = build_model(arch, pretrained=False)
    apply_strategy(model, strategy)
    return training_flops_per_image(model, (2, 1, image_size, image_size))


def gpu_bf16_peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of the GPU called `name` (torch.cuda.get_device_name), None when not in the table."""
    return next((peak for pattern, peak in BF16_PEAK_TFLOPS if re.search(pattern, name)), None)


def is_hopper_h100_h200(name: str) -> bool:
    return bool(re.search(r"\bH(100|200)\b", name))


def measure_rates(device: str, n: int, seconds: float, windows: int) -> dict[str, float]:
    """Matmul GFLOP/s per precision the device has natively: fp32 always, bf16 where native."""
    rates = {"fp32": matmul_gflops(device, torch.float32, n, seconds, windows)}
    if bf16_native(device):
        rates["bf16"] = matmul_gflops(device, torch.bfloat16, n, seconds, windows)
    return rates


# ---------------------------------------------------------------- seed-style pipeline

def seed_transforms(train: bool) -> transforms.Compose:
    aug = [transforms.RandomHorizontalFlip(), transforms.RandomRotation(10)] if train else []
    return transforms.Compose([transforms.Resize(224), *aug, transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def seed_loader(folder: Path, train: bool, workers: int, device: str, batch_size: int = 32) -> DataLoader:
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=seed_transforms(train))
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=workers,
                      pin_memory=device.startswith("cuda"), drop_last=False)


def seed_model(device: str) -> nn.Module:
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, 2)
    return model.to(device)


def seed_full_throughput(train_dir: Path, device: str, workers: int, warmup: int, steps: int,
                         batch_size: int) -> float:
    """Images/s of full fine-tuning, warm-up steps (model and DataLoader worker start) excluded; passes over the
    folder again when it holds fewer than warmup + steps batches."""
    torch.manual_seed(0)
    model = seed_model(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    loader = seed_loader(train_dir, True, workers, device, batch_size)
    running, seen, t0, i = 0.0, 0, 0.0, 0
    while i < warmup + steps:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running += loss.item()  # the notebook's running loss; also a sync point on CUDA
            i += 1
            if i == warmup:
                t0 = time.perf_counter()
            elif i > warmup:
                seen += len(y)
            if i == warmup + steps:
                break
    sync(device)
    return seen / (time.perf_counter() - t0)


def seed_frozen_run(train_dir: Path, val_dir: Path, device: str, workers: int, epochs: int) -> dict:
    """A notebook's frozen-backbone transfer run: the backbone runs on every image every epoch."""
    start = time.perf_counter()
    torch.manual_seed(0)
    model = seed_model(device)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.fc.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.fc.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    train_loader = seed_loader(train_dir, True, workers, device)
    val_loader = seed_loader(val_dir, False, workers, device)
    aucs = []
    for _ in range(epochs):
        model.eval()  # frozen batch-norm statistics
        model.fc.train()
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()
        model.eval()
        probs, labels = [], []
        with torch.no_grad():
            for x, y in val_loader:
                probs.append(torch.softmax(model(x.to(device)), 1)[:, 1].cpu())
                labels.append(y)
        aucs.append(float(roc_auc_score(torch.cat(labels).numpy(), torch.cat(probs).numpy())))
    sync(device)
    return {"seconds": time.perf_counter() - start, "n_train": len(train_loader.dataset),
            "n_val": len(val_loader.dataset), "val_auc_last": aucs[-1]}


# ---------------------------------------------------------------- core pipeline

def timed_prepare(config: TrainConfig) -> tuple[float, Any]:
    t0 = time.perf_counter()
    data = prepare_data(config)
    return time.perf_counter() - t0, data


def timed_steps(times: list[float], warmup: int) -> tuple[int, float]:
    """(steps timed, seconds) from the steps' record times, the first `warmup` steps excluded. Steps written
    together (every N steps on CUDA) share a time, so timing starts at the write that covers step `warmup`."""
    start = times[warmup - 1]
    timed = sum(1 for t in times[warmup:] if t > start)
    return timed, times[-1] - start


def core_step_throughput(config: TrainConfig, warmup: int) -> dict:
    """Run core.trainer.train for warmup + steps steps and time the steps after the warm-up from the
    step records the trainer writes (they include all of its per-step bookkeeping)."""
    t0 = time.perf_counter()
    run_dir = train(config)
    wall = time.perf_counter() - t0
    steps = runs.step_metrics(run_dir)
    if runs.read_status(run_dir).get("state") != "finished" or len(steps) <= warmup:
        raise RuntimeError(f"core run in {run_dir} did not finish its steps: {runs.log_tail(run_dir)}")
    timed, seconds = timed_steps(steps["time"].tolist(), warmup)
    if timed == 0:
        raise RuntimeError(f"core run in {run_dir}: no step recorded after the warm-up; ask for more steps")
    env = json.loads((run_dir / "environment.json").read_text())
    return {"images_per_s": timed * config.batch_size / seconds, "timed_steps": timed,
            "train_call_seconds": wall, "bf16": env["bf16_autocast"], "run_dir": str(run_dir)}


def core_epoch_throughput(config: TrainConfig) -> dict:
    """Run core.trainer.train for config.epochs whole epochs and take the training images/s of the epochs after
    the first (its start-up and any compilation excluded), from the epoch records: training steps and their
    host synchronisations, not the per-epoch validation."""
    t0 = time.perf_counter()
    run_dir = train(config)
    wall = time.perf_counter() - t0
    epochs = runs.epoch_metrics(run_dir)
    if runs.read_status(run_dir).get("state") != "finished" or len(epochs) < 2:
        raise RuntimeError(f"core run in {run_dir} did not finish 2 epochs: {runs.log_tail(run_dir)}")
    later = epochs.iloc[1:]
    images = float((later["images_per_s"] * later["epoch_seconds"]).sum())
    env = json.loads((run_dir / "environment.json").read_text())
    return {"images_per_s": images / float(later["epoch_seconds"].sum()), "timed_epochs": len(later),
            "train_call_seconds": wall, "bf16": env["bf16_autocast"], "run_dir": str(run_dir)}


def subset_folder(data: Path, dest: Path, n_pool: int, n_test: int = 32, seed: int = 0) -> Path:
    """A Kermany-layout folder of symlinks: n_pool train images (core carves validation out of them by
    patient) and a small official test split, so core's final evaluation stays short."""
    rng = random.Random(seed)
    train_files = sorted(p for p in (data / "train").glob("*/*") if p.is_file())
    chosen = {"train": rng.sample(train_files, min(n_pool, len(train_files))), "test": []}
    test_root = data / "test"
    for cls_dir in sorted(d for d in test_root.iterdir() if d.is_dir()) if test_root.is_dir() else []:
        files = sorted(cls_dir.iterdir())
        chosen["test"] += rng.sample(files, min(n_test // 2, len(files)))
    for split, files in chosen.items():
        for f in files:
            target = dest / split / f.parent.name / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f.resolve())
    return dest


def folders_from_split(run_dir: Path, dest: Path) -> tuple[Path, Path]:
    """ImageFolder trees holding exactly the train and val images of core's run, for the seed-style."""
    split = pd.read_csv(run_dir / "split.csv")
    for name in ("train", "val"):
        for row in split[split["split"] == name].itertuples():
            target = dest / name / row.class_name / Path(row.path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(Path(row.path).resolve())
    return dest / "train", dest / "val"


# ---------------------------------------------------------------- cases

def worker_candidates(device: str, quick: bool) -> list[int]:
    cores = os.cpu_count() or 1
    if device == "cpu":
        wanted = [0, 2] if quick else [0, 1, 2]
    else:
        wanted = [8, 16] if quick else [4, 8, 16]
    return sorted({min(w, cores) for w in wanted})


def core_full_throughput(device: str, config: TrainConfig, steps_data: Path, warmup: int, steps: int,
                         cuda_epochs: int) -> tuple[dict, str]:
    """Core's full fine-tuning images/s: on CUDA over whole epochs of the training split after the first
    (start-up and compilation), on the CPU over the steps after the warm-up on a small subset."""
    if device == "cuda":
        core = core_epoch_throughput(dataclasses.replace(config, epochs=cuda_epochs, max_steps_per_epoch=0))
        return core, f"{core['timed_epochs']} epochs after the first"
    config = dataclasses.replace(config, data=str(steps_data), epochs=1, max_steps_per_epoch=warmup + steps)
    timed_prepare(config)  # decode the subset now, so the train() call reads the cache
    core = core_step_throughput(config, warmup)
    return core, f"{core['timed_steps']} steps after {warmup} warm-up"


def case_full(device: str, data: Path, steps_data: Path, base: TrainConfig, warmup: int, steps: int,
              cuda_epochs: int, quick: bool, with_compile: bool) -> dict:
    batch = 256 if device == "cuda" else 32
    say(f"\n[a] full fine-tuning, resnet18 224 px, batch {batch}, {device}: {warmup} warm-up + {steps} timed "
        "steps (seed-style)")
    sweep = {}
    for w in worker_candidates(device, quick):
        sweep[w] = seed_full_throughput(data / "train", device, w, warmup, steps, batch)
        say(f"    seed-style, num_workers={w}: {sweep[w]:.1f} img/s")
    best_workers = max(sweep, key=sweep.get)
    config = dataclasses.replace(base, arch="resnet18", strategy="full", image_size=224, batch_size=batch,
                                 device=device, name="bench-full")
    core, timed = core_full_throughput(device, config, steps_data, warmup, steps, cuda_epochs)
    auto = "on" if device in COMPILE_MEASURED_FASTER else "off"
    say(f"    core (bf16 autocast: {core['bf16']}, compile: auto = {auto}): {core['images_per_s']:.1f} img/s over "
        f"{timed} (whole train() call incl. data load and final evaluation: {core['train_call_seconds']:.1f}s)")
    if with_compile:
        other = "off" if auto == "on" else "on"
        compiled, timed = core_full_throughput(device, dataclasses.replace(config, compile=other), steps_data,
                                               warmup, steps, cuda_epochs)
        core[f"compile_{other}_images_per_s"] = compiled["images_per_s"]
        say(f"    core with compile={other}: {compiled['images_per_s']:.1f} img/s over {timed} "
            f"({compiled['images_per_s'] / core['images_per_s']:.2f}x compile={auto}; whole train() call "
            f"{compiled['train_call_seconds']:.1f}s)")
    return {"case": "a full fine-tune", "device": device, "batch_size": batch, "seed_ips": sweep[best_workers],
            "core_ips": core["images_per_s"], "seed_precision": "fp32",
            "core_precision": "bf16" if core["bf16"] else "fp32",
            "seed_flops_per_image": seed_flops_per_image(224),
            "core_flops_per_image": core_flops_per_image("resnet18", "full", 224),
            "seed_workers": best_workers, "seed_worker_sweep": sweep, "core": core}


def case_frozen(device: str, data: Path, base: TrainConfig, tmp: Path, n_train: int, n_val: int,
                epochs: int, workers: int) -> dict:
    say(f"\n[b] frozen backbone, {epochs} epochs end to end, ~{n_train} train + ~{n_val} val images, {device}")
    subset = subset_folder(data, tmp / f"frozen-{device}", n_train + n_val)
    config = dataclasses.replace(base, data=str(subset), arch="resnet18", strategy="frozen", image_size=224,
                                 batch_size=32, epochs=epochs, patience=0, lr=1e-3, max_steps_per_epoch=0,
                                 val_fraction=n_val / (n_train + n_val), device=device, name="bench-frozen")
    cold, _ = timed_prepare(config)
    t0 = time.perf_counter()
    run_dir = train(config)
    core_s = time.perf_counter() - t0
    epoch_rows = runs.epoch_metrics(run_dir)
    split = runs.read_json(run_dir / "data_report.json")["counts"]
    core_train, core_val = sum(split["train"].values()), sum(split["val"].values())
    say(f"    core: cold decode of the subset {cold:.1f}s + train() {core_s:.1f}s = {cold + core_s:.1f}s end to end "
        f"({epochs} epochs of head training {epoch_rows['epoch_seconds'].sum():.2f}s; train() includes "
        f"features once, final val+test evaluation, checkpoints)")
    train_dir, val_dir = folders_from_split(run_dir, tmp / f"seed-frozen-{device}")
    seed = seed_frozen_run(train_dir, val_dir, device, workers, epochs)
    say(f"    seed-style (num_workers={workers}): {seed['seconds']:.1f}s for {seed['n_train']} train + "
        f"{seed['n_val']} val images x {epochs} epochs")
    images = epochs * (core_train + core_val)
    return {"case": f"b frozen {epochs}-epoch run", "device": device, "seed_ips": images / seed["seconds"],
            "core_ips": images / (cold + core_s), "seed_seconds": seed["seconds"],
            "core_seconds": cold + core_s, "core_cold_decode_seconds": cold, "n_train": core_train, "n_val": core_val,
            "epochs": epochs, "seed_workers": workers, "run_dir": str(run_dir)}


def case_smallcnn(device: str, steps_data: Path, base: TrainConfig, warmup: int, steps: int) -> dict:
    preset = config_from_preset("cpu")
    say(f"\n[c] 'cpu' preset: smallcnn {preset.image_size} px, batch {preset.batch_size}, {device}")
    config = dataclasses.replace(preset, data=str(steps_data), runs_dir=base.runs_dir, cache_dir=base.cache_dir,
                                 epochs=1, max_steps_per_epoch=warmup + steps, device=device, name="bench-cpu",
                                 precision=base.precision)
    cold, _ = timed_prepare(config)
    core = core_step_throughput(config, warmup)
    say(f"    core (bf16 autocast: {core['bf16']}): {core['images_per_s']:.1f} img/s "
        f"(cold decode at {config.image_size} px: {cold:.1f}s)")
    return {"case": "c smallcnn cpu preset", "device": device, "seed_ips": None, "core_ips": core["images_per_s"],
            "core_precision": "bf16" if core["bf16"] else "fp32",
            "core_flops_per_image": core_flops_per_image(preset.arch, preset.strategy, preset.image_size),
            "core": core, "core_cold_decode_seconds": cold}


# ---------------------------------------------------------------- limits, floors, report

def add_limits(row: dict, rates: dict[str, float]) -> None:
    """Each pipeline's compute limit (images/s) at the precision it ran at, and its share of it."""
    for side in ("seed", "core"):
        flops, ips = row.get(f"{side}_flops_per_image"), row.get(f"{side}_ips")
        gflops = rates.get(row.get(f"{side}_precision", ""))
        if flops and ips is not None and gflops:
            row[f"{side}_limit_ips"] = images_per_s_limit(gflops, flops)
            row[f"{side}_share"] = ips / row[f"{side}_limit_ips"]


def full_finetune_floor(device: str, native_bf16: bool, gpu_name: str, seed_ips: float, core_ips: float,
                        core_limit_ips: float | None) -> tuple[str, str]:
    """(floors, PASS/FAIL) of case (a). On a CPU core must reach 85% of the compute limit at its precision: a CPU
    without native bf16 is compute-bound in both pipelines, so a ratio between them says nothing. Where bf16 is
    native, core must also beat seed-style's fp32 by a ratio (on CUDA that and, on an H100/H200, a rate)."""
    ratio = core_ips / seed_ips
    checks: list[tuple[str, bool]] = []
    if device == "cpu":
        checks.append((f"core >= {FLOOR_SHARE_CPU:.0%} of limit",
                       core_limit_ips is not None and core_ips >= FLOOR_SHARE_CPU * core_limit_ips))
        if native_bf16:
            checks.append((f"core >= {FLOOR_RATIO_CPU_BF16:g}x seed", ratio >= FLOOR_RATIO_CPU_BF16))
    else:
        checks.append((f"core >= {FLOOR_RATIO_CUDA:g}x seed", ratio >= FLOOR_RATIO_CUDA))
        if is_hopper_h100_h200(gpu_name):
            checks.append((f"core >= {FLOOR_IPS_HOPPER:,.0f} img/s", core_ips >= FLOOR_IPS_HOPPER))
    text = "; ".join(name if ok or len(checks) == 1 else f"{name} (missed)" for name, ok in checks)
    return text, "PASS" if all(ok for _, ok in checks) else "FAIL"


def judge(row: dict, native: dict[str, bool], gpu_name: str) -> None:
    row["ratio"] = row["core_ips"] / row["seed_ips"] if row["seed_ips"] else None
    if row["case"].startswith("a "):
        row["floor"], row["result"] = full_finetune_floor(row["device"], native[row["device"]], gpu_name,
                                                          row["seed_ips"], row["core_ips"], row.get("core_limit_ips"))
    elif row["case"].startswith("b "):
        row["floor"] = f"core >= {FLOOR_FROZEN:g}x seed"
        row["result"] = "PASS" if row["ratio"] >= FLOOR_FROZEN else "FAIL"
    else:
        row["floor"], row["result"] = "-", "info"


def print_limits(rates: dict[str, dict[str, float]], rows: list[dict]) -> None:
    say("\nCompute limit = matmul GFLOP/s at the precision used / training GFLOP per image "
        "(forward + backward, torch.utils.flop_counter)")
    for device, by_precision in rates.items():
        say(f"    {device} matmul: " + ", ".join(f"{p} {g:.1f} GFLOP/s" for p, g in by_precision.items()))
    header = f"{'case':<24}{'device':<8}{'pipeline':<12}{'precision':<11}{'GFLOP/img':>10}{'limit img/s':>13}"
    say(header + "\n" + "-" * len(header))
    for r in rows:
        for side, name in (("seed", "seed-style"), ("core", "core")):
            if f"{side}_limit_ips" in r:
                say(f"{r['case']:<24}{r['device']:<8}{name:<12}{r[side + '_precision']:<11}"
                    f"{r[side + '_flops_per_image'] / 1e9:>10.2f}{r[side + '_limit_ips']:>13.1f}")


def print_table(rows: list[dict]) -> None:
    def ips(r: dict, side: str) -> str:
        return "-" if r.get(f"{side}_ips") is None else f"{r[side + '_ips']:.1f}"

    def share(r: dict, side: str) -> str:
        return f"{r[side + '_share']:.0%}" if f"{side}_share" in r else "-"

    header = (f"{'case':<24}{'device':<8}{'seed img/s':>11}{'of limit':>9}{'core img/s':>11}{'of limit':>9}"
              f"{'ratio':>8}  {'result':<8}floor")
    say("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        say(f"{r['case']:<24}{r['device']:<8}{ips(r, 'seed'):>11}{share(r, 'seed'):>9}{ips(r, 'core'):>11}"
            f"{share(r, 'core'):>9}{ratio:>8}  {r['result']:<8}{r['floor']}")


def print_gpu_share(rows: list[dict], gpu_name: str) -> None:
    peak = gpu_bf16_peak_tflops(gpu_name)
    for r in rows:
        if r["device"] != "cuda" or not r.get("core_flops_per_image"):
            continue
        tflops = r["core_ips"] * r["core_flops_per_image"] / 1e12
        share = f"{tflops / peak:.1%} of its {peak:g} TFLOPS dense bf16 peak" if peak else \
            "share of its bf16 peak: unknown (GPU not in the table)"
        say(f"GPU {gpu_name}, {r['case']}: core does {tflops:.1f} TFLOP/s of training matmuls, {share}")


def machine_line(gpu_name: str) -> tuple[str, dict]:
    native, evidence = cpu_bf16_native()
    env = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
           "platform": platform.platform(), "cpu_bf16_native": native, "cpu_bf16_evidence": evidence,
           "core_cpu_bf16_autocast": uses_bf16(torch.device("cpu"), "auto"), "cuda": gpu_name or None,
           "load_average_start": os.getloadavg()}
    line = (f"Machine: {env['cpu']}, {env['cpu_count']} cores ({env['torch_threads']} torch threads); "
            f"torch {env['torch']}, torchvision {env['torchvision']}, Python {env['python']}; "
            f"CPU bf16 native: {'yes' if native else 'no'} ({evidence}); "
            f"core's auto precision on the CPU: {'bf16' if env['core_cpu_bf16_autocast'] else 'fp32'}; "
            f"GPU: {gpu_name or 'none'}")
    return line, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Kermany-layout folder (224 px)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto = CPU, and CUDA too when present")
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes on a 2-core CPU: cases a and c, 1 warm-up + 3 timed steps, shorter "
                             "matmul windows, fewer seed-style worker counts")
    parser.add_argument("--steps", type=int, help="timed steps per pipeline on CPU (default 8, --quick 3)")
    parser.add_argument("--cuda-steps", type=int, default=30, help="timed seed-style steps on CUDA")
    parser.add_argument("--cuda-epochs", type=int, default=4, help="core's epochs on CUDA (all but the first timed)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2, --quick 1)")
    parser.add_argument("--matmul-size", type=int, help="n of the n x n matmuls (default 2048 CPU, 8192 CUDA)")
    parser.add_argument("--subset-train", type=int, default=512)
    parser.add_argument("--subset-val", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--cases", help="which cases to run, e.g. 'ab' (default abc, --quick ac)")
    parser.add_argument("--core-precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="core's precision setting (default auto: what a user gets)")
    parser.add_argument("--compile", action="store_true",
                        help="case a: also time core with torch.compile set the other way from its auto setting "
                             "(compiling costs a minute or more, outside the timed steps)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    steps = args.steps if args.steps is not None else 3 if args.quick else 8
    warmup = args.warmup if args.warmup is not None else 1 if args.quick else 2
    cases = args.cases or ("ac" if args.quick else "abc")
    if steps < 1 or warmup < 1 or args.cuda_steps < 1 or args.cuda_epochs < 2:
        sys.exit("--steps, --warmup and --cuda-steps must be at least 1, --cuda-epochs at least 2.")
    if not set(cases) <= set("abc"):
        sys.exit(f"--cases takes letters from 'abc', not '{cases}'.")

    data = args.data.resolve()
    if not (data / "train").is_dir():
        sys.exit(f"No train/ folder in {data}: pass --data <Kermany-layout folder>.")
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else \
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but PyTorch sees no CUDA GPU.")
    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""

    line, env = machine_line(gpu_name)
    say(f"{line}\nData: {data}\nload average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if os.getloadavg()[0] > 0.5:
        say(f"WARNING: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores before starting: other "
            "processes compete for the CPU and lower every figure, the compute limit included.")
    native = {d: bf16_native(d) for d in devices}
    core_bf16 = {d: uses_bf16(torch.device(d), args.core_precision) for d in devices}
    if "cpu" in devices and native["cpu"] != core_bf16["cpu"]:
        say(f"WARNING: core trains the CPU in {'bf16' if core_bf16['cpu'] else 'fp32'} although the CPU "
            f"{'has' if native['cpu'] else 'lacks'} native bf16.")

    def rates_now(device: str) -> dict[str, float]:
        n = args.matmul_size or (8192 if device == "cuda" else 2048)
        window = 0.5 if args.quick else 1.0
        rates = measure_rates(device, n, window, 3)
        if core_bf16[device] and "bf16" not in rates:  # core uses bf16 here although the hardware emulates it
            rates["bf16"] = matmul_gflops(device, torch.bfloat16, n, window, 3)
        return rates

    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    try:
        # A fresh cache: the first prepare_data is a cold decode, the second reads the cache.
        base = TrainConfig(data=str(data), runs_dir=str(tmp / "runs"), cache_dir=str(tmp / "cache"),
                           pretrained=False, patience=0, schedule="cosine", precision=args.core_precision)
        cold = warm = None
        if not args.quick or "cuda" in devices:  # CUDA's core run trains on the whole folder
            cold, prepared = timed_prepare(base)
            warm, _ = timed_prepare(base)
            counts = prepared.report["counts"]
            say(f"core prepare_data at 224 px on {sum(sum(c.values()) for c in counts.values())} images: "
                f"cold decode {cold:.1f}s, from cache {warm:.1f}s (both before any timing)")
            del prepared

        rows: list[dict] = []
        rates: dict[str, dict[str, float]] = {}
        for device in devices:
            rates[device] = rates_now(device)
            say(f"\n{device} matmul before the cases: "
                + ", ".join(f"{p} {g:.1f} GFLOP/s" for p, g in rates[device].items()))
            device_steps = args.cuda_steps if device == "cuda" else steps
            workers = 2 if device == "cpu" else min(8, os.cpu_count() or 1)
            # Core's CPU step runs use a subset (enough images for every timed step, 32 test images) so that
            # train()'s final val/test evaluation stays short; step speed does not depend on its size.
            steps_data = subset_folder(data, tmp / f"steps-{device}", math.ceil(64 * (warmup + device_steps) / 0.8))
            if "a" in cases:
                rows.append(case_full(device, data, steps_data, base, warmup, device_steps, args.cuda_epochs,
                                      args.quick, args.compile))
                workers = rows[-1]["seed_workers"]
            if "b" in cases:
                rows.append(case_frozen(device, data, base, tmp, args.subset_train, args.subset_val,
                                        args.epochs, workers))
            if "c" in cases:
                rows.append(case_smallcnn(device, steps_data, base, warmup, device_steps))
            after = rates_now(device)
            say(f"{device} matmul after the cases: " + ", ".join(f"{p} {g:.1f} GFLOP/s" for p, g in after.items())
                + " (the limit takes the better of before and after)")
            rates[device] = {p: max(g, after.get(p, 0.0)) for p, g in rates[device].items()}
        for device, by_precision in rates.items():
            if native[device] and by_precision.get("bf16", 0.0) < 1.2 * by_precision["fp32"]:
                say(f"\nNOTE: bf16 is native on this {device}, but its matmul runs at "
                    f"{by_precision['bf16'] / by_precision['fp32']:.2f}x fp32's: bf16 autocast gains little or "
                    "nothing here, and a ratio floor over seed-style's fp32 cannot be reached by precision alone.")
        for r in rows:
            add_limits(r, rates[r["device"]])
            judge(r, native, gpu_name)
        print_limits(rates, rows)
        print_table(rows)
        print_gpu_share(rows, gpu_name)
        say(f"load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        say("Shares: each pipeline's images/s over the limit at the precision it ran at (seed-style fp32, core "
            "as shown). Floors: (a) on a CPU, core >= 85% of its limit (without native bf16 both pipelines are "
            "compute-bound, so their ratio means little), and with native bf16 also core >= 2x seed-style; on "
            "CUDA core >= 10x seed-style and, on an H100/H200, >= 10,000 img/s; (b) core >= 4x seed-style end to "
            "end, img/s = epochs x (train + val images) / wall time, core's including a cold decode and its final "
            "evaluation.")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            env["load_average_end"] = os.getloadavg()
            args.json.write_text(json.dumps({"environment": env, "decode_cold_s": cold, "decode_warm_s": warm,
                                             "matmul_gflops": rates, "rows": rows}, indent=2, default=str))
            say(f"JSON written to {args.json}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
