"""ui.run_picker on a real page (Mistakes): the chosen run stays chosen across a reload and when a page is
opened by its address (?run=<name>), and a run named there that is gone is said, not silently replaced."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from app_helpers import page

import ui

MISTAKES = "views/4_Mistakes.py"


@pytest.fixture
def two_runs(finished_run, app_env):
    older, newer = app_env / "20000101-000000-smallcnn-full", app_env / "20000102-000000-smallcnn-full"
    for i, run in enumerate((older, newer)):
        shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("last.pt"))
        os.utime(run, (time.time() - 100 + i, time.time() - 100 + i))  # listed newest first
    return older, newer


def test_the_chosen_run_survives_a_reload_and_a_page_opened_by_its_address(two_runs):
    older, newer = two_runs
    at = page(MISTAKES).run()
    assert at.selectbox(key="run").value == newer.name  # nothing chosen yet: the newest
    assert at.query_params[ui.RUN_PARAMETER] == newer.name
    at.selectbox(key="run").select(older.name).run()
    assert not at.exception
    assert at.query_params[ui.RUN_PARAMETER] == older.name  # in the address bar

    reloaded = page(MISTAKES)  # a reload: a new session, only the address is left
    reloaded.query_params[ui.RUN_PARAMETER] = older.name
    reloaded.run()
    assert not reloaded.exception
    assert reloaded.selectbox(key="run").value == older.name
    assert not reloaded.warning or all("is not among" not in w.value for w in reloaded.warning)


def test_a_run_named_in_the_address_that_is_gone_is_said(two_runs):
    older, newer = two_runs
    at = page(MISTAKES)
    at.query_params[ui.RUN_PARAMETER] = "20990101-000000-deleted"
    at.run()
    assert not at.exception
    assert at.selectbox(key="run").value == newer.name
    assert any("is not among" in w.value and ui.plain(newer.name) in w.value for w in at.warning)
