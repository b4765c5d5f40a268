"""Thresholds: ROC and precision-recall curves, the confusion matrix and the clinical rates at a decision
threshold set by hand or by a target, chosen on validation and read on test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import ui
from core import runs
from core.metrics import choose_threshold, metrics_at_threshold, pr_points, roc_points, safe_auc

SPLITS = ("val", "test")
MODES = {
    "slider": "Slider",
    "recall": "Recall ≥ X",
    "specificity": "Specificity ≥ X",
    "best_f1": "Best F1",
    "youden": "Youden",
}
RATES = {
    "sensitivity": "Sensitivity (recall)",
    "specificity": "Specificity",
    "precision": "Precision (PPV)",
    "npv": "NPV",
    "f1": "F1",
    "accuracy": "Accuracy",
}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def class_names(df: pd.DataFrame, run_dir: Path) -> list[str]:
    """[negative, positive] names: from the predictions, else the run's data report."""
    if "class_name" in df:
        by_label = df.drop_duplicates("label").set_index("label")["class_name"]
        if 0 in by_label.index and 1 in by_label.index:
            return [str(by_label[0]), str(by_label[1])]
    classes = (runs.read_json(run_dir / "data_report.json", {}) or {}).get("classes")
    if isinstance(classes, list) and len(classes) == 2:
        return [str(c) for c in classes]
    return ["negative", "positive"]


# mtime is a hashed argument (no leading underscore) so a re-evaluated split is recomputed.
@st.cache_data(show_spinner=False, max_entries=32)
def split_curves(run_dir: str, split: str, mtime: float) -> dict:
    """Labels, probabilities and every ROC/PR point of a split, once per predictions file version: moving
    the slider then only costs metrics_at_threshold."""
    df = runs.read_predictions(Path(run_dir), split)
    labels = df["label"].to_numpy(dtype=int)
    probs = df["prob"].to_numpy(dtype=float)
    both = len(np.unique(labels)) == 2
    return {
        "labels": labels, "probs": probs, "names": class_names(df, Path(run_dir)), "both_classes": both,
        "roc": roc_points(labels, probs) if both else None,
        "pr": pr_points(labels, probs) if both else None,
        "auc": safe_auc(labels, probs),
    }


def roc_figure(curve: dict, m: dict, operating: dict | None) -> go.Figure:
    roc = curve["roc"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="gray"),
                             name="chance", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=roc["fpr"], y=roc["tpr"], mode="lines", name="ROC", customdata=roc["threshold"],
                             hovertemplate="FPR %{x:.3f}<br>TPR %{y:.3f}<br>threshold %{customdata:.3f}"
                                           "<extra></extra>"))
    if operating is not None:
        fig.add_trace(go.Scatter(x=[1 - operating["specificity"]], y=[operating["sensitivity"]], mode="markers",
                                 marker=dict(symbol="diamond", size=11, color="gray"),
                                 name=f"saved {operating['threshold']:.3f}"))
    fig.add_trace(go.Scatter(x=[1 - m["specificity"]], y=[m["sensitivity"]], mode="markers",
                             marker=dict(symbol="star", size=16, color="crimson"),
                             name=f"threshold {m['threshold']:.3f}"))
    fig.update_layout(title=f"ROC curve (AUC {curve['auc']:.3f})", height=430, margin=dict(t=50, b=40),
                      legend=dict(x=0.98, y=0.02, xanchor="right", yanchor="bottom"))
    fig.update_xaxes(title="False positive rate (1 − specificity)", range=[0, 1], constrain="domain")
    # Equal aspect: the diagonal is at 45° and curves compare by eye.
    fig.update_yaxes(title="True positive rate (sensitivity)", range=[0, 1.01], scaleanchor="x", scaleratio=1)
    return fig


def pr_figure(curve: dict, m: dict, operating: dict | None) -> go.Figure:
    pr = curve["pr"]
    prevalence = float(np.mean(curve["labels"]))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[prevalence, prevalence], mode="lines", name="chance (prevalence)",
                             line=dict(dash="dash", color="gray"), hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=pr["recall"], y=pr["precision"], mode="lines", name="PR",
                             customdata=pr["threshold"],
                             hovertemplate="recall %{x:.3f}<br>precision %{y:.3f}<br>threshold %{customdata:.3f}"
                                           "<extra></extra>"))
    if operating is not None and not np.isnan(operating["precision"]):
        fig.add_trace(go.Scatter(x=[operating["sensitivity"]], y=[operating["precision"]], mode="markers",
                                 marker=dict(symbol="diamond", size=11, color="gray"),
                                 name=f"saved {operating['threshold']:.3f}"))
    if not np.isnan(m["precision"]):
        fig.add_trace(go.Scatter(x=[m["sensitivity"]], y=[m["precision"]], mode="markers",
                                 marker=dict(symbol="star", size=16, color="crimson"),
                                 name=f"threshold {m['threshold']:.3f}"))
    fig.update_layout(title=f"Precision–recall curve (area {pr['auc']:.3f})", height=430,
                      margin=dict(t=50, b=40), legend=dict(x=0.02, y=0.02, yanchor="bottom"))
    fig.update_xaxes(title="Recall (sensitivity)", range=[0, 1])
    fig.update_yaxes(title="Precision (PPV)", range=[0, 1.01])
    return fig


