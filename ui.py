"""Shared pieces of the dashboard pages: settings remembered between sessions, run pickers, and
cached loaders (models once per checkpoint, tables once per file version). Views only: all logic
lives in core/."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import streamlit as st

from core import runs
from core.config import LABEL_FIELDS, TrainConfig
from core.labels import LabelSpec, spec_from
from core.predict import LoadedModel, load_run_model

PROJECT_ROOT = Path(__file__).resolve().parent
# The dashboard's pages in menu order: (script, menu title). The first is the home page at /, the others are
# served at /<title>. Text only, no icons: emoji show as empty boxes without an emoji font (Debian's Chromium has
# none), and :material/...: icons make the browser fetch a font from fonts.gstatic.com, out of reach offline.
PAGES = (
    ("views/0_Data.py", "Data"),
    ("views/1_Train.py", "Train"),
    ("views/2_Compare.py", "Compare"),
    ("views/3_Thresholds.py", "Thresholds"),
    ("views/4_Mistakes.py", "Mistakes"),
    ("views/5_Predict.py", "Predict"),
    ("views/6_External.py", "External"),
)


# Every ASCII punctuation character: CommonMark renders each one literally when a backslash precedes it.
_MARKDOWN_SPECIALS = re.compile(r"([!-/:-@\[-`{-~])")


def plain(text: object) -> str:
    """Text read from a file (a run or group name, a path, a message quoting a file) made safe for the calls
    that render Markdown (st.markdown, caption, info, warning, error, success, image captions, radio
    options): every punctuation character is backslash-escaped, so links, images, HTML tags, emphasis, LaTeX
    ($) and colour directives show as the literal characters."""
    return _MARKDOWN_SPECIALS.sub(r"\\\1", str(text))


def settings_file() -> Path:
    """Remembered settings: $CXR_SETTINGS, else ~/.config/cxr-workbench/settings.json."""
    return Path(os.environ.get("CXR_SETTINGS", Path.home() / ".config" / "cxr-workbench" / "settings.json"))


def runs_dir() -> Path:
    """Where runs live: $CXR_RUNS_DIR, else checkpoints/ in the project."""
    return Path(os.environ.get("CXR_RUNS_DIR", PROJECT_ROOT / "checkpoints"))


def load_settings() -> dict:
    try:
        return json.loads(settings_file().read_text())
    except (OSError, ValueError):
        return {}


def save_setting(key: str, value) -> None:
    settings = load_settings()
    settings[key] = value
    try:
        path = settings_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))
    except OSError:
        pass  # remembering is a convenience; a read-only home must not break the page


def data_folder() -> str:
    """The dataset folder chosen on the home page (this session, else remembered, else empty)."""
    if "data_folder" not in st.session_state:
        st.session_state["data_folder"] = load_settings().get("data_folder", "")
    return st.session_state["data_folder"]


def set_data_folder(path: str) -> None:
    st.session_state["data_folder"] = path
    save_setting("data_folder", path)


LABEL_SETTING = "label_options"
LABEL_INPUTS = {  # field -> (label, help); the choices of the select boxes come from TrainConfig
    "path_col": ("Path column", "Default: the format's, or a column named path, file, filename or image."),
    "label_col": ("Label column", "Default: the format's, or label, class or target."),
    "patient_col": ("Patient column", "Default: the format's, or patient / patient_id; else DICOM PatientID or "
                                      "file names."),
    "split_col": ("Split column", "train / val / test per row, kept as the official split."),
    "positive_value": ("Positive values", "Comma-separated (default 1, true, yes, positive, pneumonia)."),
    "negative_value": ("Negative values", "Comma-separated (default 0, false, no, negative, normal)."),
}


def label_options() -> dict[str, str]:
    """The label-file options chosen on the Data page (TrainConfig field -> value), remembered between sessions;
    {} for a dataset of class folders."""
    if LABEL_SETTING not in st.session_state:
        saved = load_settings().get(LABEL_SETTING)
        st.session_state[LABEL_SETTING] = ({k: v for k, v in saved.items() if k in LABEL_FIELDS and isinstance(v, str)}
                                           if isinstance(saved, dict) else {})
    options = dict(st.session_state[LABEL_SETTING])
    return options if options.get("labels") else {}


def label_file_inputs(key: str, remember: bool) -> dict[str, str]:
    """A label file and how to read it: path, format, and (folded) columns, values and policies. Returns the
    options as TrainConfig fields ({} without a label file). `remember`: the Data page's choice, kept for Train."""
    saved = label_options() if remember else {}
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(TrainConfig)}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name in LABEL_FIELDS:
        st.session_state.setdefault(f"{key}_{name}", saved.get(name, defaults[name]))
    labels = st.text_input("Label file (optional)", key=f"{key}_labels", placeholder="/path/to/labels.csv",
                           help="A CSV listing the images under the folder above with their labels (RSNA "
                                "stage_2_train_labels.csv, NIH Data_Entry_2017.csv, CheXpert train.csv, or any CSV "
                                "with a path and a label column): no class folders needed.").strip()
    options: dict[str, str] = {}
    if labels:
        format_col, uncertain_col, other_col = st.columns(3)
        format_col.selectbox("Label file format", choices["labels_format"], key=f"{key}_labels_format",
                             help="csv: any CSV; rsna, nih, chexpert: the public datasets' files as downloaded.")
        uncertain_col.selectbox("CheXpert uncertain (-1)", choices["uncertain"], key=f"{key}_uncertain",
                                help="ignore: leave those images out; or count them as positive / negative.")
        other_col.selectbox("NIH other findings", choices["other_findings"], key=f"{key}_other_findings",
                            help="exclude: leave out images with findings but no pneumonia; or count them as "
                                 "negative.")
        with st.expander("Columns and label values (when the names are not the defaults)"):
            columns = st.columns(3)
            for i, (name, (label, help_text)) in enumerate(LABEL_INPUTS.items()):
                columns[i % 3].text_input(label, key=f"{key}_{name}", help=help_text)
        options = {name: str(st.session_state[f"{key}_{name}"]).strip() for name in LABEL_FIELDS}
        options["labels"] = labels
    if remember and options != label_options():
        st.session_state[LABEL_SETTING] = options
        save_setting(LABEL_SETTING, options)
    return options


