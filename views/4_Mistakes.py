"""Mistakes: the false negatives and false positives of a run at its operating threshold (or, explicitly, a
previewed one), most confident first, on any of its prediction sets, as a gallery with a Grad-CAM view
of any of them."""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

import ui
from core import external, runs
from core.cam import COLOUR_MAPS, DEFAULT_ALPHA, DEFAULT_COLOUR_MAP, CamResult, cam_caption
from core.dataset import load_thumbnail
from core.metrics import mistakes
from core.ood import has_ood, ood_flags
from core.predict import LoadedModel, gradcam_display

KINDS = {"both": "Both", "false negative": "False negatives", "false positive": "False positives"}
THUMB_PX = 256
CAM_PX = 320
COLUMNS = 4
PARTS = {"all": "All", "like": "Like the training data", "unlike": "Unlike the training data ({n})"}
WHO_USES_THE_OPERATING_THRESHOLD = ("Predict, Compare, `runs`, `evaluate` and the report use the operating "
                                    "threshold; save a new one on the Thresholds page.")


def jpeg(pixels: np.ndarray) -> bytes:
    """The JPEG st.image would make of `pixels` (quality 100), made once here so that a rerun that shows the
    same image again sends the cached bytes instead of encoding it again."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=100)
    return out.getvalue()


@st.cache_data(show_spinner=False, max_entries=1024)
def thumbnail(path: str, mtime: float) -> bytes | None:
    """A small grayscale copy for the gallery (aspect kept), as JPEG; None when the file is missing or unreadable."""
    try:
        return jpeg(load_thumbnail(path, THUMB_PX))
    except (OSError, ValueError):
        return None


@st.cache_data(show_spinner=False, max_entries=128)
def grad_cam(run_dir: str, checkpoint_mtime: float, path: str, mtime: float, colour_map: str, alpha: float,
             _loaded: LoadedModel) -> tuple[bytes, bytes, CamResult]:
    """(original, overlay) as JPEG and the map of one image: a backward pass through the model, so computed
    once per image, checkpoint version (the weights and the metadata the map depends on are all in
    best.safetensors) and look. Raises ValueError for an unreadable file (not cached: it may come back)."""
    view = gradcam_display(_loaded, path, CAM_PX, colour_map, alpha)
    return jpeg(view.image), jpeg(view.overlay), view.cam


def describe(row, positive: str) -> str:
    """'IM-0001-0001.jpeg · true NORMAL · P(PNEUMONIA) 0.912 · false positive': one image, from its own row (of
    DataFrame.itertuples)."""
    class_name = getattr(row, "class_name", None)
    true_name = class_name if isinstance(class_name, str) else f"label {row.label}"
    return f"{Path(row.path).name} · true {true_name} · P({positive}) {row.prob:.3f} · {row.kind}"


def gallery_column(items: list[tuple[str, bytes | None, str]]) -> None:
    """One column of the gallery, top to bottom: (path, thumbnail or None, caption) per image. Each run of readable
    images is one st.image call: the browser mounts one element per call, and two dozen of them took a third of
    its time on a page switch. A missing or unreadable file is said in its place."""
    for readable, group in itertools.groupby(items, key=lambda item: item[1] is not None):
        group = list(group)
        if readable:
            st.image([pixels for _, pixels, _ in group], caption=[ui.plain(caption) for _, _, caption in group],
                     width="stretch")
            continue
        for path, _, caption in group:
            st.caption(ui.plain(f"file missing or unreadable: {Path(path).name}"))
            st.caption(ui.plain(caption))


@st.fragment
def grad_cam_section(run_dir: Path, shown: pd.DataFrame, positive: str) -> None:
    """The Grad-CAM picker and view of the mistakes shown. A fragment: choosing another image, colour map or
    opacity reruns only this part, not the table and the gallery, which do not depend on them."""
    # Options are the images' paths, not positions in the list: a position would point at another image after
    # the filter, set or threshold changes, and a label computed for one row would sit over another's map.
    rows = list(shown.itertuples(index=False))
    paths = list(dict.fromkeys(str(r.path) for r in rows))
    labels = {str(r.path): f"#{i + 1} {describe(r, positive)}" for i, r in enumerate(rows)}
    if st.session_state.get("mistakes_cam") not in labels:
        st.session_state["mistakes_cam"] = paths[0]
    cam_controls = st.columns([3, 1, 1])
    chosen = cam_controls[0].selectbox("Image", paths, key="mistakes_cam", format_func=lambda p: labels.get(p, p))
    colour_map = cam_controls[1].selectbox("Colour map", list(COLOUR_MAPS),
                                           index=list(COLOUR_MAPS).index(DEFAULT_COLOUR_MAP),
                                           format_func=lambda name: COLOUR_MAPS[name][1], key="mistakes_colour_map")
    alpha = cam_controls[2].slider("Overlay opacity", 0.0, 1.0, DEFAULT_ALPHA, 0.05, key="mistakes_alpha")
    row = next(r for r in rows if str(r.path) == chosen)  # the one row both the map and its caption come from
    path = str(row.path)
    try:
        loaded = ui.cached_model(run_dir)
    except (FileNotFoundError, ValueError) as e:
        st.error(ui.plain(e))
        return
    try:
        original, overlay, cam = grad_cam(str(run_dir), ui.file_mtime(run_dir / "best.safetensors"), path,
                                          ui.file_mtime(path), colour_map, alpha, loaded)
    except ValueError as e:
        st.error(ui.plain(f"{Path(path).name}: file missing or unreadable ({e})"))
        return
    views = st.columns(2)
    views[0].image(original, caption=ui.plain(f"Original: {Path(path).name}"), width=CAM_PX)
    views[1].image(overlay, caption=ui.plain(cam_caption(cam, loaded.classes[1], subject=describe(row, positive))),
                   width=CAM_PX)


st.set_page_config(page_title="Mistakes · CXR workbench", layout="wide")
st.title("Mistakes")

run_dir = ui.run_picker()
if run_dir is None:
    st.stop()

sets = runs.prediction_sets(run_dir)
if not sets:
    st.info("This run has no saved predictions yet: they are written when training finishes, and by "
            "`python -m core evaluate` for other folders.")
    st.stop()
try:
    operating = runs.operating_point(run_dir)
except ValueError as e:  # a damaged threshold.json: say so, never fall back to another threshold
    st.error(ui.plain(e))
    st.stop()

controls = st.columns([1, 2, 2])
set_name = controls[0].selectbox("Set", sets, index=sets.index("test") if "test" in sets else 0,
                                 format_func=runs.set_label, key="mistakes_set", persist_state="session",
                                 help="The run's validation and test splits, and every external folder "
                                      "evaluated with this run.")
kind = controls[1].radio("Show", list(KINDS), format_func=KINDS.get, horizontal=True, key="mistakes_kind",
                         persist_state="session")
with controls[2]:
    preview = st.toggle("Preview another threshold", key="mistakes_preview",
                        help="Look at the mistakes another threshold would make, without changing anything. "
                             + WHO_USES_THE_OPERATING_THRESHOLD)
    if preview:
        threshold = float(st.slider("Preview threshold", 0.0, 1.0, value=operating.threshold, step=0.001,
                                    format="%.3f", key="mistakes_preview_threshold"))
    else:
        threshold = operating.threshold
        st.metric("Operating threshold", f"{threshold:.3f}", help=WHO_USES_THE_OPERATING_THRESHOLD)

st.caption(ui.plain(f"Operating threshold: {operating.describe()}."))
if preview:
    st.info(f"Previewing the threshold {threshold:.3f}: below are the mistakes it would make. Nothing is saved; the "
            f"operating threshold stays {ui.plain(operating.describe())}. {WHO_USES_THE_OPERATING_THRESHOLD}")

try:
    predictions = ui.cached_predictions(run_dir, set_name)
except (FileNotFoundError, ValueError) as e:  # this set only: the others stay selectable above
    st.warning(ui.plain(f"{runs.set_label(set_name)} cannot be shown: {e}"))
    st.stop()

overlap = external.overlap_with_run(run_dir, set_name)
if overlap:
    st.warning(ui.plain(f"{runs.set_label(set_name)} is {overlap}: the model was trained or its threshold chosen on "
                        "these patients, so its mistakes here understate those on new patients."))

if has_ood(predictions):
    predictions = predictions.assign(unlike_training=ood_flags(predictions))
    n_unlike = int(predictions["unlike_training"].sum())
    part = st.radio("Images", list(PARTS), format_func=lambda k: PARTS[k].format(n=n_unlike), horizontal=True,
                    key="mistakes_ood", help="The run's own verdict on each image: a feature distance above the "
                                             "threshold that 95% of validation images pass, or (external folders) "
                                             "an image that is not a chest X-ray. Does the model err more where it "
                                             "does not know the data?")
    if part != "all":
        predictions = predictions[predictions["unlike_training"] == (part == "unlike")].reset_index(drop=True)

wrong = mistakes(predictions, threshold)
n_fn = int((wrong["kind"] == "false negative").sum())
which = "previewed" if preview else "operating"
n_fp = len(wrong) - n_fn
st.caption(f"At the {which} threshold {threshold:.3f}: {n_fn} false negative{'s' * (n_fn != 1)} and {n_fp} false "
           f"positive{'s' * (n_fp != 1)} among {len(predictions)} {ui.plain(runs.set_label(set_name))} images. "
           "Most confident mistakes first: confidence is the probability the model gave to the wrong class.")
shown = wrong if kind == "both" else wrong[wrong["kind"] == kind].reset_index(drop=True)
if shown.empty:
    st.success("No mistakes of this kind at this threshold.")
    st.stop()

table = shown.assign(file=shown["path"].map(lambda p: Path(p).name))
columns = [c for c in ("file", "kind", "class_name", "label", "prob", "confidence", "unlike_training", "ood_score",
                        "ood_reason", "patient", "path") if c in table]
# On the page: what a reader needs first, in words; the CSV keeps every column under its file name.
shown_columns = [c for c in ("file", "kind", "class_name", "prob", "confidence", "patient", "unlike_training",
                             "ood_score", "ood_reason", "path") if c in table]
try:
    positive = external.run_classes(run_dir)[1]
except ValueError:  # a run naming no classes: the column still says what it holds
    positive = "positive class"
st.dataframe(table[shown_columns], hide_index=True, height=300,
             column_config={"kind": "mistake", "class_name": "true class",
                            "prob": st.column_config.NumberColumn(f"P({positive})", format="%.3f"),
                            "confidence": st.column_config.NumberColumn(format="%.3f"),
                            "unlike_training": "unlike the training data",
                            "ood_score": st.column_config.NumberColumn("OOD score", format="%.2f"),
                            "ood_reason": "why unlike"})
if "ood_score" in table:
    st.caption("OOD score: how far the image's features lie from the training images' (Mahalanobis distance); "
               "above the run's out-of-distribution threshold, the image is unlike the training data and its "
               "decision is not to be trusted.")
st.download_button("Download this list (CSV)", table[columns].to_csv(index=False).encode(),
                   file_name=f"{run_dir.name}-{set_name.replace(':', '-')}-mistakes-at-{threshold:.3f}.csv",
                   mime="text/csv")

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
cells: list[list[tuple[str, bytes | None, str]]] = [[] for _ in range(COLUMNS)]
for i, row in enumerate(rows.itertuples(index=False)):
    true_name = getattr(row, "class_name", None) or f"label {row.label}"
    caption = (f"{row.kind} · true {true_name} · P({positive}) {row.prob:.3f}"
               + (f" · {row.patient}" if isinstance(getattr(row, "patient", None), str) else "")
               + (" · unlike the training data" if getattr(row, "unlike_training", False) else ""))
    cells[i % COLUMNS].append((str(row.path), thumbnail(str(row.path), ui.file_mtime(row.path)), caption))
for column, items in zip(st.columns(COLUMNS), cells):
    with column:
        gallery_column(items)

st.subheader("Grad-CAM")
grad_cam_section(run_dir, shown, positive)
