"""Run bookkeeping: the run folder's creation, its place in the queue, the environment and command it was started
with, and what other processes follow while it trains (status, metrics, log, stop requests, a progress bar)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from . import runs
from .config import TrainConfig
from .device import device_names
from .distributed import Distributed


def environment_info(device: torch.device, bf16: bool) -> dict:
    import PIL
    import safetensors
    import sklearn
    import torchvision

    info = {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "numpy": np.__version__, "scikit_learn": sklearn.__version__,
        "pillow": PIL.__version__, "safetensors": safetensors.__version__, "pandas": pd.__version__,
        "device": str(device), "device_name": device_names().get(
            f"cuda:{device.index or 0}" if device.type == "cuda" else device.type, device.type),
        "bf16_autocast": bf16, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
    }
    with contextlib.suppress(Exception):
        import subprocess

        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).parent, timeout=5).stdout.strip()
    return info


def record_command(run_dir: Path, config: TrainConfig, launched: bool, environment: dict) -> None:
    """environment.json: this session's environment, the command that started the run (for a dashboard
    launch, the equivalent `python -m core train ...`), and one entry per later resume."""
    previous = runs.read_json(run_dir / "environment.json", None)
    previous = previous if isinstance(previous, dict) else {}
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    if launched:  # started by the dashboard through `resume --launched`: that internal command says nothing
        this = {"command": "dashboard", "equivalent_command": config.command_line(), "at": now}
    else:
        this = {"command": runs.typed_command(sys.argv), "at": now}
    started = previous.get("started_by") if isinstance(previous.get("started_by"), dict) else None
    resumes = previous.get("resumed_by") if isinstance(previous.get("resumed_by"), list) else []
    record = {**environment, "started_by": started or this, "resumed_by": resumes + ([this] if started else [])}
    (run_dir / "environment.json").write_text(json.dumps(record, indent=2))


def new_run_dir(config: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{config.arch}-{config.strategy}" + (f"-{config.name}" if config.name else "")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)
    root = Path(config.runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    for suffix in [""] + [f"-{i}" for i in range(2, 100)]:
        d = root / (safe + suffix)
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"Could not create a run directory under {root}")


def create_run(config: TrainConfig) -> Path:
    """Validate the config and create the run directory with its config and a 'queued' status."""
    config.validate()
    run_dir = new_run_dir(config)
    config.save(run_dir / "config.json")
    now = time.time()
    runs.write_status(run_dir, state="queued", pid=os.getpid(), created=now, queued_at=now)
    return run_dir


def _queued_before(run_dir: Path) -> bool:
    """Whether another live run in the same folder joined the queue earlier (runs start in order)."""
    mine = runs.read_status(run_dir).get("queued_at", 0.0)
    for other in run_dir.parent.iterdir():
        if other == run_dir or not runs.is_run_dir(other):
            continue
        status = runs.read_status(other)
        if status.get("state") == "queued" and status.get("queued_at", float("inf")) < mine:
            return True
    return False


@contextlib.contextmanager
def training_slot(run_dir: Path) -> Iterator[None]:
    """One training at a time per runs folder, first queued first served; later launches wait here
    (state 'queued'). The OS drops the lock when a process dies, so a killed run never blocks the queue."""
    with open(run_dir.parent / ".training.lock", "w") as lock:
        while True:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _queued_before(run_dir):
                break
            fcntl.flock(lock, fcntl.LOCK_UN)
            time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class ProgressBar:
    """tqdm on terminals, silent otherwise."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, **postfix) -> None:
        if self.bar:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


class StepRecorder:
    """The training loop's per-step figures, kept on the device and written every `every` steps with one host
    synchronisation: a metrics.jsonl record per step, status.json (every 5 steps and at an epoch's end), and the
    progress bar. The stop request is read at the same cadence (stop_due). On a CPU `every` is 1: nothing waits."""

    def __init__(self, run_dir: Path, every: int, bar: ProgressBar, steps_per_epoch: int, total_steps: int,
                 enabled: bool = True, dist: Distributed = Distributed()) -> None:
        self.run_dir, self.every, self.bar, self.dist = run_dir, max(1, every), bar, dist
        self.steps_per_epoch, self.total_steps, self.enabled = steps_per_epoch, total_steps, enabled
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, int, float]] = []
        self.window_start = time.time()

    def stop_due(self, step: int) -> bool:
        """Whether a stop was asked for, read before `step` at the recording cadence (by rank 0, for every rank)."""
        if step % self.every:
            return False
        return self.dist.agree(self.enabled and runs.stop_requested(self.run_dir))

    def add(self, step: int, loss: torch.Tensor, hits: torch.Tensor, n: int, lr: float) -> None:
        self.pending.append((step, loss.detach(), hits.detach(), n, lr))

    def due(self, step: int) -> bool:
        return (step + 1) % self.every == 0 or step + 1 == self.steps_per_epoch

    def flush(self, epoch: int, global_step: int, status: dict) -> list[tuple[float, int, int]]:
        """Write the pending steps; returns (loss, correct, images) per step. `status`: the fields status.json gets
        besides the step counts (elapsed, images/s)."""
        if not self.pending:
            return []
        values = torch.stack([torch.stack([loss.float(), hits.float()]) for _, loss, hits, _, _ in self.pending])
        if self.dist.active:  # every rank's share of each step: hits and images summed; each rank's loss is its
            # part of the whole batch's x world (WholeBatchLoss), so the whole batch's loss is the ranks' mean
            sizes = torch.tensor([n for *_, n, _ in self.pending], dtype=torch.float32, device=values.device)
            summed = self.dist.sum(torch.cat([values, sizes[:, None]], 1))
            values = torch.stack([summed[:, 0] / self.dist.world, summed[:, 1]], 1)
            self.pending = [(s, loss, hits, int(n), lr) for (s, loss, hits, _, lr), n in
                            zip(self.pending, summed[:, 2].tolist())]
        values = values.cpu().tolist()  # the one synchronisation
        now = time.time()
        images = sum(n for _, _, _, n, _ in self.pending)
        rate = images / max(now - self.window_start, 1e-9)
        first_global = global_step - len(self.pending) + 1
        out = []
        for k, ((step, _, _, n, lr), (loss, hits)) in enumerate(zip(self.pending, values)):
            out.append((loss, int(hits), n))
            if self.enabled:
                runs.append_metrics(self.run_dir, {
                    "kind": "step", "epoch": epoch + 1, "step": step + 1, "global_step": first_global + k,
                    "loss": loss, "accuracy": hits / n, "lr": lr, "images_per_s": rate, "time": now})
            self.bar.update(epoch=epoch + 1, loss=f"{loss:.3f}")
        last = self.pending[-1][0]
        if self.enabled and (any(s % 5 == 0 for s, *_ in self.pending) or last + 1 == self.steps_per_epoch):
            runs.write_status(self.run_dir, epoch=epoch + 1, step=last + 1, global_step=global_step,
                              total_steps=self.total_steps, **status)
        self.pending = []
        self.window_start = now
        return out
