"""The Compare page under AppTest: empty state, a finished run's curves and metrics, and the strategy study
(launched from its form, run in the background, shown with its paired tests; refused when weights are missing)."""

from __future__ import annotations

import json
import math
import shutil
import time
import urllib.error

import pandas as pd
import torch
from app_helpers import (
    ORIGINAL_SUBSET,
    first_epoch_run,
    kill_active,
    page,
    require_data,
    run_dirs_in,
)
from bad_inputs import as_read
from conftest import rank_at_chance, rank_well

from core import runs
from core.bootstrap import format_interval
from core.operating import run_summary
from core.study import list_studies, read_study, study_progress

COMPARE_PAGE = "views/2_Compare.py"


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
    key = at.dataframe[0].value
    assert list(key.columns) == ["run", "state", "strategy", "init", "threshold", "test sensitivity",
                                 "test specificity", "test AUC"]  # the rest is in the expander below
    config = json.loads(at.dataframe[0].proto.columns)
    assert config["threshold"]["type_config"]["format"] == "%.3f"  # 0.350, never 0.3500669300556183
    row = at.dataframe[1].value.iloc[0]
    report = runs.read_report(finished_run)
    assert row["state"] == "finished"
    assert row["epochs done"] == len(runs.epoch_metrics(finished_run))
    assert row["best epoch"] == report["best_epoch"]
    # The config's strategy, as on Train and in the run's name; where the weights start is its own column.
    assert row["strategy"] == "full" and row["init"] == "scratch"  # smallcnn
    # At the operating threshold, with 95% intervals, the same strings as everywhere else.
    summary = run_summary(app_env / finished_run.name)
    assert row["operating threshold"] == summary["operating"].describe()
    assert row["test AUC"] == format_interval(summary["sets"]["test"]["metrics"]["auc"])
    assert row["val sensitivity"] == format_interval(summary["sets"]["val"]["metrics"]["sensitivity"])
    assert math.isclose(summary["sets"]["test"]["metrics"]["auc"]["value"], report["test"]["auc"])
    assert row["training time (min)"] > 0
    # Training-time figures stay available, labelled.
    youden = at.dataframe[2].value.iloc[0]
    assert math.isclose(youden["Youden threshold (training)"], report["threshold"])

    runs.save_threshold(app_env / finished_run.name, 0.9, chosen_on="val", target="manual")
    at = page(COMPARE_PAGE).run()
    row = at.dataframe[1].value.iloc[0]
    assert row["threshold"] == 0.9 and row["operating threshold"].startswith("0.900 (saved")
    assert row["test specificity"] == format_interval(
        run_summary(app_env / finished_run.name)["sets"]["test"]["metrics"]["specificity"])

    running = first_epoch_run(finished_run, app_env)  # no epoch record yet: no curve, empty metrics
    at = page(COMPARE_PAGE).run()
    assert not at.exception
    assert set(at.multiselect(key="compare_runs").value) == {finished_run.name, running.name}
    assert at.dataframe[0].value.set_index("run").loc[running.name, "state"] == "running"
    assert any("updates every" in c.value for c in at.caption)  # it follows the running run by itself
    runs.write_status(running, state="stopped")
    at.run()
    assert at.dataframe[0].value.set_index("run").loc[running.name, "state"] == "stopped"
    assert not any("updates every" in c.value for c in at.caption)  # nothing to follow: no polling

    at.multiselect(key="compare_runs").unselect(finished_run.name).unselect(running.name).run()
    assert not at.exception
    assert "Pick one or more runs" in at.info[0].value


