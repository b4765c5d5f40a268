"""core.predict: Grad-CAM points at the evidence for a class (on a model whose evidence is known)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import nn

from core.model import Classifier
from core.predict import LoadedModel, gradcam, gradcam_display, overlay


def brightness_model() -> LoadedModel:
    """A classifier whose PNEUMONIA logit grows with image brightness: its evidence is the bright pixels."""
    backbone = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())
    model = Classifier(backbone, feature_dim=1, cam_layer="0", partial=["0"])
    with torch.no_grad():
        backbone[0].weight.fill_(1 / 9)
        backbone[0].bias.zero_()
        model.head[1].weight.copy_(torch.tensor([[-1.0], [1.0]]))
        model.head[1].bias.zero_()
    return LoadedModel(model.eval(), "smallcnn", ["NORMAL", "PNEUMONIA"], 64, 0.0, 1.0, 1.0, 0.5,
                       torch.device("cpu"))


def test_gradcam_peaks_on_the_evidence_and_is_empty_without_any():
    pixels = np.full((64, 64), 10, np.uint8)
    pixels[40:52, 8:20] = 250
    loaded = brightness_model()

    heat = gradcam(loaded, pixels, target_class=1)
    assert heat.shape == (64, 64) and heat.min() >= 0 and heat.max() == 1
    row, col = np.unravel_index(heat.argmax(), heat.shape)
    assert 40 <= row < 52 and 8 <= col < 20
    assert heat[:24, 40:].max() < 0.2  # far from the bright patch

    assert not gradcam(loaded, pixels, target_class=0).any()  # brightness is no evidence for NORMAL


def test_overlay_is_rgb_at_the_image_size():
    pixels = np.zeros((30, 40), np.uint8)
    out = overlay(pixels, np.ones((30, 40)))
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    assert out[..., 0].mean() > out[..., 2].mean()  # the JET colour map's hot end is red


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_gradcam_display_keeps_the_aspect_ratio_and_says_whether_it_found_evidence():
    wide = np.full((100, 200), 10, np.uint8)
    wide[40:60, 20:50] = 250
    shown, heat_overlay, found = gradcam_display(brightness_model(), png_bytes(wide), width=320)
    assert shown.shape == (160, 320) and heat_overlay.shape == (160, 320, 3) and found

    _, _, found = gradcam_display(brightness_model(), png_bytes(np.zeros((100, 200), np.uint8)), width=320)
    assert not found
