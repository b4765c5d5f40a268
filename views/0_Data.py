"""Data, the home page: choose the dataset folder and inspect it before training: counts, class imbalance,
the patient-grouped split training will use, leakage, unreadable files and sample images."""

from __future__ import annotations

import contextvars
import io
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

import ui
from core.cache import DecodeProgress
from core.dataset import DatasetError, load_thumbnail
from core.evaluate import dataset_overview
from core.figures import plain_label
from core.labels import LabelSpec, load_index

KAGGLE_DATASET = "paultimothymooney/chest-xray-pneumonia"
SAMPLES_PER_CLASS = 6
SAMPLE_SEED = 0
THUMBNAIL_PX = 160
SPLIT_ORDER = ("train", "val", "test", "all")
EXPECTED_LAYOUT = """\
```
<root>/train/NORMAL/*.jpeg      <root>/NORMAL/*.jpeg
<root>/train/PNEUMONIA/*.jpeg   <root>/PNEUMONIA/*.jpeg
<root>/val/...                  (no split folders: validation and
<root>/test/...                  test are carved out by patient)
```"""

st.set_page_config(page_title="Data · CXR workbench", page_icon="🫁", layout="wide")


@st.cache_data(show_spinner=False, max_entries=4)
def cached_overview(folder: str, labels: LabelSpec | None, _progress=None) -> dict:
    # Decodes every image once (and fills the cache training reuses): seconds per thousand images.
    return dataset_overview(folder, labels=labels, progress=_progress)


