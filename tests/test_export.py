"""ONNX export: the calibrated probability matches PyTorch within 1e-4 in fp32, on real X-rays, and the run's
metadata travels inside the file."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from core import runs
from core.cli import main
from core.export import onnx_parity
from core.predict import load_run_model, predict_files, read_image


def test_export_matches_pytorch_and_carries_the_metadata(finished_run, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(finished_run), "--out", str(out)]) == 0
    assert "parity with PyTorch" in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    loaded = load_run_model(finished_run)
    assert json.loads(meta["classes"]) == loaded.classes
    assert int(meta["image_size"]) == loaded.image_size
    assert float(meta["threshold"]) == pytest.approx(loaded.threshold)
    assert float(meta["mean"]) == loaded.mean and float(meta["std"]) == loaded.std

    # Real X-rays of the run's own test split, decoded as prediction does: batch of several, fp32.
    paths = runs.read_predictions(finished_run, "test")["path"].tolist()[:6]
    pixels = np.stack([read_image(p, loaded.image_size) for p in paths])
    assert onnx_parity(finished_run, out, pixels) <= 1e-4

    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (prob, _) = session.run(None, {"pixels": pixels[:, None].astype(np.float32) / 255.0})
    expected = [r["prob"] for r in predict_files(loaded, paths)]
    assert np.abs(prob - np.array(expected)).max() <= 1e-4


def test_export_refuses_what_is_not_a_run(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 1
    assert "not a run directory" in capsys.readouterr().err
