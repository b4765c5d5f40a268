"""The Train page under AppTest: empty state, config errors, launching a real tiny run through the
form, stopping and resuming it, and monitoring a finished run."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from app_helpers import (
    ORIGINAL_SUBSET,
    first_epoch_run,
    kill_active,
    page,
    require_data,
    run_dirs_in,
    wait_until_settled,
)
from bad_inputs import as_read
from conftest import rank_at_chance, rank_well

import ui
from core import launch, runs
from core.model import WeightsUnavailableError

TRAIN_PAGE = "views/1_Train.py"


def metric(at, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def wait_until_running(run_dir: Path, timeout_s: float = 60) -> bool:
    """core's background process starts with `core resume`, which clears a STOP request made before
    it got going; the test therefore stops a run that is already running, as a user would."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if runs.read_status(run_dir).get("state") == "running":
            return True
        time.sleep(0.1)
    return False


def test_empty_state(app_env):
    at = page(TRAIN_PAGE).run()
    assert not at.exception
    assert at.selectbox(key="train_preset").value in ("cpu", "gpu")
    assert "No runs yet" in at.info[0].value


def test_preset_fills_the_form(app_env):
    at = page(TRAIN_PAGE).run()
    at.selectbox(key="train_preset").select("tiny").run()
    assert not at.exception
    assert at.number_input(key="train_epochs").value == 2
    assert at.number_input(key="train_image_size").value == 64
    assert at.number_input(key="train_max_steps_per_epoch").value == 5
    assert at.selectbox(key="train_arch").value == "smallcnn"


def test_invalid_settings_are_errors_not_runs(app_env, tmp_path):
    at = page(TRAIN_PAGE).run()
    at.button(key="FormSubmitter:train_form-Launch training").click().run()
    assert not at.exception
    assert "Choose a dataset folder" in at.error[0].value

    at.text_input(key="train_data").input(str(tmp_path / "nowhere"))
    at.button(key="FormSubmitter:train_form-Launch training").click().run()
    assert "Dataset folder not found" in at.error[0].value

    at.text_input(key="train_data").input(str(tmp_path))
    at.selectbox(key="train_arch").select("smallcnn")
    at.selectbox(key="train_strategy").select("frozen")
    at.button(key="FormSubmitter:train_form-Launch training").click().run()
    assert not at.exception
    assert "smallcnn trains from scratch" in at.error[0].value
    assert run_dirs_in(app_env) == []


def test_launch_stop_resume_finish(app_env):
    data = require_data(ORIGINAL_SUBSET)
    at = page(TRAIN_PAGE).run()
    at.selectbox(key="train_preset").select("tiny").run()
    at.text_input(key="train_data").input(str(data))
    at.button(key="FormSubmitter:train_form-Launch training").click().run()
    assert not at.exception
    assert not at.error
    assert "Launched" in at.success[0].value
    (run_dir,) = run_dirs_in(app_env)
    try:
        assert at.selectbox(key="train_monitor_run").value == run_dir.name
        assert metric(at, "State") in runs.ACTIVE_STATES

        # Stop once the background process runs; a STOP written before it starts is lost (see
        # wait_until_running).
        assert wait_until_running(run_dir)
        at.run()
        at.button(key="train_stop").click().run()
        assert not at.exception
        assert runs.stop_requested(run_dir)
        assert wait_until_settled([run_dir])[run_dir.name] == "stopped"

        at.run()
        assert metric(at, "State") == "stopped"
        at.button(key="train_resume").click().run()
        assert not at.exception
        assert wait_until_settled([run_dir])[run_dir.name] == "finished", runs.log_tail(run_dir)
    finally:
        kill_active([run_dir])

    at.run()
    assert not at.exception
    assert metric(at, "State") == "finished"
    assert metric(at, "Epochs done") == "2/2"
    # A success, or a warning when this machine's 10 steps left test at chance (its own test below).
    [summary] = [e.value for e in [*at.success, *at.warning] if e.value.startswith("Finished. On test")]
    assert "at the operating threshold" in summary and "chosen at the end of training" in summary
    assert "AUC 0." in summary and "[" in summary  # with its interval
    assert len(at.get("plotly_chart")) == 2
    assert "Finished" in at.code[0].value  # the log tail


