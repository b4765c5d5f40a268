"""Export a run's model to ONNX: grayscale pixels in, the calibrated probability of the positive class out,
with what a deployment needs to use it (classes, image size, normalisation, temperature, threshold) in the
file's metadata."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import runs
from .ood import OodDetector
from .predict import LoadedModel, load_run_model

OPSET = 18


class CalibratedProbability(nn.Module):
    """(N, 1, S, S) pixels scaled to [0, 1] -> (N,) calibrated probability of the positive class, the raw
    (N, 2) logits and, when the run has an out-of-distribution score, (N,) that score (Mahalanobis distance of the
    backbone features to the nearest training class mean; above the threshold in the metadata, the image is unlike
    the training data): normalisation, the model, temperature scaling and the score in one graph."""

    def __init__(self, model: nn.Module, mean: float, std: float, temperature: float,
                 detector: OodDetector | None = None):
        super().__init__()
        self.model, self.mean, self.std, self.temperature = model, mean, std, temperature
        self.with_ood = detector is not None
        if detector is not None:
            self.register_buffer("class_means", torch.from_numpy(detector.means).float())
            self.register_buffer("precision", torch.from_numpy(detector.precision).float())

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.model.backbone((pixels - self.mean) / self.std)
        logits = self.model.head(features)
        probability = torch.softmax(logits / self.temperature, dim=1)[:, 1]
        if not self.with_ood:
            return probability, logits
        diff = features[:, None, :] - self.class_means[None]  # (N, classes, d)
        squared = ((diff @ self.precision) * diff).sum(-1).amin(1)
        return probability, logits, squared.clamp_min(0).sqrt()


# The exported file must give PyTorch's probabilities: fp32 differences are about 1e-7; more than this (or NaN)
# means the graph computes something else, and the file is not written.
PARITY_TOLERANCE = 1e-3
PARITY_IMAGES = 4


def export_onnx(run_dir: str | Path, out: str | Path, force: bool = False) -> dict:
    """Write the run's best model to `out` (.onnx); returns the metadata embedded in it, plus
    "parity_max_abs_diff": the largest difference between the file's probabilities and PyTorch's on a few
    images. `out` is checked before any work (`runs.check_output_file`: never a folder, a device or a run's own
    file; an existing file, e.g. a previous model.onnx, is replaced only with `force`). The file is written to a
    temporary file beside `out` and moved onto it only when its parity check passes: a checkpoint with NaN or
    infinite weights, or a graph that disagrees with PyTorch, raises ValueError and writes nothing. ValueError
    also for a run without a usable checkpoint; ImportError naming the package when onnx or onnxruntime is
    missing."""
    try:
        import onnx
        import onnxruntime  # noqa: F401 - the parity check needs it: fail before any work
    except ImportError as e:
        raise ImportError("ONNX export needs the onnx, onnxscript and onnxruntime packages: pip install onnx "
                          "onnxscript onnxruntime.") from e
    out = runs.check_output_file(out, force, suffixes=(".onnx",))
    loaded = load_run_model(run_dir, "cpu")
    # Weights holding NaN or infinite values are refused by load_run_model; the parity check below is the net.
    wrapper = CalibratedProbability(loaded.model.eval(), loaded.mean, loaded.std, loaded.temperature,
                                    loaded.ood).eval()
    example = torch.rand(2, 1, loaded.image_size, loaded.image_size)
    metadata = {"classes": json.dumps(loaded.classes), "positive_class": loaded.classes[1],
                "image_size": str(loaded.image_size), "input": "grayscale pixels / 255, shape (N, 1, S, S), "
                "resized to S x S without keeping the aspect ratio", "mean": repr(loaded.mean),
                "std": repr(loaded.std), "temperature": repr(loaded.temperature),
                "threshold": repr(loaded.threshold), "arch": loaded.arch, "run": Path(run_dir).resolve().name}
    if loaded.ood is not None:
        metadata.update(ood_threshold=repr(loaded.ood.threshold), ood_score=(
            "output 'ood_score': Mahalanobis distance of the model's features to the nearest training class mean; "
            "above ood_threshold (which 95% of validation images pass) the image is unlike the training data and "
            "the probability does not apply. The image checks on the original file (colour, blank, mostly white, "
            "elongated) are not in the graph."))
    else:
        metadata["ood_score"] = f"none: the run has no out-of-distribution score ({loaded.ood_error or 'not fitted'}" \
                                "; python -m core fit-ood RUN, then export again)"
    outputs = ["probability", "logits"] + (["ood_score"] if loaded.ood is not None else [])
    with warnings.catch_warnings():  # the exporter's own deprecation notices say nothing to the user
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(wrapper, (example,), input_names=["pixels"],
                                    output_names=outputs, opset_version=OPSET,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), dynamo=True)
    model = program.model_proto
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    pixels = np.random.default_rng(0).integers(0, 256, (PARITY_IMAGES, loaded.image_size, loaded.image_size),
                                               dtype=np.uint8)
    parity: list[float] = []

    def write_checked(tmp: Path) -> None:
        onnx.save(model, str(tmp))
        parity.append(_parity(loaded, tmp, pixels))
        if not parity[0] <= PARITY_TOLERANCE:  # also NaN
            raise ValueError(f"The exported model's probabilities differ from PyTorch's by {parity[0]:.2g} on "
                             f"{PARITY_IMAGES} images (at most {PARITY_TOLERANCE:g} expected): the checkpoint's "
                             "weights hold NaN or infinite values, or the export is wrong; nothing written.")
        runs.check_output_file(out, force, suffixes=(".onnx",))  # again, just before replacing

    runs.write_file_atomic(out, write_checked)
    return {**metadata, "parity_max_abs_diff": parity[0]}


def _parity(loaded: LoadedModel, onnx_path: str | Path, pixels: np.ndarray) -> float:
    import onnxruntime

    x = torch.from_numpy(pixels).float().div(255.0)[:, None]
    with torch.inference_mode():
        reference = torch.softmax(loaded.model((x - loaded.mean) / loaded.std) / loaded.temperature, 1)[:, 1]
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"pixels": x.numpy()})
    gap = float(np.abs(outputs[0] - reference.numpy()).max())
    if loaded.ood is not None and len(outputs) == 3:
        with torch.inference_mode():
            expected = loaded.ood.scores(loaded.model.backbone((x - loaded.mean) / loaded.std).numpy())
        # Relative: distances are in the tens, and the graph computes them in float32.
        gap = max(gap, float(np.abs(outputs[2] - expected).max() / max(1.0, float(np.abs(expected).max()))))
    return gap


def onnx_parity(run_dir: str | Path, onnx_path: str | Path, pixels: np.ndarray) -> float:
    """Largest absolute difference between the ONNX file's probabilities (onnxruntime, fp32) and PyTorch's
    for the same (N, S, S) uint8 pixels (NaN when either gives NaN)."""
    return _parity(load_run_model(run_dir, "cpu"), onnx_path, pixels)
