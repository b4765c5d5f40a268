"""Prediction from a finished run: load the best checkpoint safely (metadata checked, the run's operating
threshold), score images, Grad-CAM overlays."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from . import cam, runs
from .cam import CamResult
from .config import ARCHITECTURES
from .dataset import NOT_AN_IMAGE, load_grayscale
from .model import Classifier, build_model
from .ood import OOD_FILE, OodDetector, folder_shift, gate_from_image, read_run_detector, verdict

# Uploads and CLI inputs larger than this are refused before decoding.
MAX_UPLOAD_BYTES = 25 * 1024 * 1024


@dataclass
class LoadedModel:
    model: Classifier
    arch: str
    classes: list[str]
    image_size: int
    mean: float
    std: float
    temperature: float
    threshold: float  # the run's operating threshold (runs.operating_point)
    device: torch.device
    ood: OodDetector | None = None  # the run's out-of-distribution score (None: not fitted, or damaged)
    ood_error: str | None = None  # why there is no score, when its file is damaged


IMAGE_SIZE_RANGE = (16, 4096)  # what a checkpoint may declare; outside it the metadata is damaged
ACCEPTED_FORMATS = "JPEG, PNG, BMP or TIFF"  # what training reads (dataset.IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class CheckpointMetadata:
    """What prediction needs from best.safetensors' metadata, checked."""

    arch: str
    classes: list[str]  # [negative, positive]
    image_size: int
    mean: float
    std: float
    temperature: float
    dropout: float


def _finite(meta: dict[str, str], key: str, default: float | None = None) -> float:
    raw = meta.get(key)
    if raw is None:
        if default is None:
            raise ValueError(f"the metadata lacks '{key}'")
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"'{key}' is not a number ({raw!r})") from None
    if not math.isfinite(value):
        raise ValueError(f"'{key}' is not finite ({raw!r})")
    return value


def checkpoint_metadata(meta: dict[str, str]) -> CheckpointMetadata:
    """Validate a checkpoint's metadata (strings, as safetensors stores them); ValueError says what is wrong.
    Checked because every probability and decision depends on it: a wrong size, normalisation or
    temperature gives confident nonsense rather than an error."""
    arch = meta.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} (expected one of {', '.join(ARCHITECTURES)})")
    try:
        classes = json.loads(meta.get("classes", ""))
    except ValueError:
        raise ValueError(f"'classes' is not a JSON list ({meta.get('classes')!r})") from None
    if not (isinstance(classes, list) and len(classes) == 2 and all(isinstance(c, str) and c for c in classes)
            and classes[0] != classes[1]):
        raise ValueError(f"'classes' must name exactly two different classes, not {classes!r}")
    size = _finite(meta, "image_size")
    low, high = IMAGE_SIZE_RANGE
    if size != int(size) or not low <= size <= high:
        raise ValueError(f"'image_size' must be a whole number of pixels between {low} and {high}, not "
                         f"{meta['image_size']}")
    std, temperature = _finite(meta, "std"), _finite(meta, "temperature", 1.0)
    if std <= 0:
        raise ValueError(f"'std' must be positive, not {meta['std']}")
    if temperature <= 0:
        raise ValueError(f"'temperature' must be positive, not {meta['temperature']}")
    # The training-time threshold is superseded by runs.operating_point, but a checkpoint carrying an
    # impossible one was not written by the trainer.
    threshold = _finite(meta, "threshold", 0.5)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"'threshold' must lie in [0, 1], not {meta['threshold']}")
    dropout = _finite(meta, "dropout", 0.0)
    return CheckpointMetadata(arch, classes, int(size), _finite(meta, "mean"), std, temperature, dropout)