def label_spec(options: dict[str, str]) -> LabelSpec | None:
    """The LabelSpec of label_file_inputs' options (None for class folders); ValueError for a bad choice."""
    return spec_from(SimpleNamespace(**options)) if options.get("labels") else None


def file_mtime(path: Path) -> float:
    """A file's modification time for cache keys (0 when missing): a rewritten file is read again."""
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


@st.cache_resource(show_spinner="Loading model…", max_entries=8)
def _cached_model(run_dir: str, checkpoint_mtime: float, threshold_mtime: float, ood_mtime: float) -> LoadedModel:
    # The mtimes are part of the cache key (Streamlit ignores only parameters starting with "_").
    return load_run_model(run_dir)


def cached_model(run_dir: Path) -> LoadedModel:
    """The run's model, loaded once per checkpoint (and reloaded when it or the threshold changes)."""
    return _cached_model(str(run_dir), file_mtime(run_dir / "best.safetensors"),
                         file_mtime(run_dir / "threshold.json"), file_mtime(run_dir / "ood.safetensors"))


@st.cache_data(show_spinner=False, max_entries=32)
def _cached_predictions(run_dir: str, split: str, file_mtime: float) -> pd.DataFrame:
    return runs.read_predictions(Path(run_dir), split)


def cached_predictions(run_dir: Path, split: str) -> pd.DataFrame:
    return _cached_predictions(str(run_dir), split, file_mtime(runs.predictions_path(run_dir, split)))


def finished_runs() -> list[dict]:
    return [r for r in runs.list_runs(runs_dir()) if r["state"] == "finished"]


