"""Shared pieces of the dashboard pages: settings remembered between sessions, run pickers, and
cached loaders (models once per checkpoint, tables once per file version). Views only: all logic
lives in core/."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import streamlit as st

from core import runs
from core.predict import LoadedModel, load_run_model

PROJECT_ROOT = Path(__file__).resolve().parent
# The dashboard's pages in menu order: (script, menu title, icon). The first is the home page at /, the
# others are served at /<title>. Emoji, not :material/...: icons: those make the browser fetch an icon
# font from fonts.gstatic.com, which an offline machine cannot reach.
PAGES = (
    ("pages/0_Data.py", "Data", "📂"),
    ("pages/1_Train.py", "Train", "🏋️"),
    ("pages/2_Compare.py", "Compare", "⚖️"),
    ("pages/3_Thresholds.py", "Thresholds", "🎚️"),
    ("pages/4_Mistakes.py", "Mistakes", "🔍"),
    ("pages/5_Predict.py", "Predict", "🩻"),
    ("pages/6_External.py", "External", "🌍"),
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


def run_picker(label: str = "Run", key: str = "run", only_finished: bool = True) -> Path | None:
    """A selectbox of runs (newest first) that remembers the choice across pages; None with a hint
    when there are none."""
    rows = finished_runs() if only_finished else runs.list_runs(runs_dir())
    if not rows:
        st.info("No finished runs yet. Start one on the **Train** page (or `python -m core train`); "
                f"runs are read from {plain(runs_dir())}.")
        return None
    names = [r["run"] for r in rows]
    remembered = st.session_state.get("selected_run")
    index = names.index(remembered) if remembered in names else 0
    choice = st.selectbox(label, names, index=index, key=key)
    st.session_state["selected_run"] = choice
    return runs_dir() / choice
