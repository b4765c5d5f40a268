"""Train: a form over TrainConfig that launches training in a background process, and a live monitor
of any run (status, progress, curves, log, stop and resume)."""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

import ui
from core import runs
from core.bootstrap import format_interval
from core.config import (
    ARCHITECTURES,
    CLASS_WEIGHTS,
    MAX_NAME_LENGTH,
    PRESETS,
    SCHEDULES,
    STRATEGIES,
    TrainConfig,
    config_from_preset,
)
from core.device import device_and_processes, device_choices
from core.figures import loss_figure, score_figure
from core.labels import load_index, spec_from
from core.launch import active_duplicates, launch_resume, launch_training
from core.metrics import chance_level_warning
from core.model import WeightsUnavailableError
from core.operating import run_summary
from core.trainer import available_devices, device_names

REFRESH_SECONDS = 3
RESUMABLE_STATES = ("stopped", "failed", "killed", "cancelled")
# Config fields the form edits; a preset fills them, the rest keep TrainConfig's defaults.
FORM_FIELDS = ("arch", "pretrained", "weights_file", "strategy", "epochs", "batch_size", "lr", "schedule",
               "image_size", "augment", "class_weights", "device", "seed", "max_steps_per_epoch", "patience")

st.set_page_config(page_title="Train · CXR workbench", page_icon="🫁", layout="wide")


def default_preset() -> str:
    return "gpu" if any(d.startswith("cuda") for d in available_devices()) else "cpu"


def apply_preset() -> None:
    """Fill the form's widgets from the chosen preset (a callback: runs before the widgets exist)."""
    config = config_from_preset(st.session_state["train_preset"])
    for name in FORM_FIELDS:
        st.session_state[f"train_{name}"] = getattr(config, name)


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def training_form() -> None:
    if "train_preset" not in st.session_state:
        st.session_state["train_preset"] = default_preset()
    if "train_arch" not in st.session_state:
        apply_preset()
    if "train_data" not in st.session_state:
        st.session_state["train_data"] = ui.data_folder()

    st.selectbox("Preset", list(PRESETS), key="train_preset", on_change=apply_preset,
                 help="Fills the form with a starting point: 'cpu' trains a small CNN from scratch (about 6 "
                      "minutes on 2 cores), 'gpu' fine-tunes an ImageNet ResNet-18, 'cpu-transfer' trains a "
                      "head on a frozen ImageNet EfficientNet-Lite0 (weights installed, works offline), "
                      "'tiny' is a smoke test.")
    devices = device_choices()
    names = device_names()
    # Enter in a field must not launch a run: only the button does (a half-typed form queued runs before).
    with st.form("train_form", enter_to_submit=False):
        st.text_input("Dataset folder", key="train_data", help="Defaults to the folder chosen on the Data page.")
        if ui.label_options():
            st.caption(f"With the label file {ui.plain(ui.label_options()['labels'])} "
                       f"({ui.plain(ui.label_options().get('labels_format') or 'csv')}) chosen on the Data page, for "
                       "that page's folder.")
        model_col, optim_col, data_col = st.columns(3)
        with model_col:
            st.selectbox("Architecture", ARCHITECTURES, key="train_arch")
            st.checkbox("ImageNet weights (pretrained)", key="train_pretrained",
                        help="efficientnet_lite0's come with the install and work offline; torchvision's "
                             "(resnet18, densenet121, efficientnet_b0) are downloaded once (needs internet) unless a "
                             "weights file is given. Ignored for smallcnn.")
            st.text_input("Weights file (optional)", key="train_weights_file",
                          help="Local ImageNet weights (.pth state dict or .safetensors), for offline machines.")
            st.selectbox("Fine-tuning strategy", STRATEGIES, key="train_strategy",
                         help="frozen: head only; partial: last stage + head; full: every layer. smallcnn "
                              "needs 'full' (every layer, from random weights: Compare shows its init as "
                              "'scratch').")
            st.selectbox("Device", devices, key="train_device",
                         format_func=lambda d: f"{d} ({names[d]})" if d in names else d)
        with optim_col:
            st.number_input("Epochs", min_value=1, max_value=500, step=1, key="train_epochs")
            st.number_input("Batch size (images)", min_value=1, max_value=1024, step=8, key="train_batch_size")
            st.number_input("Learning rate", min_value=1e-6, max_value=1.0, step=1e-4, format="%g", key="train_lr")
            st.selectbox("Learning-rate schedule", SCHEDULES, key="train_schedule")
            st.number_input("Early-stopping patience (epochs, 0 = off)", min_value=0, max_value=100, step=1,
                            key="train_patience")
        with data_col:
            st.number_input("Image size (pixels, square)", min_value=32, max_value=1024, step=16,
                            key="train_image_size")
            # A short label (a long one is cut off in a narrow column); the list is in the help.
            st.checkbox("Augment training images", key="train_augment",
                        help="Random flip, rotation, zoom, shift, brightness and contrast on training batches "
                             "(never at evaluation); strengths are options of `python -m core train`.")
            st.selectbox("Class weights", CLASS_WEIGHTS, key="train_class_weights",
                         help="inverse: weight the loss by inverse class frequency against the imbalance.")
            st.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key="train_seed")
            st.number_input("Max steps per epoch (0 = whole training set)", min_value=0, max_value=100_000,
                            step=1, key="train_max_steps_per_epoch")
        st.text_input("Run name (optional)", key="train_name", max_chars=MAX_NAME_LENGTH,
                      help="Appended to the run folder's name.")
        submitted = st.form_submit_button("Launch training", type="primary")

    if submitted:
        st.session_state.pop("train_duplicate", None)
        launch_from_form()
    elif "train_duplicate" in st.session_state:
        confirm_duplicate()


