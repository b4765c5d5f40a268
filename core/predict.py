"""Prediction from a finished run: load the best checkpoint safely, score images, Grad-CAM overlays."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from . import runs
from .dataset import NOT_AN_IMAGE, load_grayscale
from .model import Classifier, build_model

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
    threshold: float  # the run's operating threshold (user's choice, else chosen on validation)
    device: torch.device


def load_run_model(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the architecture from the checkpoint's metadata and load best.safetensors (no pickle)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(run_dir) / "best.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"No best.safetensors in {run_dir}: the run has not finished an epoch yet.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
        model = build_model(meta["arch"], pretrained=False, dropout=float(meta.get("dropout", 0)))
        model.load_state_dict(state)
    except (SafetensorError, KeyError, RuntimeError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a usable checkpoint: {type(e).__name__}: {e}") from e
    device = torch.device(device)
    model.to(device).eval()
    saved = runs.read_json(Path(run_dir) / "threshold.json", {}) or {}
    threshold = float(saved["threshold"]) if isinstance(saved.get("threshold"), (int, float)) \
        else float(meta.get("threshold", 0.5))
    return LoadedModel(model, meta["arch"], json.loads(meta["classes"]), int(meta["image_size"]),
                       float(meta["mean"]), float(meta["std"]), float(meta.get("temperature", 1.0)),
                       threshold, device)


def read_image(source: str | Path | bytes | BinaryIO, size: int) -> np.ndarray:
    """Validated decode for user-supplied files: size limit, then the training preprocessing."""
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
    try:
        return load_grayscale(source, size)
    except ValueError as e:
        reason = "" if str(e) == NOT_AN_IMAGE else f" ({e})"
        raise ValueError(f"Not a readable image: JPEG or PNG expected{reason}.") from None


def _input_tensor(loaded: LoadedModel, pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels).float().div_(255.0)[None, None]
    return ((x - loaded.mean) / loaded.std).to(loaded.device)


def predict_pixels(loaded: LoadedModel, pixels: np.ndarray) -> dict:
    """Calibrated probability of the positive class and the decision at the run's threshold."""
    with torch.inference_mode():
        logits = loaded.model(_input_tensor(loaded, pixels)).float().cpu()
    prob = float(torch.softmax(logits / loaded.temperature, dim=1)[0, 1])
    positive = prob >= loaded.threshold
    return {"prob": prob, "predicted": loaded.classes[1] if positive else loaded.classes[0],
            "threshold": loaded.threshold, "positive_class": loaded.classes[1]}


def predict_files(loaded: LoadedModel, sources: list[str | Path]) -> list[dict]:
    """One result per file; unreadable files get an 'error' instead of stopping the batch."""
    out = []
    for src in sources:
        try:
            out.append({"file": str(src), **predict_pixels(loaded, read_image(src, loaded.image_size))})
        except ValueError as e:
            out.append({"file": str(src), "error": str(e)})
    return out


def gradcam(loaded: LoadedModel, pixels: np.ndarray, target_class: int = 1) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) on the model's last convolutional block: a (S, S) map in [0, 1]
    of where evidence for `target_class` lies."""
    model, layer = loaded.model, loaded.model.cam_layer
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        output = output if isinstance(output, torch.Tensor) else output[0]
        store["act"] = output
        output.register_hook(lambda g: store.__setitem__("grad", g))

    handle = layer.register_forward_hook(hook)
    try:
        model.eval()
        x = _input_tensor(loaded, pixels).requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            model.zero_grad(set_to_none=True)
            logits[0, target_class].backward()
    finally:
        handle.remove()
    act, grad = store["act"].detach(), store["grad"].detach()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=pixels.shape, mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    peak = float(cam.max())
    return (cam / peak).cpu().numpy() if peak > 0 else cam.cpu().numpy()


def overlay(pixels: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """RGB uint8 image: the X-ray with the heat map in the JET colour map on top."""
    import cv2

    colour = cv2.applyColorMap(np.uint8(255 * np.clip(heatmap, 0, 1)), cv2.COLORMAP_JET)[..., ::-1]
    gray = np.repeat(pixels[..., None], 3, axis=2).astype(np.float32)
    return np.uint8(np.clip((1 - alpha) * gray + alpha * colour, 0, 255))


def gradcam_display(loaded: LoadedModel, source: str | Path | bytes,
                    width: int = 320) -> tuple[np.ndarray, np.ndarray, bool]:
    """(image, Grad-CAM overlay, whether the map found any evidence) at display `width` with the file's own
    aspect ratio: the map is computed on the model's square input and stretched back. Raises ValueError
    for unreadable files."""
    import cv2

    pixels = read_image(source, loaded.image_size)
    heat = gradcam(loaded, pixels)
    full = load_grayscale(source if not isinstance(source, Path) else str(source))
    height = max(1, round(full.shape[0] * width / full.shape[1]))
    shown = cv2.resize(full, (width, height), interpolation=cv2.INTER_AREA)
    return shown, overlay(shown, cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)), bool(heat.any())