def test_finished_failed_and_running_runs(app_env, finished_run):
    shutil.copytree(finished_run, app_env / finished_run.name)
    failed = app_env / "20000101-000000-resnet18-full"
    failed.mkdir()
    shutil.copy(finished_run / "config.json", failed / "config.json")
    error = "WeightsUnavailableError: Could not download the ImageNet weights for resnet18"
    (failed / "status.json").write_text(json.dumps({"state": "failed", "error": error}))

    at = page(TRAIN_PAGE).run()
    at.selectbox(key="train_monitor_run").select(finished_run.name).run()
    assert not at.exception
    assert metric(at, "State") == "finished"
    assert len(at.get("plotly_chart")) == 2
    assert "train_resume" not in [b.key for b in at.button]

    at.selectbox(key="train_monitor_run").select(failed.name).run()
    assert not at.exception
    assert metric(at, "State") == "failed"
    assert ui.plain(error) in at.error[0].value  # shown as text, never as Markdown
    assert "weights file" in at.info[0].value
    assert "train_resume" in [b.key for b in at.button]

    running = first_epoch_run(finished_run, app_env)
    at.run()  # the run list is read on each run of the page
    at.selectbox(key="train_monitor_run").select(running.name).run()
    assert not at.exception
    assert metric(at, "State") == "running"
    assert metric(at, "Step in epoch") == "3/5"
    assert metric(at, "Epochs done") == "0/2"  # in its first epoch: none done, as `runs` and Compare count
    assert metric(at, "Time left (est.)") == "0:05"  # 2 s for 3 of 10 steps
    assert len(at.get("plotly_chart")) == 2  # per-step loss; the epoch curves are still empty
    assert "train_stop" in [b.key for b in at.button]


def test_delete_a_run_after_confirming(app_env, finished_run):
    keep = app_env / "keep"
    shutil.copytree(finished_run, keep)
    doomed = app_env / "doomed"
    shutil.copytree(finished_run, doomed)
    at = page(TRAIN_PAGE).run()
    at.selectbox(key="train_monitor_run").select("doomed").run()
    assert at.button(key="train_delete").disabled  # nothing happens without the confirmation
    at.checkbox(key="train_delete_confirm_doomed").check().run()
    at.button(key="train_delete").click().run()
    assert not at.exception
    assert not doomed.exists() and keep.exists()
    assert "Deleted **doomed**" in at.success[0].value
    assert at.selectbox(key="train_monitor_run").options == ["keep"]


def test_delete_is_refused_with_the_reason_when_the_folder_holds_someone_elses_file(app_env, finished_run):
    kept = app_env / "kept"
    shutil.copytree(finished_run, kept)
    (kept / "notes.txt").write_text("mine")
    at = page(TRAIN_PAGE).run()
    at.selectbox(key="train_monitor_run").select("kept").run()
    assert not at.exception
    assert any(ui.plain(kept / "notes.txt") in e.value and "never writes" in e.value for e in at.error)
    assert "train_delete" not in [b.key for b in at.button]  # nothing to click: nothing can be lost
    assert (kept / "notes.txt").read_text() == "mine"


LAUNCH = "FormSubmitter:train_form-Launch training"


def test_enter_in_a_field_does_not_launch(app_env):
    """Streamlit's forms submit on Enter by default; the launch form and the study form turn that off, so only
    their button launches (test_browser presses Enter in the real fields)."""
    for script, form in ((TRAIN_PAGE, "train_form"), ("views/2_Compare.py", "study_form")):
        at = page(script).run()
        (block,) = [f for f in at.get("form") if f.proto.form.form_id == form]
        assert block.proto.form.enter_to_submit is False


@pytest.fixture
def no_spawn(monkeypatch):
    """Launches create their run folder but start no training process: the run stays queued (its pid is this
    process, so it counts as alive)."""
    monkeypatch.setattr(launch, "_spawn", lambda run_dir, *extra: None)