def confirm_duplicate() -> None:
    """The same config already waits or trains: queue it again only when the user says so."""
    config, twins = st.session_state["train_duplicate"]
    st.warning(f"The same settings are already queued or training as **{ui.plain(', '.join(twins))}**: launching "
               "again trains the same thing twice.")
    confirmed = st.checkbox("Yes, queue another run with the same settings", key="train_duplicate_confirm")
    left, right, _ = st.columns([1, 1, 3])
    if left.button("Queue it anyway", key="train_duplicate_launch", disabled=not confirmed):
        st.session_state.pop("train_duplicate")
        start(config)
    elif right.button("Cancel", key="train_duplicate_cancel"):
        st.session_state.pop("train_duplicate")
        st.rerun()


def launch_from_form() -> None:
    values = {name: st.session_state[f"train_{name}"] for name in FORM_FIELDS}
    values["device"], values["processes"] = device_and_processes(values["device"])  # 'all GPUs (N)': torchrun
    data = st.session_state["train_data"].strip()
    if not data:
        st.error("Choose a dataset folder first (type it above, or pick it on the Data page).")
        return
    # The Data page's label file belongs to the Data page's folder.
    labels = ui.label_options() if data == ui.data_folder().strip() else {}
    try:
        config = config_from_preset(st.session_state["train_preset"], **values, **labels, data=data,
                                    runs_dir=str(ui.runs_dir()), name=st.session_state.get("train_name", "").strip())
        config.validate()
        load_index(config.data, spec_from(config))  # a bad folder or label file is reported here, not as a failed run
        twins = active_duplicates(config)
    except (ValueError, OSError) as e:  # ValueError: DatasetError, TrainConfig.validate
        st.error(ui.plain(e))
        return
    if twins:
        st.session_state["train_duplicate"] = (config, twins)
        confirm_duplicate()
        return
    start(config)


def start(config: TrainConfig) -> None:
    try:
        run_dir = launch_training(config)  # refuses, queueing nothing, when ImageNet weights cannot be had
    except WeightsUnavailableError as e:
        st.error(ui.weights_refusal(e, "ImageNet weights (pretrained)"))
        return
    except (ValueError, OSError) as e:
        st.error(ui.plain(e))
        return
    # Set before the monitor's selectbox is created further down this run.
    st.session_state["train_monitor_run"] = run_dir.name
    st.success(f"Launched **{ui.plain(run_dir.name)}**. It trains in a background process (it keeps going if you close "
               "the browser); runs launched while another trains wait in the queue.")


