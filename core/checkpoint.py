"""Checkpoints: the best weights (safetensors, with the metadata prediction needs) and the resumable state of a
run (last.pt: model, optimizer, scheduler, random generators and progress; loaded without running code)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import TrainConfig
from .model import Classifier, normalization


def checkpoint_metadata(config: TrainConfig, classes: list[str], temperature: float = 1.0,
                        threshold: float = 0.5, epoch: int = 0) -> dict[str, str]:
    mean, std = normalization(config.arch)
    return {"arch": config.arch, "classes": json.dumps(classes), "positive_class": classes[-1],
            "image_size": str(config.image_size), "mean": str(mean), "std": str(std),
            "temperature": str(temperature), "threshold": str(threshold), "epoch": str(epoch),
            "dropout": str(config.dropout), "strategy": config.strategy, "format": "cxr-workbench/1"}


def save_weights(model: Classifier, path: Path, metadata: dict[str, str]) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_resume_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill during the write leaves the previous checkpoint intact


def load_resume_state(path: Path) -> dict:
    """The resumable state, loaded without running code from the file. A file that is damaged, or that
    holds anything but tensors and plain values, is refused with a ValueError naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} cannot be loaded safely ({type(e).__name__}: {first[:200]}); it is damaged or "
                         "not a checkpoint this tool wrote. Delete it to restart the run from epoch 0.") from None
    required = {"model": dict, "optimizer": dict, "aug_rng": torch.Tensor, "torch_rng": torch.Tensor, "progress": dict}
    if not isinstance(state, dict) or not all(isinstance(state.get(k), t) for k, t in required.items()):
        raise ValueError(f"{path} is damaged (fields missing or of the wrong type). Delete it to restart the run "
                         "from epoch 0.")
    return state


IMPLEMENTATION_CHOICES = ("fused", "foreach")  # an optimizer's param-group options that choose its kernels


@dataclass
class TrainingState:
    """What a run resumes from, and the one place that knows last.pt's layout: the model, the optimizer and its
    schedule, the augmentation and torch random generators, and the run's progress counters (epoch, step in the
    epoch, best validation score, elapsed seconds, ...). `progress` is the trainer's own dict, updated in place."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    aug_gen: torch.Generator
    progress: dict

    def save(self, path: Path, elapsed: float) -> None:
        counters = {k: v for k, v in self.progress.items() if not callable(v)}
        save_resume_state(path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "aug_rng": self.aug_gen.get_state(), "torch_rng": torch.get_rng_state(),
            "progress": {**counters, "elapsed": elapsed},
        })

    def restore(self, path: Path) -> None:
        """Load `path` into the model, optimizer, schedule and generators, and take the counters it saved that this
        run also counts (of the same type). ValueError, naming the file, when it is damaged or does not fit."""
        saved = load_resume_state(path)
        # How the optimizer computes its step (fused kernel or not) is this process's choice, not state: it goes
        # into the saved groups before loading, which places the state by them (a GPU's fused kernel needs its step
        # count on the GPU); a last.pt written before fused kernels would otherwise switch them off.
        implementation = [{k: g[k] for k in IMPLEMENTATION_CHOICES if k in g} for g in self.optimizer.param_groups]
        try:
            self.model.load_state_dict(saved["model"])
            optimizer_state = dict(saved["optimizer"])
            groups = list(optimizer_state["param_groups"])
            optimizer_state["param_groups"] = [{**group, **chosen} for group, chosen in zip(groups, implementation)] \
                + groups[len(implementation):]
            self.optimizer.load_state_dict(optimizer_state)
            if self.scheduler is not None and saved.get("scheduler"):
                self.scheduler.load_state_dict(saved["scheduler"])
            self.aug_gen.set_state(saved["aug_rng"])
            torch.set_rng_state(saved["torch_rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} does not fit this run's model or optimizer ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}). Delete it to restart the run from epoch 0.") from None
        self.progress.update({k: v for k, v in saved["progress"].items()
                              if k in self.progress and type(v) is type(self.progress[k])})


def load_weights_into(model: Classifier, path: Path) -> dict[str, str]:
    """Load a best.safetensors into `model`; returns its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    model.load_state_dict(load_file(str(path)))
    return metadata
