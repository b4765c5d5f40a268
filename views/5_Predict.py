"""Predict: upload chest X-rays and read the run's calibrated probability, its decision at the operating
threshold, and a Grad-CAM overlay of where the evidence lies; or predict a whole folder, label file or zip in
batches, as a table and a CSV."""

from __future__ import annotations

import dataclasses

import pandas as pd
import streamlit as st

import ui
from core import runs
from core.batch_predict import MAX_BATCH_UPLOAD_BYTES, collect_inputs, predict_batch
from core.cam import COLOUR_MAPS, DEFAULT_ALPHA, DEFAULT_COLOUR_MAP
from core.dataset import IMAGE_EXTENSIONS
from core.predict import ACCEPTED_FORMATS, MAX_UPLOAD_BYTES, batch_shift, gradcam_display, predict_image

CAM_PX = 320
LIMIT_MB = MAX_UPLOAD_BYTES // 2**20
TOTAL_MB = MAX_BATCH_UPLOAD_BYTES // 2**20
SINGLE, BATCH = "One by one, with Grad-CAM", "A folder, label file or zip (batch)"


st.set_page_config(page_title="Predict · CXR workbench", layout="wide")
st.title("Predict")
st.caption("A research tool: its output is not a diagnosis.")

run_dir = ui.run_picker()
if run_dir is None:
    st.stop()
try:
    loaded = ui.cached_model(run_dir)
    # Read now, not from the cached model: a threshold saved since it was cached must apply at once.
    operating = runs.operating_point(run_dir)
except (FileNotFoundError, ValueError) as e:  # damaged checkpoint, metadata or threshold.json
    st.error(str(e))
    st.stop()
loaded = dataclasses.replace(loaded, threshold=operating.threshold)

st.markdown(f"Model **{loaded.arch}** ({loaded.image_size} px input). Predicts **{ui.plain(loaded.classes[1])}** "
            "when the calibrated probability is at least the run's operating threshold, "
            f"**{ui.plain(operating.describe())}**. Save another on the Thresholds page.")

if loaded.ood is None:
    st.warning(ui.plain(loaded.ood_error) if loaded.ood_error else
               "This run has no out-of-distribution score, so the page cannot tell when an image is unlike the "
               "training data (only the checks for colour, blank, white and very elongated images run). Fit it "
               f"once with python -m core fit-ood {ui.plain(run_dir)}.")
else:
    st.caption(f"Each image is first checked against the training data: the distance of the model's features to "
               f"those of its training images (threshold {loaded.ood.threshold:.2f}, which 95% of validation images "
               "pass). An image above it, or one that is not a chest X-ray at all, gets its probability with the "
               "decision marked not applicable.")


def batch_mode() -> None:
    """A server path or several uploads, predicted in batches: progress, a sortable table, what was left out and
    why, and the CSV. The result stays until the run or its threshold changes, or Predict is pressed again."""
    with st.form("batch_predict", enter_to_submit=False, border=False):  # Enter in the path must not start it
        path = st.text_input("Folder, CSV label file or .zip on the server", key="batch_path",
                             placeholder="/data/xrays/2024-06", help="A folder is read with its sub-folders; a CSV "
                             "needs a path column (path, file, filename, image, ...; relative to the CSV's folder) "
                             "and may carry a label column; a zip is read in memory, never extracted.")
        uploads = st.file_uploader(f"…or upload images or zips: up to {LIMIT_MB} MB each, {TOTAL_MB} MB in all",
                                   type=sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS) + ["zip"],
                                   accept_multiple_files=True, max_upload_size=LIMIT_MB, key="batch_files")
        submitted = st.form_submit_button("Predict", type="primary")
    key = (str(run_dir), loaded.threshold)
    if submitted:
        st.session_state.pop("batch_result", None)
        sources = [path.strip()] if path.strip() else []
        if not sources and not uploads:
            st.error("Give a folder, CSV or zip on the server, or upload files.")
            return
        try:
            inputs = collect_inputs(sources, [(u.name, u.getvalue()) for u in uploads or []])
        except ValueError as e:
            st.error(ui.plain(e))
            return
        with inputs:
            if not inputs.items:
                st.error(f"Nothing to predict: no image found ({len(inputs.skipped)} files skipped, listed below).")
            bar = st.progress(0.0, text=f"Predicting {len(inputs.items):,} images…")
            result = predict_batch(loaded, inputs, progress=lambda done, total: bar.progress(
                done / max(total, 1), text=f"{done:,} of {total:,} images"))
            bar.empty()
        st.session_state["batch_result"] = (key, result)
    stored = st.session_state.get("batch_result")
    if stored is None or stored[0] != key:
        return
    result = stored[1]
    for line in result.summary_lines()[:2]:
        st.markdown(ui.plain(line))
    if result.shift is not None:
        (st.warning if result.shift["shifted"] else st.info)(result.shift["verdict"])
    if result.predicted:
        st.dataframe(result.table(), hide_index=True,
                     column_config={"probability": st.column_config.NumberColumn(
                         f"probability of {loaded.classes[1]}", format="%.3f")})
    left_out = result.left_out()
    if len(left_out):
        st.markdown(f"**Not predicted: {len(left_out):,}** (unreadable, or skipped), with the reason")
        st.dataframe(left_out, hide_index=True)
    st.download_button("Download the CSV", result.csv_bytes(), file_name="predictions.csv", mime="text/csv",
                       on_click="ignore", key="batch_download")
    st.caption("The CSV has a row per file: probability, the decision at the operating threshold (the model's call "
               "even where it does not apply), applicable, the out-of-distribution score and reason, and the error "
               "for files not predicted.")