def render_monitor(run_dir: Path, live: bool) -> None:
    status = runs.read_status(run_dir)
    state = status.get("state", "unknown")
    if (state in runs.ACTIVE_STATES) != live:
        st.rerun()  # the run started or ended: redraw the page so polling starts or stops

    epochs_total, steps_per_epoch = status.get("epochs"), status.get("steps_per_epoch")
    done, total_steps = status.get("global_step") or 0, status.get("total_steps")
    elapsed = status.get("elapsed")
    if state == "running" and elapsed is None and status.get("started"):
        elapsed = time.time() - status["started"]
    time_left = elapsed * (total_steps - done) / done if state == "running" and done and total_steps else None

    # Words in a wide row, numbers in a narrow one: seven tiles in one row cut "running" to "run…" at 1280 px.
    words = st.columns(2)
    words[0].metric("State", state)
    words[1].metric("Phase", status.get("phase") or "–")
    numbers = st.columns(5)
    # Epochs done, as `runs` and Compare count them; the step is the one of the epoch after those.
    numbers[0].metric("Epochs done", f"{runs.epochs_done(status)}/{epochs_total}" if epochs_total else "–")
    numbers[1].metric("Step in epoch", f"{status.get('step') or 0}/{steps_per_epoch}" if steps_per_epoch else "–")
    numbers[2].metric("Images/s", f"{status['images_per_s']:.0f}" if status.get("images_per_s") else "–")
    numbers[3].metric("Elapsed (training)", format_duration(elapsed))
    numbers[4].metric("Time left (est.)", format_duration(time_left))
    fraction = 1.0 if state == "finished" else min(done / total_steps, 1.0) if total_steps else 0.0
    st.progress(fraction, text=f"{fraction:.0%} of training steps")

    if state in ("failed", "killed") and status.get("error"):
        st.error(ui.plain(f"This run {state}: {status['error']}"))
        if "WeightsUnavailable" in status["error"] or "ImageNet weights" in status["error"]:
            st.info("ImageNet weights could not be fetched (no internet?). Launch again with a local weights "
                    "file, or untick 'ImageNet weights', or choose smallcnn.")
    elif status.get("error"):  # a damaged status.json: its state is unknown, or some fields are ignored
        st.warning(ui.plain(f"This run's status: {status['error']}"))
    if state == "finished":
        finished_summary(run_dir)

    stop_col, resume_col, _ = st.columns([1, 1, 4])
    if state == "queued":
        if stop_col.button("Cancel", key="train_stop", help="Take the run out of the queue now (it never trained)."):
            try:
                outcome = runs.cancel_queued(run_dir)
            except (ValueError, OSError) as e:  # it started meanwhile
                st.error(ui.plain(e))
            else:
                st.session_state["train_cancelled"] = (run_dir.name, outcome)
                st.rerun()  # full rerun: polling stops, the delete control appears
    elif state == "running":
        if not runs.stop_requested(run_dir) and stop_col.button("Stop", key="train_stop"):
            runs.request_stop(run_dir)
        if runs.stop_requested(run_dir):
            stop_col.caption("Stop requested: the run saves a checkpoint at its next step and stops.")
    again = "Start" if state == "cancelled" else "Resume"
    if state in RESUMABLE_STATES and resume_col.button(again, key="train_resume",
                                                       help="Continue from the last saved checkpoint (a cancelled "
                                                            "run starts from the beginning)."):
        try:
            launch_resume(run_dir)
        except (ValueError, OSError) as e:
            st.error(ui.plain(e))
        else:
            st.rerun()  # full rerun: the run is active again, so live polling starts

    epochs, steps = runs.epoch_metrics(run_dir), runs.step_metrics(run_dir)
    if epochs.empty and steps.empty:
        st.caption("No metrics yet: curves appear after the first training steps.")
    else:
        loss_col, score_col = st.columns(2)
        loss_col.plotly_chart(loss_figure(epochs, steps, steps_per_epoch), key="train_loss_chart")
        score_col.plotly_chart(score_figure(epochs), key="train_score_chart")
    st.markdown("**Log** (last 30 lines)")
    st.code(runs.log_tail(run_dir, 30) or "(no log yet)", language="text")
    if live:
        st.caption(f"Updates every {REFRESH_SECONDS} s while the run is queued or running.")
    else:
        delete_control(run_dir, state)


