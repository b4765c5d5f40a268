"""Compare runs: validation curves overlaid, a sortable table of validation and test metrics, and strategy
studies (frozen, partial, full fine-tuning, a small CNN from scratch; several seeds; paired tests)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import ui
from core import runs
from core.bootstrap import format_interval
from core.config import ARCHITECTURES, TrainConfig
from core.figures import epoch_curves_figure, study_seed_figure
from core.launch import launch_study
from core.metrics import chance_level_warning
from core.model import WeightsUnavailableError
from core.operating import run_summary
from core.significance import format_mean_interval
from core.study import (
    ARM_HELP,
    ARMS,
    MAX_SEEDS,
    Study,
    create_study,
    list_studies,
    read_study,
    study_progress,
    study_results,
)

MAX_DEFAULT_RUNS = 8
REFRESH_SECONDS = 3
# The table's first view: which run, how it trains, at which threshold, and the test figures that decide;
# every other column (validation, PPV, NPV, F1, accuracy, training details) is one click away.
KEY_COLUMNS = ("run", "state", "strategy", "init", "threshold", "test sensitivity", "test specificity", "test AUC")
METRICS = ("auc", "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")
METRIC_SHORT = {"auc": "AUC", "sensitivity": "sensitivity", "specificity": "specificity", "ppv": "PPV", "npv": "NPV",
                "f1": "F1", "accuracy": "accuracy"}

st.set_page_config(page_title="Compare · CXR workbench", page_icon="🫁", layout="wide")


# Every file comparison_row reads: a row is recomputed only when one of them changes.
ROW_FILES = ("status.json", "report.json", "threshold.json", "data_report.json", "predictions_val.csv",
             "predictions_test.csv")


def comparison_row(run: dict) -> dict:
    """One run's row: its operating threshold and how it was chosen, val and test metrics at that threshold
    with 95% patient-bootstrap intervals (strings 'value [low, high]', which sort like the values)."""
    run_dir = Path(run["path"])
    return cached_comparison_row(run, tuple(ui.file_mtime(run_dir / name) for name in ROW_FILES))


# The bootstrap intervals take a third of a second per run: without the cache every rerun of the page (a warm
# switch to it, a poll while something trains) pays that for every chosen run. `signature` (the mtimes of
# ROW_FILES) is only the cache key.
@st.cache_data(show_spinner=False, max_entries=64)
def cached_comparison_row(run: dict, signature: tuple) -> dict:
    run_dir = Path(run["path"])
    status = runs.read_status(run_dir)
    report = runs.read_report(run_dir)
    elapsed = status.get("elapsed")
    # The strategy is the config's word, as on Train and in the run's name (smallcnn's is 'full': every layer);
    # where the weights start is its own column.
    row = {"run": run["run"], "state": run["state"], "arch": run["arch"], "strategy": run["strategy"],
           "init": "ImageNet" if run["pretrained"] and run["arch"] != "smallcnn" else "scratch",
           "epochs done": run["epoch"], "epochs max": run["epochs"],
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
    data = runs.read_json(run_dir / "data_report.json", {})
    root = data.get("root") if isinstance(data, dict) else None
    row["data"] = Path(root).name if isinstance(root, str) and root else None
    for split, s in summary["sets"].items():
        row[f"{split} images"] = s["n"]
        for key in METRICS:
            row[f"{split} {METRIC_SHORT[key]}"] = format_interval(s["metrics"][key])
    test = summary["sets"].get("test")
    row["chance"] = chance_level_warning(test["metrics"]["auc"], "test") if test else None
    if test:  # which images: runs of one folder with other seeds can carve other test images
        paths = "\n".join(sorted(runs.read_predictions(run_dir, "test")["path"].astype(str)))
        row["test set"] = hashlib.sha256(paths.encode()).hexdigest()
    if summary["errors"]:
        row["problem"] = "; ".join(summary["errors"].values())
    return row


def said_first(table: pd.DataFrame) -> None:
    """Before the metrics: runs whose model ranks test no better than chance, and runs tested on different images
    (another folder, or another carve of one folder), whose test figures cannot be set side by side."""
    for run, chance in zip(table["run"], table.get("chance", [])):
        if isinstance(chance, str):
            st.warning(ui.plain(f"{run}: {chance}"), icon="⛔")
    if "test set" not in table:
        return
    tested = table.dropna(subset=["test set"])
    if tested["test set"].nunique() > 1:
        groups = [f"{', '.join(g['run'])}: {int(g['test images'].iloc[0])} test images of "
                  f"{g['data'].iloc[0] or 'an unknown folder'}" for _, g in tested.groupby("test set", sort=False)]
        st.warning(ui.plain(f"These runs were tested on {len(groups)} different sets of images ({'; '.join(groups)}): "
                            "their test figures do not compare like with like. Compare runs tested on one split: one "
                            "folder and seed, or a strategy study (one fixed split)."))


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
    st.markdown("Trains every chosen **arm** with several **seeds** on one fixed split, so all runs are tested on "
                "the same images: an ImageNet backbone **frozen** (head only), **partial** (last blocks + head) and "
                "**full** fine-tuning, the **small CNN from scratch**, and the backbone with **random init**. The "
                "runs train one after another in a background process; `efficientnet_lite0`'s ImageNet weights "
                "come with the install, so it runs offline.")
    transfer_archs = sorted((a for a in ARCHITECTURES if a != "smallcnn"), key=lambda a: a != "efficientnet_lite0")
    with st.form("study_form", enter_to_submit=False):  # only the button launches
        data = st.text_input("Dataset folder", value=ui.data_folder(), key="study_data")
        arms = st.multiselect("Arms", list(ARMS), default=["frozen", "partial", "full", "scratch"], key="study_arms",
                              help="; ".join(f"{a}: {ARM_HELP[a]}" for a in ARMS))
        arch_col, size_col, seed_col = st.columns(3)
        arch = arch_col.selectbox("Backbone", transfer_archs, key="study_arch")
        weights_file = arch_col.text_input("Weights file", key="study_weights_file",
                                           help="Local ImageNet weights for the backbone (.pth state dict or "
                                                ".safetensors), for backbones whose weights cannot be downloaded.")
        epochs = size_col.number_input("Epochs", min_value=1, max_value=500, value=4, key="study_epochs")
        image_size = size_col.number_input("Image size (pixels)", min_value=32, max_value=1024, value=96,
                                           step=16, key="study_image_size")
        batch_size = size_col.number_input("Batch size (images)", min_value=1, max_value=1024, value=64,
                                           key="study_batch_size")
        n_seeds = seed_col.number_input("Seeds per arm", min_value=1, max_value=MAX_SEEDS, value=3,
                                        key="study_seeds")
        seed = seed_col.number_input("First seed", min_value=0, max_value=2**31 - 1, value=0, key="study_seed",
                                     help="Seeds are this one, +1, +2 ...; the split uses this one for every run.")
        lr = seed_col.number_input("Learning rate", min_value=1e-6, max_value=1.0, value=1e-3, format="%.4f",
                                   key="study_lr")
        submitted = st.form_submit_button("Launch the study", type="primary")
    if not submitted:
        return
    if not data.strip():
        st.error("Choose a dataset folder first (type it above, or pick it on the Data page).")
        return
    if not arms:
        st.error("Choose at least one arm.")
        return
    base = TrainConfig(data=data.strip(), runs_dir=str(ui.runs_dir()), arch=arch, pretrained=True,
                       weights_file=weights_file.strip(), epochs=int(epochs), image_size=int(image_size),
                       batch_size=int(batch_size), seed=int(seed), lr=float(lr), schedule="cosine", patience=0)
    try:
        study = create_study(base, arms, int(n_seeds), command="dashboard")
        launch_study(study.folder)
    except WeightsUnavailableError as e:  # nothing was queued
        st.error(ui.weights_refusal(e, None))
        return
    except (ValueError, OSError) as e:
        st.error(ui.plain(e))
        return
    st.session_state["study_pick_next"] = study.id  # the picker above already exists: applied on the rerun
    st.session_state["study_launched"] = (f"Launched **{ui.plain(study.id)}**: {len(study.plan())} runs, one after "
                                          "another. Its progress and results are below; each run is also on "
                                          "**Train**.")
    st.rerun()  # the view above starts following the study


def study_view() -> bool:
    """The chosen study's progress and results; True while a process runs it."""
    studies = list_studies(ui.runs_dir())
    if not studies:
        st.caption("No study yet.")
        return False
    names = [s.id if isinstance(s, Study) else s[0] for s in studies]
    if st.session_state.get("study_pick_next") in names:
        st.session_state["study_pick"] = st.session_state.pop("study_pick_next")
    if st.session_state.get("study_pick") not in names:
        st.session_state["study_pick"] = names[0]
    name = st.selectbox("Study", names, key="study_pick")
    study = studies[names.index(name)]
    if not isinstance(study, Study):
        st.error(ui.plain(f"{name} cannot be read: {study[1]}"))
        return False
    progress = study_progress(study)
    left = (f", about {progress['minutes_left']:.0f} min left" if progress["minutes_left"] and progress["running"]
            else "")
    st.progress(progress["finished"] / progress["total"],
                text=f"{progress['finished']} of {progress['total']} runs finished{left}")
    if progress["running"]:
        current = progress["current"]
        st.caption("Running" + (f": {current[0]}, seed {current[1]}" if current else "")
                   + f". Updates every {REFRESH_SECONDS} s.")
    elif progress["finished"] < progress["total"]:
        missing = progress["total"] - progress["finished"]
        st.warning(f"{missing} of the study's runs {'is' if missing == 1 else 'are'} not finished and no process is "
                   "running the study (stopped, killed, failed or deleted). Resuming keeps the finished runs, "
                   "continues an interrupted one and trains any that are missing"
                   + (f" (about {progress['minutes_left']:.0f} min)." if progress["minutes_left"] else "."))
        if st.button("Resume the study", key="study_resume"):
            try:
                launch_study(study.folder)
            except OSError as e:  # e.g. a read-only or full disk: process.log cannot be written
                st.error(ui.plain(f"Could not start the study: {e}"))
                return False
            st.rerun()
    try:
        results = cached_study_results(str(study.folder), study_signature(study))
    except (OSError, ValueError) as e:
        st.error(ui.plain(f"The results of {study.id} cannot be computed: {e}"))
        return bool(progress["running"])
    if not any("auc" in r for r in results["rows"]):
        st.info("No run of this study has finished yet.")
    else:
        st.dataframe(pd.DataFrame([arm_row(a) for a in results["arms"]]), hide_index=True)
        trains = "; ".join(f"**{a['arm']}** ({a['arch']}, {a['init']} init) trains {arm_trains(a)}"
                           for a in results["arms"])
        st.caption(f"Test set: {results['n_test']} images, the same for every run. AUC, sensitivity and specificity "
                   "on test, at each run's threshold chosen on validation (Youden): mean ± sd over seeds [95% "
                   "t-interval of the mean]. Wall time per run (data, training, evaluation): mean ± sd. " + trains)
        st.plotly_chart(study_seed_figure(results["rows"], results["arms"]))
        if results["pairs"]:
            st.subheader("Paired comparisons")
            for pair in results["pairs"]:
                st.markdown("- " + ui.plain(pair["verdict"]))
            st.dataframe(pd.DataFrame([pair_row(p) for p in results["pairs"]]), hide_index=True)
            st.caption("Difference in mean test AUC over seeds (first arm minus second), on the same test images. "
                       "Interval and p: the test set's uncertainty from 2,000 bootstrap resamples of patients (the "
                       "same draw for both arms) plus the spread over seeds (Welch t); p Holm-adjusted across all "
                       "pairs. DeLong's test on the seed-averaged scores (images as independent) is shown as a check "
                       "where both arms have as many seeds.")
    with st.expander("Runs of this study"):
        st.dataframe(pd.DataFrame([{k: r.get(k) for k in ("arm", "seed", "state", "run", "threshold", "auc",
                                                          "sensitivity", "specificity", "minutes")}
                                   for r in results["rows"]]), hide_index=True,
                     column_config={**{c: st.column_config.NumberColumn(format="%.3f")
                                       for c in ("threshold", "auc", "sensitivity", "specificity")},
                                    "minutes": st.column_config.NumberColumn(format="%.1f")})
        if study.command:
            st.caption(ui.plain(f"Started by: {study.command}"))
    for problem in results["problems"]:
        st.warning(ui.plain(problem))
    return bool(progress["running"])


