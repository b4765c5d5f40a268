"""One self-contained HTML report of a run: what was trained on what, how it trained, its metrics with 95%
patient-bootstrap intervals at the run's operating threshold, curves, calibration, subgroups, external
evaluations, the most confident mistakes with Grad-CAM, and the limits of it all.

The file opens offline and requests nothing: plotly.js is embedded once, every figure is inline, images are
data: URIs, the CSS is inline, and a Content-Security-Policy forbids any other source. Every number comes
from the same core functions the dashboard uses (core.operating, core.calibration, core.subgroups, with the
same bootstrap defaults), so the report and the dashboard agree for a given run and threshold.

A damaged file in the run folder (metrics.jsonl, data_report.json, ...) never stops the report: the section
that needs it says what is wrong, and the others are written as usual.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from . import runs
from .bootstrap import METRIC_KEYS, METRIC_LABELS, Interval, format_interval
from .metrics import chance_level_warning
from .operating import PredictionSet, bootstrap_for, curve_data, load_set, ranking_only, set_summary

# Section ids and headings, in the order they appear.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Summary"),
    ("data", "Data"),
    ("split", "Split"),
    ("config", "Configuration and environment"),
    ("training", "Training"),
    ("operating-point", "Metrics at the operating threshold"),
    ("curves", "ROC and precision–recall curves"),
    ("calibration", "Calibration"),
    ("subgroups", "Subgroups"),
    ("external", "External evaluations"),
    ("mistakes", "Most confident mistakes"),
    ("limitations", "Limitations"),
)
SECTION_IDS = tuple(section_id for section_id, _ in SECTIONS)
MISTAKES_PER_KIND = 6
HEADLINE_KEYS = ("auc", "sensitivity", "specificity", "ppv", "npv")
LIST_LIMIT = 20  # longest list of files (skipped, shared patients, ...) written out; the rest is counted
THUMBNAIL_WIDTH = 320  # what core.predict.gradcam_display returns by default; stated here for the CSS

# The browser refuses every source but the page itself and data:/blob: URIs. plotly.js needs inline scripts
# and styles; 'unsafe-eval' because parts of plotly.js compile functions at run time.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; "
                           "style-src 'unsafe-inline'; img-src data: blob:; font-src data:; connect-src 'none'; "
                           "form-action 'none'; base-uri 'none'")

# Figures are drawn while the page is parsed; once it is laid out, each is fitted to its final box.
RESIZE_ON_LOAD = ("window.addEventListener('load', function () { document.querySelectorAll('.js-plotly-plot')"
                  ".forEach(function (figure) { Plotly.Plots.resize(figure); }); });")

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0;
       color: #1d2430; background: #f6f7f9; line-height: 1.45; }
header { background: #1d2f4f; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 1.5em; }
header p { margin: 2px 0; opacity: 0.9; }
nav { background: #fff; border-bottom: 1px solid #d9dde3; padding: 8px 32px; position: sticky; top: 0;
      z-index: 10; font-size: 0.92em; }
nav a { margin-right: 14px; color: #1d4f91; text-decoration: none; white-space: nowrap; }
main { max-width: 1200px; margin: 0 auto; padding: 8px 24px 40px 24px; }
section { background: #fff; border: 1px solid #d9dde3; border-radius: 6px; padding: 8px 24px 18px 24px;
          margin: 18px 0; }
h2 { border-bottom: 1px solid #e3e6ea; padding-bottom: 6px; }
h3 { margin-top: 1.4em; }
table { border-collapse: collapse; margin: 8px 0 12px 0; font-size: 0.92em; }
th, td { border: 1px solid #d9dde3; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
caption { caption-side: bottom; text-align: left; color: #5a6372; font-size: 0.9em; padding-top: 4px; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.9em; }
pre { background: #f0f2f5; padding: 8px 12px; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
.note { color: #5a6372; font-size: 0.92em; }
.box { border-left: 4px solid; padding: 8px 14px; margin: 10px 0; border-radius: 3px; }
.info { border-color: #1d6fb8; background: #eaf3fb; }
.warning { border-color: #c98a00; background: #fff6e0; }
.error { border-color: #c0392b; background: #fdecea; }
.ok { border-color: #2e8b57; background: #eaf7ef; }
/* Grid tracks exist before the figures do: plotly.js sizes each figure as its script runs, while the page
   is still being parsed, and a flex row would hand the first figure the whole width. */
.columns { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 12px 32px;
           align-items: start; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 12px; }
.figures.small { grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); }
.columns > *, .figures > * { min-width: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 14px; }
.card { border: 1px solid #d9dde3; border-radius: 4px; padding: 8px; width: 520px; background: #fafbfc; }
.card .pair { display: flex; gap: 6px; }
.card .pair > img { width: 256px; max-width: 50%; height: auto; display: block; }
.card p { margin: 6px 0 0 0; font-size: 0.88em; overflow-wrap: anywhere; }
"""


# ---------------------------------------------------------------- small HTML helpers

def _e(value: object) -> str:
    """Escape any text for HTML (file names, config values and class names come from files)."""
    return html.escape(str(value), quote=True)


def _box(kind: str, text: str, already_html: bool = False) -> str:
    return f'<div class="box {kind}">{text if already_html else _e(text)}</div>'


def _p(text: str, css: str = "") -> str:
    return f'<p class="{css}">{_e(text)}</p>' if css else f"<p>{_e(text)}</p>"


