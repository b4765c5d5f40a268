"""Export a run's model to ONNX: grayscale pixels in, the calibrated probability of the positive class out,
with what a deployment needs to use it (classes, image size, normalisation, temperature, threshold) in the
file's metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .predict import load_run_model

OPSET = 18


class CalibratedProbability(nn.Module):
    """(N, 1, S, S) pixels scaled to [0, 1] -> (N,) calibrated probability of the positive class, and the raw
    (N, 2) logits: normalisation, the model and temperature scaling in one graph."""

    def __init__(self, model: nn.Module, mean: float, std: float, temperature: float):
        super().__init__()
        self.model, self.mean, self.std, self.temperature = model, mean, std, temperature

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model((pixels - self.mean) / self.std)
        return torch.softmax(logits / self.temperature, dim=1)[:, 1], logits


def export_onnx(run_dir: str | Path, out: str | Path) -> dict:
    """Write the run's best model to `out` (.onnx); returns the metadata embedded in it. Raises ValueError
    for a run without a usable checkpoint, ImportError naming the package when onnx is missing."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript "
                          "(and onnxruntime to run the file).") from e
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder: give a file name such as model.onnx.")
    if not out.parent.is_dir():
        raise ValueError(f"The folder {out.parent} does not exist.")
    loaded = load_run_model(run_dir, "cpu")
    wrapper = CalibratedProbability(loaded.model.eval(), loaded.mean, loaded.std, loaded.temperature).eval()
    example = torch.rand(2, 1, loaded.image_size, loaded.image_size)
    metadata = {"classes": json.dumps(loaded.classes), "positive_class": loaded.classes[1],
                "image_size": str(loaded.image_size), "input": "grayscale pixels / 255, shape (N, 1, S, S), "
                "resized to S x S without keeping the aspect ratio", "mean": repr(loaded.mean),
                "std": repr(loaded.std), "temperature": repr(loaded.temperature),
                "threshold": repr(loaded.threshold), "arch": loaded.arch, "run": Path(run_dir).resolve().name}
    program = torch.onnx.export(wrapper, (example,), input_names=["pixels"],
                                output_names=["probability", "logits"], opset_version=OPSET,
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), dynamo=True)
    model = program.model_proto
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return metadata


def onnx_parity(run_dir: str | Path, onnx_path: str | Path, pixels: np.ndarray) -> float:
    """Largest absolute difference between the ONNX file's probabilities (onnxruntime, fp32) and PyTorch's
    for the same (N, S, S) uint8 pixels."""
    import onnxruntime

    loaded = load_run_model(run_dir, "cpu")
    x = torch.from_numpy(pixels).float().div(255.0)[:, None]
    with torch.inference_mode():
        reference = torch.softmax(loaded.model((x - loaded.mean) / loaded.std) / loaded.temperature, 1)[:, 1]
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (prob, _) = session.run(None, {"pixels": x.numpy()})
    return float(np.abs(prob - reference.numpy()).max())