def study_signature(study: Study) -> tuple:
    """What the results depend on: the study file and each run's status and test predictions."""
    files = [study.folder / "study.json"]
    for arm, seed in study.plan():
        run_dir = study.run_dir(arm, seed)
        if run_dir is not None:
            files += [run_dir / "status.json", run_dir / "report.json", run_dir / "predictions_test.csv"]
    return tuple(ui.file_mtime(f) for f in files)


@st.cache_data(show_spinner="Comparing the arms…", max_entries=8)
def cached_study_results(folder: str, signature: tuple) -> dict:
    return study_results(read_study(Path(folder)))


def arm_trains(arm: dict) -> str:
    return {"frozen": "the head", "full": "every layer"}.get(arm["strategy"],
                                                               ", ".join(arm["trains"] or []) + " and the head")


def arm_row(arm: dict) -> dict:
    minutes = arm["minutes"]
    params = f"{arm['trainable']:,}" if arm["trainable"] is not None else "unknown"
    return {"arm": arm["arm"], "runs": arm["runs"], "test AUC": format_mean_interval(arm["auc"]),
            "sensitivity": format_mean_interval(arm["sensitivity"]),
            "specificity": format_mean_interval(arm["specificity"]),
            "minutes per run": "" if minutes["n"] == 0 else f"{minutes['mean']:.1f}" if minutes["n"] == 1
            else f"{minutes['mean']:.1f} ± {minutes['sd']:.1f}", "trainable parameters": params}


