"""Shared fixtures: tiny generated datasets for unit tests, and the real X-rays in ../shared/data."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Decoded-image cache and dashboard settings in a per-session temp folder, never the user's
    (session-scoped so that session and module fixtures use it too)."""
    root = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXR_CACHE_DIR", str(root / "image-cache"))
        mp.setenv("CXR_SETTINGS", str(root / "settings.json"))
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "kermany_224").is_dir():
        pytest.skip(f"real X-rays not found at {SHARED_DATA} (expected ../shared/data beside the repo)")
    return SHARED_DATA


def make_xray(size: int = 48, label: int = 0, seed: int = 0) -> Image.Image:
    """A synthetic grayscale 'X-ray': positive images carry a bright blob, so a model can learn them."""
    rng = np.random.default_rng(seed)
    arr = rng.normal(90, 20, (size, size))
    if label:
        y, x = rng.integers(size // 4, 3 * size // 4, 2)
        yy, xx = np.mgrid[:size, :size]
        arr += 120 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * (size / 8) ** 2))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_dataset(root: Path, per_class: dict[str, int], splits: tuple[str, ...] | None = ("train", "test"),
                  size: int = 48, patients_per_class: int | None = None) -> Path:
    """Kermany-style names (person<N>_bacteria_<k> / IM-<N>-<k>) so patient grouping is exercised."""
    for split in splits or (None,):
        base = root / split if split else root
        for cls, n in per_class.items():
            d = base / cls
            d.mkdir(parents=True, exist_ok=True)
            label = int(cls == "PNEUMONIA")
            for i in range(n):
                patient = i // 2 if patients_per_class is None else i % patients_per_class
                offset = 0 if split in (None, "train") else 10_000
                name = (f"person{patient + offset}_bacteria_{i}.jpeg" if label
                        else f"IM-{patient + offset:04d}-{i:04d}.jpeg")
                make_xray(size, label, seed=zlib.crc32(f"{split}{cls}{i}".encode())).save(d / name)
    return root


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "xrays", {"NORMAL": 24, "PNEUMONIA": 40})


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A real finished run (preset 'tiny': 2 epochs of 5 steps at 64 px) on the 400 full-size originals,
    trained once per session. Tests that write into a run use `run_copy`."""
    from core import runs
    from core.config import config_from_preset
    from core.trainer import train

    originals = SHARED_DATA / "kermany_original_train_subset"
    if not originals.is_dir():
        pytest.skip(f"real X-rays not found at {originals} (expected ../shared/data beside the repo)")
    config = config_from_preset("tiny", data=str(originals), device="cpu", seed=0,
                                runs_dir=str(tmp_path_factory.getbasetemp() / "fixture-runs"))
    run_dir = train(config)
    state = runs.read_status(run_dir).get("state")
    assert state == "finished", f"fixture run ended '{state}': {runs.log_tail(run_dir)}"
    return run_dir


@pytest.fixture
def app_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The dashboard pointed at an empty runs folder and a fresh settings file, never the user's."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    monkeypatch.setenv("CXR_RUNS_DIR", str(runs_dir))
    monkeypatch.setenv("CXR_SETTINGS", str(tmp_path / "settings.json"))
    return runs_dir


@pytest.fixture
def empty_runs_dir(app_env: Path) -> Path:
    return app_env


@pytest.fixture
def run_copy(finished_run: Path, app_env: Path) -> Path:
    """A private copy of the finished run in the dashboard's runs folder."""
    import shutil

    target = app_env / finished_run.name
    shutil.copytree(finished_run, target, ignore=shutil.ignore_patterns("last.pt"))
    return target


def rank_well(run_dir: Path, split: str = "val") -> None:
    """Rewrite a set's predictions so that the model ranks them clearly better than chance, with mistakes left
    (PNEUMONIA evenly from 0.35 to 0.95, NORMAL from 0.05 to 0.65), whatever the fixture's model learned on this
    machine: its 10 steps can leave a set ranked at chance on one CPU and not on another."""
    import numpy as np
    import pandas as pd

    path = run_dir / f"predictions_{split}.csv"
    frame = pd.read_csv(path, keep_default_na=False)
    for label, (low, high) in ((0, (0.05, 0.65)), (1, (0.35, 0.95))):
        rows = frame["label"] == label
        spread = np.linspace(low, high, int(rows.sum()))
        for column in ("prob", "prob_uncalibrated"):
            if column in frame:
                frame.loc[rows, column] = spread
    frame.to_csv(path, index=False)


def rank_at_chance(run_dir: Path, split: str = "test") -> None:
    """Rewrite a set's predictions so that the model ranks them no better than chance: each class gets the same
    spread of probabilities (evenly from 0.2 to 0.8), whatever the fixture's model learned on this machine."""
    import numpy as np
    import pandas as pd

    path = run_dir / f"predictions_{split}.csv"
    frame = pd.read_csv(path, keep_default_na=False)
    for label in (0, 1):
        rows = frame["label"] == label
        spread = np.linspace(0.2, 0.8, int(rows.sum()))
        for column in ("prob", "prob_uncalibrated"):
            if column in frame:
                frame.loc[rows, column] = spread
    frame.to_csv(path, index=False)


def evaluate_training_copies(run_dir: Path, folder: Path, per_class: int = 3) -> str:
    """Evaluate, as an external folder, copies of the run's own training images under other names: a set that is
    not independent of the run (identical files). Returns its prediction-set name."""
    import shutil

    import pandas as pd

    from core import external

    split = pd.read_csv(run_dir / "split.csv")
    train = split[split["split"] == "train"]
    for cls in ("NORMAL", "PNEUMONIA"):
        (folder / cls).mkdir(parents=True)
        for i, path in enumerate(train[train["class_name"] == cls]["path"][:per_class]):
            shutil.copy(path, folder / cls / f"copy-{i}.jpeg")
    result = external.evaluate_external(run_dir, str(folder), device="cpu")
    return external.set_name(result["name"])


class CopiesToTheDevice(TorchDispatchMode):
    """Every operator that takes a CPU tensor and returns one on the 'meta' device (standing in for a GPU, where a
    read of a device value raises), with its non_blocking argument: (operator name, non_blocking)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.device.type == "meta" and any(
                isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args):
            self.copies.append((str(func), (kwargs or {}).get("non_blocking")))
        return out
