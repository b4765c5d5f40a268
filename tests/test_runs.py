"""The validating run reader: one damaged file in one run never breaks the listing of the others, and
damaged thresholds are refused with a message naming the file."""

from __future__ import annotations

import json
import shutil

import pytest
from bad_inputs import RUN_DAMAGE, damage_run

from core import runs
from core.cli import main


@pytest.fixture
def two_runs(finished_run, tmp_path):
    good = tmp_path / "runs" / "20000101-000000-good"
    bad = tmp_path / "runs" / "20000101-000001-bad"
    for d in (good, bad):
        shutil.copytree(finished_run, d, ignore=shutil.ignore_patterns("last.pt"))
    return good, bad


@pytest.mark.parametrize("file,content", [
    ("report.json", '{"test": 5, "val": [1, 2], "threshold": 0.4}'),
    ("report.json", "[1, 2]"),
    ("config.json", "[1]"),
    ("config.json", "{}"),
    ("config.json", '{"data": "x"}'),
    ("status.json", '{"state": "running", "pid": "abc"}'),
    ("status.json", '{"pid": -1}'),
    ("metrics.jsonl", None),  # binary
])
def test_one_damaged_run_does_not_break_the_listing(two_runs, capsys, file, content):
    good, bad = two_runs
    if content is None:
        (bad / file).write_bytes(bytes(range(256)) * 8)
    else:
        (bad / file).write_text(content)
    listed = {r["run"]: r for r in runs.list_runs(good.parent)}
    assert set(listed) == {good.name, bad.name}
    runs.epoch_metrics(bad)  # no exception on a binary metrics file
    assert main(["runs", "--runs-dir", str(good.parent)]) == 0
    out = capsys.readouterr().out
    assert good.name in out and bad.name in out
    if file == "config.json":  # listed as damaged, never silently
        assert "config.json is damaged" in (listed[bad.name]["error"] or "")


def test_an_unreadable_run_folder_is_listed_with_the_reason_and_hides_no_other(two_runs, monkeypatch, capsys):
    # As a run folder of another user (chmod 000) reads to a user without root's override: every access refused.
    import os
    from pathlib import Path

    from core.cli import main

    good, bad = two_runs
    real_lstat, real_listdir = os.lstat, os.listdir

    def refused(path) -> None:
        if Path(path) == bad or bad in Path(path).parents:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(runs.os, "lstat", lambda path, *a, **k: refused(path) or real_lstat(path, *a, **k))
    monkeypatch.setattr(runs.os, "listdir", lambda path=".": refused(path) or real_listdir(path))
    monkeypatch.setattr(runs, "_not_a_run", lambda path, real=runs._not_a_run: refused(path) or real(path))
    listed = {r["run"]: r for r in runs.list_runs(good.parent)}
    assert set(listed) == {good.name, bad.name}
    assert listed[good.name]["state"] == "finished"
    assert listed[bad.name]["state"] == "unknown" and "cannot be read (Permission denied)" in listed[bad.name]["error"]
    assert main(["runs", "--runs-dir", str(good.parent)]) == 0
    out = capsys.readouterr().out
    assert good.name in out and bad.name in out and "Permission denied" in out


@pytest.mark.parametrize("written", ['"0.5"', "NaN", "Infinity", "-Infinity", "1e400", "1.5", "null", "absent"])
def test_a_damaged_training_threshold_is_refused(two_runs, written):
    # Never 0.5 in its place: every figure would move under the user without a word.
    _, bad = two_runs
    report = json.loads((bad / "report.json").read_text())
    assert "threshold" in report
    report["threshold"] = "@@"
    if written == "absent":  # a finished run always has one
        del report["threshold"]
    (bad / "report.json").write_text(json.dumps(report).replace('"@@"', written))
    with pytest.raises(ValueError, match="report.json is damaged"):
        runs.operating_point(bad)
    # A saved threshold still makes the run usable.
    runs.save_threshold(bad, 0.5, chosen_on="val", target="manual")
    assert runs.operating_point(bad).threshold == 0.5


def test_old_float32_text_reads_back_as_the_value_the_threshold_was_chosen_on(tmp_path):
    import numpy as np

    probs = np.float32([0.7599862217903137, 0.1, 0.5])
    (tmp_path / "predictions_val.csv").write_text(
        "path,label,prob\n" + "".join(f"/x{i}.png,1,{p}\n" for i, p in enumerate(probs)))  # float32 repr
    back = runs.read_predictions(tmp_path, "val")["prob"].to_numpy()
    assert back[0] == float(probs[0]) and back[0] >= 0.7599862217903137


