"""The CLI never loses what it did not create: `delete` removes only provable runs of this tool, `report` and
`export` never replace a run's files, a device or pipe, or an earlier output without --force, and an export whose
model gives NaN writes nothing. Each refusal is one line on stderr with exit 1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from bad_inputs import damage_run

from core import report as report_module
from core.cli import main


def refused(capsys, argv: list[str], *words: str) -> str:
    """Run the CLI, expecting exit 1 and one line on stderr holding every one of `words`."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


def test_delete_refuses_another_tools_folder_and_keeps_it(tmp_path, capsys):
    hf = tmp_path / "hf-model"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (hf / "status.json").write_text(json.dumps({"state": "done"}))
    (hf / "pytorch_model.bin").write_bytes(b"\x00" * 100)
    refused(capsys, ["delete", str(hf), "--yes"], "not a run of this tool", "nothing deleted")
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "pytorch_model.bin", "status.json"]


def test_delete_refuses_a_link_and_a_run_holding_someone_elses_file(run_copy, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(run_copy)
    refused(capsys, ["delete", str(link), "--yes"], "symbolic link")
    (run_copy / "notes.txt").write_text("mine")
    refused(capsys, ["delete", str(run_copy), "--yes"], "notes.txt", "never writes")
    assert (run_copy / "notes.txt").read_text() == "mine" and (run_copy / "best.safetensors").exists()


@pytest.mark.parametrize("variant", ["config-missing", "config-garbage", "status-garbage"])
def test_delete_still_removes_a_damaged_run(run_copy, capsys, variant):
    damage_run(run_copy, variant)
    assert main(["delete", str(run_copy), "--yes"]) == 0
    assert "Deleted" in capsys.readouterr().out and not run_copy.exists()


def test_report_never_replaces_a_runs_file_or_a_pipe(run_copy, tmp_path, capsys):
    weights = (run_copy / "best.safetensors").read_bytes()
    refused(capsys, ["report", str(run_copy), "--out", str(run_copy / "best.safetensors"), "--force"],
            "best.safetensors", "never replaced")
    assert (run_copy / "best.safetensors").read_bytes() == weights
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    refused(capsys, ["report", str(run_copy), "--out", str(fifo), "--force"], "not a regular file")
    refused(capsys, ["report", str(run_copy), "--out", str(run_copy)], "is a folder")
    assert fifo.exists()


def test_report_replaces_an_existing_file_only_with_force(run_copy, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(report_module, "MISTAKES_PER_KIND", 1)
    replaced_only_with_force(capsys, ["report", str(run_copy)], tmp_path / "report.html", "<!DOCTYPE html>")


def replaced_only_with_force(capsys, argv: list[str], out, written_start: str) -> None:
    """An existing `out` survives the command without --force (one-line refusal) and is replaced with it."""
    out.write_text("mine")
    refused(capsys, [*argv, "--out", str(out)], f"{out.name} exists", "--force")
    assert out.read_text() == "mine"
    assert main([*argv, "--out", str(out), "--force"]) == 0
    assert out.read_text().startswith(written_start)


def _nan_weights(run_dir: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = run_dir / "best.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.ndim > 1)
    tensors[name].fill_(float("nan"))
    save_file(tensors, str(path), metadata=metadata)


def test_export_of_nan_weights_fails_and_writes_nothing(run_copy, capsys):
    _nan_weights(run_copy)
    refused(capsys, ["export", str(run_copy)], "NaN")
    assert not (run_copy / "model.onnx").exists()
    assert not [p.name for p in run_copy.iterdir() if p.name.endswith(".tmp")]


def test_export_replaces_an_earlier_export_only_with_force(run_copy, capsys):
    assert main(["export", str(run_copy)]) == 0
    assert "parity with PyTorch" in capsys.readouterr().out
    first = (run_copy / "model.onnx").read_bytes()
    refused(capsys, ["export", str(run_copy)], "model.onnx exists", "--force")
    assert (run_copy / "model.onnx").read_bytes() == first
    refused(capsys, ["export", str(run_copy), "--out", str(run_copy / "split.csv"), "--force"], "never replaced")
    assert main(["export", str(run_copy), "--force"]) == 0
    assert "parity with PyTorch" in capsys.readouterr().out


def test_a_negative_zero_threshold_is_shown_as_zero(run_copy, capsys):
    (run_copy / "threshold.json").write_text('{"threshold": -0.0, "chosen_on": "val", "target": "by hand"}')
    assert main(["runs", "--runs-dir", str(run_copy.parent)]) == 0
    out = capsys.readouterr().out
    assert "0.000 (saved" in out and "-0.000" not in out and "-0.0" not in out



def test_evaluate_out_never_replaces_a_runs_file_and_an_existing_file_only_with_force(run_copy, tmp_path, capsys):
    predictions = (run_copy / "predictions_test.csv").read_bytes()
    refused(capsys, ["evaluate", str(run_copy), "--out", str(run_copy / "predictions_test.csv"), "--force"],
            "predictions_test.csv", "never replaced")
    assert (run_copy / "predictions_test.csv").read_bytes() == predictions
    refused(capsys, ["evaluate", str(run_copy), "--out", "/dev/null", "--force"], "not a regular file")
    replaced_only_with_force(capsys, ["evaluate", str(run_copy)], tmp_path / "mine.csv", "path,")


def test_delete_checks_every_folder_before_deleting_any(run_copy, tmp_path, capsys):
    refused(capsys, ["delete", str(run_copy), str(tmp_path / "missing"), "--yes"], "missing", "nothing deleted")
    assert run_copy.exists()
    refused(capsys, ["delete", str(run_copy / "external" / ".."), "--yes"], "without '..'")
    assert (run_copy / "config.json").exists()


def test_another_tools_job_folder_with_a_run_like_name_is_not_deleted(tmp_path, capsys):
    import json

    for name, files in (("20240101-000000-bert-base", {"config.json": {"architectures": ["BertModel"]},
                                                       "status.json": {"state": "finished"}}),
                        ("20240101-120000-job-x", {"status.json": {"state": "finished"}, "log.txt": "done",
                                                   "metrics.jsonl": "{}"})):
        folder = tmp_path / name
        folder.mkdir()
        for file, content in files.items():
            (folder / file).write_text(content if isinstance(content, str) else json.dumps(content))
        refused(capsys, ["delete", str(folder), "--yes"], "is not a run of this tool", "nothing deleted")
        assert sorted(p.name for p in folder.iterdir()) == sorted(files)


def test_a_name_with_a_newline_stays_one_line(run_copy, tmp_path, capsys):
    out = tmp_path / "x\ny.html"
    out.write_text("mine")
    err = refused(capsys, ["report", str(run_copy), "--out", str(out)], "exists")
    assert "x\\x0ay.html" in err
    refused(capsys, ["evaluate", str(run_copy), "--data", str(tmp_path), "--refit-threshold", ""],
            "Unknown threshold rule")
    refused(capsys, ["export", str(run_copy), "--out", ""], "is a folder")
