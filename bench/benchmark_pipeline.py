"""Benchmark: a seed-style notebook pipeline against core's pipeline, in one run. Prints figures, asserts
nothing.

Seed-style is what a typical notebook does: torchvision ImageFolder + per-image PIL transforms + a
DataLoader, fp32, a 3-channel torchvision resnet18. Core is core.trainer.train itself (decoded uint8
cache, batched augmentation on the device, channels_last, bf16 autocast where core.trainer.uses_bf16
says so), timed from the per-step records it writes to metrics.jsonl.

Cases, per device (CPU, and CUDA when present):
  a  full fine-tuning of resnet18 at 224 px, batch 32: images/s over --steps steps after --warmup steps
  b  5-epoch frozen-backbone run end to end on a subset (--subset-train + --subset-val images):
     seed-style runs the backbone every epoch, core computes features once and trains the head on them
  c  the 'cpu' preset (smallcnn, 128 px, batch 64): core's images/s, for information

ImageNet weights are not used (random init, no download); they do not change speed.

    .venv/bin/python bench/benchmark_pipeline.py [--steps 8] [--device auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
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
from torch.utils.data import DataLoader
from torchvision import transforms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core import runs  # noqa: E402
from core.config import TrainConfig, config_from_preset  # noqa: E402
from core.trainer import prepare_data, train, uses_bf16  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "kermany_224"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
FLOOR_FULL_CPU, FLOOR_FROZEN = 1.3, 4.0


def say(msg: str) -> None:
    print(msg, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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


def seed_full_throughput(train_dir: Path, device: str, workers: int, warmup: int, steps: int) -> float:
    """Images/s of full fine-tuning, warm-up steps (model and DataLoader worker start) excluded."""
    torch.manual_seed(0)
    model = seed_model(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    loader = seed_loader(train_dir, True, workers, device)
    running, seen, t0 = 0.0, 0, 0.0
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running += loss.item()  # the notebook's running loss; also a sync point on CUDA
        if i + 1 == warmup:
            t0 = time.perf_counter()
        elif i + 1 > warmup:
            seen += len(y)
        if i + 1 == warmup + steps:
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


def core_step_throughput(config: TrainConfig, warmup: int) -> dict:
    """Run core.trainer.train for warmup + steps steps and time the steps after the warm-up from the
    per-step timestamps the trainer writes (they include all of its per-step bookkeeping)."""
    t0 = time.perf_counter()
    run_dir = train(config)
    wall = time.perf_counter() - t0
    steps = runs.step_metrics(run_dir)
    if runs.read_status(run_dir).get("state") != "finished" or len(steps) <= warmup:
        raise RuntimeError(f"core run in {run_dir} did not finish its steps: {runs.log_tail(run_dir)}")
    times = steps["time"].to_numpy()
    timed = len(steps) - warmup
    env = json.loads((run_dir / "environment.json").read_text())
    return {"images_per_s": timed * config.batch_size / (times[-1] - times[warmup - 1]),
            "timed_steps": timed, "train_call_seconds": wall, "bf16": env["bf16_autocast"],
            "run_dir": str(run_dir)}


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

def worker_candidates(device: str) -> list[int]:
    cores = os.cpu_count() or 1
    wanted = [0, 1, 2] if device == "cpu" else [0, 2, 4, 8, 16]
    return sorted({w for w in wanted if w <= cores})


def case_full(device: str, data: Path, steps_data: Path, base: TrainConfig, warmup: int, steps: int) -> dict:
    say(f"\n[a] full fine-tuning, resnet18 224 px, batch 32, {device}: {warmup} warm-up + {steps} timed steps")
    sweep = {}
    for w in worker_candidates(device):
        sweep[w] = seed_full_throughput(data / "train", device, w, warmup, steps)
        say(f"    seed-style, num_workers={w}: {sweep[w]:.1f} img/s")
    best_workers = max(sweep, key=sweep.get)
    config = dataclasses.replace(base, data=str(steps_data), arch="resnet18", strategy="full", image_size=224,
                                 batch_size=32, epochs=1, max_steps_per_epoch=warmup + steps, device=device,
                                 name="bench-full")
    timed_prepare(config)  # decode the subset now, so the train() call below reads the cache
    core = core_step_throughput(config, warmup)
    say(f"    core (bf16 autocast: {core['bf16']}): {core['images_per_s']:.1f} img/s "
        f"(whole train() call incl. data load and final evaluation: {core['train_call_seconds']:.1f}s)")
    return {"case": "a full fine-tune", "device": device, "seed_ips": sweep[best_workers],
            "core_ips": core["images_per_s"], "floor": FLOOR_FULL_CPU if device == "cpu" else None,
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
            "core_ips": images / (cold + core_s), "floor": FLOOR_FROZEN, "seed_seconds": seed["seconds"],
            "core_seconds": cold + core_s, "core_cold_decode_seconds": cold, "n_train": core_train, "n_val": core_val,
            "epochs": epochs, "seed_workers": workers, "run_dir": str(run_dir)}


def case_smallcnn(device: str, steps_data: Path, base: TrainConfig, warmup: int, steps: int) -> dict:
    preset = config_from_preset("cpu")
    say(f"\n[c] 'cpu' preset: smallcnn {preset.image_size} px, batch {preset.batch_size}, {device}")
    config = dataclasses.replace(preset, data=str(steps_data), runs_dir=base.runs_dir, cache_dir=base.cache_dir,
                                 epochs=1, max_steps_per_epoch=warmup + steps, device=device, name="bench-cpu")
    cold, _ = timed_prepare(config)
    core = core_step_throughput(config, warmup)
    say(f"    core: {core['images_per_s']:.1f} img/s (cold decode at {config.image_size} px: {cold:.1f}s)")
    return {"case": "c smallcnn cpu preset", "device": device, "seed_ips": None, "core_ips": core["images_per_s"],
            "floor": None, "core": core, "core_cold_decode_seconds": cold}


# ---------------------------------------------------------------- report

def verdict(row: dict) -> str:
    if row["seed_ips"] is None or row["floor"] is None:
        return "info"
    return "PASS" if row["ratio"] >= row["floor"] else "FAIL"


def print_table(rows: list[dict]) -> None:
    header = f"{'case':<24}{'device':<8}{'seed img/s':>12}{'core img/s':>12}{'ratio':>8}{'floor':>8}  result"
    say("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        seed = f"{r['seed_ips']:.1f}" if r["seed_ips"] is not None else "-"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        floor = f"{r['floor']:.1f}x" if r["floor"] is not None else "-"
        say(f"{r['case']:<24}{r['device']:<8}{seed:>12}{r['core_ips']:>12.1f}{ratio:>8}{floor:>8}  {r['result']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Kermany-layout folder (224 px)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto = CPU, and CUDA too when present")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per pipeline on CPU")
    parser.add_argument("--cuda-steps", type=int, default=60, help="timed steps per pipeline on CUDA")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--subset-train", type=int, default=512)
    parser.add_argument("--subset-val", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--cases", default="abc", help="which cases to run, e.g. 'ab'")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()

    data = args.data.resolve()
    if not (data / "train").is_dir():
        sys.exit(f"No train/ folder in {data}: pass --data <Kermany-layout folder>.")
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else \
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but PyTorch sees no CUDA GPU.")

    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    try:
        # A fresh cache: the first prepare_data is a cold decode, the second reads the cache.
        base = TrainConfig(data=str(data), runs_dir=str(tmp / "runs"), cache_dir=str(tmp / "cache"),
                           pretrained=False, patience=0, schedule="cosine")
        env = {"python": sys.version.split()[0], "torch": torch.__version__,
               "torchvision": torchvision.__version__, "platform": platform.platform(),
               "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "bf16_cpu": uses_bf16(torch.device("cpu"), "auto")}
        say(f"Environment: {json.dumps(env)}\nData: {data}")
        load = os.getloadavg()[0]
        if load > 0.5:
            say(f"WARNING: load average {load:.1f} on {os.cpu_count()} cores before starting: other processes "
                "compete for the CPU and lower both pipelines' figures.")
        cold, prepared = timed_prepare(base)
        warm, _ = timed_prepare(base)
        counts = prepared.report["counts"]
        say(f"core prepare_data at 224 px on {sum(sum(c.values()) for c in counts.values())} images: "
            f"cold decode {cold:.1f}s, from cache {warm:.1f}s (both before any timing)")
        del prepared

        rows: list[dict] = []
        for device in devices:
            steps = args.cuda_steps if device == "cuda" else args.steps
            workers = 2 if device == "cpu" else min(8, os.cpu_count() or 1)
            # Core's step runs use a subset (enough images for every timed step, 32 test images) so that
            # train()'s final val/test evaluation stays short; step speed does not depend on its size.
            steps_data = subset_folder(data, tmp / f"steps-{device}", math.ceil(64 * (args.warmup + steps) / 0.8))
            if "a" in args.cases:
                rows.append(case_full(device, data, steps_data, base, args.warmup, steps))
                workers = rows[-1]["seed_workers"]
            if "b" in args.cases:
                rows.append(case_frozen(device, data, base, tmp, args.subset_train, args.subset_val,
                                        args.epochs, workers))
            if "c" in args.cases:
                rows.append(case_smallcnn(device, steps_data, base, args.warmup, steps))
        for r in rows:
            r["ratio"] = r["core_ips"] / r["seed_ips"] if r["seed_ips"] else None
            r["result"] = verdict(r)
        print_table(rows)
        say(f"load average now: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        say("floors: (a) core >= 1.3x seed-style on CPU; (b) core >= 4x seed-style end to end. "
            "(b) img/s = epochs x (train + val images) / wall time; core's wall time includes decoding "
            "the images from scratch (cold cache) and its final val+test evaluation.")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            env["load_average_end"] = os.getloadavg()
            args.json.write_text(json.dumps({"environment": env, "decode_cold_s": cold, "decode_warm_s": warm,
                                             "rows": rows}, indent=2, default=str))
            say(f"JSON written to {args.json}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