def delete_control(run_dir: Path, state: str) -> None:
    """Delete a run that is not training, after an explicit confirmation (it cannot be undone)."""
    with st.expander("Delete this run"):
        try:
            runs.check_deletable(run_dir)
        except ValueError as e:  # e.g. a file someone put in the folder, which deleting would lose
            st.error(ui.plain(e))
            return
        files, size = runs.run_size(run_dir)
        st.markdown(f"Deletes **{ui.plain(run_dir.name)}** ({state}; {files} files, {size / 2**20:.1f} MB) and "
                    "everything in it: checkpoints, predictions, saved threshold and external evaluations. This "
                    "cannot be undone.")
        confirmed = st.checkbox(f"Yes, delete {run_dir.name}", key=f"train_delete_confirm_{run_dir.name}")
        if st.button("Delete run", key="train_delete", type="primary", disabled=not confirmed):
            try:
                runs.delete_run(run_dir)
            except (ValueError, OSError) as e:
                st.error(ui.plain(e))
                return
            st.session_state["train_deleted"] = run_dir.name
            st.rerun()


def finished_summary(run_dir: Path) -> None:
    """Test metrics with 95% intervals at the run's operating threshold, saying which threshold that is."""
    try:
        summary = run_summary(run_dir, ["test"])
    except ValueError as e:
        st.error(ui.plain(e))
        return
    test = summary["sets"].get("test")
    if test is None:
        st.success("Finished. " + ui.plain(summary["errors"].get("test") or "No test set."))
        return
    m = test["metrics"]
    chance = chance_level_warning(m["auc"], "test")
    # A model no better than chance on test is not a success, however the run ended.
    (st.warning if chance else st.success)(
        f"Finished. On test ({test['n']} images, {test['n_patients']} patients) at the operating threshold "
        f"{ui.plain(summary['operating'].describe())}: AUC {format_interval(m['auc'])}, sensitivity "
        f"{format_interval(m['sensitivity'])}, specificity {format_interval(m['specificity'])} (95% intervals, "
        "patients resampled). See **Compare**, **Thresholds** and **Mistakes**."
        + (f" {ui.plain(chance)}" if chance else ""), icon="⛔" if chance else None)
    report = runs.read_report(run_dir)
    youden = report.get("test") if isinstance(report.get("test"), dict) else {}
    if isinstance(report.get("threshold"), (int, float)) and youden:
        st.caption(f"Training-time figures at the Youden threshold {report['threshold']:.3f} chosen on validation: "
                   f"test AUC {youden.get('auc', float('nan')):.3f}, sensitivity "
                   f"{youden.get('sensitivity', float('nan')):.3f}, specificity "
                   f"{youden.get('specificity', float('nan')):.3f}.")


# Two fragments over one view: only an active run polls, so finished runs cost nothing.
@st.fragment(run_every=REFRESH_SECONDS)
def live_monitor(run_dir: Path) -> None:
    render_monitor(run_dir, live=True)


@st.fragment
def still_monitor(run_dir: Path) -> None:
    render_monitor(run_dir, live=False)


st.title("Train")
training_form()

st.header("Monitor")
deleted = st.session_state.pop("train_deleted", None)
if deleted:
    st.success(f"Deleted **{ui.plain(deleted)}**.")
cancelled = st.session_state.pop("train_cancelled", None)
if cancelled:
    st.success(f"Cancelled **{ui.plain(cancelled[0])}**: it left the queue without training; delete it below or "
               "start it again." if cancelled[1] == "cancelled" else
               f"**{ui.plain(cancelled[0])}** had just started: it stopped at its first step ({cancelled[1]}).")
all_runs = runs.list_runs(ui.runs_dir())
if not all_runs:
    st.info(f"No runs yet in {ui.plain(ui.runs_dir())}: launch one above (or `python -m core train --preset cpu "
            "--data DIR`).")
    st.stop()
run_names = [r["run"] for r in all_runs]
if st.session_state.get("train_monitor_run") not in run_names:
    st.session_state["train_monitor_run"] = run_names[0]  # newest first
# Plain names: a keyed selectbox keeps showing an option's first label, so a state in it would go stale.
chosen = st.selectbox("Run", run_names, key="train_monitor_run")
chosen_dir = ui.runs_dir() / chosen
if runs.read_status(chosen_dir).get("state") in runs.ACTIVE_STATES:
    live_monitor(chosen_dir)
else:
    still_monitor(chosen_dir)