def test_a_rerun_reuses_the_metrics_until_a_file_of_the_run_changes(app_env, finished_run, monkeypatch):
    """Rows and curves are cached (a warm switch to the page must not redo the bootstrap of every run), yet a
    rewritten predictions file or a new epoch shows on the next rerun."""
    import core.operating

    run_dir = app_env / finished_run.name
    shutil.copytree(finished_run, run_dir)
    calls = []
    real_summary = core.operating.run_summary
    monkeypatch.setattr(core.operating, "run_summary", lambda *a, **k: calls.append(a) or real_summary(*a, **k))
    at = page(COMPARE_PAGE).run()
    assert not at.exception and len(calls) == 1
    at.run()
    assert not at.exception and len(calls) == 1  # nothing changed: no second bootstrap

    predictions = run_dir / "predictions_test.csv"
    frame = pd.read_csv(predictions)
    frame["prob"] = 1 - frame["prob"]  # re-evaluated: the ranking turns round
    frame.to_csv(predictions, index=False)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "epoch", "epoch": 3, "val_auc": 0.5, "val_loss": 5.0}) + "\n")
    at.run()
    assert not at.exception and len(calls) == 2
    row = at.dataframe[1].value.iloc[0]
    assert row["test AUC"] == format_interval(real_summary(run_dir)["sets"]["test"]["metrics"]["auc"])
    loss_chart = json.loads(at.get("plotly_chart")[1].proto.spec)
    assert loss_chart["layout"]["yaxis"]["range"][1] >= 5.0  # the new epoch's loss is on the chart


def test_study_that_needs_unavailable_weights_queues_nothing(app_env, monkeypatch, tmp_path):
    data = require_data(ORIGINAL_SUBSET)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    at = page(COMPARE_PAGE).run()
    at.text_input(key="study_data").input(str(data))
    at.selectbox(key="study_arch").set_value("resnet18")
    at.button(key="FormSubmitter:study_form-Launch the study").click().run()
    assert not at.exception
    error = as_read(at.error[0].value)
    # In the form's words: its field, no command-line flag, no raw network error.
    assert "ImageNet weights for resnet18" in error and "Weights file" in error
    assert "--" not in error and "URLError" not in error and "Errno" not in error
    assert list(app_env.iterdir()) == []  # no run, no study


def test_study_button_runs_every_arm_and_seed_and_shows_the_paired_tests(app_env):
    data = require_data(ORIGINAL_SUBSET)
    at = page(COMPARE_PAGE).run()
    assert at.selectbox(key="study_arch").value == "efficientnet_lite0"  # works offline: the default
    at.text_input(key="study_data").input(str(data))
    at.multiselect(key="study_arms").set_value(["frozen", "scratch"])
    at.number_input(key="study_seeds").set_value(2)
    at.number_input(key="study_epochs").set_value(1)
    at.number_input(key="study_image_size").set_value(32)
    at.button(key="FormSubmitter:study_form-Launch the study").click().run()
    assert not at.exception and not at.error
    assert "Launched" in at.success[0].value
    (study,) = list_studies(app_env)
    deadline = time.monotonic() + 600
    try:
        while study_progress(study)["running"] and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        kill_active(run_dirs_in(app_env))
    study = read_study(study.folder)
    assert study_progress(study)["finished"] == 4, (study.folder / "process.log").read_text()[-2000:]

    at = page(COMPARE_PAGE).run()
    assert not at.exception and not at.error
    assert at.selectbox(key="study_pick").value == study.id
    arms = next(d.value for d in at.dataframe if "trainable parameters" in d.value.columns)
    assert list(arms["arm"]) == ["frozen", "scratch"] and list(arms["runs"]) == [2, 2]
    assert arms.set_index("arm").loc["frozen", "test AUC"].startswith("0.")
    assert any("frozen vs scratch" in as_read(m.value) and "(Holm)" in as_read(m.value) for m in at.markdown)
    assert any(t.type == "plotly_chart" for t in at.get("plotly_chart"))

    # A second study, launched while the first is shown, becomes the one shown.
    at.text_input(key="study_data").input(str(data))
    at.multiselect(key="study_arms").set_value(["scratch"])
    at.number_input(key="study_seeds").set_value(1)
    at.number_input(key="study_epochs").set_value(1)
    at.number_input(key="study_image_size").set_value(32)
    at.button(key="FormSubmitter:study_form-Launch the study").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "Launched" in at.success[0].value
    second = next(s for s in list_studies(app_env) if s.id != study.id)
    try:
        deadline = time.monotonic() + 300
        while study_progress(second)["running"] and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        kill_active(run_dirs_in(app_env))
    at.run()
    assert not at.exception and at.selectbox(key="study_pick").value == second.id


