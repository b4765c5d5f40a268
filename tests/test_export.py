"""ONNX export: the calibrated probability matches PyTorch within 1e-4 in fp32, on real X-rays, and the run's
metadata travels inside the file."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from core import runs
from core.cli import main
from core.export import export_onnx, onnx_parity
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
    prob, ood_score = session.run(["probability", "ood_score"], {"pixels": pixels[:, None].astype(np.float32) / 255.0})
    expected = predict_files(loaded, paths)
    assert np.abs(prob - np.array([r["prob"] for r in expected])).max() <= 1e-4
    # The out-of-distribution score travels too, with its threshold in the metadata.
    assert np.allclose(ood_score, [r["ood"]["score"] for r in expected], rtol=1e-3)
    assert float(meta["ood_threshold"]) == pytest.approx(loaded.ood.threshold)


def test_export_refuses_what_is_not_a_run(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 1
    assert "not a run directory" in capsys.readouterr().err


def _poison_weights(run_dir, value=float("nan")):
    """Write `value` into one tensor of best.safetensors, keeping its metadata (as a diverged training would)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = run_dir / "best.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.ndim > 1)
    tensors[name][0] = value
    save_file(tensors, str(path), metadata=metadata)
    return name


def test_weights_with_nan_are_refused_and_nothing_is_written(run_copy, tmp_path):
    name = _poison_weights(run_copy)
    earlier = tmp_path / "model.onnx"
    earlier.write_bytes(b"an earlier export")
    with pytest.raises(ValueError, match=rf"best.safetensors holds NaN or infinite .*e.g. {name}"):
        export_onnx(run_copy, earlier, force=True)
    assert earlier.read_bytes() == b"an earlier export" and not (run_copy / "model.onnx").exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(run_copy.glob("*.tmp"))


def test_a_failed_parity_check_is_a_failed_export(run_copy, tmp_path, monkeypatch):
    import core.export

    monkeypatch.setattr(core.export, "_parity", lambda *args: float("nan"))
    earlier = tmp_path / "model.onnx"
    earlier.write_bytes(b"an earlier export")
    with pytest.raises(ValueError, match="differ from PyTorch's by nan.*nothing written"):
        export_onnx(run_copy, earlier, force=True)
    assert earlier.read_bytes() == b"an earlier export" and not list(tmp_path.glob(".*.tmp"))


def test_an_existing_export_is_replaced_only_with_force_and_a_runs_files_never(run_copy):
    metadata = export_onnx(run_copy, run_copy / "model.onnx")  # the CLI's default place
    assert 0 <= metadata["parity_max_abs_diff"] <= 1e-4
    first = (run_copy / "model.onnx").read_bytes()
    with pytest.raises(ValueError, match="model.onnx exists: pass --force to replace it"):
        export_onnx(run_copy, run_copy / "model.onnx")
    weights = (run_copy / "best.safetensors").read_bytes()
    for name in ("best.safetensors", "report.json"):
        with pytest.raises(ValueError, match="whose own files are never replaced"):
            export_onnx(run_copy, run_copy / name, force=True)
    assert (run_copy / "best.safetensors").read_bytes() == weights and (run_copy / "model.onnx").read_bytes() == first
    export_onnx(run_copy, run_copy / "model.onnx", force=True)
    assert onnx.load(str(run_copy / "model.onnx")).metadata_props
    assert not [p.name for p in run_copy.iterdir() if p.name.endswith(".tmp")]
