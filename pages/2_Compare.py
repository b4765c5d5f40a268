"""Compare runs: validation curves overlaid, a sortable table of validation and test metrics, and a
one-click study of fine-tuning strategies (frozen, partial, full, and a small CNN from scratch)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

import ui
from core import runs
from core.bootstrap import format_interval
from core.config import ARCHITECTURES, TrainConfig
from core.dataset import scan_dataset
from core.figures import epoch_curves_figure
from core.launch import launch_training, strategy_study
from core.operating import run_summary

MAX_DEFAULT_RUNS = 8
METRICS = ("auc", "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")
METRIC_SHORT = {"auc": "AUC", "sensitivity": "sensitivity", "specificity": "specificity", "ppv": "PPV", "npv": "NPV",
                "f1": "F1", "accuracy": "accuracy"}

st.set_page_config(page_title="Compare · CXR workbench", page_icon="🫁", layout="wide")


def comparison_row(run: dict) -> dict:
    """One run's row: its operating threshold and how it was chosen, val and test metrics at that threshold
    with 95% patient-bootstrap intervals (strings 'value [low, high]', which sort like the values)."""
    run_dir = Path(run["path"])
    status = runs.read_status(run_dir)
    report = runs.read_report(run_dir)
    elapsed = status.get("elapsed")
    epochs = runs.epoch_metrics(run_dir)
    row = {"run": run["run"], "state": run["state"], "arch": run["arch"],
           "strategy": "scratch" if run["arch"] == "smallcnn" else run["strategy"],
           "pretrained": bool(run["pretrained"]) and run["arch"] != "smallcnn",
           "epochs run": int(epochs["epoch"].nunique()) if not epochs.empty else 0, "epochs max": run["epochs"],
           "best epoch": report.get("best_epoch"),
           "training time (min)": round(elapsed / 60, 2) if isinstance(elapsed, (int, float)) else None}
    if run["state"] != "finished":
        return row
    try:
        summary = run_summary(run_dir, ["val", "test"])
    except ValueError as e:  # a damaged threshold.json: say so in the row, keep the others
        row["operating threshold"] = f"damaged: {e}"
        return row
    row["threshold"] = summary["threshold"]
    row["operating threshold"] = summary["operating"].describe()
    for split, s in summary["sets"].items():
        for key in METRICS:
            row[f"{split} {METRIC_SHORT[key]}"] = format_interval(s["metrics"][key])
    if summary["errors"]:
        row["problem"] = "; ".join(summary["errors"].values())
    return row


def training_time_row(run: dict) -> dict:
    """The figures written at the end of training, at the Youden threshold chosen on validation then."""
    report = runs.read_report(Path(run["path"]))
    row = {"run": run["run"], "Youden threshold (training)": report.get("threshold")}
    for split in ("val", "test"):
        m = report.get(split) if isinstance(report.get(split), dict) else {}
        for key in ("auc", "sensitivity", "specificity"):
            value = m.get(key)
            row[f"{split} {key}"] = value if isinstance(value, (int, float)) else None
    return row


def study_form() -> None:
    st.markdown("Trains the same data, seed, image size and epochs four ways: an ImageNet backbone with a "
                "**frozen** backbone (head only), **partial** (last stage + head) and **full** fine-tuning, and "
                "the **small CNN from scratch**. The runs queue and train one after another.")
    transfer_archs = [a for a in ARCHITECTURES if a != "smallcnn"]
    with st.form("study_form"):
        data = st.text_input("Dataset folder", value=ui.data_folder(), key="study_data")
        arch_col, size_col, seed_col = st.columns(3)
        arch = arch_col.selectbox("Backbone", transfer_archs, key="study_arch")
        pretrained = arch_col.checkbox("ImageNet weights (pretrained)", value=True, key="study_pretrained",
                                       help="Downloaded once (needs internet) unless a weights file is given.")
        weights_file = arch_col.text_input("Weights file (optional)", key="study_weights_file")
        epochs = size_col.number_input("Epochs", min_value=1, max_value=500, value=10, key="study_epochs")
        image_size = size_col.number_input("Image size (pixels)", min_value=32, max_value=1024, value=224,
                                           step=16, key="study_image_size")
        batch_size = seed_col.number_input("Batch size (images)", min_value=1, max_value=1024, value=32,
                                           key="study_batch_size")
        seed = seed_col.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, key="study_seed")
        submitted = st.form_submit_button("Launch the 4 study runs", type="primary")
    if not submitted:
        return
    if not data.strip():
        st.error("Choose a dataset folder first (type it above, or pick it on the Data page).")
        return
    base = TrainConfig(data=data.strip(), runs_dir=str(ui.runs_dir()), arch=arch, pretrained=pretrained,
                       weights_file=weights_file.strip(), epochs=int(epochs), image_size=int(image_size),
                       batch_size=int(batch_size), seed=int(seed))
    try:
        configs = strategy_study(base)
        for config in configs:
            config.validate()
        scan_dataset(base.data)  # a bad folder is reported here rather than as four failed runs
        launched = [launch_training(config).name for config in configs]
    except (ValueError, OSError) as e:  # ValueError covers DatasetError and TrainConfig.validate
        st.error(str(e))
        return
    st.success("Launched " + ", ".join(f"**{name}**" for name in launched) + ". Follow them on **Train**; "
               "select them above once they have epochs to compare.")
    if pretrained and not weights_file.strip():
        st.info("The ImageNet runs download their weights first; without internet they fail with a clear "
                "error (shown below and on Train). Give a local weights file to run them offline.")


st.title("Compare runs")
all_runs = runs.list_runs(ui.runs_dir())
if not all_runs:
    st.info(f"No runs yet in `{ui.runs_dir()}`. Start one on **Train**, or launch the strategy study below.")
else:
    by_name = {r["run"]: r for r in all_runs}
    # Plain names (states are in the table): a keyed widget keeps an option's first label.
    chosen = st.multiselect("Runs", list(by_name), default=list(by_name)[:MAX_DEFAULT_RUNS], key="compare_runs")
    if not chosen:
        st.info("Pick one or more runs.")
    else:
        selected = [by_name[n] for n in chosen]
        curves = {r["run"]: runs.epoch_metrics(Path(r["path"])) for r in selected}
        curves = {name: df for name, df in curves.items() if not df.empty}
        if curves:
            auc_col, loss_col = st.columns(2)
            auc_col.plotly_chart(epoch_curves_figure(curves, "val_auc", "Validation AUC", "ROC AUC (0–1)"))
            loss_col.plotly_chart(epoch_curves_figure(curves, "val_loss", "Validation loss",
                                                "Cross-entropy loss (weighted)"))
        else:
            st.caption("None of the selected runs has finished an epoch yet: no curves to draw.")

        st.subheader("Metrics")
        st.caption("Validation and test at each run's **operating threshold** (the one saved on Thresholds, else the "
                   "one chosen on validation at the end of training), with 95% intervals from 2,000 bootstrap "
                   "resamples of patients. Empty until a run finishes. Click a column header to sort.")
        table = pd.DataFrame([comparison_row(r) for r in selected])
        st.dataframe(table, hide_index=True,
                     column_config={"threshold": st.column_config.NumberColumn(format="%.3f")})
        finished = [r for r in selected if r["state"] == "finished"]
        if finished:
            with st.expander("Training-time figures (Youden threshold chosen on validation at the end of training)"):
                st.dataframe(pd.DataFrame([training_time_row(r) for r in finished]), hide_index=True,
                             column_config={c: st.column_config.NumberColumn(format="%.3f")
                                            for c in ("Youden threshold (training)", "val auc", "val sensitivity",
                                                      "val specificity", "test auc", "test sensitivity",
                                                      "test specificity")})
                st.caption("Kept for reference: these do not follow a threshold saved later.")

        failed = [r for r in selected if r["state"] in ("failed", "killed")]
        for run in failed:
            st.error(f"**{run['run']}** {run['state']}: {run['error'] or 'no error recorded'}")
        if any("WeightsUnavailable" in (r["error"] or "") or "ImageNet weights" in (r["error"] or "")
               for r in failed):
            st.info("Runs that needed ImageNet weights could not download them (no internet here?). Launch "
                    "them again with a local weights file, without pretrained weights, or as smallcnn.")

st.header("Strategy study")
study_form()
