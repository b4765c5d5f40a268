"""core.cam: the Grad-CAM layer is the deepest one with a map of at least 8×8 at the model's input size,
for every architecture; colour maps and opacity of the overlay; captions that state layer and resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core import cam
from core.model import Classifier, build_model

# Each architecture at the input sizes users train it with: the `tiny` and `cpu` presets for the small
# CNN, 224 px for the ImageNet backbones.
TYPICAL_SIZES = [("smallcnn", 64), ("smallcnn", 128), ("resnet18", 224), ("densenet121", 224),
                 ("efficientnet_b0", 224)]


@pytest.fixture(scope="module")
def models() -> dict[str, Classifier]:
    torch.manual_seed(0)
    return {arch: build_model(arch, pretrained=False).eval() for arch in dict(TYPICAL_SIZES)}


@pytest.mark.parametrize(("arch", "size"), TYPICAL_SIZES)
def test_every_architecture_explains_with_at_least_an_8x8_map(models, arch, size):
    model = models[arch]
    result = cam.gradcam(model, torch.randn(1, 1, size, size))
    assert result.heat.shape == (size, size) and result.heat.dtype == np.float32
    assert 0 <= result.heat.min() and result.heat.max() <= 1
    assert min(result.layer.rows, result.layer.cols) >= cam.MIN_MAP_SIDE
    # The deepest such layer: the next candidate down is coarser than 8×8.
    sizes = cam.feature_map_sizes(model, (size, size))
    names = [f"backbone.{name}" for name, _, _ in sizes]
    chosen = names.index(result.layer.name)
    assert sizes[chosen][1:] == (result.layer.rows, result.layer.cols)
    assert all(min(rows, cols) < cam.MIN_MAP_SIDE for _, rows, cols in sizes[chosen + 1:])


def strided_model() -> Classifier:
    """Three stride-2 convolutions: maps of size/2, size/4 and size/8."""
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(backbone, feature_dim=4, cam_layers=["1", "3", "5"], partial=["4"]).eval()


@pytest.mark.parametrize(("size", "layer", "side"), [(64, "backbone.5", 8), (32, "backbone.3", 8),
                                                     (40, "backbone.3", 10), (8, "backbone.1", 4)])
def test_the_layer_is_chosen_from_the_measured_map_size(size, layer, side):
    chosen = cam.choose_cam_layer(strided_model(), (size, size))
    assert (chosen.name, chosen.rows, chosen.cols) == (layer, side, side)  # too small for 8×8: the finest


def test_frozen_weights_still_give_a_map():
    torch.manual_seed(0)
    model = strided_model()
    for p in model.parameters():
        p.requires_grad_(False)
    result = cam.gradcam(model, torch.rand(1, 1, 64, 64), target_class=int(model(torch.rand(1, 1, 64, 64)).argmax()))
    assert result.heat.shape == (64, 64)
    assert all(p.grad is None for p in model.parameters())


def test_viridis_is_the_default_and_its_ends_are_purple_and_yellow():
    assert cam.DEFAULT_COLOUR_MAP in ("viridis", "cividis")
    gray = np.full((4, 8), 128, np.uint8)
    heat = np.zeros((4, 8), np.float32)
    heat[:, 4:] = 1
    out = cam.overlay(gray, heat, alpha=1.0)
    cold, hot = out[0, 0].astype(int), out[0, 7].astype(int)
    assert cold[2] > cold[1] and cold[0] > cold[1]  # dark purple
    assert hot[0] > 200 and hot[1] > 200 and hot[2] < 80  # yellow


@pytest.mark.parametrize(("colour_map", "hot_channel"), [("jet", 0), ("cividis", 1), ("viridis", 1)])
def test_colour_maps_and_opacity(colour_map, hot_channel):
    gray = np.full((4, 4), 100, np.uint8)
    hot = cam.overlay(gray, np.ones((4, 4)), colour_map, alpha=1.0)
    assert hot.shape == (4, 4, 3) and hot.dtype == np.uint8
    assert hot[..., hot_channel].mean() > hot[..., 2].mean()  # red (JET) or yellow, never blue, at the peak
    assert np.array_equal(cam.overlay(gray, np.ones((4, 4)), colour_map, alpha=0.0), np.dstack([gray] * 3))
    half = cam.overlay(gray, np.ones((4, 4)), colour_map, alpha=0.5).astype(int)
    assert np.abs(half - (hot.astype(int) + 100) / 2).max() <= 1


def test_unknown_colour_map_or_opacity_is_refused():
    gray, heat = np.zeros((2, 2), np.uint8), np.zeros((2, 2))
    with pytest.raises(ValueError, match="colour map 'rainbow'"):
        cam.overlay(gray, heat, "rainbow")
    with pytest.raises(ValueError, match="opacity"):
        cam.overlay(gray, heat, alpha=1.5)


def test_caption_states_layer_resolution_and_an_empty_map():
    layer = cam.CamLayer("backbone.stages.2", 8, 8)
    found = cam.CamResult(np.eye(4, dtype=np.float32), layer)
    assert cam.cam_caption(found, "PNEUMONIA") == "Grad-CAM, 8×8 map from backbone.stages.2: evidence for PNEUMONIA"
    empty = cam.CamResult(np.zeros((4, 4), np.float32), layer)
    assert not empty.found
    text = cam.cam_caption(empty, "PNEUMONIA", subject="a.jpeg · true NORMAL · p=0.100")
    assert text.startswith("a.jpeg · true NORMAL · p=0.100 — Grad-CAM, 8×8 map from backbone.stages.2: ")
    assert "no evidence for the positive class (PNEUMONIA) found" in text
