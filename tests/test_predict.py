"""core.predict: Grad-CAM points at the evidence for a class (on a model whose evidence is known), the
display keeps the file's aspect ratio, checkpoint metadata is validated, the operating threshold applies,
and read_image accepts what training accepts."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from core import runs
from core.model import Classifier, build_model
from core.predict import (
    CamView,
    LoadedModel,
    checkpoint_metadata,
    gradcam,
    gradcam_display,
    load_run_model,
    predict_pixels,
    read_image,
)


def brightness_model() -> LoadedModel:
    """A classifier whose PNEUMONIA logit grows with image brightness: its evidence is the bright pixels."""
    backbone = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())
    model = Classifier(backbone, feature_dim=1, cam_layers=["0"], partial=["0"])
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

    result = gradcam(loaded, pixels, target_class=1)
    heat = result.heat
    assert heat.shape == (64, 64) and heat.min() >= 0 and heat.max() == 1
    assert (result.layer.name, result.layer.rows, result.layer.cols) == ("backbone.0", 32, 32)
    row, col = np.unravel_index(heat.argmax(), heat.shape)
    assert 40 <= row < 52 and 8 <= col < 20
    assert heat[:24, 40:].max() < 0.2  # far from the bright patch

    assert not gradcam(loaded, pixels, target_class=0).found  # brightness is no evidence for NORMAL


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def test_gradcam_display_keeps_the_aspect_ratio_and_says_whether_it_found_evidence():
    wide = np.full((100, 200), 10, np.uint8)
    wide[40:60, 20:50] = 250
    view = gradcam_display(brightness_model(), png_bytes(wide), width=320)
    assert isinstance(view, CamView)
    assert view.image.shape == (160, 320) and view.overlay.shape == (160, 320, 3) and view.cam.found
    assert view.caption("PNEUMONIA") == "Grad-CAM, 32×32 map from backbone.0: evidence for PNEUMONIA"

    empty = gradcam_display(brightness_model(), png_bytes(np.zeros((100, 200), np.uint8)), width=320)
    assert not empty.cam.found and "no evidence for the positive class" in empty.caption("PNEUMONIA")


def test_gradcam_display_takes_the_colour_map_and_opacity():
    pixels = np.full((64, 64), 10, np.uint8)
    pixels[20:40, 20:40] = 250
    data = png_bytes(pixels)
    jet = gradcam_display(brightness_model(), data, width=64, colour_map="jet", alpha=1.0)
    viridis = gradcam_display(brightness_model(), data, width=64, colour_map="viridis", alpha=1.0)
    row, col = np.unravel_index(jet.cam.heat.argmax(), jet.cam.heat.shape)
    assert jet.overlay[row, col, 0] > 100 and jet.overlay[row, col, 1:].max() < 50  # JET's hot end is red
    assert viridis.overlay[row, col, 1] > 200 and viridis.overlay[row, col, 2] < 80  # viridis' is yellow
    plain = gradcam_display(brightness_model(), data, width=64, alpha=0.0)
    assert np.array_equal(plain.overlay, np.dstack([plain.image] * 3))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF"])
def test_read_image_accepts_what_training_accepts(fmt):
    pixels = read_image(png_bytes(np.full((30, 50), 120, np.uint8), fmt), 32)
    assert pixels.shape == (32, 32) and pixels.dtype == np.uint8


def test_read_image_names_the_accepted_formats():
    with pytest.raises(ValueError, match="Not a readable image: JPEG, PNG, BMP or TIFF expected"):
        read_image(b"plain text, not pixels" * 4, 32)


# ---------------------------------------------------------------- checkpoints

GOOD_METADATA = {"arch": "smallcnn", "classes": json.dumps(["NORMAL", "PNEUMONIA"]), "image_size": "64",
                 "mean": "0.5", "std": "0.25", "temperature": "1.5", "threshold": "0.4", "dropout": "0.0"}


@pytest.fixture(scope="module")
def smallcnn_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in build_model("smallcnn").state_dict().items()}


def write_run(run_dir, state, **metadata) -> None:
    run_dir.mkdir(exist_ok=True)
    save_file(state, str(run_dir / "best.safetensors"), metadata={**GOOD_METADATA, **metadata})


def test_checkpoint_metadata_is_read_and_typed():
    info = checkpoint_metadata(GOOD_METADATA)
    assert (info.arch, info.classes, info.image_size, info.std, info.temperature) == \
        ("smallcnn", ["NORMAL", "PNEUMONIA"], 64, 0.25, 1.5)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("image_size", "8", "between 16 and 4096"), ("image_size", "5000", "between 16 and 4096"),
    ("image_size", "64.5", "whole number"), ("image_size", "big", "not a number"),
    ("classes", json.dumps(["PNEUMONIA"]), "exactly two"), ("classes", json.dumps(["A", "B", "C"]), "exactly two"),
    ("classes", json.dumps(["A", "A"]), "exactly two different"), ("classes", "NORMAL,PNEUMONIA", "JSON"),
    ("std", "0", "'std' must be positive"), ("std", "-0.2", "positive"), ("std", "nan", "not finite"),
    ("temperature", "0", "'temperature' must be positive"), ("temperature", "inf", "not finite"),
    ("threshold", "1.5", r"\[0, 1\]"), ("threshold", "nan", "not finite"), ("mean", "inf", "not finite"),
    ("arch", "vgg16", "unknown architecture"),
])
def test_damaged_metadata_is_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        checkpoint_metadata({**GOOD_METADATA, key: value})


def test_missing_metadata_is_refused():
    with pytest.raises(ValueError, match="lacks 'std'"):
        checkpoint_metadata({k: v for k, v in GOOD_METADATA.items() if k != "std"})


def test_load_run_model_names_the_checkpoint_with_damaged_metadata(tmp_path, smallcnn_state):
    write_run(tmp_path / "run", smallcnn_state, temperature="-1")
    with pytest.raises(ValueError, match=r"best\.safetensors has damaged metadata: 'temperature' must be positive"):
        load_run_model(tmp_path / "run")


def test_load_run_model_uses_the_operating_threshold(tmp_path, smallcnn_state):
    run_dir = tmp_path / "run"
    write_run(run_dir, smallcnn_state)
    assert load_run_model(run_dir).threshold == 0.5  # no choice made yet: the default, not the checkpoint's
    (run_dir / "report.json").write_text(json.dumps({"threshold": 0.3}))
    assert load_run_model(run_dir).threshold == pytest.approx(0.3)
    runs.save_threshold(run_dir, 0.7, chosen_on="val", target="manual")
    loaded = load_run_model(run_dir)
    assert loaded.threshold == pytest.approx(0.7) and loaded.temperature == 1.5 and loaded.image_size == 64
    assert predict_pixels(loaded, np.zeros((64, 64), np.uint8))["threshold"] == pytest.approx(0.7)


def test_load_run_model_refuses_a_damaged_threshold_file(tmp_path, smallcnn_state):
    run_dir = tmp_path / "run"
    write_run(run_dir, smallcnn_state)
    (run_dir / "report.json").write_text(json.dumps({"threshold": 0.3}))
    (run_dir / "threshold.json").write_text('{"threshold": "high"}')
    with pytest.raises(ValueError, match=r"threshold\.json is damaged"):
        load_run_model(run_dir)
