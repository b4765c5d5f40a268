"""core.report on a real finished run: every section, no external request, the same numbers as
core.operating at the run's operating threshold, and a report (with the damage named) from a damaged run."""

from __future__ import annotations

import html
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from core import report as report_module
from core import runs
from core.bootstrap import METRIC_KEYS, METRIC_LABELS, format_interval
from core.cli import main
from core.metrics import mistakes
from core.operating import run_summary
from core.report import SECTION_IDS, build_report_html, write_report
from core.subgroups import NO_METADATA


class _Tables(HTMLParser):
    """Every table of a piece of HTML as rows of cell texts (th and td alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def tables_of(fragment: str) -> list[list[list[str]]]:
    parser = _Tables()
    parser.feed(fragment)
    return parser.tables


def section(document: str, section_id: str) -> str:
    match = re.search(rf'<section id="{re.escape(section_id)}">(.*?)</section>', document, re.S)
    assert match, f"no section {section_id}"
    return match.group(1)


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("last.pt"))
    return target


def metric_table(fragment: str) -> dict[str, dict[str, str]]:
    """The interval table of a section: {set label: {metric label: cell}}."""
    for table in tables_of(fragment):
        if table and table[0][0] == "Metric" and any(row[0] == METRIC_LABELS["auc"] for row in table):
            labels = table[0][1:]
            return {label: {row[0]: row[i + 1] for row in table[1:]} for i, label in enumerate(labels)}
    raise AssertionError("no metric table")


def assert_matches_run_summary(fragment: str, run_dir: Path) -> dict:
    expected = run_summary(run_dir)
    shown = metric_table(fragment)
    assert set(shown) == {runs.set_label(n) for n in expected["sets"]}
    for name, summary in expected["sets"].items():
        for key in METRIC_KEYS:
            assert shown[runs.set_label(name)][METRIC_LABELS[key]] == format_interval(summary["metrics"][key]), \
                (name, key)
    return expected


@pytest.fixture(scope="module")
def report_run(finished_run: Path, tmp_path_factory) -> Path:
    return copy_run(finished_run, tmp_path_factory.mktemp("report") / finished_run.name)


@pytest.fixture(scope="module")
def document(report_run: Path) -> str:
    return build_report_html(report_run)


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """One mistake of each kind: Grad-CAM is the slow part, and these tests look elsewhere."""
    monkeypatch.setattr(report_module, "MISTAKES_PER_KIND", 1)


def test_every_section_is_there_in_order(document: str) -> None:
    found = re.findall(r'<section id="([^"]+)"><h2>', document)
    assert found == list(SECTION_IDS)
    assert "could not be written" not in document
    summary = section(document, "summary")
    assert "not a diagnosis" in summary and "Value [95% interval]" in summary
    assert "No external evaluation" in section(document, "external")
    for words in ("paediatric", "Guangzhou", "Label noise", "shift", "rarely transfer", "sampling variation",
                  "Research use only"):
        assert words in section(document, "limitations")


def test_the_report_requests_nothing(document: str) -> None:
    from plotly.offline import get_plotlyjs

    plotly_js = get_plotlyjs()
    assert document.count(plotly_js) == 1
    rest = document.replace(plotly_js, "")
    lowered = rest.lower()
    for pattern in ("<script src", "<link", "@import", "url(", "http://", "https://", "mathjax"):
        assert pattern not in lowered, pattern
    for attribute in re.findall(r'\s(?:src|href)="([^"]*)"', rest):
        assert attribute.startswith(("data:image/png;base64,", "#")), attribute[:80]
    assert "Content-Security-Policy" in rest and "default-src 'none'" in rest


def test_numbers_equal_the_operating_summary(document: str, report_run: Path) -> None:
    expected = assert_matches_run_summary(section(document, "operating-point"), report_run)
    threshold = f"{expected['threshold']:.3f}"
    assert threshold in section(document, "summary") and threshold in section(document, "operating-point")
    headline = metric_table(section(document, "summary"))["test"]
    assert headline[METRIC_LABELS["auc"]] == format_interval(expected["sets"]["test"]["metrics"]["auc"])
    # The training-time Youden figures are shown, labelled as such.
    assert "At the end of training (report.json)" in section(document, "operating-point")


def test_figures_mistakes_and_calibration(document: str, report_run: Path) -> None:
    assert section(document, "training").count('class="plotly-graph-div"') == 2
    assert section(document, "curves").count('class="plotly-graph-div"') == 2
    assert section(document, "operating-point").count('class="plotly-graph-div"') == 2  # val and test matrices
    calibration = section(document, "calibration")
    assert "10 equal-width" in calibration and "ECE before" in calibration and "Temperature T =" in calibration
    assert re.search(r"<td>0\.\d{3} \[0\.\d{3}, 0\.\d{3}\]</td>", calibration)  # Brier with its interval
    mistakes = section(document, "mistakes")
    test = pd.read_csv(runs.predictions_path(report_run, "test"))
    threshold = runs.operating_threshold(report_run)
    n_fn = int(((test["prob"] < threshold) & (test["label"] == 1)).sum())
    n_fp = int(((test["prob"] >= threshold) & (test["label"] == 0)).sum())
    assert f"{n_fn} false negative(s) and {n_fp} false positive(s)" in mistakes
    images = re.findall(r'src="data:image/png;base64,', mistakes)
    assert len(images) == 2 * (min(n_fn, 6) + min(n_fp, 6))
    assert mistakes.count("<p class=\"note\">Grad-CAM, ") == min(n_fn, 6) + min(n_fp, 6)  # layer, map size
    assert "pneumonia subtype" in section(document, "subgroups")
    assert NO_METADATA in html.unescape(section(document, "subgroups"))  # files without metadata say so


def test_a_saved_threshold_changes_every_number(run_copy: Path, quick: None) -> None:
    before = build_report_html(run_copy)
    runs.save_threshold(run_copy, 0.9, chosen_on="val", target="manual")
    after = build_report_html(run_copy)
    assert "0.900 (saved; manual on validation)" in section(after, "summary")
    expected = assert_matches_run_summary(section(after, "operating-point"), run_copy)
    assert expected["threshold"] == 0.9
    old, new = metric_table(section(before, "operating-point")), metric_table(section(after, "operating-point"))
    assert old["test"][METRIC_LABELS["sensitivity"]] != new["test"][METRIC_LABELS["sensitivity"]]
    assert old["test"][METRIC_LABELS["auc"]] == new["test"][METRIC_LABELS["auc"]]  # the ranking does not move
    assert "at 0.900" in section(after, "curves") and "threshold 0.900" in section(after, "mistakes")


def test_damaged_files_are_named_and_the_rest_is_written(run_copy: Path, quick: None) -> None:
    (run_copy / "data_report.json").write_text("{not json")
    (run_copy / "metrics.jsonl").write_bytes(bytes(range(256)) * 8)
    (run_copy / "split.csv").write_bytes(b"\x00\x01\x02")
    (run_copy / "environment.json").write_text("[1, 2]")
    document = build_report_html(run_copy)
    assert "data_report.json is damaged: it is not valid JSON" in section(document, "data")
    assert "metrics.jsonl is damaged: it is not text" in section(document, "training")
    assert "split.csv" in section(document, "split") and 'class="box error"' in section(document, "split")
    assert "environment.json is damaged" in section(document, "config")
    assert "could not be written" not in document
    assert_matches_run_summary(section(document, "operating-point"), run_copy)


def test_a_half_damaged_metrics_file_keeps_its_good_lines(run_copy: Path, quick: None) -> None:
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write("{truncated\n")
    training = section(build_report_html(run_copy), "training")
    assert "1 line(s) are not JSON records" in training and training.count('class="plotly-graph-div"') == 2


def test_a_damaged_threshold_is_reported_not_replaced(run_copy: Path, quick: None) -> None:
    (run_copy / "threshold.json").write_text("garbage")
    document = build_report_html(run_copy)
    assert "threshold.json is damaged" in section(document, "summary")
    assert "threshold.json is damaged" in section(document, "operating-point")
    assert re.findall(r'<section id="([^"]+)">', document) == list(SECTION_IDS)


def test_text_from_files_is_escaped(run_copy: Path, quick: None) -> None:
    config = json.loads((run_copy / "config.json").read_text())
    config["name"] = "<script>alert('config')</script>"
    (run_copy / "config.json").write_text(json.dumps(config))
    document = build_report_html(run_copy)
    assert "<script>alert(" not in document
    assert "&lt;script&gt;alert(&#x27;config&#x27;)&lt;/script&gt;" in section(document, "config")


def test_missing_mistake_images_are_listed(run_copy: Path, quick: None) -> None:
    path = runs.predictions_path(run_copy, "test")
    frame = pd.read_csv(path)
    frame["path"] = [f"/nonexistent/folder/{Path(p).name}" for p in frame["path"]]
    frame.to_csv(path, index=False)
    wrong = mistakes(frame, runs.operating_threshold(run_copy))
    shown = sum(min(1, int((wrong["kind"] == kind).sum())) for kind in ("false negative", "false positive"))
    section_html = section(build_report_html(run_copy), "mistakes")
    assert shown and section_html.count("File missing or unreadable") == shown
    assert "data:image/png" not in section_html


def _fake_external(run_dir: Path, name: str, summary: str) -> None:
    """An external evaluation as core.external writes it, with the test predictions standing in."""
    target = run_dir / runs.EXTERNAL_DIR / name
    target.mkdir(parents=True)
    shutil.copy(runs.predictions_path(run_dir, "test"), target / "predictions.csv")
    (target / "summary.json").write_text(summary)


def test_external_evaluations_with_their_numbers_and_damage(run_copy: Path, quick: None) -> None:
    _fake_external(run_copy, "site-b", json.dumps({
        "name": "site-b", "root": "/data/<site-b>", "split": "all", "n": 58, "n_patients": 53, "n_found": 60,
        "counts": {"NORMAL": 15, "PNEUMONIA": 43}, "class_map": {"normal": "NORMAL"},
        "skipped": [{"path": "/data/site-b/bad.png", "reason": "not an image"}],
        "warnings": ["A threshold chosen on the run's own validation data rarely transfers."],
        "threshold": {"described": "0.760 (chosen at the end of training; Youden on validation)"},
        "refit": {"broken": True}}))
    _fake_external(run_copy, "broken", "{not json")
    (run_copy / runs.EXTERNAL_DIR / "interrupted").mkdir()

    document = build_report_html(run_copy, [])
    external = section(document, "external")
    assert "external: site-b" in external and "external: broken" in external
    assert "/data/&lt;site-b&gt;" in external and "bad.png" in external and "rarely transfers" in external
    assert "summary.json has damaged fields (refit)" in external  # named, and the rest of it still shown
    assert "&#x27;interrupted&#x27; has no predictions.csv" in external
    assert_matches_run_summary(section(document, "operating-point"), run_copy)
    assert "external: site-b" in section(document, "subgroups")

    only = build_report_html(run_copy, ["site-b"])
    assert "external: broken" not in only
    assert set(metric_table(section(only, "operating-point"))) == {"validation", "test", "external: site-b"}
    with pytest.raises(ValueError, match="no external evaluation named 'nosuch'"):
        build_report_html(run_copy, ["nosuch"])


def test_cli_writes_the_report(run_copy: Path, tmp_path: Path, quick: None, capsys) -> None:
    out = tmp_path / "out" / "report.html"
    assert main(["report", str(run_copy), "--out", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>") and str(out) in capsys.readouterr().out
    assert not list(out.parent.glob(".*.tmp"))
    assert main(["report", str(run_copy), "--external", "nosuch", "--out", str(tmp_path / "x.html")]) == 1
    assert "nosuch" in capsys.readouterr().err and not (tmp_path / "x.html").exists()
    assert main(["report", str(tmp_path / "not-a-run"), "--out", str(tmp_path / "y.html")]) == 1


def test_write_report_returns_the_path(report_run: Path, tmp_path: Path, quick: None) -> None:
    out = write_report(report_run, tmp_path / "r.html", None)
    assert out == tmp_path / "r.html" and out.stat().st_size > 1_000_000  # plotly.js alone is several MB


# ---------------------------------------------------------------- where the report may be written

def test_the_report_never_replaces_a_runs_file_or_a_non_regular_file(report_run: Path, tmp_path: Path) -> None:
    import os

    weights = (report_run / "best.safetensors").read_bytes()
    with pytest.raises(ValueError, match="best.safetensors is in the run folder .* whose own files are never replaced"):
        write_report(report_run, report_run / "best.safetensors", force=True)
    assert (report_run / "best.safetensors").read_bytes() == weights
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        write_report(report_run, fifo, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="file is not a folder"):
        write_report(report_run, tmp_path / "file" / "r.html")
    assert fifo.exists() and (tmp_path / "file").read_text() == "x"
    assert not [p for p in report_run.iterdir() if p.name.endswith(".tmp")]


def test_an_existing_report_is_replaced_only_with_force(report_run: Path, tmp_path: Path, quick: None) -> None:
    out = tmp_path / "report.html"
    out.write_text("my earlier report")
    with pytest.raises(ValueError, match="report.html exists: pass --force to replace it"):
        write_report(report_run, out)
    assert out.read_text() == "my earlier report"
    assert write_report(report_run, out, force=True) == out
    assert out.read_text().startswith("<!DOCTYPE html>") and not list(tmp_path.glob(".*.tmp"))


HOSTILE = "<img src=http://x/a.png> [link](http://x) <script>alert(1)</script>"


def test_text_from_the_runs_files_is_escaped(run_copy: Path, quick: None) -> None:
    _fake_external(run_copy, "site-h", json.dumps({
        "name": "site-h", "root": f"/data/{HOSTILE}", "split": "all", "warnings": [HOSTILE],
        "skipped": [{"path": f"/data/{HOSTILE}.png", "reason": HOSTILE}]}))
    config = json.loads((run_copy / "config.json").read_text())
    config.update(name=HOSTILE, data=f"/data/{HOSTILE}")
    (run_copy / "config.json").write_text(json.dumps(config))
    runs.write_status(run_copy, phase=HOSTILE, error=HOSTILE)
    environment = json.loads((run_copy / "environment.json").read_text())
    environment["started_by"] = {"command": f"python -m core train {HOSTILE}"}
    (run_copy / "environment.json").write_text(json.dumps(environment))
    data_report = json.loads((run_copy / "data_report.json").read_text())
    data_report.update(root=HOSTILE, skipped=[{"path": HOSTILE, "reason": HOSTILE}])
    (run_copy / "data_report.json").write_text(json.dumps(data_report))
    runs.save_threshold(run_copy, 0.4, chosen_on="val", target=HOSTILE)

    document = build_report_html(run_copy, [])
    assert "<img src=http" not in document and "alert(1)</script>" not in document  # nowhere, scripts included
    assert document.count("&lt;img src=http://x/a.png&gt; [link](http://x)") >= 8  # shown as the text it is
    from plotly.offline import get_plotlyjs

    assert 'href="http' not in document.replace(get_plotlyjs(), "")


def test_subgroups_of_image_metadata_for_test_and_external_sets(run_copy: Path, quick: None) -> None:
    from core.operating import load_set
    from core.subgroups import prepare_subgroups, set_groups, subgroup_table

    path = runs.predictions_path(run_copy, "test")
    frame = pd.read_csv(path)
    rows = range(len(frame))
    frame["age"] = [(3, 12, 25, 50, 70)[i % 5] for i in rows]
    frame["view"] = [("PA", "AP")[i % 2] for i in rows]
    frame.to_csv(path, index=False)
    _fake_external(run_copy, "site-c", json.dumps({"name": "site-c", "n": len(frame)}))
    external = run_copy / runs.EXTERNAL_DIR / "site-c" / "predictions.csv"
    frame.assign(site=[("<b>A</b>", "B")[i % 2] for i in rows]).to_csv(external, index=False)

    fragment = section(build_report_html(run_copy), "subgroups")
    test_part, external_part = fragment.split("<h3>external: site-c</h3>")
    table = tables_of(test_part)[0]
    assert table[0][:2] == ["grouping", "group"]
    shown = {(r[0], r[1]): r for r in table[1:]}
    assert [g for k, g in shown if k == "age band"] == ["0-4", "5-17", "18-39", "40-64", "65+"]
    pset = load_set(run_copy, "test")
    expected = subgroup_table(prepare_subgroups(pset.labels, pset.probs, pset.patients, set_groups(pset.frame)),
                              runs.operating_threshold(run_copy)).set_index(["grouping", "group"])
    columns = table[0]
    for key in (("age band", "65+"), ("view position", "AP")):
        for metric_key in ("sensitivity", "specificity", "auc"):
            cell = shown[key][columns.index(METRIC_LABELS[metric_key])]
            assert cell == format_interval(expected.loc[key, metric_key]), (key, metric_key)
    assert NO_METADATA not in html.unescape(test_part)
    assert ("site", "<b>A</b>") in {(r[0], r[1]) for r in tables_of(external_part)[0][1:]}
    assert "<b>A</b>" not in external_part and "&lt;b&gt;A&lt;/b&gt;" in external_part  # shown as text
