"""Start training in a separate process, so a run outlives the page or terminal that started it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from . import runs
from .config import TrainConfig
from .model import check_weights
from .study import record_process
from .trainer import create_run

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def spawn_command(run_dir: Path, *extra: str) -> list[str]:
    """The command that trains a queued run: `python -m core resume --launched`, under torchrun with one process
    per GPU when the run's config asks for several processes."""
    command = ["-m", "core", "resume", str(run_dir), "--quiet", "--launched", *extra]
    try:
        processes = TrainConfig.load(run_dir / "config.json").processes
    except (OSError, ValueError, TypeError):
        processes = 1  # the run itself reports a damaged config
    if processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                *command]
    return [sys.executable, *command]


def _spawn(run_dir: Path, *extra: str) -> subprocess.Popen:
    log = open(run_dir / "process.log", "ab")
    proc = subprocess.Popen(spawn_command(run_dir, *extra),
                            cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True,  # survives the dashboard's restart or Ctrl-C
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    runs.write_status(run_dir, pid=proc.pid)
    return proc


def resolved(config: TrainConfig) -> TrainConfig:
    """The config as a run records it: its folders as absolute paths (the training process runs elsewhere). The
    data folder keeps the user's spelling (links are not followed), so views show the path they typed."""
    return dataclasses.replace(config, runs_dir=str(Path(config.runs_dir).resolve()),
                               data=os.path.abspath(os.path.expanduser(config.data)))


def _same_training(a: dict, b: dict) -> bool:
    """Whether two configs train the same thing: every field equal but the run's name."""
    return {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}


def active_duplicates(config: TrainConfig) -> list[str]:
    """The queued or running runs (by name) in the config's runs folder that train exactly this config (its
    run name aside): launching it again would queue the same training twice."""
    wanted = json.loads(json.dumps(resolved(config).to_dict(), default=str))  # as config.json holds it
    return [r["run"] for r in runs.list_runs(wanted["runs_dir"])
            if r["state"] in runs.ACTIVE_STATES and _same_training(runs.read_config(Path(r["path"])), wanted)]


def launch_training(config: TrainConfig) -> Path:
    """Create the run directory and train it in a background process. Runs launched while another
    trains wait their turn (state 'queued'). Returns the run directory at once."""
    config = resolved(config)
    config.validate()
    check_weights(config.arch, config.pretrained, config.weights_file)  # fail now, not after queueing
    run_dir = create_run(config)
    _spawn(run_dir)
    return run_dir


def launch_resume(run_dir: Path) -> None:
    """Continue a stopped, failed or killed run in a background process."""
    refusal = runs.resume_refusal(run_dir)
    if refusal:
        raise ValueError(refusal)
    runs.clear_stop(run_dir)
    runs.write_status(run_dir, state="queued", error=None)
    _spawn(Path(run_dir))


def launch_study(study_dir: Path) -> subprocess.Popen:
    """Run (or continue) a study in a background process that outlives the page: `python -m core study
    --resume`, its output in the study folder's process.log."""
    study_dir = Path(study_dir)
    log = open(study_dir / "process.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "core", "study", "--resume", str(study_dir), "--quiet"],
                            cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    record_process(study_dir, pid=proc.pid, state="starting")  # the page sees it running from now on
    return proc
