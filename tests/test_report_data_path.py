"""The report's Data section names the data folder as the user gave it, and where it led when that differs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core import report as report_module
from core import runs


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_module, "MISTAKES_PER_KIND", 1)


def test_the_data_folder_is_shown_as_typed_and_resolved(run_copy: Path, quick: None, tmp_path: Path) -> None:
    root = runs.read_json(run_copy / "data_report.json")["root"]
    link = tmp_path / "xrays-link"
    link.symlink_to(root)
    config = runs.read_config(run_copy)
    (run_copy / "config.json").write_text(json.dumps({**config, "data": str(link)}))
    document = report_module.build_report_html(run_copy)
    assert f"Data folder <code>{link}</code> (resolved: <code>{root}</code>)" in document

    (run_copy / "config.json").write_text(json.dumps({**config, "data": root}))
    document = report_module.build_report_html(run_copy)
    assert f"Data folder <code>{root}</code>;" in document  # the same folder: named once