def load_run_model(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the architecture from the checkpoint's metadata and load best.safetensors (no pickle), with the
    run's operating threshold. ValueError when the checkpoint, its metadata or threshold.json is unusable."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(run_dir) / "best.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"No best.safetensors in {run_dir}: the run has not finished an epoch yet.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a usable checkpoint: {type(e).__name__}: {e}") from e
    try:
        info = checkpoint_metadata(meta)
    except ValueError as e:
        raise ValueError(f"{path} has damaged metadata: {e}.") from None
    # Before the weights: a damaged threshold.json is refused with its own message, never replaced.
    threshold = runs.operating_point(Path(run_dir)).threshold
    model = build_model(info.arch, pretrained=False, dropout=info.dropout)
    try:
        state = load_file(str(path))
    except (SafetensorError, RuntimeError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a usable checkpoint: {type(e).__name__}: {e}") from None
    _check_state_dict(path, info.arch, model.state_dict(), state)
    model.load_state_dict(state)
    try:
        ood, ood_error = read_run_detector(run_dir), None
        if ood is not None and ood.dim != model.feature_dim:
            ood, ood_error = None, f"{Path(run_dir) / OOD_FILE} does not fit this model's features: fit it again " \
                                   "with python -m core fit-ood RUN."
    except ValueError as e:
        ood, ood_error = None, str(e)
    device = torch.device(device)
    model.to(device).eval()
    return LoadedModel(model, info.arch, info.classes, info.image_size, info.mean, info.std, info.temperature,
                       threshold, device, ood, ood_error)


def _check_state_dict(path: Path, arch: str, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """One line when the weights do not belong to the declared architecture (PyTorch's own message lists every
    tensor: thousands of characters)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[0]})" if shapes else ""]
        raise ValueError(f"{path} does not hold {arch} weights as its metadata says: "
                         f"{', '.join(p for p in parts if p)}.")
    bad = [k for k, v in found.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path} holds NaN or infinite weights ({len(bad)} tensors, e.g. {bad[0]}): the run cannot "
                         "predict; train it again.")


def read_image(source: str | Path | bytes | BinaryIO, size: int, inspect=None) -> np.ndarray:
    """Validated decode for user-supplied files: size limit, then the training preprocessing (`inspect`: see
    dataset.load_grayscale)."""
    source = read_upload(source)
    try:
        return load_grayscale(source, size, inspect)
    except ValueError as e:
        reason = "" if str(e) == NOT_AN_IMAGE else f" ({e})"
        raise ValueError(f"Not a readable image: {ACCEPTED_FORMATS} expected{reason}.") from None


def _input_tensor(loaded: LoadedModel, pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels).float().div_(255.0)[None, None]
    return ((x - loaded.mean) / loaded.std).to(loaded.device)


def predict_pixels(loaded: LoadedModel, pixels: np.ndarray, gate: str | None = None,
                   keep_features: bool = False) -> dict:
    """Calibrated probability of the positive class, the decision at the run's threshold, and whether that
    decision applies: "ood" says whether the image is unlike the training data (the gate's reason, given by the
    caller from the file, or the feature score above its threshold). A flagged image keeps its probability and
    decision, marked "applicable": False."""
    with cam.MODEL_LOCK, torch.inference_mode():
        features = loaded.model.backbone(_input_tensor(loaded, pixels))
        logits = loaded.model.head(features).float().cpu()
    prob = float(torch.softmax(logits / loaded.temperature, dim=1)[0, 1])
    positive = prob >= loaded.threshold
    ood = verdict(loaded.ood, features.float().cpu().numpy(), gate)
    result = {"prob": prob, "predicted": loaded.classes[1] if positive else loaded.classes[0],
              "threshold": loaded.threshold, "positive_class": loaded.classes[1], "applicable": not ood.flagged,
              "ood": ood.as_dict()}
    if keep_features:  # for a folder test over several images; not JSON
        result["features"] = features.float().cpu().numpy()[0]
    return result


def read_upload(source: str | Path | bytes | BinaryIO) -> bytes:
    """The file's bytes, refusing what is larger than MAX_UPLOAD_BYTES or not a regular file."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.is_file():
            raise ValueError(f"Not a file: {p}")
        if p.stat().st_size > MAX_UPLOAD_BYTES:
            raise ValueError(f"{p.name} is larger than {MAX_UPLOAD_BYTES // 2**20} MB.")
        source = p.read_bytes()
    elif not isinstance(source, bytes):
        source = source.read(MAX_UPLOAD_BYTES + 1)
    if len(source) > MAX_UPLOAD_BYTES:
        raise ValueError(f"The file is larger than {MAX_UPLOAD_BYTES // 2**20} MB.")
    return source


def predict_image(loaded: LoadedModel, source: str | Path | bytes | BinaryIO, keep_features: bool = False) -> dict:
    """predict_pixels for one file, with the image gate run on the file itself (colour, aspect ratio)."""
    gate: list[str | None] = []
    # One decode serves both: the gate looks at the decoded file before it is turned gray and resized.
    pixels = read_image(source, loaded.image_size, lambda img, size: gate.append(gate_from_image(img, size)))
    return predict_pixels(loaded, pixels, gate[0] if gate else None, keep_features)


def predict_files(loaded: LoadedModel, sources: list[str | Path], keep_features: bool = False) -> list[dict]:
    """One result per file; unreadable files get an 'error' instead of stopping the batch."""
    out = []
    for src in sources:
        try:
            result = predict_image(loaded, src, keep_features)
        except ValueError as e:
            out.append({"file": str(src), "error": str(e)})
            continue
        out.append({"file": str(src), **result})
    return out


def batch_shift(loaded: LoadedModel, results: list[dict]) -> dict | None:
    """The folder verdict (flagged share, two-sample test) over predictions made with keep_features=True; None
    for fewer than two readable images."""
    done = [r for r in results if "error" not in r and "features" in r]
    if len(done) < 2:
        return None
    features = np.stack([r["features"] for r in done])
    flags = np.array([r["ood"]["flagged"] for r in done])
    return folder_shift(loaded.ood, features, flags, gated=sum(bool(r["ood"]["gate"]) for r in done))


def gradcam(loaded: LoadedModel, pixels: np.ndarray, target_class: int = 1) -> CamResult:
    """Grad-CAM of `target_class` (default the positive class) for preprocessed `pixels`; see core.cam."""
    return cam.gradcam(loaded.model, _input_tensor(loaded, pixels), target_class)


@dataclass(frozen=True)
class CamView:
    image: np.ndarray  # the file at display width, grayscale uint8, its own aspect ratio
    overlay: np.ndarray  # the same with the map on top, RGB uint8
    cam: CamResult  # the map at the model's input size, with its layer and resolution

    def caption(self, positive_class: str, subject: str = "") -> str:
        return cam.cam_caption(self.cam, positive_class, subject)


def gradcam_display(loaded: LoadedModel, source: str | Path | bytes, width: int = 320,
                    colour_map: str = cam.DEFAULT_COLOUR_MAP, alpha: float = cam.DEFAULT_ALPHA) -> CamView:
    """The file and its Grad-CAM overlay at display `width` with the file's own aspect ratio: the map is
    computed on the model's square input and stretched back. Raises ValueError for unreadable files."""
    import cv2

    pixels = read_image(source, loaded.image_size)
    result = gradcam(loaded, pixels)
    full = load_grayscale(source if not isinstance(source, Path) else str(source))
    height = max(1, round(full.shape[0] * width / full.shape[1]))
    shown = cv2.resize(full, (width, height), interpolation=cv2.INTER_AREA)
    heat = cv2.resize(result.heat, (width, height), interpolation=cv2.INTER_LINEAR)
    return CamView(shown, cam.overlay(shown, heat, colour_map, alpha), result)
