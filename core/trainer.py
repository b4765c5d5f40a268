"""Training: data preparation, the training loop, checkpoints, stop/resume, and the final report.

The trainer owns the run directory (see core.runs). Everything another process needs to follow the
run is written there as it happens.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import runs
from .augment import AugmentParams, augment_batch
from .cache import DecodeProgress, decode_images
from .config import TrainConfig
from .dataset import (
    METADATA_FIELDS,
    DatasetIndex,
    assign_splits,
    leakage_report,
    metadata_columns,
    with_header_fields,
)
from .labels import load_index, spec_from
from .metrics import choose_threshold, metrics_at_threshold, safe_auc
from .model import Classifier, apply_strategy, build_model, count_parameters, normalization, set_train_mode
from .ood import OOD_FILE, OodDetector, fit_detector, save_detector
from .streaming import BatchPrefetcher, MappedImages, default_memory_budget, fits_in_memory

EVAL_SPLITS = ("val", "test")


class StopRequested(Exception):
    """Raised inside the loop when a STOP file appears; the run is saved and marked stopped."""


# ---------------------------------------------------------------- device and precision

def select_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"Device '{spec}' asked for, but PyTorch sees no CUDA GPU here.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"Device '{spec}' asked for, but only {torch.cuda.device_count()} GPU(s) exist.")
    return device


def uses_bf16(device: torch.device, precision: str) -> bool:
    """auto: bf16 autocast on CUDA, and on CPUs with native bf16 (AVX512-BF16/AMX), where oneDNN runs
    convolutions about 2.5x faster than fp32; fp32 elsewhere."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def available_devices() -> list[str]:
    """Device choices for forms: auto, cpu, and every GPU found."""
    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        out.append("mps")
    return out