def _cell_text(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return "—" if not np.isfinite(value) else f"{float(value):.4f}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _table(columns: Sequence[str], rows: Iterable[Sequence[object]], caption: str | None = None,
           row_headers: bool = False) -> str:
    """An HTML table of escaped cells; numbers are right-aligned. With `row_headers` the first cell of each
    row is a header."""
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            if i == 0 and row_headers:
                cells.append(f"<th>{_e(_cell_text(value))}</th>")
            else:
                numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
                cells.append(f'<td class="num">{_e(_cell_text(value))}</td>' if numeric
                             else f"<td>{_e(_cell_text(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _png_data_uri(pixels: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _json_text(value: object) -> str:
    """A config or environment value as written in its JSON file (0.002, false, null), strings bare."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
        return f"{value:.{digits}f}"
    return "—"


def _read_json_file(path: Path) -> tuple[Any, str | None]:
    """(content, None), or (None, what is wrong with the file in words)."""
    if not path.exists():
        return None, f"{path.name} is missing."
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        return None, f"{path.name} cannot be read ({e})."
    except UnicodeDecodeError:
        return None, f"{path.name} is damaged: it is not text (binary data)."
    try:
        return json.loads(text), None
    except ValueError as e:
        return None, f"{path.name} is damaged: it is not valid JSON ({e})."


def _read_json_object(path: Path) -> tuple[dict | None, str | None]:
    data, error = _read_json_file(path)
    if error is None and not isinstance(data, dict):
        return None, f"{path.name} is damaged: it holds a JSON {type(data).__name__}, not an object."
    return data, error


# ---------------------------------------------------------------- what every section reads

@dataclass
class _PreparedSet:
    """A prediction set with its threshold-free intervals, as the dashboard's Thresholds page prepares it,
    and its summary at the operating threshold."""

    pset: PredictionSet
    ranking: dict[str, Interval]
    summary: dict


@dataclass
class _Context:
    run_dir: Path
    sets: list[str]  # val, test and the included external evaluations, in that order
    all_sets: list[str]  # every prediction set of the run (for colours shared with the dashboard)
    missing_externals: list[str]  # external folders without predictions (reported, not read)
    operating: runs.OperatingPoint | None
    operating_error: str | None
    prepared: dict[str, _PreparedSet] = field(default_factory=dict)
    set_errors: dict[str, str] = field(default_factory=dict)
    figures: int = 0

    @property
    def threshold(self) -> float | None:
        return None if self.operating is None else self.operating.threshold

    def figure(self, fig: Any) -> str:
        """The figure as a div and the script that draws it with the embedded plotly.js."""
        import plotly.graph_objects as go

        self.figures += 1
        # core.figures builds figures without plotly's validation (for the dashboard's speed); validating here
        # turns its shorthand (a title given as a bare string, a colour scale by name) into the explicit form
        # that the embedded plotly.js draws as intended.
        fig = go.Figure(fig.to_dict())
        # A fixed div id (not plotly's random one): the same run gives the same file.
        div = fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False,
                          div_id=f"figure-{self.figures}", default_height="440px",
                          config={"displaylogo": False, "responsive": True})
        return f'<div class="figure">{div}</div>'

    def colour(self, name: str) -> str:
        from .figures import set_colour

        externals = [n for n in self.all_sets if n.startswith(runs.EXTERNAL_PREFIX)]
        return set_colour(name, externals.index(name) if name in externals else 0)


def _selected_externals(run_dir: Path, externals: list[str] | None) -> tuple[list[str], list[str]]:
    """(external set names to include, external folders without predictions). An unknown name is refused."""
    available = [n for n in runs.prediction_sets(run_dir) if n.startswith(runs.EXTERNAL_PREFIX)]
    base = run_dir / runs.EXTERNAL_DIR
    incomplete = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")
                        and runs.EXTERNAL_PREFIX + d.name not in available) if base.is_dir() else []
    if not externals:
        return available, incomplete
    chosen = []
    for raw in externals:
        name = raw if raw.startswith(runs.EXTERNAL_PREFIX) else runs.EXTERNAL_PREFIX + raw
        if name not in available:
            known = ", ".join(n[len(runs.EXTERNAL_PREFIX):] for n in available) or "none"
            raise ValueError(f"{run_dir} has no external evaluation named '{raw}' with predictions "
                             f"(evaluations: {known}).")
        if name not in chosen:
            chosen.append(name)
    short = {n[len(runs.EXTERNAL_PREFIX):] for n in chosen}
    return chosen, [n for n in incomplete if n in short]


def _prepare(run_dir: Path, externals: list[str] | None) -> _Context:
    chosen, incomplete = _selected_externals(run_dir, externals)
    own = [n for n in ("val", "test") if runs.predictions_path(run_dir, n).is_file()]
    try:
        operating, operating_error = runs.operating_point(run_dir), None
    except ValueError as e:
        operating, operating_error = None, str(e)
    ctx = _Context(run_dir, own + chosen, runs.prediction_sets(run_dir), incomplete, operating, operating_error)
    if operating is None:
        return ctx
    for name in ctx.sets:
        try:
            pset = load_set(run_dir, name)
        except (FileNotFoundError, ValueError) as e:
            ctx.set_errors[name] = str(e)
            continue
        # The same resamples, seed and threshold-free intervals as the Thresholds page and run_summary.
        boot = bootstrap_for(pset)
        ranking = ranking_only(pset, boot)
        ctx.prepared[name] = _PreparedSet(pset, ranking, set_summary(pset, operating.threshold, boot, ranking))
    return ctx


def _needs_threshold(ctx: _Context) -> str | None:
    if ctx.operating is None:
        return _box("error", f"No metrics: the operating threshold cannot be read. {ctx.operating_error}")
    if not ctx.prepared:
        reasons = "; ".join(ctx.set_errors.values()) or "the run has no saved predictions yet"
        return _box("error", f"No metrics: no prediction set could be read ({reasons}).")
    return None


def _set_error_boxes(ctx: _Context, names: Iterable[str] | None = None) -> str:
    return "".join(_box("error", f"{runs.set_label(n)}: {ctx.set_errors[n]}")
                   for n in (names if names is not None else ctx.sets) if n in ctx.set_errors)


def _interval_table(ctx: _Context, names: list[str], keys: Sequence[str] = METRIC_KEYS) -> str:
    """Metrics (rows) of sets (columns) as 'value [low, high]', and the images and patients of each set."""
    columns = ["Metric"] + [runs.set_label(n) for n in names]
    rows: list[list[object]] = [[METRIC_LABELS[k]] + [format_interval(ctx.prepared[n].summary["metrics"][k])
                                                      for n in names] for k in keys]
    rows.append(["Images"] + [_images_text(ctx.prepared[n].summary) for n in names])
    return _table(columns, rows, row_headers=True)


def _images_text(summary: dict) -> str:
    text = f"{summary['n']} images, {summary['n_patients']} patients"
    return text + ("" if summary["patients_known"] else " (ids unknown: images resampled)")


def _bootstrap_note(ctx: _Context) -> str:
    first = next(iter(ctx.prepared.values())).summary
    return (f"Value [95% interval]: percentile intervals from {first['n_resamples']:,} bootstrap resamples of "
            f"patients (not images), seed {first['seed']}. A dash: undefined (no images of that kind, or too few "
            "resamples where it is defined).")


# ---------------------------------------------------------------- sections

def _summary(ctx: _Context) -> str:
    run_dir = ctx.run_dir
    config = runs.read_config(run_dir)
    status = runs.read_status(run_dir)
    parts = []
    if config:
        model = f"{config.get('arch', '?')}, " + (f"ImageNet weights, {config.get('strategy', '?')} fine-tuning"
                                                  if config.get("pretrained") else "trained from scratch")
    else:
        model = "unknown model (config.json is missing or unreadable)"
    parts.append(f"<p>Run <code>{_e(run_dir.name)}</code>: {_e(model)}; state <b>{_e(status.get('state'))}</b>"
                 + (f" ({_e(status.get('error'))})" if status.get("error") else "") + ".</p>")
    names = next((p.pset.class_names for p in ctx.prepared.values()), None)
    classes = f"{names[1]} versus {names[0]}" if names else "pneumonia versus normal"
    parts.append(_box("info", f"This report describes a research model that sorts chest X-rays into {classes}, "
                              "trained and audited with the CXR workbench, a research tool. Its output is not a "
                              "diagnosis and must not guide the care of any patient."))
    if ctx.operating is None:
        parts.append(_box("error", f"Operating threshold unreadable: {ctx.operating_error}"))
    else:
        parts.append(f"<p><b>Operating threshold {_e(ctx.operating.describe())}</b>. Every metric, confusion "
                     "matrix and mistake in this report is read at it (predict positive when the probability "
                     "≥ threshold).</p>")
    missing = _needs_threshold(ctx)
    if missing:
        return "".join(parts) + missing
    headline = "test" if "test" in ctx.prepared else next(iter(ctx.prepared))
    parts.append(f"<h3>Headline: {_e(runs.set_label(headline))}</h3>")
    if headline != "test":
        parts.append(_set_error_boxes(ctx, ["test"]))
        parts.append(_box("warning", "No usable test predictions: the headline is read on "
                                     f"{runs.set_label(headline)}, not on held-out test data."))
    parts.append(_interval_table(ctx, [headline], HEADLINE_KEYS))
    parts.append(_p(_bootstrap_note(ctx), "note"))
    return "".join(parts)


def _count_table(counts: dict, title: str) -> str:
    """Images per split (rows) and class (columns), with totals."""
    splits = [s for s, row in counts.items() if isinstance(row, dict)]
    classes: list[str] = []
    for s in splits:
        classes += [c for c in counts[s] if c not in classes]
    rows = []
    for s in splits:
        values = [counts[s].get(c, 0) for c in classes]
        numeric = [v for v in values if isinstance(v, (int, float))]
        rows.append([s, *values, int(sum(numeric))])
    totals = [sum(counts[s].get(c, 0) for s in splits if isinstance(counts[s].get(c, 0), (int, float)))
              for c in classes]
    rows.append(["all", *totals, int(sum(totals))])
    return _table(["split", *classes, "total"], rows, caption=title, row_headers=True)


def _leakage(report: object, title: str) -> str:
    parts = [f"<h3>{_e(title)}</h3>"]
    if not isinstance(report, dict):
        return "".join(parts) + _p("Not recorded.", "note")
    per_split = report.get("patients_per_split")
    if isinstance(per_split, dict):
        parts.append(_p("Patients per split: " + ", ".join(f"{s} {n}" for s, n in per_split.items()) + "."))
    shared = report.get("shared_patients")
    shared = shared if isinstance(shared, dict) else {}
    total = sum(int(v.get("count") or 0) for v in shared.values() if isinstance(v, dict))
    parts.append(_box("ok", "No patient occurs in more than one split.") if total == 0 else
                 _box("warning", f"{total} patient(s) occur in more than one split: their images are not "
                                 "independent between those splits."))
    if total:
        parts.append(_table(["splits", "shared patients", "examples"],
                            [[pair, int(v.get("count") or 0), ", ".join(str(x) for x in (v.get("examples") or []))]
                             for pair, v in shared.items() if isinstance(v, dict)]))
    groups, across = report.get("identical_file_groups", 0), report.get("identical_files_across_splits", 0)
    text = f"Groups of byte-identical files: {groups}; groups spanning more than one split: {across}."
    parts.append(_box("warning", text) if across else _p(text))
    examples = report.get("identical_across_examples") or []
    if isinstance(examples, list) and examples:
        parts.append(_table(["identical files (split:path)"],
                            [[" | ".join(str(x) for x in g) if isinstance(g, list) else str(g)]
                             for g in examples[:LIST_LIMIT]]))
    return "".join(parts)


def _file_list(title: str, rows: object) -> str:
    if not isinstance(rows, list) or not rows:
        return f"<p><b>{_e(title)}</b>: none.</p>"
    shown = rows[:LIST_LIMIT]
    if all(isinstance(r, dict) for r in shown):
        table = _table(["file", "reason"], [[r.get("path"), r.get("reason")] for r in shown])
    else:
        table = _table(["file"], [[r] for r in shown])
    more = f" (the first {LIST_LIMIT} shown)" if len(rows) > LIST_LIMIT else ""
    return f"<p><b>{_e(title)}</b>: {len(rows)}{_e(more)}.</p>{table}"


def _data(ctx: _Context) -> str:
    report, error = _read_json_object(ctx.run_dir / "data_report.json")
    if error:
        return _box("error", f"No data summary: {error}")
    assert report is not None
    typed, root = runs.read_config(ctx.run_dir).get("data"), report.get("root", "?")
    # The folder as the user gave it, and where it led when that differs (a link, a relative path).
    shown = f"<code>{_e(typed)}</code> (resolved: <code>{_e(root)}</code>)" if isinstance(typed, str) and typed \
        and typed != root else f"<code>{_e(root)}</code>"
    parts = [f"<p>Data folder {shown}; classes "
             f"{_e(', '.join(str(c) for c in report.get('classes') or []))} (positive class "
             f"<b>{_e(report.get('positive_class', '?'))}</b>); images resized to {_e(report.get('image_size', '?'))} "
             "px.</p>"]
    if report.get("labels"):
        parts.append(_p(f"Labels: {report['labels']}."))
    if report.get("patients_from"):
        parts.append(_p(f"Patient ids from {report['patients_from']}."))
    counts = report.get("counts")
    if isinstance(counts, dict) and counts:
        parts.append(_count_table(counts, "Images per split used for training, validation and test (readable "
                                          "images only)."))
    else:
        parts.append(_box("error", "data_report.json holds no image counts."))
    official = report.get("official_counts")
    if isinstance(official, dict) and official:
        parts.append(_count_table(official, "Images per split folder as found on disk."))
    elif not report.get("labels"):
        parts.append(_p("The folder has no split folders (train/val/test): every split was carved by patient.",
                        "note"))
    parts.append(_file_list("Unreadable images (skipped)", report.get("skipped")))
    parts.append(_file_list("Files that are not images (ignored)", report.get("ignored_non_image_files")))
    parts.append(_file_list("Entries that could not be used (skipped)", report.get("unusable_entries")))
    parts.append(_leakage(report.get("leakage"), "Leakage between the splits used"))
    if "leakage_official_splits" in report:
        parts.append(_leakage(report.get("leakage_official_splits"), "Leakage between the official split folders"))
    return "".join(parts)


def _split(ctx: _Context) -> str:
    config = runs.read_config(ctx.run_dir)
    path = ctx.run_dir / "split.csv"
    try:
        table = pd.read_csv(path, dtype={"patient": str, "official_split": str})
    except FileNotFoundError:
        return _box("error", "split.csv is missing: the split cannot be shown.")
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        return _box("error", f"split.csv is damaged ({type(e).__name__}: {e}).")
    missing = {"split", "class_name", "patient"} - set(table.columns)
    if missing:
        return _box("error", f"split.csv is damaged: it lacks the columns {', '.join(sorted(missing))}.")
    official = table.get("official_split", pd.Series("", index=table.index)).fillna("").astype(str)
    has_official = (official != "").any()
    val_fraction, test_fraction, seed = (config.get(k, "?") for k in ("val_fraction", "test_fraction", "seed"))
    if has_official:
        how = (f"The official test folder is kept as the benchmark, untouched. Validation ({_fmt_share(val_fraction)} "
               "of the pool) is carved out of the official train folder plus the official val folder (often tiny), "
               f"grouped by patient (no patient in both train and validation) and stratified by class, seed {seed}.")
    else:
        how = (f"The folder has no split folders: test ({_fmt_share(test_fraction)}) and then validation "
               f"({_fmt_share(val_fraction)} of the rest) are carved grouped by patient and stratified by class, "
               f"seed {seed}.")
    parts = [_p(how)]
    used = table[table["split"] != "skipped"]
    classes = sorted(used["class_name"].astype(str).unique())
    order = [s for s in ("train", "val", "test") if s in set(used["split"])]
    rows = []
    for s in order:
        part = used[used["split"] == s]
        rows.append([s] + [int((part["class_name"].astype(str) == c).sum()) for c in classes]
                    + [int(len(part)), int(part["patient"].nunique())])
    parts.append(_table(["split", *classes, "images", "patients"], rows, row_headers=True,
                        caption="From split.csv: readable images and distinct patients per split."))
    skipped = int((table["split"] == "skipped").sum())
    if skipped:
        parts.append(_p(f"{skipped} unreadable file(s) are listed in split.csv as skipped."))
    splits_of_patient = used.groupby("patient")["split"].nunique()
    crossing = int((splits_of_patient > 1).sum())
    parts.append(_box("ok", "Checked in split.csv: every patient's images lie in one split.") if crossing == 0 else
                 _box("warning", f"Checked in split.csv: {crossing} patient(s) have images in more than one split "
                                 "(patients the official folders already share, or missing patient ids)."))
    if has_official:
        cross = pd.crosstab(official[table.index.isin(used.index)].replace("", "none"), used["split"])
        parts.append(_table(["official folder", *[str(c) for c in cross.columns]],
                            [[str(i), *[int(v) for v in cross.loc[i]]] for i in cross.index], row_headers=True,
                            caption="Where each split's images come from (rows: the folder on disk; columns: the "
                                    "split used)."))
    return "".join(parts)


def _fmt_share(value: object) -> str:
    return f"{value:.0%}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _config(ctx: _Context) -> str:
    config_part = ["<h3>Training configuration (config.json)</h3>"]
    config, error = _read_json_object(ctx.run_dir / "config.json")
    if error:
        config_part.append(_box("error", error))
    else:
        assert config is not None
        config_part.append(_table(["option", "value"], [[k, _json_text(v)] for k, v in config.items()],
                                  row_headers=True))
    env_part = ["<h3>Environment (environment.json)</h3>"]
    env, error = _read_json_object(ctx.run_dir / "environment.json")
    if error:
        env_part.append(_box("error", error))
    else:
        assert env is not None
        env_part.append(_commands(env))
        shown = {k: v for k, v in env.items() if k not in ("argv", "started_by", "resumed_by")}
        env_part.append(_table(["item", "value"], [[k, _json_text(v)] for k, v in shown.items()], row_headers=True))
    return f'<div class="columns"><div>{"".join(config_part)}</div><div>{"".join(env_part)}</div></div>'


def _commands(env: dict) -> str:
    """The command that started the run (a dashboard launch with its equivalent command) and the resumes;
    runs written before those fields existed recorded argv."""
    def one(entry: object) -> str:
        if not isinstance(entry, dict) or not isinstance(entry.get("command"), str):
            return ""
        equivalent = entry.get("equivalent_command")
        text = entry["command"] + (f" (equivalent: {equivalent})" if isinstance(equivalent, str) else "")
        return f"<pre><code>{_e(text)}</code></pre>"

    started = one(env.get("started_by"))
    if not started and isinstance(env.get("argv"), list) and env["argv"]:
        started = f"<pre><code>{_e(runs.typed_command([str(a) for a in env['argv']]))}</code></pre>"
    resumes = "".join(one(e) for e in env.get("resumed_by") or [] if isinstance(env.get("resumed_by"), list))
    return (f"<p>Started by:</p>{started}" if started else "") + (f"<p>Resumed by:</p>{resumes}" if resumes else "")


def _metrics_file_problem(path: Path) -> str | None:
    """What is wrong with metrics.jsonl, in words; None when every line is a JSON record."""
    if not path.exists():
        return "metrics.jsonl is missing."
    try:
        raw = path.read_bytes()
    except OSError as e:
        return f"metrics.jsonl cannot be read ({e})."
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "metrics.jsonl is damaged: it is not text (binary data)."
    bad = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if not isinstance(record, dict):
            bad += 1
    return f"metrics.jsonl is damaged: {bad} line(s) are not JSON records and were left out." if bad else None


def _training(ctx: _Context) -> str:
    from .figures import loss_figure, score_figure

    problem = _metrics_file_problem(ctx.run_dir / "metrics.jsonl")
    try:
        epochs, steps = runs.epoch_metrics(ctx.run_dir), runs.step_metrics(ctx.run_dir)
    except (ValueError, KeyError, TypeError) as e:
        # runs.read_metrics skips half-written lines, but a file that is not text fails as a whole.
        return _box("error", problem or f"metrics.jsonl cannot be read ({type(e).__name__}: {e}).")
    parts = [_box("error", problem)] if problem else []
    if epochs.empty and steps.empty:
        return "".join(parts) + _p("No training metrics recorded.")
    status = runs.read_status(ctx.run_dir)
    steps_per_epoch = status.get("steps_per_epoch")
    steps_per_epoch = steps_per_epoch if isinstance(steps_per_epoch, int) and steps_per_epoch > 0 else None
    best = runs.read_report(ctx.run_dir).get("best_epoch")
    if best is not None:
        parts.append(_p(f"Best epoch (highest validation AUC, the checkpoint evaluated below): {best}."))
    parts.append('<div class="figures">' + ctx.figure(loss_figure(epochs, steps, steps_per_epoch))
                 + ctx.figure(score_figure(epochs)) + "</div>")
    if not epochs.empty:
        columns = [c for c in ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_auc", "lr")
                   if c in epochs]
        rows = [[_epoch_cell(r[c]) if c == "epoch" else _number(r[c]) for c in columns]
                for _, r in epochs.iterrows()]
        parts.append(_table(columns, rows, caption="Per-epoch records of metrics.jsonl (after a resume, the latest "
                                                   "record of each epoch)."))
    return "".join(parts)


def _number(value: Any) -> float | str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "—"
    return number if math.isfinite(number) else "—"


def _epoch_cell(value: Any) -> int | float | str:
    number = _number(value)
    return int(number) if isinstance(number, float) and number.is_integer() else number


TRAINING_TIME_ROWS = (("auc", "AUC"), ("sensitivity", "Sensitivity (recall)"), ("specificity", "Specificity"),
                      ("precision", "PPV (precision)"), ("npv", "NPV"), ("f1", "F1"), ("accuracy", "Accuracy"),
                      ("tp", "TP"), ("fn", "FN"), ("tn", "TN"), ("fp", "FP"))


def _training_time(ctx: _Context) -> str:
    report, error = _read_json_object(ctx.run_dir / "report.json")
    title = "<h3>At the end of training (report.json)</h3>"
    if error:
        return title + _box("error", f"No training-time figures: {error}")
    assert report is not None
    splits = [s for s in ("val", "test") if isinstance(report.get(s), dict)]
    if not splits:
        return title + _p("report.json holds no training-time metrics.", "note")
    threshold = report.get("threshold")
    rule = str(report.get("threshold_rule") or "Youden on validation").replace("youden", "Youden")
    rows = []
    for key, label in TRAINING_TIME_ROWS:
        row: list[object] = [label]
        for s in splits:
            value = report[s].get(key)
            row.append(value if key in ("tp", "fn", "tn", "fp") else _fmt(value))
        rows.append(row)
    return (title + _p(f"Computed once when training ended, at the threshold {_fmt(threshold)} ({rule}), without "
                       "intervals. They are kept for reference: the operating threshold and the intervals above "
                       "supersede them.", "note")
            + _table(["Metric", *[runs.set_label(s) for s in splits]], rows, row_headers=True))


def _operating_point(ctx: _Context) -> str:
    from .external import set_origin
    from .figures import confusion_figure
    from .operating import shift_warnings

    missing = _needs_threshold(ctx)
    if missing:
        return missing + _training_time(ctx)
    assert ctx.operating is not None
    names = [n for n in ctx.sets if n in ctx.prepared]
    parts = [f"<p>Operating threshold <b>{_e(ctx.operating.describe())}</b>.</p>", _set_error_boxes(ctx)]
    if "val" in ctx.prepared:
        val = ctx.prepared["val"].summary
        for other in (n for n in names if n != "val"):
            label = "test" if other == "test" else runs.set_label(other)
            gaps = shift_warnings(val, ctx.prepared[other].summary, label)
            if gaps:
                parts.append(_box("warning", f"<b>Validation does not represent {_e(label)}.</b> "
                                             + _e("; ".join(gaps)) + ". "
                                             + _e(f"{set_origin(ctx.run_dir, other)}: the threshold fitted on "
                                                  "validation does not give validation's rates there."),
                                  already_html=True))
    parts.append(_interval_table(ctx, names))
    positive = ctx.prepared[names[0]].pset.class_names[1]
    parts.append(_p(f"{_bootstrap_note(ctx)} Positive class: {positive}. PPV and NPV depend on each set's "
                    "prevalence.", "note"))
    parts.append("<h3>Confusion matrices</h3>")
    parts.append('<div class="figures small">' + "".join(
        ctx.figure(confusion_figure(ctx.prepared[n].summary["counts"], ctx.prepared[n].pset.class_names,
                                    f"{runs.set_label(n)} (n={ctx.prepared[n].summary['n']})"))
        for n in names) + "</div>")
    parts.append(_training_time(ctx))
    return "".join(parts)


def _curves(ctx: _Context) -> str:
    from .figures import pr_figure, roc_figure

    missing = _needs_threshold(ctx)
    if missing:
        return missing
    assert ctx.threshold is not None
    shown = [n for n in ("val", "test") if n in ctx.prepared]
    curves, markers = {}, []
    for n in shown:
        prepared = ctx.prepared[n]
        m = prepared.summary["metrics"]
        markers.append({"name": f"{runs.set_label(n)} at {ctx.threshold:.3f}", "fpr": 1 - m["specificity"]["value"],
                        "tpr": m["sensitivity"]["value"], "recall": m["sensitivity"]["value"],
                        "precision": m["ppv"]["value"], "colour": ctx.colour(n)})
        data = curve_data(prepared.pset, prepared.ranking)
        if data["roc"]:
            curves[n] = data
    parts = [_set_error_boxes(ctx, ("val", "test"))]
    one_class = [runs.set_label(n) for n in shown if n not in curves]
    if one_class:
        parts.append(_box("warning", f"{', '.join(one_class)}: one class only, so no curve (both are needed)."))
    if not curves:
        return "".join(parts) + _p("No set with both classes: no curves.")
    roc = {runs.set_label(n): {**c["roc"], "colour": ctx.colour(n)} for n, c in curves.items()}
    pr = {runs.set_label(n): {**c["pr"], "colour": ctx.colour(n)} for n, c in curves.items()}
    parts.append('<div class="figures">' + ctx.figure(roc_figure(roc, markers, "ROC (test is read, never tuned)"))
                 + ctx.figure(pr_figure(pr, markers)) + "</div>")
    parts.append(_p(f"Stars: the operating threshold {ctx.threshold:.3f} on each set. AUC and PR-AUC (average "
                    "precision) with 95% patient-bootstrap intervals; the dotted lines of the PR curve are each set's "
                    "prevalence, a random classifier's precision.", "note"))
    return "".join(parts)


def _calibration(ctx: _Context) -> str:
    from .calibration import N_BINS, calibration_summary, calibration_table, temperature_note, uncalibrated_probs
    from .figures import reliability_figure

    missing = _needs_threshold(ctx)
    if missing:
        return missing
    report = runs.read_report(ctx.run_dir)
    # As on the Thresholds page: a run without a recorded temperature is read with T = 1.
    temperature = report.get("temperature") if isinstance(report.get("temperature"), (int, float)) else 1.0
    parts = [_p(temperature_note(report))]
    _, report_error = _read_json_object(ctx.run_dir / "report.json")
    if report_error:
        parts.append(_box("error", report_error))
    summaries = {}
    for n in ctx.sets:
        if n not in ctx.prepared:
            continue
        pset = ctx.prepared[n].pset
        summaries[runs.set_label(n)] = {**calibration_summary(pset.labels, pset.probs,
                                                              uncalibrated_probs(pset.frame, float(temperature)),
                                                              # the same seeded resamples as the set's other
                                                              # intervals, drawn again rather than kept for every
                                                              # set (2,000 x images weights each)
                                                              boot=bootstrap_for(pset)),
                                        "colour": ctx.colour(n)}
    if not summaries:
        return "".join(parts)
    table = calibration_table(summaries).T
    rows = [[label, *table.loc[label]] for label in table.index]
    parts.append('<div class="columns">' + ctx.figure(reliability_figure(summaries)) + "<div>"
                 + _table(["set", *table.columns], rows, row_headers=True,
                          caption=f"ECE: expected calibration error over {N_BINS} equal-width probability bins. "
                                  "Brier: mean squared error of the probability. Lower is better for both. "
                                  "Before / after: without / with the temperature scaling fitted on validation. "
                                  "Brier: value [95% interval], patients resampled as for every other figure. ECE "
                                  "has no interval: it adds up absolute gaps, so chance alone inflates it on a few "
                                  "hundred images, and a resampled interval would not cover its true value.")
                 + "</div></div>")
    return "".join(parts)


def _subgroups(ctx: _Context) -> str:
    from .subgroups import MIN_GROUP_IMAGES, NO_METADATA, metadata_groups, prepare_subgroups, set_groups, subgroup_table

    missing = _needs_threshold(ctx)
    if missing:
        return missing
    assert ctx.threshold is not None
    names = [n for n in ctx.sets if n != "val" and n in ctx.prepared]
    if not names:
        return _p("No test or external predictions: no subgroups to read.")
    parts = []
    for n in names:
        pset = ctx.prepared[n].pset
        parts.append(f"<h3>{_e(runs.set_label(n))}</h3>")
        groups = set_groups(pset.frame)
        parts.extend(_p(f"{note}.", "note") for note in groups.attrs.get("notes", []))
        if metadata_groups(pset.frame).empty:
            parts.append(_p(NO_METADATA, "note"))
        if groups.shape[1] == 0:
            parts.append(_p("No subgroups: the file names do not follow Kermany's patterns and the images carry no "
                            "metadata."))
            continue
        table = subgroup_table(prepare_subgroups(pset.labels, pset.probs, pset.patients, groups), ctx.threshold)
        keys = [k for k in ("sensitivity", "specificity", "auc") if k in table]
        rows = [[r["grouping"], r["group"], int(r["images"]), int(r["positives"]), int(r["negatives"])]
                + [format_interval(r[k]) if isinstance(r[k], dict) else "—" for k in keys]
                for _, r in table.iterrows()]
        parts.append(_table(["grouping", "group", "images", "positives", "negatives",
                             *[METRIC_LABELS[k] for k in keys]], rows))
    parts.append(_p(f"At the operating threshold {ctx.threshold:.3f}; 95% patient-bootstrap intervals, patients "
                    "resampled within each group. Groups come from Kermany's file names (the pneumonia subtype, "
                    "bacterial / viral: pneumonia images only, so only a sensitivity; the two acquisition series of "
                    "the normal images: only a specificity) and from the image metadata where the data had it: age "
                    "band in years (0-4 and 5-17: children; 18-39, 40-64 and 65+: adults), sex, view position (AP "
                    "films are mostly bedside, of sicker patients; PA standing) and site; unknown: no value, or none "
                    f"that is an age. Groups under {MIN_GROUP_IMAGES} images get no interval.", "note"))
    return "".join(parts)


def _external(ctx: _Context) -> str:
    from .external import read_external

    names = [n for n in ctx.sets if n.startswith(runs.EXTERNAL_PREFIX)]
    parts = [_box("error", f"External evaluation '{name}' has no predictions.csv (damaged or interrupted): "
                           "evaluate the folder again, or delete it.") for name in ctx.missing_externals]
    if not names:
        return "".join(parts) + _p("No external evaluation of this run is included (python -m core evaluate RUN "
                                   "--data FOLDER evaluates one).")
    for n in names:
        short = n[len(runs.EXTERNAL_PREFIX):]
        parts.append(f"<h3>{_e(runs.set_label(n))}</h3>")
        if n in ctx.prepared:  # said first: then no threshold below means anything
            chance = chance_level_warning(ctx.prepared[n].summary["metrics"].get("auc"), runs.set_label(n))
            if chance:
                parts.append(_box("error", chance))
        try:
            summary: dict | None = read_external(ctx.run_dir, short)
        except (FileNotFoundError, ValueError) as e:
            summary = None
            parts.append(_box("error", str(e)))
        if summary is not None and isinstance(summary.get("ood"), dict):
            verdict = summary["ood"].get("verdict")
            if isinstance(verdict, str):
                parts.append(_box("warning" if summary["ood"].get("shifted") else "info", verdict))
        if summary is not None:
            parts.append(_external_summary(summary))
        if n in ctx.prepared:
            assert ctx.operating is not None
            parts.append(f"<p>At the run's current operating threshold <b>{_e(ctx.operating.describe())}</b>:</p>")
            parts.append(_interval_table(ctx, [n]))
            parts.append(_ood_parts(ctx, n))
        elif n in ctx.set_errors:
            parts.append(_box("error", ctx.set_errors[n]))
        elif ctx.operating is None:
            parts.append(_box("error", f"No metrics: {ctx.operating_error}"))
        if summary is not None and summary.get("refit") is not None:
            parts.append(_refit(summary["refit"]))
    return "".join(parts)


def _ood_parts(ctx: _Context, name: str) -> str:
    """The set's metrics on its images like and unlike the training data (the model's own verdict per image)."""
    from .ood import split_by_ood

    assert ctx.threshold is not None
    parts = split_by_ood(ctx.prepared[name].pset)
    if parts is None:
        return _p("This evaluation predates the out-of-distribution score: evaluate the folder again to split it "
                  "into images like and unlike the training data.", "note")
    columns = ["Metric"] + [f"{part.name.split('(')[-1].rstrip(')')} ({len(part.labels)} images)" for part in parts]
    summaries = [set_summary(part, ctx.threshold) if len(part.labels) else None for part in parts]
    rows = [[METRIC_LABELS[k]] + [format_interval(s["metrics"][k]) if s else "—" for s in summaries]
            for k in METRIC_KEYS]
    return (_p("Split by the model's own verdict on each image (does it do better where it claims to know the "
               "data?), same threshold, 95% patient-bootstrap intervals:") + _table(columns, rows, row_headers=True))


def _external_summary(summary: dict) -> str:
    def text(key: str) -> str:
        value = summary.get(key)
        return "?" if value is None else str(value)

    counts = summary.get("counts")
    counts_text = ", ".join(f"{c} {v}" for c, v in counts.items()) if isinstance(counts, dict) else "?"
    mapping = summary.get("class_map")
    rows = [["data folder", text("root") if summary.get("root") else text("data")], ["split", text("split")],
            ["images", f"{text('n')} ({counts_text}), {text('n_patients')} patients, {text('n_found')} files found"],
            ["class folders", ", ".join(f"{f} → {t}" for f, t in mapping.items())
             if isinstance(mapping, dict) else "?"],
            ["evaluated", text("created")]]
    threshold = summary.get("threshold")
    if isinstance(threshold, dict) and threshold.get("described"):
        rows.append(["threshold when evaluated", str(threshold["described"])])
    parts = [_table(["", ""], rows, row_headers=True)]
    skipped = summary.get("skipped")
    parts.append(_file_list("Unreadable images (skipped)", skipped if isinstance(skipped, list) else []))
    warnings = summary.get("warnings")
    if isinstance(warnings, list):
        parts += [_box("warning", str(w)) for w in warnings]
    elif warnings is not None:
        parts.append(_box("error", "summary.json is damaged: its warnings are not a list."))
    return "".join(parts)


def _refit(refit: object) -> str:
    title = "<h4>Threshold re-picked on part of this folder</h4>"
    if not isinstance(refit, dict):
        return title + _box("error", "summary.json is damaged: its re-picked threshold results are not an object.")
    try:
        intro = (f"Re-picked on {refit['fit']['n']} images ({refit['fit']['n_patients']} patients, "
                 f"{float(refit['fraction']):.0%} of the patients, seed {refit['seed']}) by "
                 f"{refit['rule_described']}: {float(refit['threshold']):.4f} (operating threshold when re-picked "
                 f"{float(refit['operating_threshold']):.4f}). Read on the other {refit['read']['n']} images "
                 f"({refit['read']['n_patients']} patients), with 95% patient-bootstrap intervals, as saved in "
                 "summary.json.")
        at_operating, at_refit = refit["at_operating"]["metrics"], refit["at_refit"]["metrics"]
        rows = [[METRIC_LABELS[k], format_interval(at_operating.get(k)), format_interval(at_refit.get(k))]
                for k in METRIC_KEYS]
        return title + _p(intro) + _table(
            ["Metric", f"at {float(refit['operating_threshold']):.3f} (operating)",
             f"at {float(refit['threshold']):.3f} (re-picked)"], rows, row_headers=True)
    except (KeyError, TypeError, ValueError, AttributeError):
        return title + _box("error", "summary.json is damaged: its re-picked threshold results are incomplete.")


def _mistakes(ctx: _Context) -> str:
    from .metrics import mistakes

    missing = _needs_threshold(ctx)
    if missing:
        return missing
    assert ctx.threshold is not None
    if "test" not in ctx.prepared:
        return _box("error", ctx.set_errors.get("test", "No test predictions: no mistakes to show."))
    pset = ctx.prepared["test"].pset
    wrong = mistakes(pset.frame, ctx.threshold)
    n_fn, n_fp = int((wrong["kind"] == "false negative").sum()), int((wrong["kind"] == "false positive").sum())
    parts = [_p(f"On test at the operating threshold {ctx.threshold:.3f}: {n_fn} false negative(s) and {n_fp} false "
                f"positive(s). The most confident of each (up to {MISTAKES_PER_KIND}) are shown with the image and "
                "its Grad-CAM overlay (evidence for the positive class).")]
    if wrong.empty:
        return "".join(parts)
    loaded, load_error = None, None
    try:
        from .predict import load_run_model

        loaded = load_run_model(ctx.run_dir)
    except (FileNotFoundError, ValueError) as e:
        load_error = str(e)
    if load_error:
        parts.append(_box("warning", f"No Grad-CAM: the model cannot be loaded ({load_error})."))
    positive = pset.class_names[1]
    for kind in ("false negative", "false positive"):
        rows = wrong[wrong["kind"] == kind].head(MISTAKES_PER_KIND)
        parts.append(f"<h3>{_e(kind.capitalize())}s</h3>")
        if rows.empty:
            parts.append(_p("None."))
            continue
        parts.append('<div class="cards">' + "".join(_mistake_card(loaded, row, pset.class_names, positive)
                                                     for _, row in rows.iterrows()) + "</div>")
    return "".join(parts)


def _mistake_card(loaded: Any, row: pd.Series, class_names: list[str], positive: str) -> str:
    from .predict import gradcam_display

    path = str(row["path"])
    true_name = row.get("class_name") if isinstance(row.get("class_name"), str) else class_names[int(row["label"])]
    patient = row.get("patient")
    caption = (f"{Path(path).name} · true {true_name} · p({positive}) = {float(row['prob']):.3f}"
               + (f" · patient {patient}" if isinstance(patient, str) and patient else ""))
    if loaded is None:
        return f'<div class="card"><p>{_e(caption)}</p></div>'
    try:
        view = gradcam_display(loaded, path)
    except (ValueError, OSError) as e:
        return f'<div class="card"><p>File missing or unreadable: {_e(Path(path).name)} ({_e(e)})</p>' \
               f"<p>{_e(caption)}</p></div>"
    # The dashboard's caption: the layer and map size, and whether the map found any evidence.
    cam_text = view.caption(positive)
    return (f'<div class="card"><div class="pair"><img alt="{_e(Path(path).name)}" src="{_png_data_uri(view.image)}">'
            f'<img alt="{_e(cam_text)}" src="{_png_data_uri(view.overlay)}"></div>'
            f"<p>{_e(caption)}</p><p class=\"note\">{_e(cam_text)}</p></div>")


def _limitations(ctx: _Context) -> str:
    from .external import set_origin

    items = [
        "<b>Single-centre paediatric data.</b> Kermany's images are chest X-rays of children aged one to five at "
        "Guangzhou Women and Children's Medical Center. Adults, other hospitals, other scanners and other "
        "projections (lateral, portable AP) are outside what the model has seen.",
        "<b>Label noise.</b> The labels are the grading of the original study, not a reference standard such as "
        "follow-up or laboratory confirmation; some images are mislabelled, and bacterial versus viral pneumonia "
        "is hard to tell from a radiograph.",
        "<b>Validation and test.</b> " + _e(set_origin(ctx.run_dir, "test")) + ": rates read on validation (and "
        "the threshold fitted there) may not carry over to test unchanged.",
        "<b>Thresholds rarely transfer between sites.</b> Prevalence, equipment and patients differ; a threshold "
        "fitted on this run's validation data should be re-picked on local data before any other use.",
        "<b>Intervals cover sampling variation only.</b> The 95% intervals resample patients of these sets; they say "
        "nothing about another population, label errors, or a shift in acquisition.",
        "<b>Research use only.</b> This is not a medical device and its output is not a diagnosis.",
    ]
    items.insert(1, "<b>Images unlike the training data.</b> " + _e(_ood_note(ctx)))
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _ood_note(ctx: _Context) -> str:
    from .ood import read_run_detector

    try:
        detector = read_run_detector(ctx.run_dir)
    except ValueError as e:
        return str(e)
    if detector is None:
        return ("This run has no out-of-distribution score, so nothing flags an image the model has not seen the like "
                "of (python -m core fit-ood RUN fits one).")
    rates = []
    for name in ("val", "test"):
        prepared = ctx.prepared.get(name)
        if prepared is not None and "ood_score" in prepared.pset.frame:
            scores = pd.to_numeric(prepared.pset.frame["ood_score"], errors="coerce").to_numpy()
            rates.append(f"{np.mean(~(scores <= detector.threshold)):.1%} of {runs.set_label(name)}")
    return (f"Prediction flags an image whose features are farther from the training images' than "
            f"{detector.threshold:.2f} (a threshold that 95% of validation images pass"
            + (f"; flagged: {', '.join(rates)}" if rates else "") + ") and images that are not chest X-rays "
            "(colour, blank, mostly white, elongated); a flagged image's decision is marked not applicable. The "
            "score only knows what is far from the training data: a plausible-looking film from another population "
            "can pass it.")


BUILDERS: dict[str, Callable[[_Context], str]] = {
    "summary": _summary, "data": _data, "split": _split, "config": _config, "training": _training,
    "operating-point": _operating_point, "curves": _curves, "calibration": _calibration, "subgroups": _subgroups,
    "external": _external, "mistakes": _mistakes, "limitations": _limitations,
}


def _section(section_id: str, title: str, ctx: _Context) -> str:
    try:
        body = BUILDERS[section_id](ctx)
    except Exception as e:  # one broken section must not cost the reader the whole report
        body = _box("error", f"This section could not be written ({type(e).__name__}: {e}).")
    return f'<section id="{section_id}"><h2>{_e(title)}</h2>{body}</section>'


# ---------------------------------------------------------------- entry points

def build_report_html(run_dir: str | os.PathLike, externals: list[str] | None = None) -> str:
    """The report of `run_dir` as one HTML document. `externals`: the external evaluations to include by name
    (empty or None: all of them); an unknown name raises ValueError. A run folder that is not a run raises
    FileNotFoundError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder.")
    if not runs.is_run_dir(run_dir) and not (run_dir / "status.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json or status.json).")
    ctx = _prepare(run_dir, externals)
    sections = "".join(_section(section_id, title, ctx) for section_id, title in SECTIONS)
    nav = " ".join(f'<a href="#{section_id}">{_e(title)}</a>' for section_id, title in SECTIONS)
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    threshold = f"operating threshold {ctx.operating.describe()}" if ctx.operating else "operating threshold unreadable"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>CXR workbench report · {_e(run_dir.name)}</title><style>{CSS}</style>"
        f'<script type="text/javascript">{_plotly_js()}</script></head><body>'
        f"<header><h1>Chest X-ray pneumonia classifier: run {_e(run_dir.name)}</h1>"
        f"<p>Research report, not a diagnosis · {_e(threshold)}</p>"
        f"<p>Written {_e(generated)} by <code>python -m core report</code> from {_e(run_dir.resolve())}</p></header>"
        f"<nav>{nav}</nav><main>{sections}</main><script>{RESIZE_ON_LOAD}</script></body></html>\n")


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike, externals: list[str] | None = None,
                 force: bool = False) -> Path:
    """Write the report of `run_dir` to `out` and return its path. `out` is checked before any work
    (`runs.check_output_file`: never a folder, a device or a run's own file, nor under a file; missing folders
    are created; an existing file is replaced only with `force`), and written atomically: a reader never sees half
    a file."""
    out = runs.check_output_file(out, force, suffixes=(".html",), new_folders=True)
    document = build_report_html(run_dir, externals)
    runs.check_output_file(out, force, suffixes=(".html",), new_folders=True)  # again: building takes a while
    out.parent.mkdir(parents=True, exist_ok=True)
    runs.write_file_atomic(out, lambda tmp: tmp.write_text(document, encoding="utf-8"))
    return out
