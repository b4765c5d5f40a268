"""Mistakes: the false negatives and false positives of a run at the current threshold, most confident
first, as a gallery with a Grad-CAM view of any of them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

import ui
from core import runs
from core.dataset import to_grayscale_uint8
from core.metrics import mistakes
from core.predict import gradcam_display

KINDS = {"both": "Both", "false negative": "False negatives", "false positive": "False positives"}
THUMB_PX = 256
CAM_PX = 320
COLUMNS = 4


@st.cache_data(show_spinner=False, max_entries=1024)
def thumbnail(path: str, mtime: float) -> np.ndarray | None:
    """A small grayscale copy for the gallery (aspect kept); None when the file is missing or unreadable."""
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("L" if img.mode == "L" else "RGB", (THUMB_PX, THUMB_PX))  # decode large originals fast
            gray = to_grayscale_uint8(img)
            gray.thumbnail((THUMB_PX, THUMB_PX))
            return np.asarray(gray, dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _mtime(path: str) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


st.set_page_config(page_title="Mistakes · CXR workbench", layout="wide")
st.title("Mistakes")

run_dir = ui.run_picker()
if run_dir is None:
    st.stop()

controls = st.columns([1, 2, 2])
split = controls[0].radio("Split", ["test", "val"], horizontal=True, key="mistakes_split",
                          persist_state="session")
kind = controls[1].radio("Show", list(KINDS), format_func=KINDS.get, horizontal=True, key="mistakes_kind",
                         persist_state="session")

# The Thresholds page writes the threshold being tuned; otherwise the run's saved operating threshold.
if st.session_state.get("threshold_run") == str(run_dir) and "threshold" in st.session_state:
    threshold = float(st.session_state["threshold"])
    origin = f"set on the Thresholds page: {st.session_state.get('threshold_target', 'manual')}"
else:
    threshold = runs.operating_threshold(run_dir)
    origin = "the run's operating threshold"
controls[2].metric("Threshold", f"{threshold:.3f}", help=origin)

try:
    predictions = ui.cached_predictions(run_dir, split)
except (FileNotFoundError, ValueError) as e:
    st.error(str(e))
    st.stop()

wrong = mistakes(predictions, threshold)
n_fn = int((wrong["kind"] == "false negative").sum())
st.caption(f"At threshold {threshold:.3f} ({origin}): {n_fn} false negatives and {len(wrong) - n_fn} false "
           f"positives among {len(predictions)} {split} images. Most confident mistakes first: confidence is "
           "the probability the model gave to the wrong class.")
shown = wrong if kind == "both" else wrong[wrong["kind"] == kind].reset_index(drop=True)
if shown.empty:
    st.success("No mistakes of this kind at this threshold.")
    st.stop()

table = shown.assign(file=shown["path"].map(lambda p: Path(p).name))
columns = [c for c in ("file", "kind", "class_name", "label", "prob", "confidence", "patient", "path") if c in table]
st.dataframe(table[columns], hide_index=True, height=240,
             column_config={"prob": st.column_config.NumberColumn("probability", format="%.3f"),
                            "confidence": st.column_config.NumberColumn(format="%.3f")})
st.download_button("Download this list (CSV)", table[columns].to_csv(index=False).encode(),
                   file_name=f"{run_dir.name}-{split}-mistakes.csv", mime="text/csv")

st.subheader("Gallery")
paging = st.columns([1, 1, 4])
per_page = int(paging[0].number_input("Images per page", min_value=4, max_value=48, value=24, step=4,
                                      key="mistakes_per_page"))
pages = max(1, math.ceil(len(shown) / per_page))
if st.session_state.get("mistakes_page", 1) > pages:  # fewer pages after a filter or threshold change
    st.session_state["mistakes_page"] = pages
page = int(paging[1].number_input(f"Page (of {pages})", min_value=1, max_value=pages, step=1, key="mistakes_page"))
start = (page - 1) * per_page
rows = shown.iloc[start:start + per_page]
grid = st.columns(COLUMNS)
for i, row in enumerate(rows.itertuples(index=False)):
    true_name = getattr(row, "class_name", None) or f"label {row.label}"
    caption = (f"{row.kind} · true {true_name} · p={row.prob:.3f}"
               + (f" · {row.patient}" if isinstance(getattr(row, "patient", None), str) else ""))
    with grid[i % COLUMNS]:
        pixels = thumbnail(str(row.path), _mtime(str(row.path)))
        if pixels is None:
            st.caption(f"file missing or unreadable: {Path(row.path).name}")
            st.caption(caption)
        else:
            st.image(pixels, caption=caption, width="stretch")

st.subheader("Grad-CAM")
options = list(range(len(shown)))
choice = st.selectbox("Image", options, key="mistakes_cam",
                      format_func=lambda i: f"{Path(shown.at[i, 'path']).name} · {shown.at[i, 'kind']} · "
                                            f"p={shown.at[i, 'prob']:.3f}")
try:
    loaded = ui.cached_model(run_dir)
    original, heat_overlay, found = gradcam_display(loaded, str(shown.at[choice, "path"]))
except FileNotFoundError as e:
    st.error(str(e))
except ValueError as e:
    st.error(f"{Path(shown.at[choice, 'path']).name}: file missing or unreadable ({e})")
else:
    views = st.columns(2)
    views[0].image(original, caption="Original", width=CAM_PX)
    views[1].image(heat_overlay, caption=ui.gradcam_caption(loaded.classes[1], found), width=CAM_PX)
