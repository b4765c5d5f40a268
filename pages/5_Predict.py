"""Predict: upload chest X-rays and read the run's calibrated probability, its decision at the operating
threshold, and a Grad-CAM overlay of where the evidence lies."""

from __future__ import annotations

import dataclasses

import pandas as pd
import streamlit as st

import ui
from core import runs
from core.predict import MAX_UPLOAD_BYTES, gradcam_display, predict_pixels, read_image

CAM_PX = 320
LIMIT_MB = MAX_UPLOAD_BYTES // 2**20


st.set_page_config(page_title="Predict · CXR workbench", layout="wide")
st.title("Predict")
st.caption("A research tool: its output is not a diagnosis.")

run_dir = ui.run_picker()
if run_dir is None:
    st.stop()
try:
    loaded = ui.cached_model(run_dir)
except (FileNotFoundError, ValueError) as e:
    st.error(str(e))
    st.stop()

# Read the threshold now: a threshold saved since the model was cached must apply at once.
loaded = dataclasses.replace(loaded, threshold=runs.operating_threshold(run_dir))
saved = runs.read_json(run_dir / "threshold.json", {}) or {}
origin = (f"saved, chosen on {saved.get('chosen_on')} ({saved.get('target')})" if "threshold" in saved
          else "chosen on validation at the end of training")
st.markdown(f"Model **{loaded.arch}** ({loaded.image_size} px input). Predicts **{loaded.classes[1]}** when "
            f"the calibrated probability is at least **{loaded.threshold:.3f}** ({origin}; change it on the "
            "Thresholds page).")

uploads = st.file_uploader(f"Chest X-rays: JPEG or PNG, up to {LIMIT_MB} MB each", type=["jpg", "jpeg", "png"],
                           accept_multiple_files=True, max_upload_size=LIMIT_MB, key="predict_files")
st.caption(f"Files larger than {LIMIT_MB} MB are refused. Images of any size and of grayscale or colour are "
           f"resized to the model's {loaded.image_size} × {loaded.image_size} input as in training.")

results = []
for upload in uploads or []:
    data = upload.getvalue()
    with st.container(border=True):
        st.markdown(f"**{upload.name}**")
        try:
            pixels = read_image(data, loaded.image_size)  # size limit and validation: never a traceback
        except ValueError as e:
            st.error(f"{upload.name}: {e}")
            results.append({"file": upload.name, "probability": None, "decision": None, "error": str(e)})
            continue
        result = predict_pixels(loaded, pixels)
        positive = result["predicted"] == loaded.classes[1]
        results.append({"file": upload.name, "probability": result["prob"], "decision": result["predicted"],
                        "error": None})
        left, middle, right = st.columns([1, 1.3, 1.3])
        left.metric(f"Probability of {loaded.classes[1]}", f"{result['prob']:.3f}")
        left.markdown(f"Decision: **:{'red' if positive else 'green'}[{result['predicted']}]**  \n"
                      f"({result['prob']:.3f} {'≥' if positive else '<'} threshold {result['threshold']:.3f})")
        original, heat_overlay, found = gradcam_display(loaded, data, CAM_PX)
        middle.image(original, caption="Original", width=CAM_PX)
        right.image(heat_overlay, caption=ui.gradcam_caption(loaded.classes[1], found), width=CAM_PX)

if len(results) > 1:
    st.subheader("Summary")
    st.dataframe(pd.DataFrame(results), hide_index=True,
                 column_config={"probability": st.column_config.NumberColumn(format="%.3f")})
