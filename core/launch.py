"""Start training in a separate process, so a run outlives the page or terminal that started it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from . import runs
from .config import TrainConfig
from .trainer import create_run

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _spawn(run_dir: Path, *extra: str) -> subprocess.Popen:
    log = open(run_dir / "process.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "core", "resume", str(run_dir), "--quiet", "--launched", *extra],
                            cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True,  # survives the dashboard's restart or Ctrl-C
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    runs.write_status(run_dir, pid=proc.pid)
    return proc


def launch_training(config: TrainConfig) -> Path:
    """Create the run directory and train it in a background process. Runs launched while another
    trains wait their turn (state 'queued'). Returns the run directory at once."""
    config = dataclasses.replace(config, runs_dir=str(Path(config.runs_dir).resolve()),
                                 data=str(Path(config.data).expanduser().resolve()))
    run_dir = create_run(config)
    _spawn(run_dir)
    return run_dir


def launch_resume(run_dir: Path) -> None:
    """Continue a stopped, failed or killed run in a background process."""
    status = runs.read_status(run_dir)
    if status.get("state") in runs.ACTIVE_STATES:
        raise ValueError(f"{Path(run_dir).name} is still {status['state']}.")
    runs.clear_stop(run_dir)
    runs.write_status(run_dir, state="queued", error=None)
    _spawn(Path(run_dir))


def strategy_study(base: TrainConfig) -> list[TrainConfig]:
    """Frozen vs partial vs full fine-tuning of `base.arch` (an ImageNet backbone), and the small CNN
    from scratch: same data, seed, image size and epochs."""
    arch = base.arch if base.arch != "smallcnn" else "resnet18"
    configs = [dataclasses.replace(base, arch=arch, strategy=s, name=f"study-{s}")
               for s in ("frozen", "partial", "full")]
    configs.append(dataclasses.replace(base, arch="smallcnn", pretrained=False, strategy="full",
                                       name="study-scratch"))
    return configs