def _p(value: float) -> str:
    if value != value:  # NaN: not computed
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def pair_row(pair: dict) -> dict:
    return {"pair": f"{pair['a']} − {pair['b']}", "AUC difference": f"{pair['difference']:+.4f}",
            "95% interval": f"[{pair['low']:+.3f}, {pair['high']:+.3f}]", "p": _p(pair["p"]),
            "p (Holm)": _p(pair["p_holm"]), "DeLong p": _p(pair["delong_p"]),
            "seeds": f"{pair['n_seeds_a']} vs {pair['n_seeds_b']}" + ("" if pair["seed_variance"] else
                                                                       " (seed variation not included)")}


def curve_figures(selected: list[dict]) -> tuple[go.Figure, go.Figure] | None:
    """Validation AUC and loss per epoch of the chosen runs; None before any of them has finished an epoch."""
    chosen = tuple((r["run"], r["path"]) for r in selected)
    return cached_curve_figures(chosen, tuple(ui.file_mtime(Path(path) / "metrics.jsonl") for _, path in chosen))


# Built once per version of the runs' metrics.jsonl: reading them and building the figures was most of the
# server's work on a rerun once the table rows are cached. A resource, not data: st.plotly_chart only reads a
# figure, so every session can share it without a copy. `signature` is only the cache key.
@st.cache_resource(show_spinner=False, max_entries=16)
def cached_curve_figures(chosen: tuple, signature: tuple) -> tuple[go.Figure, go.Figure] | None:
    curves = {name: runs.epoch_metrics(Path(path)) for name, path in chosen}
    curves = {name: df for name, df in curves.items() if not df.empty}
    if not curves:
        return None
    return (epoch_curves_figure(curves, "val_auc", "Validation AUC", "ROC AUC (0–1)", score=True),
            epoch_curves_figure(curves, "val_loss", "Validation loss", "Cross-entropy loss (weighted)"))