RUN_PARAMETER = "run"  # ?run=<name> in the address: the chosen run survives a reload and a shared link


def _remember_run(key: str) -> None:
    """The user picked a run: every page shows it from now on (before this rerun reads the address)."""
    st.session_state["selected_run"] = st.session_state[key]
    st.query_params[RUN_PARAMETER] = st.session_state[key]


def run_picker(label: str = "Run", key: str = "run", only_finished: bool = True) -> Path | None:
    """A selectbox of runs (newest first). The choice stays chosen across pages (session state) and across a
    reload or a page opened by its address (the query parameter ?run=<name>, kept in the address bar); a
    named run that is gone is said, never silently swapped for the newest. None with a hint when there are
    no runs."""
    rows = finished_runs() if only_finished else runs.list_runs(runs_dir())
    if not rows:
        st.info("No finished runs yet. Start one on the **Train** page (or `python -m core train`); "
                f"runs are read from {plain(runs_dir())}.")
        return None
    names = [r["run"] for r in rows]
    asked = st.query_params.get(RUN_PARAMETER)
    wanted = asked if asked is not None else st.session_state.get("selected_run")
    if key in st.session_state and st.session_state[key] in names and st.session_state[key] != wanted \
            and wanted in names:
        st.session_state[key] = wanted  # a page visited before shows the run chosen since, on any page
    elif key not in st.session_state or st.session_state[key] not in names:
        st.session_state[key] = wanted if wanted in names else names[0]
    choice = st.selectbox(label, names, key=key, on_change=_remember_run, args=(key,),
                          help="The run this page shows; its name is kept in the address (?run=...), so a reload "
                               "keeps it.")
    if wanted is not None and wanted not in names:
        st.warning(plain(f"The run {wanted} is not among the {'finished ' if only_finished else ''}runs in "
                         f"{runs_dir()} (deleted, renamed or not finished): showing {choice}."))
    st.session_state["selected_run"] = choice
    if st.query_params.get(RUN_PARAMETER) != choice:
        st.query_params[RUN_PARAMETER] = choice
    return runs_dir() / choice

def weights_refusal(error: Exception, pretrained_field: str | None) -> str:
    """A refusal about ImageNet weights (core.model.WeightsUnavailableError) in a form's words: its fields, not
    the command line's flags, and no raw network error (offline is all it means). `pretrained_field`: the
    form's tick box for ImageNet weights, if it has one. Markdown: file names in the message are escaped."""
    text = str(error)
    way_out = (f"untick **{pretrained_field}**, or " if pretrained_field else "") + \
        "choose efficientnet_lite0 (its weights come with the install)"
    if text.startswith("Could not download"):
        arch = text.split(" for ", 1)[1].split(" ", 1)[0] if " for " in text else "this architecture"
        return (f"The ImageNet weights for {plain(arch)} cannot be downloaded (this machine has no internet "
                f"connection). Give a local copy in the **Weights file** field, or {way_out}.")
    text = plain(text)
    for flag, field in (("--weights-file PATH", "a file in the **Weights file** field"),
                        ("--weights-file", "the **Weights file** field"),
                        ("--no-pretrained", f"untick **{pretrained_field}**" if pretrained_field else way_out)):
        text = text.replace(plain(flag), field)
    return text


# The Thresholds page's live view (components/operating_view.js): registered once per server process, when this
# module is first imported. Its JavaScript is the project's own code, never text from a file a user gave.
_OPERATING_VIEW = st.components.v2.component(
    "cxr_workbench.operating_view",
    js=(PROJECT_ROOT / "components" / "operating_view.js").read_text(encoding="utf-8"),
    css=(PROJECT_ROOT / "components" / "operating_view.css").read_text(encoding="utf-8"),
)


def operating_view(data: dict, key: str) -> None:
    """ROC and PR curves with the operating points, and the confusion matrices, from
    core.figures.operating_view_data: a threshold step moves the markers in place instead of redrawing charts."""
    _OPERATING_VIEW(data=data, key=key)
