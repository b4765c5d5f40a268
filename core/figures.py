"""Plotly figure builders shared by the dashboard pages and the HTML report, so both draw the same
figures from the same numbers. Builders take plain data (arrays, tables, summaries) and return figures;
they read no files."""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd
import plotly.colors as pc
import plotly.graph_objects as go

# Plotly validates every property of every trace on construction: most of a Thresholds rerun's time. The
# builders are fixed code, so it is off here; tests/test_figures.py builds every figure with it on.
VALIDATE = False
# Named colour scales are resolved by validation too; this is plotly's "Blues".
BLUES = [[i / 8, c] for i, c in enumerate(pc.sequential.Blues)]
# The chart toolbar (plotly's modebar) sits in the top margin, right of the left-aligned title, so it covers
# no data: down the right edge (orientation "v") it hid the PR curve's operating points, the confusion
# matrices' right column and the last epoch at 1280 px. Five buttons keep it short beside a long title.
MODEBAR = dict(orientation="h", remove=["select2d", "lasso2d", "zoomIn2d", "zoomOut2d", "autoScale2d"])
TOP_MARGIN = 70  # px: the title's line and, above the plot area, the toolbar's row


def _title(text: str) -> dict:
    """A left-aligned title in the top margin (the toolbar takes the margin's right end)."""
    return {"text": text, "x": 0, "xanchor": "left", "xref": "paper", "y": 1, "yanchor": "bottom",
            "yref": "paper", "pad": {"b": 12}}
# Legend below the x-axis title, not over it.
LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.25)
# One colour per prediction set, the same on every figure (Okabe-Ito: colour-blind safe).
SET_COLOURS = {"val": "#0072B2", "test": "#D55E00"}
EXTERNAL_COLOURS = ("#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442")


def _text(text: str) -> dict:
    """A title as plotly.js wants it: without validation a bare string is not converted, and plotly.js
    (v3 and later) draws no title from a string."""
    return {"text": text}


def plain_label(text: object) -> str:
    """Text from a file (a run, set or class name) for a figure: plotly.js draws HTML tags (<a href>, <b>)
    and entities in names, titles and axis labels, and fills %{...} in hover templates; escaped, it shows the
    characters themselves."""
    return html.escape(str(text), quote=False).replace("%{", "%&#123;")


def _scatter(**kwargs) -> go.Scatter:
    return go.Scatter(_validate=VALIDATE, **kwargs)


def set_colour(name: str, index: int = 0) -> str:
    return SET_COLOURS.get(name, EXTERNAL_COLOURS[index % len(EXTERNAL_COLOURS)])


def _auc_text(auc) -> str:
    if isinstance(auc, dict):
        value, low, high = auc.get("value"), auc.get("low"), auc.get("high")
        if value is None or not np.isfinite(value):
            return "—"
        if low is not None and high is not None and np.isfinite(low) and np.isfinite(high):
            return f"{value:.3f} [{low:.3f}, {high:.3f}]"
        return f"{value:.3f}"
    return "—" if auc is None or not np.isfinite(auc) else f"{auc:.3f}"


def roc_figure(curves: dict[str, dict], markers: list[dict] | None = None, title: str = "ROC curve") -> go.Figure:
    """ROC curves of several sets overlaid. curves[label] = {fpr, tpr, threshold, auc (float or interval
    dict), colour}; markers = [{name, fpr, tpr, colour, symbol}] for operating points."""
    fig = go.Figure(_validate=VALIDATE)
    fig.add_trace(_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="#888888"),
                             name="chance", hoverinfo="skip"))
    for label, c in curves.items():
        label = plain_label(label)
        fig.add_trace(_scatter(x=c["fpr"], y=c["tpr"], mode="lines", name=f"{label} (AUC {_auc_text(c['auc'])})",
                                 line=dict(color=c.get("colour")), customdata=c["threshold"],
                                 hovertemplate=f"{label}<br>FPR %{{x:.3f}}<br>TPR %{{y:.3f}}<br>"
                                               "threshold %{customdata:.3f}<extra></extra>"))
    for m in markers or []:
        fig.add_trace(_scatter(x=[m["fpr"]], y=[m["tpr"]], mode="markers", name=plain_label(m["name"]),
                                 marker=dict(symbol=m.get("symbol", "star"), size=m.get("size", 14),
                                             color=m.get("colour", "#DC143C"), line=dict(width=1, color="#000000"))))
    fig.update_layout(modebar=MODEBAR, title=_title(title), height=460, margin=dict(t=TOP_MARGIN, b=40),
                      legend=LEGEND_BELOW)
    fig.update_xaxes(title=_text("False positive rate (1 − specificity)"), range=[0, 1], constrain="domain")
    # Equal aspect: the diagonal is at 45° and curves compare by eye.
    fig.update_yaxes(title=_text("True positive rate (sensitivity)"), range=[0, 1.01], scaleanchor="x", scaleratio=1)
    return fig


