"""core.launch: a run launched while another trains waits in the queue in its own process; cancelling it ends
that process at once and leaves a run that can be deleted; an identical config in the queue is found."""

from __future__ import annotations

import fcntl
import time

import pytest

from core import launch, runs
from core.config import config_from_preset


def wait_for(predicate, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_a_queued_run_is_cancelled_at_once_and_deletable(tiny_dataset, tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    config = config_from_preset("tiny", data=str(tiny_dataset), runs_dir=str(runs_dir), device="cpu")
    with open(runs_dir / ".training.lock", "w") as lock:  # another run holds the training slot
        fcntl.flock(lock, fcntl.LOCK_EX)
        run_dir = launch.launch_training(config)
        assert launch.active_duplicates(config) == [run_dir.name]
        pid = runs.read_status(run_dir)["pid"]
        # Its process has started and waits for the slot (it rewrites its status with its own pid).
        assert wait_for(lambda: "pid" in runs.read_json(run_dir / "status.json", {}) and
                        (run_dir / "process.log").exists() and runs.pid_alive(pid))
        time.sleep(3)  # past the import of torch, into the queue
        assert runs.read_status(run_dir)["state"] == "queued"

        started = time.monotonic()
        assert runs.cancel_queued(run_dir) == "cancelled"
        assert time.monotonic() - started < runs.CANCEL_WAIT_S
        assert not runs.pid_alive(pid)  # the waiting process ended
        status = runs.read_status(run_dir)
        assert status["state"] == "cancelled" and not status.get("error")
        assert launch.active_duplicates(config) == []
        (row,) = runs.list_runs(runs_dir)
        assert row["state"] == "cancelled" and row["epoch"] == 0
        runs.check_deletable(run_dir)  # no ValueError
        runs.delete_run(run_dir)
        assert not run_dir.exists()


def test_only_a_queued_run_is_cancelled(finished_run):
    try:
        runs.cancel_queued(finished_run)
    except ValueError as e:
        assert "finished, not queued" in str(e)
    else:
        raise AssertionError("a finished run was cancelled")


def test_a_run_name_alone_is_no_other_training(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "_spawn", lambda run_dir, *extra: None)  # queued in this (live) process
    config = config_from_preset("tiny", data=str(tiny_dataset), runs_dir=str(tmp_path), device="cpu")
    first = launch.launch_training(config)
    named = config_from_preset("tiny", data=str(tiny_dataset), runs_dir=str(tmp_path), device="cpu", name="again")
    assert launch.active_duplicates(named) == [first.name]
    other = config_from_preset("tiny", data=str(tiny_dataset), runs_dir=str(tmp_path), device="cpu", seed=1)
    assert launch.active_duplicates(other) == []
    runs.write_status(first, state="finished")
    assert launch.active_duplicates(config) == []  # only queued or training runs count


def test_epochs_done_is_the_one_count_of_every_view():
    assert runs.epochs_done({"state": "stopped", "epoch": 1, "step": 11, "steps_per_epoch": 71}) == 0
    assert runs.epochs_done({"state": "stopped", "epoch": 2, "step": 15, "steps_per_epoch": 71}) == 1
    assert runs.epochs_done({"state": "running", "epoch": 1, "step": 71, "steps_per_epoch": 71}) == 1
    assert runs.epochs_done({"state": "finished", "epoch": 3, "step": 5, "steps_per_epoch": 71}) == 3
    assert runs.epochs_done({"state": "queued"}) == 0
    assert runs.epochs_done({"state": "stopped", "epoch": "2"}) == 0  # a damaged field counts nothing


def test_a_launched_run_records_the_data_folder_as_typed(tiny_dataset, tmp_path):
    link = tmp_path / "my-xrays"
    link.symlink_to(tiny_dataset)
    config = config_from_preset("tiny", data=str(link), runs_dir=str(tmp_path))
    assert launch.resolved(config).data == str(link)  # not the link's target: the views show what was typed


def test_a_finished_run_is_not_relaunched(run_copy):
    with pytest.raises(ValueError, match="has finished: there is nothing to resume"):
        launch.launch_resume(run_copy)
    assert runs.read_status(run_copy)["state"] == "finished"
