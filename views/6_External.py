"""External data: evaluate a finished run on another folder of X-rays (another site, other class folder names),
keep each evaluation in the run, read it with patient-bootstrap intervals, and re-pick the threshold on part
of it. The work is done by core.external; this page only collects choices and shows results."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

import ui
from core import external, runs
from core.dataset import DatasetError
from core.labels import LabelSpec
from core.metrics import TARGET_DEFAULTS, THRESHOLD_TARGETS, chance_level_warning, describe_rule
from core.ood import split_by_ood

EVALUATION_ERRORS = (DatasetError, ValueError, FileNotFoundError, OSError, RuntimeError)


def md(text: object) -> str:
    """Text from files, folders or errors inside Markdown (st.markdown, st.caption, st.warning, st.error and widget
    labels all render it): every ASCII punctuation character backslash-escaped and line breaks made spaces, so
    that nothing in it becomes a link, an image, HTML or formatting."""
    return ui.plain(" ".join(str(text).splitlines()))


# The predictions file's mtime is a hashed argument so that a re-evaluation under the same name is recomputed.
@st.cache_data(show_spinner="Bootstrapping intervals…", max_entries=32)
def set_metrics(run_dir: str, name: str, threshold: float, predictions_mtime: float) -> dict:
    from core.operating import load_set, set_summary

    return set_summary(load_set(Path(run_dir), external.set_name(name)), threshold)


@st.cache_data(show_spinner=False, max_entries=64)
def ood_parts(run_dir: str, name: str, threshold: float, predictions_mtime: float) -> dict:
    """Metrics of the images the model calls like and unlike its training data ({} for an older evaluation)."""
    from core.operating import load_set, set_summary

    parts = split_by_ood(load_set(Path(run_dir), external.set_name(name)))
    if parts is None:
        return {}
    return {f"{label} ({len(part.labels)})": set_summary(part, threshold) if len(part.labels) else {}
            for label, part in zip(("like the training data", "unlike it"), parts)}


def show_metrics(table: pd.DataFrame) -> None:
    """A metrics table with the metric names as a column, so that they are shown in full."""
    st.dataframe(table.rename_axis("metric").reset_index(), hide_index=True,
                 column_config={"metric": st.column_config.TextColumn("metric", width="medium")})


def evaluate_section(run_dir: Path, classes: list[str], folder: str, labels: LabelSpec | None) -> None:
    """Split and class-map choices for `folder` (or its label file), and the button that evaluates it."""
    split = "all"
    chosen: dict[str, str | None] = {}
    if labels is not None:
        root = str(Path(folder).expanduser().resolve())
        st.markdown(f"Images and classes from the label file: its negative label is **{md(classes[0])}**, its "
                    f"positive label **{md(classes[1])}**.")
    else:
        try:
            layout = external.describe_folder(folder)
        except DatasetError as e:
            st.error(md(e))
            return
        root = layout.root
        if layout.splits:
            split = st.radio("Split folders to evaluate", ["all"] + layout.splits, horizontal=True,
                             key=f"ext_split:{layout.root}", help="The folder has split folders: evaluate all of "
                                                                  "them or one.")
        folders = layout.folders(split)
        suggested = external.suggest_class_map(folders, classes)
        options = classes + [external.IGNORE]
        st.markdown(f"**Class of each folder** in {md(layout.root)}: the run's classes, or *ignore* to leave a "
                    "folder out.")
        columns = st.columns(min(len(folders), 4))
        for i, name in enumerate(folders):
            match = suggested[name]
            chosen[name] = columns[i % len(columns)].selectbox(
                md(name), options, index=options.index(match) if match else None, placeholder="choose a class",
                key=f"ext_map:{layout.root}:{name}")
    try:
        suggested = external.suggest_name(run_dir, folder, split, root)
    except ValueError as e:
        st.error(md(e))
        return
    evaluation_name = st.text_input("Name of this evaluation", value=suggested, key=f"ext_name:{root}:{split}",
                                    max_chars=external.MAX_NAME_LENGTH,
                                    help="Letters, digits, '_', '.' and '-'. A name in use asks before it replaces "
                                         "that evaluation.")
    try:
        saved_as = external.check_name(evaluation_name) if evaluation_name.strip() else suggested
    except ValueError as e:
        st.error(md(e))
        return
    saved = {e["name"]: e for e in external.list_external(run_dir)}
    replace = False
    if saved_as in saved:
        earlier = saved[saved_as]
        what = (f"of {earlier['root']}, evaluated {earlier['created']}" if not earlier["damaged"] else "damaged")
        st.warning(md(f"An evaluation named '{saved_as}' exists ({what}). Evaluating under this name replaces it: "
                      "its predictions, summary and re-picked threshold."))
        replace = st.checkbox(md(f"Replace the evaluation '{saved_as}'"), key=f"ext_replace:{saved_as}")
    if not st.button("Evaluate", type="primary", key="ext_evaluate"):
        return
    if saved_as in saved and not replace:
        st.error(md(f"Nothing evaluated: tick 'Replace the evaluation {saved_as}', or give another name."))
        return
    unmapped = [f for f, c in chosen.items() if c is None]
    if unmapped:
        st.error(f"Choose a class (or ignore) for the folder{'s' if len(unmapped) > 1 else ''} "
                 f"{md(', '.join(unmapped))} first.")
        return
    bar = st.progress(0.0, text="Reading images…")

    def progress(done: int, total: int) -> None:
        bar.progress(done / max(total, 1), text=f"Decoding images: {done} of {total}")

    try:
        with st.spinner("Scoring the folder…"):
            result = external.evaluate_external(run_dir, folder, {f: c for f, c in chosen.items() if c} or None,
                                                name=saved_as, split=split, progress=progress, replace=replace,
                                                labels=labels)
    except EVALUATION_ERRORS as e:
        bar.empty()
        st.error(md(e))
        return
    bar.empty()
    st.session_state["ext_open"] = result["name"]
    skipped = (f"; {len(result['skipped'])} unreadable files or unusable rows skipped (listed below)"
               if result["skipped"] else "")
    st.success(md(f"Evaluated {result['n']} images as '{result['name']}'{skipped}."))


def counts_table(summary: dict) -> pd.DataFrame:
    by_folder = summary.get("counts_by_folder") or {}
    rows = [{"folder": f, "class": c, "images": by_folder.get(f, 0) if c != external.IGNORE else None}
            for f, c in (summary.get("class_map") or {}).items()]
    for ignored in summary.get("ignored_folders") or []:
        for row in rows:
            if row["folder"] == ignored.get("folder"):
                row["images"] = ignored.get("files")
    return pd.DataFrame(rows)


def show_refit(refit: dict) -> None:
    st.markdown(f"Threshold re-picked by **{md(refit['rule_described'])}** on {refit['fit']['n']} images "
                f"({refit['fit']['n_patients']} patients): **{refit['threshold']:.3f}** (operating threshold "
                f"{refit['operating_threshold']:.3f}). Read on the other {refit['read']['n']} images "
                f"({refit['read']['n_patients']} patients), no patient on both sides:")
    show_metrics(external.metrics_table({f"at {refit['operating_threshold']:.3f} (operating)": refit["at_operating"],
                                         f"at {refit['threshold']:.3f} (re-picked)": refit["at_refit"]}))
    st.caption("95% patient-bootstrap intervals on the read part. The run's operating threshold is unchanged: to "
               "use a threshold chosen on this set, choose the set on the Thresholds page and save it there.")


def refit_section(run_dir: Path, name: str, summary: dict, chance: str | None) -> None:
    st.markdown("#### Re-pick the threshold on part of this set")
    if chance:
        st.caption("Not offered: the model does not rank this set's images better than chance, so any threshold "
                   "re-picked here would mean nothing.")
        return
    st.caption("A threshold rarely transfers to another site. Pick one with a rule on a share of this set's "
               "patients, and read the rest at the operating threshold and at the re-picked one.")
    columns = st.columns(3)
    rule = columns[0].selectbox("Rule", THRESHOLD_TARGETS, format_func=describe_rule, key="ext_refit_rule")
    value = None
    if rule in TARGET_DEFAULTS:
        is_ratio = rule == "cost"
        value = columns[1].number_input("Cost ratio" if is_ratio else "Target", min_value=0.01 if is_ratio else 0.0,
                                        max_value=100.0 if is_ratio else 1.0, value=float(TARGET_DEFAULTS[rule]),
                                        step=0.5 if is_ratio else 0.01, key=f"ext_refit_value:{rule}")
    fraction = columns[2].slider("Share of patients to fit on", 0.2, 0.8, 0.5, 0.05, key="ext_refit_fraction")
    if st.button("Re-pick the threshold", key="ext_refit"):
        try:
            with st.spinner("Re-picking and bootstrapping…"):
                summary["refit"] = external.refit_threshold(run_dir, name, rule, value, fraction)
        except (ValueError, OSError) as e:  # OSError: a full disk or read-only run folder
            st.error(md(e))
    if isinstance(summary.get("refit"), dict):
        show_refit(summary["refit"])


def delete_section(run_dir: Path, name: str) -> None:
    if st.session_state.get("ext_confirm_delete") != name:
        if st.button("Delete this evaluation", key="ext_delete"):
            st.session_state["ext_confirm_delete"] = name
            st.rerun()
        return
    st.warning(md(f"Delete the evaluation '{name}' (its predictions and summary)? The images are not touched."))
    yes, no = st.columns(2)
    if yes.button("Yes, delete it", type="primary", key="ext_delete_yes"):
        try:
            external.delete_external(run_dir, name)
        except (ValueError, FileNotFoundError, OSError) as e:
            st.error(md(e))
            return
        st.session_state.pop("ext_confirm_delete", None)
        st.session_state.pop("ext_open", None)
        st.rerun()
    if no.button("Cancel", key="ext_delete_no"):
        st.session_state.pop("ext_confirm_delete", None)
        st.rerun()


def evaluation_view(run_dir: Path, entry: dict, threshold: float, threshold_text: str) -> None:
    name = entry["name"]
    if entry["damaged"]:
        st.error(md(entry["error"]))
        delete_section(run_dir, name)
        return
    try:
        summary = external.read_external(run_dir, name)
    except (FileNotFoundError, ValueError) as e:
        st.error(md(e))
        delete_section(run_dir, name)
        return
    try:
        metrics = set_metrics(str(run_dir), name, threshold,
                              ui.file_mtime(external.external_dir(run_dir, name) / external.PREDICTIONS_FILE))
    except (FileNotFoundError, ValueError) as e:
        metrics, metrics_error = None, e
    # Said first: below chance, no number further down is worth choosing a threshold from.
    chance = chance_level_warning(metrics["metrics"]["auc"], runs.set_label(external.set_name(name))) \
        if metrics else None
    if chance:
        st.warning(md(chance), icon="⛔")
    # Images of the run's own patients make every number below meaningless as external validation: said first.
    independence = external.overlap_warnings(summary["overlap"], summary.get("n", 0)) \
        if isinstance(summary.get("overlap"), dict) else []
    for warning in independence:
        st.warning(md(warning))
    at_eval = (summary.get("threshold") or {}).get("value")
    st.caption(md(f"{summary.get('root', '?')} · split {summary.get('split', '?')} · evaluated "
                  f"{summary.get('created', '?')}"
                  + (f" (the operating threshold then was {at_eval:.3f}; the numbers below are read at today's)"
                     if at_eval is not None else "")))
    left, right = st.columns([1, 2])
    with left:
        st.markdown(f"**{summary.get('n', '?')} images**, {summary.get('n_patients', '?')} patients")
        if summary.get("labels"):
            st.markdown(md(f"Labels: {summary['labels']}."))
            st.dataframe(pd.DataFrame([{"class": c, "images": n} for c, n in (summary.get("counts") or {}).items()]),
                         hide_index=True)
        else:
            st.dataframe(counts_table(summary), hide_index=True)
        skipped = summary.get("skipped") or []
        if skipped:
            with st.expander(f"{len(skipped)} unreadable files or unusable rows skipped"):
                st.dataframe(pd.DataFrame(skipped), hide_index=True)
        if summary.get("ignored_files"):
            with st.expander(f"{len(summary['ignored_files'])} files that are not images, ignored"):
                st.dataframe(pd.DataFrame({"path": summary["ignored_files"]}), hide_index=True)
    with right:
        st.markdown(f"At the operating threshold {md(threshold_text)}:")
        if metrics is None:
            st.error(md(metrics_error))
        else:
            columns = {"all images": metrics}
            parts = ood_parts(str(run_dir), name, threshold,
                              ui.file_mtime(external.external_dir(run_dir, name) / external.PREDICTIONS_FILE))
            columns.update(parts)
            show_metrics(external.metrics_table(columns))
            st.caption(f"95% patient-bootstrap intervals ({metrics['n_patients']} patients, "
                       f"{metrics['n_resamples']} resamples); a dash where a metric is undefined on this set."
                       + (" The other columns split the set by the model's own verdict on each image: does it do "
                          "better where it claims to know the data?" if parts else ""))
    shift = summary.get("ood")
    if isinstance(shift, dict) and shift.get("verdict") and not shift.get("shifted"):
        st.info(md(shift["verdict"]))  # a shift is the first of the warnings below
    elif not isinstance(shift, dict):
        st.info("This evaluation predates the out-of-distribution check: evaluate the folder again (tick Replace) "
                "to see which images are unlike the training data.")
    for warning in summary.get("warnings") or []:
        # Said above; and a folder of the run's own patients is no other site for a threshold to transfer to.
        if warning not in independence and not (independence and warning == external.THRESHOLD_TRANSFER_WARNING):
            st.warning(md(warning))
    if summary.get("refit_refused"):
        st.warning(md(f"Not re-picked: {summary['refit_refused']}"))
    st.info(f"This set can now be chosen on the **Thresholds** and **Mistakes** pages as "
            f"*{md(runs.set_label(external.set_name(name)))}*.")
    refit_section(run_dir, name, summary, chance)
    delete_section(run_dir, name)


st.set_page_config(page_title="External · CXR workbench", layout="wide")
st.title("External")
st.caption("Evaluate a finished run on another folder of X-rays. A research tool: its output is not a diagnosis.")

run_dir = ui.run_picker()
if run_dir is None:
    st.stop()
try:
    classes = external.run_classes(run_dir)
    operating = runs.operating_point(run_dir)
except ValueError as e:
    st.error(md(e))
    st.stop()
st.markdown(f"The run predicts **{md(classes[1])}** (positive) against **{md(classes[0])}**; operating threshold "
            f"{md(operating.describe())}.")

st.subheader("Evaluate a folder")
folder = st.text_input("Folder of X-rays: one sub-folder per class, with or without train/val/test folders (or "
                       "the image folder of a label file)",
                       value="", key="ext_folder", placeholder="/data/other_site/chest_xray").strip()
try:
    labels = ui.label_spec(ui.label_file_inputs("ext", remember=False))
except ValueError as e:
    st.error(md(e))
    st.stop()
if folder:
    evaluate_section(run_dir, classes, folder, labels)

st.subheader("Evaluations of this run")
entries = external.list_external(run_dir)
if not entries:
    st.info("None yet: evaluate a folder above (or `python -m core evaluate RUN --data DIR`).")
    st.stop()
st.dataframe(pd.DataFrame([{"name": e["name"], "images": e["n"], "evaluated": e["created"], "folder": e["root"],
                            "split": e["split"], "warnings": len(e["warnings"]),
                            "status": "damaged" if e["damaged"] else "ok"} for e in entries]), hide_index=True)
names = [e["name"] for e in entries]
if st.session_state.get("ext_open") not in names:
    st.session_state.pop("ext_open", None)
opened = st.selectbox("Open an evaluation", names, key="ext_open")
evaluation_view(run_dir, next(e for e in entries if e["name"] == opened), operating.threshold, operating.describe())