def pr_figure(curves: dict[str, dict], markers: list[dict] | None = None,
              title: str = "Precision–recall curve") -> go.Figure:
    """PR curves overlaid. curves[label] = {precision, recall, threshold, auc (average precision),
    prevalence, colour}; a dashed line per set at its prevalence (a random classifier's precision)."""
    fig = go.Figure(_validate=VALIDATE)
    for label, c in curves.items():
        label = plain_label(label)
        fig.add_trace(_scatter(x=[0, 1], y=[c["prevalence"]] * 2, mode="lines", hoverinfo="skip",
                                 name=f"{label} chance (prevalence {c['prevalence']:.2f})",
                                 line=dict(dash="dot", color=c.get("colour"), width=1)))
        fig.add_trace(_scatter(x=c["recall"], y=c["precision"], mode="lines",
                                 name=f"{label} (PR-AUC {_auc_text(c['auc'])})", line=dict(color=c.get("colour")),
                                 customdata=c["threshold"],
                                 hovertemplate=f"{label}<br>recall %{{x:.3f}}<br>precision %{{y:.3f}}<br>"
                                               "threshold %{customdata:.3f}<extra></extra>"))
    for m in markers or []:
        if m.get("precision") is None or not np.isfinite(m["precision"]):
            continue
        fig.add_trace(_scatter(x=[m["recall"]], y=[m["precision"]], mode="markers", name=plain_label(m["name"]),
                                 marker=dict(symbol=m.get("symbol", "star"), size=m.get("size", 14),
                                             color=m.get("colour", "#DC143C"), line=dict(width=1, color="#000000"))))
    fig.update_layout(modebar=MODEBAR, title=_title(title), height=460, margin=dict(t=TOP_MARGIN, b=40),
                      legend=LEGEND_BELOW)
    fig.update_xaxes(title=_text("Recall (sensitivity)"), range=[0, 1])
    fig.update_yaxes(title=_text("Precision (PPV)"), range=[0, 1.01])
    return fig


def confusion_figure(counts: dict, names: list[str], title: str) -> go.Figure:
    """2x2 confusion matrix from {tp, fp, fn, tn}; names = [negative, positive] (shown as text)."""
    z = [[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]]
    names = [plain_label(n) for n in names]
    heatmap = go.Heatmap(_validate=VALIDATE, z=z, x=names, y=names, text=z, texttemplate="%{text}",
                         textfont=dict(size=18),
                         colorscale=BLUES, showscale=False,
                         hovertemplate="true %{y}<br>predicted %{x}<br>%{z} images<extra></extra>")
    fig = go.Figure(_validate=VALIDATE, data=heatmap)
    fig.update_layout(modebar=MODEBAR, title=_title(title), height=340, margin=dict(t=TOP_MARGIN, b=40))
    fig.update_xaxes(title=_text("Predicted class"), type="category")
    fig.update_yaxes(title=_text("True class"), type="category", autorange="reversed")
    return fig


# The dashboard's live threshold view (components/operating_view.js) draws curves from these points: a curve of
# every candidate threshold has one point per image, so it is thinned to one point per CURVE_GRID cell, which a
# chart a few hundred pixels wide cannot tell apart from the whole curve.
CURVE_GRID = 0.002