def test_an_identical_config_already_queued_asks_first(app_env, tiny_dataset, no_spawn):
    at = page(TRAIN_PAGE).run()
    at.selectbox(key="train_preset").select("tiny").run()
    at.text_input(key="train_data").input(str(tiny_dataset))
    at.button(key=LAUNCH).click().run()
    (first,) = run_dirs_in(app_env)
    assert runs.read_status(first)["state"] == "queued"

    at.button(key=LAUNCH).click().run()  # the same settings again
    assert not at.exception
    assert "already queued or training" in at.warning[0].value and ui.plain(first.name) in at.warning[0].value
    assert run_dirs_in(app_env) == [first]  # nothing queued without the confirmation
    assert at.button(key="train_duplicate_launch").disabled
    at.checkbox(key="train_duplicate_confirm").check().run()
    at.button(key="train_duplicate_launch").click().run()
    assert not at.exception
    assert len(run_dirs_in(app_env)) == 2 and "Launched" in at.success[0].value

    at.text_input(key="train_name").input("other")  # a run name alone does not make it another training
    at.button(key=LAUNCH).click().run()
    at.button(key="train_duplicate_cancel").click().run()
    assert len(run_dirs_in(app_env)) == 2 and not at.warning

    at.number_input(key="train_epochs").set_value(3)  # different settings launch at once
    at.button(key=LAUNCH).click().run()
    assert len(run_dirs_in(app_env)) == 3 and not at.warning


def test_offline_imagenet_refusal_names_the_forms_fields(app_env, tiny_dataset, monkeypatch):
    def offline(arch, pretrained, weights_file=""):
        raise WeightsUnavailableError(
            f"Could not download the ImageNet weights for {arch} (https://download.pytorch.org/x.pth): URLError: "
            "<urlopen error [Errno -2] Name or service not known>. Either connect to the internet once, or pass it "
            "with --weights-file PATH, or train without ImageNet weights (--no-pretrained).")

    monkeypatch.setattr(launch, "check_weights", offline)
    at = page(TRAIN_PAGE).run()
    at.selectbox(key="train_preset").select("gpu").run()
    at.text_input(key="train_data").input(str(tiny_dataset))
    at.selectbox(key="train_device").select("cpu")
    at.button(key=LAUNCH).click().run()
    assert not at.exception
    message = at.error[0].value
    assert "**Weights file**" in message and "untick **ImageNet weights" in message
    assert "--" not in message and "URLError" not in message and "Errno" not in message
    assert run_dirs_in(app_env) == []


def test_cancel_a_queued_run_then_delete_it(app_env, tiny_dataset, no_spawn, monkeypatch):
    import subprocess
    import sys

    at = page(TRAIN_PAGE).run()
    at.selectbox(key="train_preset").select("tiny").run()
    at.text_input(key="train_data").input(str(tiny_dataset))
    at.button(key=LAUNCH).click().run()
    (run_dir,) = run_dirs_in(app_env)
    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the queued process
    try:
        runs.write_status(run_dir, pid=waiting.pid)
        at.run()
        assert metric(at, "State") == "queued"
        at.button(key="train_stop").click().run()
        assert not at.exception
        assert waiting.wait(timeout=10) is not None  # its process ended
    finally:
        waiting.kill()
    assert runs.read_status(run_dir)["state"] == "cancelled"
    assert "Cancelled" in at.success[0].value
    assert metric(at, "State") == "cancelled"
    assert at.button(key="train_resume").label == "Start"
    at.checkbox(key=f"train_delete_confirm_{run_dir.name}").check().run()
    at.button(key="train_delete").click().run()
    assert not at.exception
    assert not run_dir.exists()


@pytest.mark.parametrize("ranking", ["well", "at chance"])
def test_a_finished_run_at_chance_on_test_is_not_shown_as_a_success(app_env, finished_run, ranking):
    run_dir = app_env / finished_run.name
    shutil.copytree(finished_run, run_dir)
    (rank_well if ranking == "well" else rank_at_chance)(run_dir, "test")
    at = page(TRAIN_PAGE).run()
    at.selectbox(key="train_monitor_run").select(finished_run.name).run()
    assert not at.exception
    finished = [e for e in [*at.success, *at.warning] if e.value.startswith("Finished. On test")]
    assert len(finished) == 1
    if ranking == "well":
        assert finished[0] in at.success
    else:
        assert finished[0] in at.warning and finished[0].icon == "⛔"
        assert "does not rank test's images better than chance" in as_read(finished[0].value)