def test_image_metadata_is_read_back_validated_and_never_refuses_a_file(tmp_path):
    import math

    import pandas as pd

    huge = "1" + "0" * 400
    (tmp_path / "predictions_val.csv").write_text(
        "path,label,prob,age,sex,view,site\n"
        "/a.png,1,0.9,45,M,PA,007\n"
        "/b.png,0,0.2,,,,\n"
        "/c.png,1,0.7,abc, F ,AP," + "s" * 5000 + "\n"
        f"/d.png,0,0.1,{huge},O,LL,1\n"
        "/e.png,0,0.4,-3,,AP,2\n")
    read = runs.read_predictions(tmp_path, "val")
    assert read["age"].tolist()[0] == 45 and read["age"].tolist()[4] == -3  # a number; its range is judged later
    assert all(math.isnan(a) for a in read["age"].tolist()[1:4])  # blank, text, 400 digits
    assert read["sex"].fillna("blank").tolist() == ["M", "blank", "F", "O", "blank"]  # stripped
    assert read["view"].fillna("blank").tolist() == ["PA", "blank", "AP", "LL", "AP"]
    assert read["site"].tolist()[0] == "007" and read["site"].tolist()[3] == "1"  # text, never 7 or 1.0
    assert len(read["site"].tolist()[2]) == runs.MAX_METADATA_CHARS
    assert pd.isna(read["site"][1])
    (tmp_path / "predictions_val.csv").write_text("path,label,prob\n/a.png,1,0.9\n")  # written before metadata
    assert list(runs.read_predictions(tmp_path, "val").columns) == ["path", "label", "prob"]


@pytest.mark.parametrize("column", ["label", "prob", "ood_score"])
def test_a_number_of_400_digits_is_a_damaged_cell_not_a_crash(tmp_path, column):
    row = {"path": "/a.png", "label": "1", "prob": "0.5", "ood_score": "1.0", column: "1" + "0" * 400}
    (tmp_path / "predictions_val.csv").write_text(",".join(row) + "\n" + ",".join(row.values()) + "\n")
    if column == "ood_score":
        assert runs.read_predictions(tmp_path, "val")["ood_score"].isna().all()
    else:
        with pytest.raises(ValueError, match=f"the {column} column must hold"):
            runs.read_predictions(tmp_path, "val")


@pytest.mark.parametrize("content", ["[1, 2]", '"abc"', "\x00\xff", "null"])
def test_writing_status_over_a_damaged_file_replaces_it(tmp_path, content):
    (tmp_path / "status.json").write_text(content)
    runs.write_status(tmp_path, state="stopped")
    assert runs.read_status(tmp_path)["state"] == "stopped"


def test_a_pid_no_process_can_have_reads_as_killed(tmp_path):
    runs.write_status(tmp_path, state="running", pid=10**30)
    assert runs.read_status(tmp_path)["state"] == "killed"
    assert runs.pid_alive(10**30) is False


@pytest.mark.parametrize("content", ["", "[1]", "\x00garbage"])
def test_a_damaged_report_is_named_never_replaced_by_threshold_one_half(tmp_path, content):
    runs.write_status(tmp_path, state="finished")
    (tmp_path / "report.json").write_text(content)
    with pytest.raises(ValueError, match="report.json is missing or damaged"):
        runs.operating_point(tmp_path)
    runs.save_threshold(tmp_path, 0.3, chosen_on="val", target="by hand")
    assert runs.operating_point(tmp_path).threshold == 0.3  # a saved threshold makes the run usable again


def test_metric_records_with_wrong_types_read_as_missing_numbers(two_runs):
    _, bad = two_runs
    with open(bad / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "epoch", "epoch": 3, "val_auc": "high", "val_loss": 10**30,
                            "train_loss": float("inf")}) + "\n")
        f.write(json.dumps({"kind": "step", "global_step": "x", "loss": [1]}) + "\n")
    epochs, steps = runs.epoch_metrics(bad), runs.step_metrics(bad)
    for df in (epochs, steps):
        numeric = df.drop(columns=["kind"])
        assert all(str(t) == "float64" for t in numeric.dtypes), numeric.dtypes
    last = epochs[epochs["epoch"] == 3].iloc[0]
    assert last[["val_auc", "val_loss", "train_loss"]].isna().all()


def test_huge_numbers_in_report_and_config_are_left_out_of_tables(two_runs):
    import pandas as pd
    import pyarrow as pa

    _, bad = two_runs
    report = json.loads((bad / "report.json").read_text())
    report["best_epoch"] = 10**30
    report["test"]["auc"] = 10**40
    (bad / "report.json").write_text(json.dumps(report))
    config = json.loads((bad / "config.json").read_text())
    config["epochs"] = 10**30
    (bad / "config.json").write_text(json.dumps(config))
    read = runs.read_report(bad)
    assert "best_epoch" not in read and "auc" not in read["test"]
    listed = {r["run"]: r for r in runs.list_runs(bad.parent)}
    assert listed[bad.name]["epochs"] is None
    pa.Table.from_pandas(pd.DataFrame(list(listed.values())))  # a table the dashboard can show