def thin_curve(x: np.ndarray, y: np.ndarray, threshold: np.ndarray, grid: float = CURVE_GRID) -> dict[str, list]:
    """The curve's points with consecutive points in the same grid cell merged (the first kept), the last point
    kept; coordinates rounded to 4 decimals."""
    x, y, threshold = (np.asarray(a, dtype=float) for a in (x, y, threshold))
    if len(x) == 0:
        return {"x": [], "y": [], "threshold": []}
    cells = np.stack([np.floor(x / grid), np.floor(y / grid)], axis=1)
    keep = np.ones(len(x), dtype=bool)
    keep[1:] = np.any(cells[1:] != cells[:-1], axis=1)
    keep[-1] = True
    return {k: np.round(v[keep], 4).tolist() for k, v in (("x", x), ("y", y), ("threshold", threshold))}


def operating_curves(roc_curves: dict[str, dict], pr_curves: dict[str, dict], roc_title: str = "ROC curve",
                     pr_title: str = "Precision–recall curve") -> dict:
    """The curves of the dashboard's live threshold view: those of roc_figure / pr_figure (same inputs, same
    legend texts), thinned, in plain text (the view writes every name as text, never as HTML), and a key that
    changes only when they do. Threshold-free: built once per set of curves, then passed to operating_view_data
    at every threshold."""
    import hashlib
    import json

    roc, pr = [], []
    for label, c in roc_curves.items():
        roc.append({"name": f"{label} (AUC {_auc_text(c['auc'])})", "label": label, "colour": c.get("colour"),
                    **thin_curve(c["fpr"], c["tpr"], c["threshold"])})
    for label, c in pr_curves.items():
        pr.append({"name": f"{label} chance (prevalence {c['prevalence']:.2f})", "label": label,
                   "colour": c.get("colour"), "dash": "4 3", "x": [0, 1], "y": [c["prevalence"]] * 2})
        pr.append({"name": f"{label} (PR-AUC {_auc_text(c['auc'])})", "label": label, "colour": c.get("colour"),
                   **thin_curve(c["recall"], c["precision"], c["threshold"])})
    charts = {
        "roc": {"title": roc_title, "x_title": "False positive rate (1 − specificity)", "x_name": "FPR",
                "y_title": "True positive rate (sensitivity)", "y_name": "TPR",
                "curves": [{"name": "chance", "label": "chance", "colour": "#888888", "dash": "6 4", "x": [0, 1],
                            "y": [0, 1]}] + roc} if roc else None,
        "pr": {"title": pr_title, "x_title": "Recall (sensitivity)", "x_name": "recall",
               "y_title": "Precision (PPV)", "y_name": "precision", "curves": pr} if pr else None,
    }
    return {"curves_key": hashlib.sha1(json.dumps(charts, sort_keys=True).encode()).hexdigest()[:16], **charts}


def operating_view_data(curves: dict, markers: list[dict], matrices: list[dict]) -> dict:
    """What the live threshold view draws: `curves` from operating_curves, the operating points ({name, colour,
    fpr, tpr, recall, precision}; an undefined coordinate is left out of its chart) and the confusion matrices
    ({title, classes [negative, positive], counts {tp, fp, fn, tn}}), in plain text."""
    def finite(value) -> float | None:
        return float(value) if value is not None and np.isfinite(value) else None

    return {
        **curves,
        "markers": [{"name": m["name"], "colour": m.get("colour", "#DC143C"),
                     **{k: finite(m.get(k)) for k in ("fpr", "tpr", "recall", "precision")}} for m in markers],
        "matrices": [{"title": m["title"], "classes": [str(n) for n in m["classes"]],
                      "counts": [[int(m["counts"]["tn"]), int(m["counts"]["fp"])],
                                 [int(m["counts"]["fn"]), int(m["counts"]["tp"])]]} for m in matrices],
    }