if st.radio("Images", [SINGLE, BATCH], horizontal=True, key="predict_mode") == BATCH:
    batch_mode()
    st.stop()

uploads = st.file_uploader(f"Chest X-rays: {ACCEPTED_FORMATS}, up to {LIMIT_MB} MB each",
                           type=sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS),
                           accept_multiple_files=True, max_upload_size=LIMIT_MB, key="predict_files")
st.caption(f"{ACCEPTED_FORMATS}, as training reads. Files larger than {LIMIT_MB} MB are refused. Images of any "
           f"size and of grayscale or colour are resized to the model's {loaded.image_size} × {loaded.image_size} "
           "input as in training.")
cam_controls = st.columns([1, 1, 2])
colour_map = cam_controls[0].selectbox("Grad-CAM colour map", list(COLOUR_MAPS),
                                       index=list(COLOUR_MAPS).index(DEFAULT_COLOUR_MAP),
                                       format_func=lambda name: COLOUR_MAPS[name][1], key="predict_colour_map")
alpha = cam_controls[1].slider("Overlay opacity", 0.0, 1.0, DEFAULT_ALPHA, 0.05, key="predict_alpha")

results, scored = [], []
for upload in uploads or []:
    data = upload.getvalue()
    name = ui.plain(upload.name)
    with st.container(border=True):
        st.markdown(f"**{name}**")
        try:
            result = predict_image(loaded, data, keep_features=True)  # size limit and validation: no traceback
        except ValueError as e:
            st.error(f"{name}: {ui.plain(e)}")
            results.append({"file": upload.name, "probability": None, "decision": None, "applies": None,
                            "OOD score": None, "why not": None, "error": str(e)})
            continue
        scored.append(result)
        ood = result["ood"]
        positive = result["predicted"] == loaded.classes[1]
        decision = result["predicted"] if result["applicable"] else "not applicable"
        results.append({"file": upload.name, "probability": result["prob"], "decision": decision,
                        "applies": result["applicable"], "OOD score": ood["score"],
                        "why not": ood["reason"], "error": None})
        if not result["applicable"]:
            st.warning(ood["reason"])
        left, middle, right = st.columns([1, 1.3, 1.3])
        # Withheld from the headline where the model does not apply: the number is in the sentence below, as what
        # the model alone would say.
        left.metric(f"Probability of {ui.plain(loaded.classes[1])}",
                    f"{result['prob']:.3f}" if result["applicable"] else "—",
                    help=None if result["applicable"] else "Not shown as a result: the model does not apply to "
                                                           "this image (see the warning above).")
        comparison = f"{result['prob']:.3f} {'≥' if positive else '<'} threshold {result['threshold']:.3f}"
        if result["applicable"]:
            left.markdown(f"Decision: **:{'red' if positive else 'green'}[{ui.plain(result['predicted'])}]**  \n"
                          f"({comparison})")
        else:
            said = ui.plain(result["predicted"])
            left.markdown(f"Decision: **not applicable**  \n(the model alone would say {said}: {comparison}; not to "
                          "be trusted on this image)")
        if ood["score"] is not None and ood["gate"]:
            left.caption(f"Feature score {ood['score']:.2f} (threshold {ood['threshold']:.2f}): not used, the image "
                         "is not a chest X-ray.")
        elif ood["score"] is not None:
            like = "unlike" if ood["score"] > ood["threshold"] else "like"
            left.caption(f"{like.capitalize()} the training data (score {ood['score']:.2f}, threshold "
                         f"{ood['threshold']:.2f})")
        view = gradcam_display(loaded, data, CAM_PX, colour_map, alpha)
        middle.image(view.image, caption="Original", width="stretch")
        right.image(view.overlay, caption=ui.plain(view.caption(loaded.classes[1])), width="stretch")

if len(results) > 1:
    st.subheader("Summary")
    shift = batch_shift(loaded, scored)
    if shift is not None:
        (st.warning if shift["shifted"] else st.info)(shift["verdict"])
    st.dataframe(pd.DataFrame(results), hide_index=True,
                 column_config={"probability": st.column_config.NumberColumn(format="%.3f"),
                                "OOD score": st.column_config.NumberColumn(format="%.2f")})