def test_predictions_with_empty_paths_or_missing_rows_are_refused_with_the_file_named(two_runs):
    import pandas as pd

    _, bad = two_runs
    path = bad / "predictions_test.csv"
    table = pd.read_csv(path)
    table.iloc[:-3].to_csv(path, index=False)  # truncated
    with pytest.raises(ValueError, match=r"predictions_test.csv has \d+ rows but split.csv lists \d+ test images"):
        runs.read_predictions(bad, "test")
    table.loc[0, "path"] = ""
    table.to_csv(path, index=False)
    with pytest.raises(ValueError, match="path column must name an image"):
        runs.read_predictions(bad, "test")


# ---------------------------------------------------------------- what may be deleted

def _other_tools_folder(folder):
    """A Hugging Face model folder: a config.json and a status.json, but of another tool."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    (folder / "status.json").write_text(json.dumps({"state": "done"}))
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    return folder


def test_another_tools_folder_is_refused_and_kept(tmp_path):
    hf = _other_tools_folder(tmp_path / "hf-model")
    with pytest.raises(ValueError, match="hf-model is not a run of this tool: its config.json is another "
                                         "program's.*nothing deleted"):
        runs.check_deletable(hf)
    with pytest.raises(ValueError, match="not a run of this tool"):
        runs.delete_run(hf)
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors", "status.json"]
    assert not runs.is_run_folder(hf)


def test_a_folder_named_like_a_run_with_another_tools_files_is_refused_naming_one(finished_run, tmp_path):
    run = shutil.copytree(finished_run, tmp_path / finished_run.name, ignore=shutil.ignore_patterns("last.pt"))
    (run / "notes.txt").write_text("my notes")
    with pytest.raises(ValueError, match=r"notes\.txt, a file this tool never writes in a run.*nothing deleted"):
        runs.delete_run(run)
    assert (run / "notes.txt").read_text() == "my notes" and (run / "best.safetensors").exists()
    assert runs.is_run_folder(run)  # still a run: listed, so the user sees why it is kept
    (run / "notes.txt").unlink()
    (run / "external" / "site" / "extra").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"external/site/extra, a folder this tool never writes"):
        runs.check_deletable(run)


def test_links_files_and_missing_paths_are_refused(finished_run, tmp_path):
    link = tmp_path / "link-to-run"
    link.symlink_to(finished_run)
    with pytest.raises(ValueError, match="is a symbolic link"):
        runs.delete_run(link)
    assert (finished_run / "config.json").exists()
    (tmp_path / "a-file").write_text("x")
    for path, words in [(tmp_path / "a-file", "is not a folder"), (tmp_path / "nope", "does not exist")]:
        with pytest.raises(ValueError, match=words):
            runs.check_deletable(path)


@pytest.mark.parametrize("variant", sorted(RUN_DAMAGE))
def test_every_damaged_run_stays_listed_and_deletable(finished_run, tmp_path, variant):
    run = shutil.copytree(finished_run, tmp_path / "runs" / f"damaged-{variant}")  # not even the trainer's name
    damage_run(run, variant)
    assert [r["run"] for r in runs.list_runs(run.parent)] == [run.name]
    runs.delete_run(run)
    assert not run.exists()


def test_a_run_without_its_config_is_recognised_by_three_other_signs(finished_run, tmp_path):
    run = shutil.copytree(finished_run, tmp_path / finished_run.name)
    (run / "config.json").unlink()
    (run / "status.json").write_bytes(b"\x00garbage")
    runs.check_deletable(run)  # its name, checkpoint, environment.json and split.csv
    renamed = run.rename(tmp_path / "renamed")
    (renamed / "environment.json").write_text("{}")
    (renamed / "split.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="it has no config.json, and its name is not a run name"):
        runs.check_deletable(renamed)  # its checkpoint alone proves nothing
    runs.write_status(renamed, state="finished")
    with pytest.raises(ValueError, match="not a run of this tool"):
        runs.check_deletable(renamed)  # a checkpoint and a status: another tool could have both names
    shutil.copy(finished_run / "split.csv", renamed / "split.csv")
    runs.check_deletable(renamed)  # its checkpoint, status and split.csv


def test_everything_the_tools_write_in_a_run_is_deletable(finished_run, tmp_path):
    run = shutil.copytree(finished_run, tmp_path / finished_run.name)
    for name in ("process.log", "STOP", "model.onnx", "report.html", "best.tmp", ".model.onnx.123.tmp",
                 ".DS_Store", "ood.safetensors"):
        (run / name).write_text("x")
    for name in ("predictions.csv", "summary.json", ".summary.json.9.tmp"):
        (run / "external" / "site-b").mkdir(parents=True, exist_ok=True)
        (run / "external" / "site-b" / name).write_text("x")
    runs.delete_run(run)
    assert not run.exists()


@pytest.mark.parametrize("name", ["notes.html", "other-model.onnx"])
def test_a_file_of_the_users_with_an_output_suffix_is_not_taken_for_the_tools(finished_run, tmp_path, name):
    run = shutil.copytree(finished_run, tmp_path / finished_run.name)
    (run / name).write_text("mine")
    with pytest.raises(ValueError, match=f"holds .*{name}.*nothing deleted"):
        runs.delete_run(run)
    assert (run / name).read_text() == "mine"


def test_an_active_run_is_refused_before_anything(finished_run, tmp_path):
    import os

    run = shutil.copytree(finished_run, tmp_path / finished_run.name)
    runs.write_status(run, state="running", pid=os.getpid())
    with pytest.raises(ValueError, match="is running: stop it first"):
        runs.check_deletable(run)
    assert run.exists()


def test_the_runs_listing_leaves_out_another_tools_folder(two_runs):
    good, _ = two_runs
    _other_tools_folder(good.parent / "hf-model")
    assert "hf-model" not in {r["run"] for r in runs.list_runs(good.parent)}


# ---------------------------------------------------------------- where a command may write its output

def test_output_checks_refuse_devices_pipes_folders_and_a_runs_files(finished_run, tmp_path):
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "to-pipe").symlink_to(fifo)
    (tmp_path / "a-file").write_text("x")
    refused = [("/dev/null", "not a regular file"), (fifo, "not a regular file"),
               (tmp_path / "to-pipe", "not a regular file"), (tmp_path, "is a folder"),
               (tmp_path / "a-file" / "r.html", "a-file is not a folder"),
               (finished_run / "best.safetensors", "whose own files are never replaced"),
               (finished_run / "config.json", "whose own files are never replaced"),
               (finished_run / "external" / "x" / "r.html", "whose own files are never replaced"),
               (finished_run / "notes.txt", "whose own files are never replaced")]
    for out, words in refused:
        with pytest.raises(ValueError, match=words):
            runs.check_output_file(out, force=True, suffixes=(".html",), new_folders=True)
    with pytest.raises(ValueError, match="The folder .*missing does not exist"):
        runs.check_output_file(tmp_path / "missing" / "r.html", force=True, suffixes=(".html",))
    assert fifo.exists() and os.path.exists("/dev/null")
    with pytest.raises(ValueError, match="a-file exists: pass --force to replace it"):
        runs.check_output_file(tmp_path / "a-file")
    assert runs.check_output_file(tmp_path / "a-file", force=True) == tmp_path / "a-file"
    assert runs.check_output_file(finished_run / "report.html", suffixes=(".html",)) == finished_run / "report.html"
    assert runs.check_output_file(tmp_path / "new" / "r.html", new_folders=True) == tmp_path / "new" / "r.html"


# ---------------------------------------------------------------- -0.0

def test_a_negative_zero_threshold_reads_as_zero(two_runs):
    import math

    good, bad = two_runs
    (good / "threshold.json").write_text('{"threshold": -0.0, "chosen_on": "val", "target": "by hand"}')
    point = runs.operating_point(good)
    assert math.copysign(1, point.threshold) == 1 and point.describe().startswith("0.000 (saved")
    (good / "threshold.json").unlink()
    report = json.loads((good / "report.json").read_text())
    report["threshold"] = -0.0
    (good / "report.json").write_text(json.dumps(report))
    assert runs.operating_point(good).describe().startswith("0.000 (chosen")
    runs.save_threshold(bad, -0.0, chosen_on="val", target="by hand")
    assert json.loads((bad / "threshold.json").read_text())["threshold"] == 0 and \
        '"threshold": 0.0' in (bad / "threshold.json").read_text()


@pytest.mark.parametrize("name", ["external:../..", "external:..", "external:", "external:a/b", "external:/etc"])
def test_an_external_set_name_is_one_folder_of_the_run_never_a_path(finished_run, name):
    with pytest.raises(ValueError, match="names no evaluation of this run"):
        runs.predictions_path(finished_run, name)
    with pytest.raises(ValueError, match="names no evaluation of this run"):
        runs.read_predictions(finished_run, name)
    assert runs.predictions_path(finished_run, "external:site-b") == finished_run / "external" / "site-b" / \
        "predictions.csv"