def device_names() -> dict[str, str]:
    names = {"cpu": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            names[f"cuda:{i}"] = torch.cuda.get_device_name(i)
    return names


# ---------------------------------------------------------------- data

@dataclass
class SplitTensors:
    images: torch.Tensor | MappedImages  # (N, 1, S, S) uint8: in memory, or read from the cache's memory maps
    labels: torch.Tensor  # (N,) int64
    table: pd.DataFrame  # path, patient, label, class_name for these rows


@dataclass
class PreparedData:
    index: DatasetIndex
    split_table: pd.DataFrame  # every file found: path, split (or "skipped"), label, class_name, patient
    splits: dict[str, SplitTensors]
    report: dict


def prepare_data(config: TrainConfig, progress=None) -> PreparedData:
    """Scan (class folders or a label file), decode (cached), take patient ids and metadata from DICOM headers,
    split by patient and report: counts, skipped files, leakage."""
    index = load_index(config.data, spec_from(config), config.positive_class or None)
    paths = [r.path for r in index.records]
    decoded = decode_images(paths, config.image_size, config.cache_dir or None,
                            config.decode_workers or None, progress=progress, root=index.root)
    index = with_header_fields(index, decoded.metadata)
    split_names = assign_splits(index, config.val_fraction, config.test_fraction, config.data_split_seed)
    table = pd.DataFrame({
        "path": paths, "split": split_names, "label": [r.label for r in index.records],
        "class_name": [r.class_name for r in index.records], "patient": [r.patient for r in index.records],
        "official_split": [r.official_split or "" for r in index.records],
        "sha256": decoded.sha256,  # lets a later external evaluation find files shared with this run
    })
    for key, column in metadata_columns(index.records).items():  # age, sex, view, site: subgroups read them
        table[key] = column
    ok = np.zeros(len(paths), bool)
    ok[decoded.ok_indices] = True
    row_of = np.full(len(paths), -1)
    row_of[decoded.ok_indices] = np.arange(len(decoded.ok_indices))
    table.loc[~ok, "split"] = "skipped"

    splits: dict[str, SplitTensors] = {}
    # Images stay in memory when they fit the budget; a larger set is read batch by batch from the cache's
    # memory maps (a prefetching thread keeps the next batches ready).
    budget = int(config.memory_budget_gb * 2**30) if config.memory_budget_gb > 0 else default_memory_budget()
    in_memory = fits_in_memory(len(decoded.ok_indices), config.image_size, budget)
    for name in ("train", "val", "test"):
        mask = (table["split"] == name).to_numpy()
        rows = row_of[mask]
        sub = table[mask].reset_index(drop=True)
        images = torch.from_numpy(decoded.gather(rows)).unsqueeze(1) if in_memory else decoded.mapped(rows)
        splits[name] = SplitTensors(images, torch.tensor(sub["label"].to_numpy(), dtype=torch.long), sub)
    if len(splits["train"].labels) == 0 or len(splits["val"].labels) == 0:
        raise ValueError(f"No readable training or validation images in {index.root}.")
    used = table["split"] != "skipped"
    counts = {s: {c: int(((table["split"] == s) & (table["class_name"] == c)).sum()) for c in index.classes}
              for s in ("train", "val", "test")}
    official = index.counts() if index.has_official_splits else {}
    report = {
        "root": index.root, "classes": index.classes, "positive_class": index.positive_class,
        "label_file": index.label_file, "labels": index.labels, "patients_from": index.patients_from or "file names",
        "image_size": config.image_size, "counts": counts, "official_counts": official,
        "skipped": [{"path": p, "reason": r} for p, r in decoded.failed.items()],
        "ignored_non_image_files": index.ignored_files,
        "unusable_entries": [{"path": p, "reason": r} for p, r in index.unusable.items()],
        "decoded_now": decoded.decoded_now, "from_cache": len(paths) - decoded.decoded_now,
        "images_in_memory": in_memory, "memory_budget_bytes": budget,
        "leakage": leakage_report([r for r, u in zip(index.records, used) if u],
                                  list(table.loc[used, "split"]),
                                  [h for h, u in zip(decoded.sha256, used) if u]),
    }
    if index.has_official_splits:
        report["leakage_official_splits"] = leakage_report(
            index.records, [r.official_split or "" for r in index.records], decoded.sha256)
    return PreparedData(index, table, splits, report)


def _to_input(batch_u8: torch.Tensor, device: torch.device, mean: float, std: float,
              aug: AugmentParams | None, generator: torch.Generator | None) -> torch.Tensor:
    x = batch_u8.to(device, non_blocking=True).float().div_(255.0)
    if aug is not None and generator is not None:
        x = augment_batch(x, aug, generator)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def compute_logits(model: Classifier, images: torch.Tensor, device: torch.device, mean: float,
                   std: float, bf16: bool, batch_size: int = 128, features_only: bool = False) -> torch.Tensor:
    """Logits (or backbone features) for uint8 images, in eval mode, as float32 on the CPU."""
    model.eval()
    out = []
    net = model.backbone if features_only else model
    for i in range(0, len(images), batch_size):
        x = _to_input(images[i:i + batch_size], device, mean, std, None, None)
        with autocast(device, bf16):
            out.append(net(x).float().cpu())
    dim = model.feature_dim if features_only else 2
    return torch.cat(out) if out else torch.zeros(0, dim)


def features_and_logits(model: Classifier, images: torch.Tensor, device: torch.device, mean: float, std: float,
                        bf16: bool, batch_size: int = 128) -> tuple[np.ndarray, torch.Tensor]:
    """Backbone features (N, d) as float32 numpy and logits (N, 2) as a float32 CPU tensor. The logits are the
    model's forward at the run's precision (bf16 autocast where it trains so); the features are always computed
    in float32, the precision Predict and the ONNX graph score at, so that one image gets one verdict everywhere
    (a second pass only where bf16 is used)."""
    model.eval()
    feats, logits = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = _to_input(images[i:i + batch_size], device, mean, std, None, None)
            with autocast(device, bf16):
                f = model.backbone(x)
                out = model.head(f)
            if bf16:
                f = model.backbone(x)
            feats.append(f.float().cpu())
            logits.append(out.float().cpu())
    if not feats:
        return np.zeros((0, model.feature_dim), np.float32), torch.zeros(0, 2)
    return torch.cat(feats).numpy(), torch.cat(logits)


def fit_temperature_checked(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, str | None]:
    """Temperature scaling (Guo et al. 2017) on validation logits: calibrated probabilities without
    changing the ranking, so AUC and the threshold's meaning are kept. Returns (temperature, None), or
    (1.0, why the fit was refused)."""
    if len(labels) < 2 or len(labels.unique()) < 2:
        return 1.0, "validation holds fewer than two images of each class"
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not (math.isfinite(t) and 0.05 < t < 20):
        return 1.0, f"the fitted temperature {t:.3g} is outside (0.05, 20): validation is probably separated " \
                    "perfectly, so probabilities are left uncalibrated"
    return t, None


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return fit_temperature_checked(logits, labels)[0]


def positive_probs(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    # float64: a float32 written to CSV and read back is another number, so an image whose probability
    # equals the threshold chosen on it could change sides between the training report and the views.
    return torch.softmax(logits / temperature, dim=1)[:, 1].double().numpy()


# ---------------------------------------------------------------- checkpoints

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


def _save_resume_state(path: Path, state: dict) -> None:
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


# ---------------------------------------------------------------- run directory

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


# ---------------------------------------------------------------- training

class _Progress:
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


def train(config: TrainConfig | None = None, run_dir: Path | None = None, resume: bool = False,
          show_progress: bool = False, launched: bool = False) -> Path:
    """Train (or resume) a run and return its directory. Errors are recorded in status.json
    ('failed' with the message) and re-raised; a STOP request ends the run as 'stopped'. `launched`: started
    by the dashboard's launcher (recorded as such in environment.json)."""
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
            if runs.stop_requested(run_dir):
                raise StopRequested()
            _train(config, run_dir, resume, show_progress, launched)
    except StopRequested:
        runs.log(run_dir, "Stopped on request; resume continues from the saved checkpoint.")
        runs.write_status(run_dir, state="stopped")
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


def _train(config: TrainConfig, run_dir: Path, resume: bool, show_progress: bool, launched: bool = False) -> None:
    started = time.time()
    device = select_device(config.device)
    bf16 = uses_bf16(device, config.precision)
    record_command(run_dir, config, launched, environment_info(device, bf16))
    runs.write_status(run_dir, state="running", pid=os.getpid(), started=started, phase="preparing data",
                      device=str(device))
    resuming = resume and (run_dir / "last.pt").exists()
    runs.log(run_dir, f"{'Resuming' if resuming else 'Starting'} on {device} (bf16 autocast: {bf16}); "
                      f"data {config.data}")

    # The terminal's line (stderr) when shown; the status file gets the same words for the Train page.
    timing = DecodeProgress() if show_progress else DecodeProgress(stream=io.StringIO())

    def decode_progress(done: int, total: int) -> None:
        timing(done, total)
        runs.write_status(run_dir, phase=timing.line(done, total))

    data = prepare_data(config, progress=decode_progress)
    data.split_table.to_csv(run_dir / "split.csv", index=False)
    (run_dir / "data_report.json").write_text(json.dumps(data.report, indent=2))
    counts = data.report["counts"]
    runs.log(run_dir, f"Images per split and class: {counts}; decoded now {data.report['decoded_now']}, "
                      f"from cache {data.report['from_cache']}; skipped {len(data.report['skipped'])}")
    for item in data.report["skipped"]:
        runs.log(run_dir, f"Skipped unreadable file {item['path']}: {item['reason']}")

    torch.manual_seed(config.seed)
    model = build_model(config.arch, config.pretrained, config.weights_file, config.dropout)
    params = apply_strategy(model, config.strategy)
    model.to(device).to(memory_format=torch.channels_last)
    trainable, total = count_parameters(model)
    runs.log(run_dir, f"{config.arch} ({'ImageNet' if config.pretrained and config.arch != 'smallcnn' else 'random'}"
                      f" init), strategy {config.strategy}: {trainable:,} of {total:,} parameters train")
    mean, std = normalization(config.arch)
    classes = data.index.classes

    train_labels = data.splits["train"].labels
    class_counts = torch.bincount(train_labels, minlength=2).float()
    if (class_counts == 0).any():
        raise ValueError(f"The training split has no images of class "
                         f"{classes[int((class_counts == 0).nonzero()[0])]}.")
    weights = (class_counts.sum() / (2 * class_counts)) if config.class_weights == "inverse" else torch.ones(2)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights.to(device))

    frozen = config.strategy == "frozen"
    if frozen:
        # The backbone cannot change: compute its features once and train the head on them.
        runs.write_status(run_dir, phase="computing backbone features")
        t0 = time.time()
        inputs = {s: compute_logits(model, data.splits[s].images, device, mean, std, bf16,
                                    features_only=True) for s in ("train", "val")}
        runs.log(run_dir, f"Backbone features for {sum(len(v) for v in inputs.values())} images in "
                          f"{time.time() - t0:.1f}s")
        net: torch.nn.Module = model.head
    else:
        inputs = {s: data.splits[s].images for s in ("train", "val")}
        net = model

    n_train = len(train_labels)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs

    opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    elif config.schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=1)
    else:
        scheduler = None
    aug = AugmentParams(config.aug_flip, config.aug_rotation, config.aug_scale, config.aug_shift,
                        config.aug_brightness, config.aug_contrast) if config.augment and not frozen else None
    aug_gen = torch.Generator().manual_seed(config.seed + 1)

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_auc": -1.0, "best_epoch": 0,
             "stale_epochs": 0, "elapsed": 0.0, "loss_sum": 0.0, "correct": 0, "seen": 0}
    last_path, best_path = run_dir / "last.pt", run_dir / "best.safetensors"
    if resuming:
        saved = load_resume_state(last_path)
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            if scheduler is not None and saved.get("scheduler"):
                scheduler.load_state_dict(saved["scheduler"])
            aug_gen.set_state(saved["aug_rng"])
            torch.set_rng_state(saved["torch_rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{last_path} does not fit this run's model or optimizer ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}). Delete it to restart the run from epoch 0.") from None
        state.update({k: v for k, v in saved["progress"].items() if k in state and type(v) is type(state[k])})
        runs.log(run_dir, f"Resumed after epoch {state['epoch']}, step {state['step_in_epoch']}")

    def save_last() -> None:
        _save_resume_state(last_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "aug_rng": aug_gen.get_state(), "torch_rng": torch.get_rng_state(),
            "progress": {**state, "elapsed": state["elapsed"] + time.time() - session_start},
        })

    session_start = time.time()
    bar = _Progress(show_progress, total_steps, state["global_step"], "training")
    runs.write_status(run_dir, state="running", phase="training", epochs=config.epochs,
                      steps_per_epoch=steps_per_epoch, epoch=state["epoch"],
                      best_val_auc=state["best_auc"] if state["best_auc"] >= 0 else None)
    try:
        while state["epoch"] < config.epochs:
            epoch = state["epoch"]
            perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
            if frozen:
                model.head.train()
            else:
                set_train_mode(model, config.strategy)
            epoch_start, epoch_images = time.time(), 0
            seen_probs: list[torch.Tensor] = []  # for the train AUC (of this session's part of the epoch)
            seen_labels: list[torch.Tensor] = []
            with BatchPrefetcher(inputs["train"], perm, config.batch_size, state["step_in_epoch"],
                                 steps_per_epoch) as batches:
                for step, idx, batch in batches:
                    if runs.stop_requested(run_dir):
                        state["step_in_epoch"] = step
                        save_last()
                        raise StopRequested()
                    t_step = time.time()
                    y = train_labels[idx].to(device, non_blocking=True)
                    if frozen:
                        x = batch.to(device)
                    else:
                        x = _to_input(batch, device, mean, std, aug, aug_gen)
                    with autocast(device, bf16):
                        logits = net(x)
                    loss = loss_fn(logits.float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                        scheduler.step()
                    loss_value = float(loss.detach())
                    seen_probs.append(torch.softmax(logits.detach().float(), 1)[:, 1].cpu())
                    seen_labels.append(y.cpu())
                    correct = int((logits.argmax(1) == y).sum())
                    state["loss_sum"] += loss_value * len(idx)
                    state["correct"] += correct
                    state["seen"] += len(idx)
                    state["global_step"] += 1
                    state["step_in_epoch"] = step + 1
                    epoch_images += len(idx)
                    ips = len(idx) / max(time.time() - t_step, 1e-9)
                    lr = optimizer.param_groups[0]["lr"]
                    runs.append_metrics(run_dir, {
                        "kind": "step", "epoch": epoch + 1, "step": step + 1, "global_step": state["global_step"],
                        "loss": loss_value, "accuracy": correct / len(idx), "lr": lr, "images_per_s": ips,
                        "time": time.time()})
                    bar.update(epoch=epoch + 1, loss=f"{loss_value:.3f}")
                    if step % 5 == 0 or step + 1 == steps_per_epoch:
                        # This epoch's mean so far: one step's figure jumps, and the last batch is often tiny.
                        runs.write_status(run_dir, epoch=epoch + 1, step=step + 1, global_step=state["global_step"],
                                          total_steps=total_steps,
                                          images_per_s=epoch_images / max(time.time() - epoch_start, 1e-9),
                                          elapsed=state["elapsed"] + time.time() - session_start)
            train_seconds = time.time() - epoch_start

            # Validation.
            if frozen:
                with torch.no_grad():
                    val_logits = model.head.eval()(inputs["val"].to(device)).float().cpu()
            else:
                val_logits = compute_logits(model, inputs["val"], device, mean, std, bf16)
            val_labels = data.splits["val"].labels
            val_loss = float(F.cross_entropy(val_logits, val_labels, weight=weights))
            val_prob = positive_probs(val_logits)
            val_auc = safe_auc(val_labels.numpy(), val_prob)
            val_acc = float((val_logits.argmax(1) == val_labels).float().mean())
            score = val_auc if math.isfinite(val_auc) else -val_loss
            improved = score > state["best_auc"]
            if improved:
                state["best_auc"], state["best_epoch"], state["stale_epochs"] = score, epoch + 1, 0
                save_weights(model, best_path, checkpoint_metadata(config, classes, epoch=epoch + 1))
            else:
                state["stale_epochs"] += 1
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(score)
            elapsed = state["elapsed"] + time.time() - session_start
            record = {
                "kind": "epoch", "epoch": epoch + 1, "global_step": state["global_step"],
                "train_loss": state["loss_sum"] / max(state["seen"], 1),
                "train_accuracy": state["correct"] / max(state["seen"], 1),
                "train_auc": safe_auc(torch.cat(seen_labels).numpy(), torch.cat(seen_probs).numpy())
                if seen_labels else float("nan"),
                "val_loss": val_loss, "val_accuracy": val_acc, "val_auc": val_auc,
                "lr": optimizer.param_groups[0]["lr"], "images_per_s": epoch_images / max(train_seconds, 1e-9),
                "epoch_seconds": train_seconds, "elapsed": elapsed, "best": improved, "time": time.time()}
            runs.append_metrics(run_dir, record)
            runs.log(run_dir, f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.4f} "
                              f"acc {record['train_accuracy']:.3f} | val loss {val_loss:.4f} acc {val_acc:.3f} "
                              f"AUC {val_auc:.4f}{' (best)' if improved else ''} | "
                              f"{record['images_per_s']:.0f} img/s, {train_seconds:.1f}s")
            state.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, correct=0, seen=0)
            save_last()
            runs.write_status(run_dir, epoch=epoch + 1, best_val_auc=state["best_auc"],
                              best_epoch=state["best_epoch"], elapsed=elapsed)
            if config.patience and state["stale_epochs"] >= config.patience:
                runs.log(run_dir, f"Early stopping: no better validation AUC for {config.patience} epochs")
                break
    finally:
        bar.close()

    runs.write_status(run_dir, phase="final evaluation")
    report = finalize_run(run_dir, config, model, data, device, bf16)
    runs.write_status(run_dir, state="finished", phase="done", finished=time.time(),
                      elapsed=state["elapsed"] + time.time() - session_start)
    test = report.get("test") or {}
    nan = float("nan")
    runs.log(run_dir, f"Finished. Threshold {report['threshold']:.3f} chosen on validation (Youden). "
                      f"Test AUC {test.get('auc', nan):.4f}, sensitivity {test.get('sensitivity', nan):.3f}, "
                      f"specificity {test.get('specificity', nan):.3f}")


