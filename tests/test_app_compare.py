"""The Compare page under AppTest: empty state, a finished run's curves and metrics, and the
one-click strategy study (whose ImageNet runs fail cleanly offline)."""

from __future__ import annotations

import math
import shutil

from app_helpers import (
    ORIGINAL_SUBSET,
    first_epoch_run,
    kill_active,
    page,
    require_data,
    run_dirs_in,
    wait_until_settled,
)

from core import runs
from core.bootstrap import format_interval
from core.operating import run_summary

COMPARE_PAGE = "pages/2_Compare.py"


def test_empty_state(app_env):
    at = page(COMPARE_PAGE).run()
    assert not at.exception
    assert "No runs yet" in at.info[0].value
    assert at.text_input(key="study_data").value == ""


def test_finished_run_metrics(app_env, finished_run):
    shutil.copytree(finished_run, app_env / finished_run.name)
    at = page(COMPARE_PAGE).run()
    assert not at.exception
    assert at.multiselect(key="compare_runs").value == [finished_run.name]
    assert len(at.get("plotly_chart")) == 2
    row = at.dataframe[0].value.iloc[0]
    report = runs.read_report(finished_run)
    assert row["state"] == "finished"
    assert row["epochs run"] == 2
    assert row["best epoch"] == report["best_epoch"]
    assert row["strategy"] == "scratch"  # smallcnn
    # At the operating threshold, with 95% intervals, the same strings as everywhere else.
    summary = run_summary(app_env / finished_run.name)
    assert row["operating threshold"] == summary["operating"].describe()
    assert row["test AUC"] == format_interval(summary["sets"]["test"]["metrics"]["auc"])
    assert row["val sensitivity"] == format_interval(summary["sets"]["val"]["metrics"]["sensitivity"])
    assert math.isclose(summary["sets"]["test"]["metrics"]["auc"]["value"], report["test"]["auc"])
    assert row["training time (min)"] > 0
    # Training-time figures stay available, labelled.
    youden = at.dataframe[1].value.iloc[0]
    assert math.isclose(youden["Youden threshold (training)"], report["threshold"])

    runs.save_threshold(app_env / finished_run.name, 0.9, chosen_on="val", target="manual")
    at = page(COMPARE_PAGE).run()
    row = at.dataframe[0].value.iloc[0]
    assert row["threshold"] == 0.9 and row["operating threshold"].startswith("0.900 (saved")
    assert row["test specificity"] == format_interval(
        run_summary(app_env / finished_run.name)["sets"]["test"]["metrics"]["specificity"])

    running = first_epoch_run(finished_run, app_env)  # no epoch record yet: no curve, empty metrics
    at = page(COMPARE_PAGE).run()
    assert not at.exception
    assert set(at.multiselect(key="compare_runs").value) == {finished_run.name, running.name}
    assert at.dataframe[0].value.set_index("run").loc[running.name, "state"] == "running"

    at.multiselect(key="compare_runs").unselect(finished_run.name).unselect(running.name).run()
    assert not at.exception
    assert "Pick one or more runs" in at.info[0].value


def test_strategy_study(app_env):
    data = require_data(ORIGINAL_SUBSET)
    at = page(COMPARE_PAGE).run()
    at.text_input(key="study_data").input(str(data))
    at.number_input(key="study_epochs").set_value(1)
    at.number_input(key="study_image_size").set_value(64)
    at.button(key="FormSubmitter:study_form-Launch the 4 study runs").click().run()
    assert not at.exception
    assert not at.error
    assert "Launched" in at.success[0].value
    launched = run_dirs_in(app_env)
    try:
        assert sorted(runs.read_config(d)["strategy"] + "/" + runs.read_config(d)["arch"] for d in launched) == [
            "frozen/resnet18", "full/resnet18", "full/smallcnn", "partial/resnet18"]
        states = wait_until_settled(launched)
    finally:
        kill_active(launched)
    scratch = next(d.name for d in launched if d.name.endswith("study-scratch"))
    assert states[scratch] == "finished"
    # Offline the ImageNet runs fail with core's message; where the weights are cached they finish.
    assert all(s in ("finished", "failed") for s in states.values()), states

    at = page(COMPARE_PAGE).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert len(table) == 4
    assert table.set_index("run").loc[scratch, "test AUC"].startswith("0.")
    failed = [name for name, s in states.items() if s == "failed"]
    assert len(at.error) == len(failed)
    for name in failed:
        assert any(name in e.value and "ImageNet weights" in e.value for e in at.error)