def runs_view() -> bool:
    """Curves and metrics of the chosen runs; True while any run is queued or training."""
    all_runs = runs.list_runs(ui.runs_dir())
    if not all_runs:
        st.info(f"No runs yet in {ui.plain(ui.runs_dir())}. Start one on **Train**, or launch the strategy study "
                "below.")
        return False
    active = any(r["state"] in runs.ACTIVE_STATES for r in all_runs)
    by_name = {r["run"]: r for r in all_runs}
    # Plain names (states are in the table): a keyed widget keeps an option's first label.
    chosen = st.multiselect("Runs", list(by_name), default=list(by_name)[:MAX_DEFAULT_RUNS], key="compare_runs")
    if not chosen:
        st.info("Pick one or more runs.")
        return active
    selected = [by_name[n] for n in chosen if n in by_name]
    figures = curve_figures(selected)
    if figures:
        auc_col, loss_col = st.columns(2)
        auc_col.plotly_chart(figures[0], key="compare_auc_chart")
        loss_col.plotly_chart(figures[1], key="compare_loss_chart")
    else:
        st.caption("None of the selected runs has finished an epoch yet: no curves to draw.")

    st.subheader("Metrics")
    st.caption("Test sensitivity, specificity and AUC at each run's **operating threshold** (the one saved on "
               "Thresholds, else the one chosen on validation at the end of training), with 95% intervals from "
               "2,000 bootstrap resamples of patients. Empty until a run finishes. Click a column header to sort. "
               "Init: ImageNet weights or scratch (random).")
    table = pd.DataFrame([comparison_row(r) for r in selected])
    said_first(table)
    table = table.drop(columns=["chance", "test set"], errors="ignore")
    number_format = {"threshold": st.column_config.NumberColumn(format="%.3f"),
                     "training time (min)": st.column_config.NumberColumn(format="%.1f")}
    st.dataframe(table[[c for c in KEY_COLUMNS if c in table]], hide_index=True, column_config=number_format)
    with st.expander("All columns (validation, PPV, NPV, F1, accuracy, epochs, training time)"):
        st.dataframe(table, hide_index=True, column_config=number_format)
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
        st.error(f"**{ui.plain(run['run'])}** {run['state']}: " + ui.plain(run["error"] or "no error recorded"))
    if any("WeightsUnavailable" in (r["error"] or "") or "ImageNet weights" in (r["error"] or "") for r in failed):
        st.info("Runs that needed ImageNet weights could not download them (no internet here?). Launch "
                "them again with a local weights file, without pretrained weights, or as smallcnn.")
    return active


def render(live: bool) -> None:
    runs_view()
    st.header("Strategy study")
    launched = st.session_state.pop("study_launched", None)
    if launched:
        st.success(launched)
    study_view()
    active = anything_active()  # the same test that chose this fragment: no rerun loop
    if live:
        st.caption(f"Follows the runs and the study: updates every {REFRESH_SECONDS} s while one is queued or "
                   "running.")
    if active != live:
        st.rerun()  # work started or ended: redraw so that following starts or stops


# Two fragments over one view, as on Train: only while something trains does the page poll.
@st.fragment(run_every=REFRESH_SECONDS)
def live_view() -> None:
    render(live=True)


@st.fragment
def still_view() -> None:
    render(live=False)


def anything_active() -> bool:
    if any(r["state"] in runs.ACTIVE_STATES for r in runs.list_runs(ui.runs_dir())):
        return True
    return any(isinstance(s, Study) and study_progress(s)["running"] for s in list_studies(ui.runs_dir()))


st.title("Compare runs")
if anything_active():
    live_view()
else:
    still_view()
with st.expander("Launch a new study", expanded=not list_studies(ui.runs_dir())):
    study_form()