def reliability_figure(summaries: dict[str, dict], title: str = "Reliability diagram") -> go.Figure:
    """Observed share of positives against mean predicted probability per bin, before (dotted) and after
    (solid) temperature scaling, for each set. summaries[label] = calibration_summary(...) + colour."""
    fig = go.Figure(_validate=VALIDATE)
    fig.add_trace(_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="#888888"),
                             name="perfect calibration", hoverinfo="skip"))
    for label, s in summaries.items():
        label = plain_label(label)
        for key, dash, word in (("before", "dot", "before scaling"), ("after", "solid", "after scaling")):
            part = s[key]
            bins: pd.DataFrame = part["bins"]
            fig.add_trace(_scatter(
                x=bins["mean_predicted"], y=bins["observed_positive"], mode="lines+markers",
                line=dict(color=s.get("colour"), dash=dash),
                marker=dict(size=np.clip(4 + np.sqrt(bins["count"]), 5, 16)),
                name=f"{label} {word} (ECE {part['ece']:.3f}, Brier {part['brier']:.3f})",
                customdata=np.stack([bins["count"], bins["bin_low"], bins["bin_high"]], axis=1),
                hovertemplate=f"{label} {word}<br>bin %{{customdata[1]:.1f}}–%{{customdata[2]:.1f}}: "
                              "%{customdata[0]} images<br>mean predicted %{x:.3f}<br>observed %{y:.3f}<extra></extra>"))
    n_bins = next(iter(summaries.values()))["n_bins"] if summaries else 10
    fig.update_layout(modebar=MODEBAR, title=_title(f"{title} ({n_bins} equal-width bins)"),
                      height=480, margin=dict(t=TOP_MARGIN, b=40), legend=LEGEND_BELOW)
    fig.update_xaxes(title=_text("Mean predicted probability"), range=[0, 1], constrain="domain")
    fig.update_yaxes(title=_text("Observed share of positives"), range=[0, 1.01], scaleanchor="x", scaleratio=1)
    return fig


SCORE_RANGE = [0, 1.02]  # AUC and accuracy live in 0-1 (a hair more, so a point at 1 is not cut in half)


def _last_epoch(*frames: pd.DataFrame) -> float:
    values = [float(np.nanmax(f["epoch"])) for f in frames if not f.empty and "epoch" in f and f["epoch"].notna().any()]
    return max(values, default=1.0)


def _epoch_axis(fig: go.Figure, last_epoch: float) -> None:
    """Whole epochs from 0: one tick per epoch (every n-th beyond ten), never '0, 1, 1' from a fractional
    tick printed as an integer."""
    last = max(1, math.ceil(last_epoch))
    fig.update_xaxes(range=[0, last + 0.15], tick0=0, dtick=max(1, math.ceil(last / 10)), tickformat="d")


def _loss_range(*series: pd.Series) -> list[float]:
    """0 to a little above the largest loss: a loss is never negative, and one point is no reason to show -0.5."""
    values = [float(np.nanmax(s)) for s in series if len(s) and s.notna().any()]
    top = max(values, default=1.0)
    return [0, (top if math.isfinite(top) and top > 0 else 1.0) * 1.08]


def epoch_curves_figure(curves: dict[str, pd.DataFrame], column: str, title: str, y_title: str,
                        score: bool = False) -> go.Figure:
    """One line per run of a per-epoch column (Compare); `score`: a 0-1 metric (AUC, accuracy), else a loss."""
    fig = go.Figure(_validate=VALIDATE)
    for name, epochs in curves.items():
        if column in epochs:
            fig.add_trace(_scatter(x=epochs["epoch"], y=epochs[column], mode="lines+markers", name=plain_label(name)))
    fig.update_layout(modebar=MODEBAR, title=_title(title), xaxis_title=_text("Epoch"), yaxis_title=_text(y_title),
                      margin=dict(t=TOP_MARGIN, b=10), legend=LEGEND_BELOW, showlegend=True)
    _epoch_axis(fig, _last_epoch(*curves.values()))
    fig.update_yaxes(range=SCORE_RANGE if score else _loss_range(*(e[column] for e in curves.values() if column in e)))
    return fig


