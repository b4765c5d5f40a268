"""Grad-CAM explanations (Selvaraju et al. 2017) through the maintained `grad-cam` package: which layer
explains a prediction, at what map resolution, and overlays in a chosen colour map.

The last block of a CNN sees the most but its map is coarse: 4×4 for the small CNN at 128 px, 7×7 for
the ImageNet backbones at 224 px, one blob for a whole lung. The explanation therefore comes from the
deepest block whose feature map is at least MIN_MAP_SIDE on each side at the model's input size, found
by a forward pass (strides and padding differ by architecture, so the size is measured, not computed).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from .model import Classifier

MIN_MAP_SIDE = 8
# Colour maps an overlay can use: name -> (OpenCV colour map id, label for pickers). Viridis and cividis
# are perceptually uniform and readable with colour-vision deficiencies; JET is kept because readers of
# the Grad-CAM literature know it, but its rainbow invents edges and hides red/green differences.
COLOUR_MAPS: dict[str, tuple[int, str]] = {
    "viridis": (cv2.COLORMAP_VIRIDIS, "viridis (colour-blind safe)"),
    "cividis": (cv2.COLORMAP_CIVIDIS, "cividis (colour-blind safe)"),
    "jet": (cv2.COLORMAP_JET, "JET (rainbow, not colour-blind safe)"),
}
DEFAULT_COLOUR_MAP = "viridis"
DEFAULT_ALPHA = 0.4

# The dashboard caches one model per run and shares it between sessions (threads). Grad-CAM registers
# forward hooks on it; a forward pass from another thread while they are attached would be recorded
# as this image's activations. Everything that runs the model in a process that serves several users
# takes this lock.
MODEL_LOCK = threading.Lock()


@dataclass(frozen=True)
class CamLayer:
    name: str  # path inside the Classifier, e.g. "backbone.layer3"
    rows: int  # feature-map size at the input size it was chosen for
    cols: int


@dataclass(frozen=True)
class CamResult:
    heat: np.ndarray  # (H, W) float32 in [0, 1] at the model's input size; all zero when nothing was found
    layer: CamLayer

    @property
    def found(self) -> bool:
        """Whether the map holds any evidence for the target class (Grad-CAM keeps only positive evidence)."""
        return bool(self.heat.any())


# Per model, per input (H, W): the chosen layer. Weak keys: a model dropped from the dashboard's cache
# takes its entry with it.
_CHOSEN: weakref.WeakKeyDictionary[Classifier, dict[tuple[int, int], CamLayer]] = weakref.WeakKeyDictionary()


def feature_map_sizes(model: Classifier, input_hw: tuple[int, int]) -> list[tuple[str, int, int]]:
    """(name inside the backbone, rows, cols) of every Grad-CAM candidate for a single-channel input of
    `input_hw`, shallow to deep, measured by one forward pass of zeros."""
    sizes: dict[str, tuple[int, int]] = {}
    handles = []
    for name, module in model.cam_layers:
        def record(_module, _inputs, output, name=name):
            output = output if isinstance(output, torch.Tensor) else output[0]
            sizes[name] = (int(output.shape[-2]), int(output.shape[-1]))
        handles.append(module.register_forward_hook(record))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 1, *input_hw, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return [(name, *sizes[name]) for name, _ in model.cam_layers if name in sizes]


def choose_cam_layer(model: Classifier, input_hw: tuple[int, int]) -> CamLayer:
    """The deepest candidate whose map is at least MIN_MAP_SIDE × MIN_MAP_SIDE; the finest one when the
    input is too small for any to reach it."""
    per_model = _CHOSEN.setdefault(model, {})
    if input_hw not in per_model:
        sizes = feature_map_sizes(model, input_hw)
        if not sizes:
            raise ValueError("The model has no Grad-CAM candidate layer.")
        fine = [s for s in sizes if min(s[1], s[2]) >= MIN_MAP_SIDE]
        name, rows, cols = fine[-1] if fine else max(sizes, key=lambda s: s[1] * s[2])
        per_model[input_hw] = CamLayer(f"backbone.{name}", rows, cols)
    return per_model[input_hw]


def gradcam(model: Classifier, x: torch.Tensor, target_class: int = 1) -> CamResult:
    """Grad-CAM of logit `target_class` for one normalised input `x` of shape (1, 1, H, W): where in the
    image the evidence for that class lies, as an (H, W) map in [0, 1] (the peak is 1)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with MODEL_LOCK:
        layer = choose_cam_layer(model, (int(x.shape[-2]), int(x.shape[-1])))
        # An input that needs gradients lets them reach the layer even when the weights are frozen.
        x = x.detach().float().requires_grad_(True)
        explainer = GradCAM(model=model, target_layers=[model.get_submodule(layer.name)])
        try:  # not `with GradCAM(...)`: its __exit__ swallows an IndexError and only prints it
            # fp32 even under a caller's bf16 autocast: the map sums many small gradient × activation
            # products, which bf16's 8-bit mantissa would round coarsely.
            with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
                heat = explainer(input_tensor=x, targets=[ClassifierOutputTarget(target_class)])[0]
        finally:
            explainer.activations_and_grads.release()
            model.zero_grad(set_to_none=True)  # the backward pass filled weight gradients nobody reads
    heat = np.clip(np.nan_to_num(heat.astype(np.float32)), 0, None)
    peak = float(heat.max())
    # grad-cam scales by max + 1e-7; dividing by the peak again makes "the strongest evidence" exactly 1.
    return CamResult(heat / peak if peak > 0 else np.zeros_like(heat), layer)


def overlay(pixels: np.ndarray, heat: np.ndarray, colour_map: str = DEFAULT_COLOUR_MAP,
            alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """RGB uint8 image: the grayscale X-ray with `heat` (same shape, in [0, 1]) in `colour_map` on top at
    opacity `alpha` (0 shows the X-ray alone, 1 the map alone)."""
    if colour_map not in COLOUR_MAPS:
        raise ValueError(f"Unknown colour map '{colour_map}'; choose one of {', '.join(COLOUR_MAPS)}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"The overlay opacity is between 0 and 1, not {alpha}.")
    code = COLOUR_MAPS[colour_map][0]
    colour = cv2.applyColorMap(np.uint8(255 * np.clip(heat, 0, 1)), code)[..., ::-1]  # OpenCV gives BGR
    gray = np.repeat(pixels[..., None], 3, axis=2).astype(np.float32)
    return np.uint8(np.clip((1 - alpha) * gray + alpha * colour, 0, 255))


def cam_caption(cam: CamResult, positive_class: str, subject: str = "") -> str:
    """'Grad-CAM, 14×14 map from backbone.layer3: evidence for PNEUMONIA', prefixed with `subject` (the
    image the map belongs to) when given."""
    method = f"Grad-CAM, {cam.layer.rows}×{cam.layer.cols} map from {cam.layer.name}"
    if cam.found:
        text = f"{method}: evidence for {positive_class}"
    else:
        text = f"{method}: no evidence for the positive class ({positive_class}) found; the map is empty"
    return f"{subject} — {text}" if subject else text