def confusion_figure(m: dict, names: list[str], title: str) -> go.Figure:
    z = [[m["tn"], m["fp"]], [m["fn"], m["tp"]]]
    fig = go.Figure(go.Heatmap(z=z, x=names, y=names, text=z, texttemplate="%{text}", textfont=dict(size=18),
                               colorscale="Blues", showscale=False,
                               hovertemplate="true %{y}<br>predicted %{x}<br>%{z} images<extra></extra>"))
    fig.update_layout(title=title, height=340, margin=dict(t=50, b=40))
    fig.update_xaxes(title="Predicted class", type="category")
    fig.update_yaxes(title="True class", type="category", autorange="reversed")
    return fig


st.set_page_config(page_title="Thresholds · CXR workbench", layout="wide")
st.title("Decision threshold")
st.caption("Choose the threshold on **validation**, then read **test** at that threshold: tuning on test "
           "makes its numbers optimistic.")

run_dir = ui.run_picker()
if run_dir is None:
    st.stop()

available = [s for s in SPLITS if (run_dir / f"predictions_{s}.csv").exists()]
if "val" not in available:
    st.error(f"No validation predictions in `{run_dir}`: the run has not finished evaluating.")
    st.stop()
try:
    curves = {s: split_curves(str(run_dir), s, _mtime(run_dir / f"predictions_{s}.csv")) for s in available}
except (FileNotFoundError, ValueError) as e:
    st.error(str(e))
    st.stop()

# A new run starts from its own operating threshold, not from the last run's slider position.
if st.session_state.get("threshold_run") != str(run_dir):
    st.session_state["thr_slider"] = runs.operating_threshold(run_dir)
    st.session_state["threshold_run"] = str(run_dir)

controls = st.columns([1, 3, 1])
split = controls[0].radio("Tune on", available, horizontal=True, key="thr_split", persist_state="session")
mode = controls[1].radio("Set the threshold by", list(MODES), format_func=MODES.get, horizontal=True,
                         key="thr_mode", persist_state="session")
x = None
if mode in ("recall", "specificity"):
    x = controls[2].number_input("X", min_value=0.5, max_value=1.0, value=0.95, step=0.01, format="%.3f",
                                 key="thr_x", persist_state="session")

curve = curves[split]
if not curve["both_classes"]:
    st.warning(f"The {split} split holds only one class: curves and targets need both.")

chosen = None
if mode != "slider":
    chosen = choose_threshold(curve["labels"], curve["probs"], mode, x)
    # The slider shows the chosen value and starts from it when switching back to manual.
    st.session_state["thr_slider"] = chosen
slider_value = st.slider("Threshold (predict positive when probability ≥ threshold)", 0.0, 1.0, step=0.001,
                         format="%.3f", key="thr_slider", persist_state="session", disabled=chosen is not None)
# A target's exact threshold, not the slider's rounding of it: recall >= X must hold.
threshold = float(slider_value if chosen is None else chosen)
target = "manual" if chosen is None else (f"{mode}>={x:.3f}" if x is not None else mode)

# Read by the Mistakes page (and kept when switching pages).
st.session_state.update(threshold=threshold, threshold_split=split, threshold_target=target)

if split == "test":
    st.warning("You are tuning the threshold on the **test** set. Numbers read on test at a threshold chosen "
               "on test are optimistic; choose it on validation and only read test.")

metrics = {s: metrics_at_threshold(c["labels"], c["probs"], threshold) for s, c in curves.items()}
operating = runs.operating_threshold(run_dir)
operating_metrics = metrics_at_threshold(curve["labels"], curve["probs"], operating)

summary = st.columns([1, 1, 2])
summary[0].metric("Current threshold", f"{threshold:.3f}", help=f"Target: {target}, on {split}")
if summary[2].button("Save threshold", type="primary",
                     help="Prediction and the Mistakes page use the saved threshold of a run."):
    try:
        runs.save_threshold(run_dir, threshold, chosen_on=split, target=target)
        operating = threshold
        operating_metrics = metrics[split]
        summary[2].success(f"Saved {threshold:.3f} (chosen on {split}, {target}).")
    except (ValueError, OSError) as e:
        summary[2].error(f"Could not save the threshold: {e}")
saved = runs.read_json(run_dir / "threshold.json", {}) or {}
origin = (f"saved, chosen on {saved.get('chosen_on')} ({saved.get('target')})" if "threshold" in saved
          else "chosen on validation (Youden) at the end of training")
summary[1].metric("Operating threshold", f"{operating:.3f}", help=f"Used by Predict: {origin}")
summary[2].caption(f"Operating threshold {origin}.")

if curve["both_classes"]:
    charts = st.columns(2)
    charts[0].plotly_chart(roc_figure(curve, metrics[split], operating_metrics), key="roc")
    charts[1].plotly_chart(pr_figure(curve, metrics[split], operating_metrics), key="pr")

order = [split] + [s for s in available if s != split]
matrices = st.columns(len(order))
for col, s in zip(matrices, order, strict=True):
    m = metrics[s]
    role = "threshold chosen here" if s == split else "threshold applied"
    n = m["tp"] + m["tn"] + m["fp"] + m["fn"]
    col.plotly_chart(confusion_figure(m, curves[s]["names"], f"{s}: {role} (n={n})"), key=f"cm_{s}")

table = pd.DataFrame({f"{s} ({'tuned' if s == split else 'applied'})": [metrics[s][k] for k in RATES]
                      for s in order}, index=list(RATES.values()))
st.dataframe(table.style.format("{:.3f}", na_rep="—"))
st.caption("Positive class: " + curve["names"][1] + ". NPV: share of negative predictions that are truly "
           "negative. A dash: undefined (no predictions or no images of that kind).")