def loss_figure(epochs: pd.DataFrame, steps: pd.DataFrame, steps_per_epoch: int | None) -> go.Figure:
    """Training loss per step and per epoch, validation loss per epoch."""
    fig = go.Figure(_validate=VALIDATE)
    if not steps.empty and "loss" in steps:
        per_epoch = steps_per_epoch or int(steps["step"].max())
        fig.add_trace(_scatter(x=steps["global_step"] / per_epoch, y=steps["loss"], mode="lines",
                                 name="train (per step)", line=dict(width=1), opacity=0.45))
    losses = [steps["loss"]] if not steps.empty and "loss" in steps else []
    for column, name in (("train_loss", "train (epoch mean)"), ("val_loss", "validation")):
        if not epochs.empty and column in epochs:
            fig.add_trace(_scatter(x=epochs["epoch"], y=epochs[column], mode="lines+markers", name=name))
            losses.append(epochs[column])
    fig.update_layout(modebar=MODEBAR, title=_title("Loss"), xaxis_title=_text("Epoch"),
                      yaxis_title=_text("Cross-entropy loss (weighted)"),
                      margin=dict(t=TOP_MARGIN, b=10), legend=LEGEND_BELOW)
    step_epochs = steps["global_step"] / (steps_per_epoch or steps["step"].max()) if not steps.empty and \
        {"global_step", "step"} <= set(steps) else pd.Series(dtype=float)
    _epoch_axis(fig, max(_last_epoch(epochs), float(step_epochs.max()) if step_epochs.notna().any() else 0.0))
    fig.update_yaxes(range=_loss_range(*losses))
    return fig


def score_figure(epochs: pd.DataFrame) -> go.Figure:
    """Accuracy and validation AUC per epoch, on a fixed 0–1 axis (also before the first epoch)."""
    fig = go.Figure(_validate=VALIDATE)
    for column, name in (("train_accuracy", "train accuracy"), ("val_accuracy", "validation accuracy"),
                         ("val_auc", "validation AUC")):
        if not epochs.empty and column in epochs:
            fig.add_trace(_scatter(x=epochs["epoch"], y=epochs[column], mode="lines+markers", name=name))
    fig.update_layout(modebar=MODEBAR, title=_title("Accuracy and AUC"), xaxis_title=_text("Epoch"),
                      yaxis_title=_text("Score (0–1)"),
                      margin=dict(t=TOP_MARGIN, b=10), legend=LEGEND_BELOW)
    fig.update_yaxes(range=SCORE_RANGE)
    _epoch_axis(fig, _last_epoch(epochs))
    return fig


def study_seed_figure(rows: list[dict], arms: list[dict]) -> go.Figure:
    """Test AUC of every seed by arm (one dot per run, labelled with its seed), the arm's mean as a bar
    with its 95% t-interval over seeds."""
    fig = go.Figure(_validate=VALIDATE)
    order = [a["arm"] for a in arms]
    means = [a["auc"]["mean"] for a in arms]
    err_plus = [a["auc"]["high"] - a["auc"]["mean"] if a["auc"]["n"] > 1 else 0 for a in arms]
    err_minus = [a["auc"]["mean"] - a["auc"]["low"] if a["auc"]["n"] > 1 else 0 for a in arms]
    fig.add_trace(go.Scatter(_validate=VALIDATE, x=order, y=means, mode="markers",
                             name="mean (95% t-interval with 2+ seeds)",
                             marker=dict(symbol="line-ew-open", size=28, color="#000000", line=dict(width=2)),
                             error_y=dict(type="data", symmetric=False, array=err_plus, arrayminus=err_minus,
                                          color="#777777")))
    done = [r for r in rows if "auc" in r]
    # Seeds in the hover text, not as labels: labels of close values overlap.
    fig.add_trace(_scatter(x=[r["arm"] for r in done], y=[r["auc"] for r in done], mode="markers",
                           name="one run (seed)", text=[f"seed {r['seed']}: {r['auc']:.4f}" for r in done],
                           hoverinfo="text", marker=dict(size=10, color="#0072B2", opacity=0.7)))
    fig.update_layout(modebar=MODEBAR, title=_title("Test AUC per seed, by arm"), xaxis_title=_text("Arm"),
                      yaxis_title=_text("Test ROC AUC"), margin=dict(t=TOP_MARGIN, b=10), legend=LEGEND_BELOW)
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=order)
    # AUC's own range: from a little below the lowest value shown to 1 (an interval reaching past 1 is cut there).
    shown = [v for v in [*means, *(m - e for m, e in zip(means, err_minus)), *(r["auc"] for r in done)]
             if isinstance(v, (int, float)) and math.isfinite(v)]
    low = max(0.0, math.floor((min(shown, default=0.5) - 0.02) * 20) / 20)
    fig.update_yaxes(range=[low, SCORE_RANGE[1]])
    return fig