def load_weights_into(model: Classifier, path: Path) -> dict[str, str]:
    """Load a best.safetensors into `model`; returns its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    model.load_state_dict(load_file(str(path)))
    return metadata


def fit_run_ood(run_dir: Path, config: TrainConfig, model: Classifier, data: PreparedData,
                val_features: np.ndarray, device: torch.device, bf16: bool) -> OodDetector | None:
    """Fit the out-of-distribution score on the training features and save it as ood.safetensors. A failure
    is logged and leaves the run without a score (prediction says so), never fails the run."""
    mean, std = normalization(config.arch)
    try:
        # float32 features only: the training logits are not needed
        train_features = compute_logits(model, data.splits["train"].images, device, mean, std, False,
                                        features_only=True).numpy()
        detector = fit_detector(train_features, data.splits["train"].labels.numpy(), val_features,
                                seed=config.seed)
        save_detector(detector, run_dir / OOD_FILE, {"fitted_by": "training", "arch": config.arch})
    except (ValueError, np.linalg.LinAlgError) as e:
        runs.log(run_dir, f"No out-of-distribution score: {e}")
        return None
    runs.log(run_dir, f"Out-of-distribution score fitted on {detector.info['n_train']} training images; threshold "
                      f"{detector.threshold:.2f} passes {1 - detector.info['val_flagged']:.1%} of validation")
    return detector


def finalize_run(run_dir: Path, config: TrainConfig, model: Classifier, data: PreparedData,
                 device: torch.device, bf16: bool) -> dict:
    """Best weights -> calibrated val/test predictions, threshold chosen on validation, report."""
    best_path = run_dir / "best.safetensors"
    meta = load_weights_into(model, best_path)
    model.to(device)
    mean, std = normalization(config.arch)
    features, logits = {}, {}
    for s in EVAL_SPLITS:
        features[s], logits[s] = features_and_logits(model, data.splits[s].images, device, mean, std, bf16)
    temperature, refused = fit_temperature_checked(logits["val"], data.splits["val"].labels)
    report: dict = {"best_epoch": int(meta.get("epoch", 0)), "temperature": temperature,
                    "temperature_fit": {"fitted": refused is None, "note": refused, "on": "val"},
                    "threshold_rule": "youden on validation"}
    probs = {s: positive_probs(logits[s], temperature) for s in EVAL_SPLITS}
    raw_probs = {s: positive_probs(logits[s]) for s in EVAL_SPLITS}
    val_labels = data.splits["val"].labels.numpy()
    threshold = choose_threshold(val_labels, probs["val"], "youden")
    detector = fit_run_ood(run_dir, config, model, data, features["val"], device, bf16)
    report["ood"] = {"fitted": detector is not None, **(detector.info if detector is not None else {})}
    report["threshold"] = threshold
    for s in EVAL_SPLITS:
        table = data.splits[s].table
        if len(table) == 0:
            continue
        out = table[["path", "patient", "label", "class_name"]
                    + [c for c in METADATA_FIELDS if c in table.columns]].copy()
        out["prob"] = probs[s]
        out["prob_uncalibrated"] = raw_probs[s]
        if detector is not None:  # the feature score only: the image gate reads files, which training does not
            out["ood_score"] = detector.scores(features[s])
            out["ood_flag"] = out["ood_score"] > detector.threshold
        out.to_csv(run_dir / f"predictions_{s}.csv", index=False)
        report[s] = metrics_at_threshold(table["label"].to_numpy(), probs[s], threshold)
    save_weights(model, best_path, checkpoint_metadata(config, data.index.classes, temperature, threshold,
                                                       epoch=report["best_epoch"]))
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report
