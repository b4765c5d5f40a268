"""Predict: upload chest X-rays and read the run's calibrated probability, its decision at the operating
threshold, and a Grad-CAM overlay of where the evidence lies."""

from __future__ import annotations

import dataclasses

import pandas as pd
import streamlit as st

import ui
from core import runs
from core.cam import COLOUR_MAPS, DEFAULT_ALPHA, DEFAULT_COLOUR_MAP
from core.dataset import IMAGE_EXTENSIONS
from core.predict import ACCEPTED_FORMATS, MAX_UPLOAD_BYTES, batch_shift, gradcam_display, predict_image

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
    # Read now, not from the cached model: a threshold saved since it was cached must apply at once.
    operating = runs.operating_point(run_dir)
except (FileNotFoundError, ValueError) as e:  # damaged checkpoint, metadata or threshold.json
    st.error(str(e))
    st.stop()
loaded = dataclasses.replace(loaded, threshold=operating.threshold)

st.markdown(f"Model **{loaded.arch}** ({loaded.image_size} px input). Predicts **{ui.plain(loaded.classes[1])}** "
            "when the calibrated probability is at least the run's operating threshold, "
            f"**{ui.plain(operating.describe())}**. Save another on the Thresholds page.")

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
        left.metric(f"Probability of {ui.plain(loaded.classes[1])}", f"{result['prob']:.3f}")
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