def test_an_interrupted_study_resumes_from_its_button_keeping_finished_runs(app_env, finished_run):
    import json

    done, interrupted = app_env / "20000101-000000-done", app_env / "20000101-000001-interrupted"
    for d in (done, interrupted):
        shutil.copytree(finished_run, d)
    runs.write_status(interrupted, state="stopped")
    finished_at = runs.read_status(done)["finished"]
    folder = app_env / "studies" / "study-20000101-000000"
    for seed, d in enumerate((done, interrupted)):  # runs of this study say so (and their seed) in their config
        (d / "config.json").write_text(json.dumps({**runs.read_config(d), "study": folder.name, "seed": seed,
                                                              "split_seed": 0}))
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({
        "id": folder.name, "base": runs.read_config(finished_run), "arms": ["scratch"], "seeds": [0, 1],
        "runs": {"scratch/0": done.name, "scratch/1": interrupted.name}}))
    at = page(COMPARE_PAGE).run()
    assert not at.exception
    assert any("1 of the study's runs is not finished" in w.value for w in at.warning)
    at.button(key="study_resume").click().run()
    assert not at.exception
    study = read_study(folder)
    deadline = time.monotonic() + 300
    try:
        while study_progress(study)["running"] and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        kill_active([done, interrupted])
    assert runs.read_status(interrupted)["state"] == "finished", (folder / "process.log").read_text()[-2000:]
    assert runs.read_status(done)["finished"] == finished_at  # kept, not trained again
    at = page(COMPARE_PAGE).run()
    # Only the fixture's own chance-level warnings (its 10 steps can leave test at chance on some CPUs).
    assert not at.exception and all(w.icon == "⛔" for w in at.warning), [w.value for w in at.warning]
    assert "2 of 2 runs finished" in at.get("progress")[0].proto.text


def test_runs_tested_on_other_images_or_at_chance_are_said_to_be_so_before_the_table(app_env, finished_run):
    same = app_env / finished_run.name
    shutil.copytree(finished_run, same)
    rank_well(same, "test")
    twin = app_env / "20000101-000000-smallcnn-full"  # the same test images: comparable
    shutil.copytree(same, twin)
    at = page(COMPARE_PAGE).run()
    assert not at.exception
    assert not at.warning
    row = at.dataframe[1].value.set_index("run").loc[twin.name]
    assert row["data"] == "kermany_original_train_subset"
    assert row["test images"] == len(runs.read_predictions(twin, "test"))

    other = app_env / "20000102-000000-smallcnn-full"  # another carve of the folder: as many, other test images
    shutil.copytree(same, other)
    predictions = pd.read_csv(other / "predictions_test.csv", keep_default_na=False)
    predictions["path"] = "/another/carve/" + predictions["path"].str.rsplit("/", n=1).str[-1]
    predictions.to_csv(other / "predictions_test.csv", index=False)
    rank_at_chance(other, "test")
    at = page(COMPARE_PAGE).run()
    assert not at.exception
    said = [as_read(w.value) for w in at.warning]
    assert any(w.startswith(f"{other.name}: The model does not rank test's images better than chance") for w in said)
    n = len(predictions)
    [different] = [w for w in said if w.startswith("These runs were tested on 2 different sets of images")]
    groups = different[different.index("(") + 1:different.index("):")].split("; ")
    assert {g.split(": ")[1] for g in groups} == {f"{n} test images of kermany_original_train_subset"}
    assert [sorted(g.split(": ")[0].split(", ")) for g in groups] in (
        [[other.name], sorted([same.name, twin.name])], [sorted([same.name, twin.name]), [other.name]])
