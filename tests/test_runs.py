"""The validating run reader: one damaged file in one run never breaks the listing of the others, and
damaged thresholds are refused with a message naming the file."""

from __future__ import annotations

import json
import shutil

import pytest

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


def test_a_damaged_training_threshold_is_refused(two_runs):
    _, bad = two_runs
    report = json.loads((bad / "report.json").read_text())
    report["threshold"] = "0.5"
    (bad / "report.json").write_text(json.dumps(report))
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