@st.cache_data(show_spinner=False, max_entries=4)
def sample_thumbnails(folder: str, labels: LabelSpec | None) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Up to SAMPLES_PER_CLASS readable images per class, picked with a fixed seed so the grid is
    stable between visits; unreadable files are skipped."""
    index = load_index(folder, labels)
    rng = np.random.default_rng(SAMPLE_SEED)
    samples: dict[str, list[tuple[str, np.ndarray]]] = {}
    for class_name in index.classes:
        paths = [r.path for r in index.records if r.class_name == class_name]
        thumbs: list[tuple[str, np.ndarray]] = []
        for i in rng.permutation(len(paths))[:SAMPLES_PER_CLASS * 5]:
            try:
                thumbs.append((Path(paths[i]).name, load_thumbnail(paths[i], 2 * THUMBNAIL_PX)))
            except (OSError, ValueError):
                continue
            if len(thumbs) == SAMPLES_PER_CLASS:
                break
        samples[class_name] = thumbs
    return samples


def breakable(file_name: str) -> str:
    """A long file name that wraps after its separators (a zero-width space after _ - .), never mid-word."""
    for sep in "_-.":
        file_name = file_name.replace(sep, sep + "\u200b")
    return file_name


def download_kaggle_dataset() -> str:
    """Download (or reuse kagglehub's cached copy of) the Kaggle release; returns its chest_xray folder."""
    import kagglehub

    root = Path(kagglehub.dataset_download(KAGGLE_DATASET))
    return str(root / "chest_xray" if (root / "chest_xray").is_dir() else root)


def counts_table(counts: dict[str, dict[str, int]], classes: list[str]) -> pd.DataFrame:
    splits = [s for s in SPLIT_ORDER if s in counts] + [s for s in counts if s not in SPLIT_ORDER]
    table = pd.DataFrame([[counts[s].get(c, 0) for c in classes] for s in splits], index=splits, columns=classes)
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    table.index.name = "split"
    return table


def counts_figure(table: pd.DataFrame, classes: list[str], title: str) -> go.Figure:
    long = (table.drop(index="total")[classes].reset_index()
            .melt(id_vars="split", var_name="class", value_name="images"))
    long["class"] = long["class"].map(plain_label)  # folder names, drawn by plotly as HTML otherwise
    fig = px.bar(long, x="split", y="images", color="class", barmode="group", text="images", title=title)
    fig.update_layout(xaxis_title="Split", yaxis_title="Images (count)", legend_title="Class",
                      margin=dict(t=50, b=10))
    return fig


def imbalance_lines(table: pd.DataFrame, classes: list[str]) -> list[str]:
    negative, positive = classes[0], classes[-1]
    shown_negative, shown_positive = ui.plain(negative), ui.plain(positive)  # folder names, as text
    lines = []
    for split, row in table.drop(index="total").iterrows():
        counts = f"{row[positive]:,} {shown_positive} vs {row[negative]:,} {shown_negative}"
        if row[negative] and row[positive]:
            lines.append(f"- **{split}**: {counts} = {row[positive] / row[negative]:.2f} : 1")
        else:
            lines.append(f"- **{split}**: {counts} (one class missing)")
    return lines


def show_leakage(report: dict | None, title: str) -> None:
    st.markdown(f"**{title}**")
    if not report:
        st.write("No official split folders: nothing to check.")
        return
    per_split = report.get("patients_per_split", {})
    st.caption("Patients per split: " + ", ".join(f"{s} {n:,}" for s, n in per_split.items()))
    shared = pd.DataFrame([{"splits": pair, "shared patients": item["count"],
                            "examples": ", ".join(item["examples"])}
                           for pair, item in report.get("shared_patients", {}).items()])
    if shared.empty or shared["shared patients"].sum() == 0:
        st.success("No patient occurs in more than one split.")
    else:
        st.warning(f"{int(shared['shared patients'].sum()):,} patient(s) occur in more than one split.")
    if not shared.empty:
        st.dataframe(shared, hide_index=True)
    groups, across = report.get("identical_file_groups", 0), report.get("identical_files_across_splits", 0)
    text = f"Groups of byte-identical files: {groups:,}; groups spanning more than one split: {across:,}."
    (st.warning if across else st.write)(text)
    examples = report.get("identical_across_examples") or []
    if examples:
        st.dataframe(pd.DataFrame({"identical files (split:path)": [" | ".join(g) for g in examples]}),
                     hide_index=True)


def show_file_list(title: str, rows: list, columns: list[str]) -> None:
    st.markdown(f"**{title}**")
    if not rows:
        st.write("none")
        return
    frame = pd.DataFrame(rows) if isinstance(rows[0], dict) else pd.DataFrame({columns[0]: rows})
    st.dataframe(frame[columns], hide_index=True)


# Set the text box from a finished download before the widget exists (Streamlit forbids it after).
pending_folder = st.session_state.pop("pending_data_folder", None)
if pending_folder is not None:
    st.session_state["data_folder_input"] = pending_folder
elif "data_folder_input" not in st.session_state:
    st.session_state["data_folder_input"] = ui.data_folder()

st.title("Chest X-ray pneumonia workbench")
st.caption("Check the data here, train on **Train**, compare runs on **Compare**, pick an operating "
           "threshold on **Thresholds**, study errors on **Mistakes** and score new images on **Predict**. "
           "A research tool, not a medical device.")

folder = st.text_input("Dataset folder", key="data_folder_input", placeholder="/path/to/chest_xray",
                       help="A folder on this machine; remembered for the next session.").strip()
if folder != ui.data_folder():
    ui.set_data_folder(folder)
try:
    labels = ui.label_spec(ui.label_file_inputs("data", remember=True))
except ValueError as e:
    st.error(ui.plain(e))
    st.stop()

with st.expander("No dataset yet? Download the Kaggle release (needs internet and Kaggle access)"):
    st.markdown(f"Downloads [`{KAGGLE_DATASET}`](https://www.kaggle.com/datasets/{KAGGLE_DATASET}) "
                "(about 1.2 GB) with `kagglehub` and points the dataset folder at it.")
    if st.button("Download from Kaggle"):
        with st.spinner("Downloading from Kaggle…"):
            try:
                downloaded = download_kaggle_dataset()
            except Exception as e:  # offline, no credentials, disk full: every failure is a message
                st.error(f"Download failed: {ui.plain(f'{type(e).__name__}: {e}')}. Without internet, download the "
                         "dataset elsewhere, copy it here and type its folder above.")
            else:
                st.session_state["pending_data_folder"] = downloaded
                ui.set_data_folder(downloaded)
                st.rerun()

if not folder:
    st.info("Type the folder that holds the chest X-rays above (or download them). Expected layout, "
            "one folder per class, with or without split folders:")
    st.markdown(EXPECTED_LAYOUT)
    st.stop()

try:
    with st.spinner("Scanning and decoding every image once (about 10 s per 5,000 images; cached after)…"):
        bar, timing = st.empty(), DecodeProgress(stream=io.StringIO())
        # The bar is drawn in the context from before the cached call: inside it Streamlit would record the bar's
        # updates into the cached overview and replay them, on a later run, into this run's bar (gone by then).
        page_context = contextvars.copy_context()

        def show_progress(done: int, total: int) -> None:
            timing(done, total)  # keeps the rate; its line says images/s and the time left
            page_context.run(bar.progress, done / max(total, 1), text=timing.line(done, total))

        overview = cached_overview(folder, labels, show_progress)
        bar.empty()
except DatasetError as e:
    st.error(ui.plain(e))
    st.markdown("Expected layout:\n" + EXPECTED_LAYOUT)
    st.stop()
except OSError as e:
    st.error(ui.plain(f"Could not read {folder}: {e}"))
    st.stop()

classes: list[str] = overview["classes"]
layout = "official train/val/test folders" if overview["has_official_splits"] else "no split folders"
if overview.get("label_file"):
    layout = "splits from the label file" if overview["has_official_splits"] else "no split column"
# The folder as typed; where it led too when that differs (a link, a relative path, ~).
where = ui.plain(folder) if str(overview["root"]) == folder else \
    f"{ui.plain(folder)} (resolved: {ui.plain(overview['root'])})"
st.success(f"**{overview['n_images']:,} images** in {where} ({layout}); classes "
           f"{ui.plain(', '.join(classes))}; positive class **{ui.plain(overview['positive_class'])}**.")
if overview.get("label_file"):
    st.markdown(f"Labels: {ui.plain(overview['labels'])}.")
st.markdown(f"**{overview.get('n_patients', 0):,} patients**, ids from {ui.plain(overview.get('patients_from'))}.")
if overview.get("metadata"):
    st.subheader("Image metadata (subgroups on Thresholds and in the report)")
    meta_cols = st.columns(len(overview["metadata"]))
    for column, (field, counts) in zip(meta_cols, overview["metadata"].items()):
        name = {"age": "age band", "view": "view position"}.get(field, field)
        column.dataframe(pd.DataFrame({name: list(counts), "images": list(counts.values())}), hide_index=True)

st.header("Images per split and class")
official = counts_table(overview["counts"], classes)
count_col, chart_col = st.columns([2, 3])
with count_col:
    st.dataframe(official)
    st.markdown("**Class imbalance** (positive : negative)\n" + "\n".join(imbalance_lines(official, classes)))
    st.caption("Training weights the loss by inverse class frequency (class weights 'inverse') and "
               "chooses the decision threshold on validation, so the imbalance does not bias the default.")
with chart_col:
    st.plotly_chart(counts_figure(official, classes, "As found on disk"))

st.header("The split training will use")
if overview["has_official_splits"]:
    st.markdown("The official test folder is kept as the benchmark. Validation is carved out of train (plus "
                "the official val, often tiny) **grouped by patient** and stratified by class, so no patient "
                "is in both train and validation. Patients the official folders already share between train "
                "and test stay shared (see Leakage). Defaults: 15 % validation, seed 0.")
else:
    st.markdown("Test and validation are carved out **grouped by patient** and stratified by class, so no "
                "patient is in two splits. Defaults: 15 % test, 15 % validation, seed 0.")
planned = counts_table(overview["planned_counts"], classes)
plan_col, plan_chart_col = st.columns([2, 3])
with plan_col:
    st.dataframe(planned)
with plan_chart_col:
    st.plotly_chart(counts_figure(planned, classes, "Patient-grouped split for training"))

st.header("Leakage")
leak_official, leak_planned = st.columns(2)
with leak_official:
    show_leakage(overview.get("leakage_official"), "Official split folders")
with leak_planned:
    show_leakage(overview.get("leakage_planned"), "Split training will use")

st.header("Image sizes and modes")
sizes = overview["image_sizes"]
if sizes["sampled"]:
    st.markdown(f"From the headers of {sizes['sampled']:,} files spread over the dataset: width "
                f"{sizes['width_min']:,}–{sizes['width_max']:,} px, height {sizes['height_min']:,}–"
                f"{sizes['height_max']:,} px; modes " + ", ".join(f"`{m}` {n:,}" for m, n in sizes["modes"].items())
                + ". Every image is converted to one channel and resized to the training size.")
else:
    st.write("No readable image headers found.")

st.header("Files left out")
unreadable_col, ignored_col = st.columns(2)
with unreadable_col:
    show_file_list("Unreadable or unusable (skipped by training)",
                   overview["unreadable"] + overview.get("unusable_entries", []), ["path", "reason"])
with ignored_col:
    show_file_list("Ignored non-image files", overview["ignored_non_image_files"], ["path"])

st.header("Sample images")
try:
    samples = sample_thumbnails(folder, labels)
except (DatasetError, OSError) as e:
    st.error(ui.plain(f"Could not load samples: {e}"))
    samples = {}
for class_name, thumbs in samples.items():
    st.subheader(ui.plain(class_name))
    if not thumbs:
        st.write("No readable images.")
        continue
    for column, (name, pixels) in zip(st.columns(SAMPLES_PER_CLASS), thumbs, strict=False):
        # As wide as its column (a fixed 160 px overflowed six columns at 1280 px), never wider than the thumbnail.
        column.image(pixels, caption=ui.plain(breakable(name)), width="stretch")
