"""Thresholds: fit a decision threshold on validation by a rule or by hand, read every set (test,
external folders) at it with 95% patient-bootstrap intervals, see ROC/PR curves of validation and test
overlaid, calibration, subgroups, and save it as the run's one operating threshold.

Speed: what depends on the threshold is one fragment (threshold_views), so a slider step or a rule change reruns
and resends only that, not the run's sets, calibration or report; everything read from files is cached on the
file's mtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

import ui
from core import external, runs
from core.bootstrap import METRIC_KEYS, METRIC_LABELS, PatientBootstrap, ThresholdCounts, format_interval
from core.calibration import N_BINS, calibration_summary, calibration_table, temperature_note, uncalibrated_probs
from core.figures import operating_curves, operating_view_data, reliability_figure, set_colour
from core.metrics import TARGET_DEFAULTS, chance_level_warning, choose_threshold, describe_rule
from core.ood import has_ood, split_by_ood
from core.operating import curve_data, load_set, ranking_only, set_summary, shift_warnings
from core.subgroups import (
    MIN_GROUP_IMAGES,
    NO_METADATA,
    metadata_groups,
    prepare_subgroups,
    set_groups,
    subgroup_table,
)

RULES = {
    "slider": "By hand",
    "recall": "Recall ≥ X",
    "specificity": "Specificity ≥ X",
    "ppv": "PPV ≥ X",
    "npv": "NPV ≥ X",
    "cost": "Cost ratio",
    "best_f1": "Best F1",
    "youden": "Youden",
}


# mtime is hashed (no leading underscore) so a re-evaluated set is recomputed. cache_resource: the
# bootstrap's weight matrix is shared, not copied, on every slider move.
@st.cache_resource(show_spinner="Resampling patients…", max_entries=32)
def prepared_set(run_dir: str, name: str, mtime: float) -> dict:
    """The set, its fixed patient resamples, and everything that does not depend on the threshold."""
    pset = load_set(Path(run_dir), name)
    boot = PatientBootstrap(pset.patients, len(pset.labels))
    ranking = ranking_only(pset, boot)
    return {"set": pset, "boot": boot, "ranking": ranking, "curves": curve_data(pset, ranking),
            "counts": ThresholdCounts(pset.labels, pset.probs, boot)}


@st.cache_resource(show_spinner=False, max_entries=32)
def prepared_calibration(run_dir: str, sets: tuple[tuple[str, str, float], ...], temperature: float) -> tuple:
    """Reliability figure and ECE/Brier table of (name, colour, mtime) sets: threshold-free, built once."""
    summaries = {}
    for name, colour, mtime in sets:
        pset, boot = (prepared_set(run_dir, name, mtime)[k] for k in ("set", "boot"))  # the same resamples
        summaries[runs.set_label(name)] = {**calibration_summary(pset.labels, pset.probs,
                                                                 uncalibrated_probs(pset.frame, temperature),
                                                                 boot=boot),
                                           "colour": colour}
    return reliability_figure(summaries), calibration_table(summaries)


@st.cache_resource(show_spinner="Resampling subgroups…", max_entries=32)
def prepared_subgroups(run_dir: str, name: str, mtime: float, groups_csv: str, csv_mtime: float
                       ) -> tuple[list, list[str], bool]:
    """Subgroups of a set (Kermany's file names, the image metadata, and the user's CSV when given) with their
    patient resamples, what was tidied or left out, and whether the set carries image metadata; raises ValueError
    for an unusable CSV."""
    pset = load_set(Path(run_dir), name)
    groups = set_groups(pset.frame, groups_csv or None)
    return (prepare_subgroups(pset.labels, pset.probs, pset.patients, groups), groups.attrs.get("notes", []),
            not metadata_groups(pset.frame).empty)


@st.cache_resource(show_spinner="Resampling patients…", max_entries=32)
def prepared_part(run_dir: str, name: str, mtime: float, part: int) -> dict | None:
    """The images of a set that the model calls like (part 0) or unlike (part 1) its training data, prepared as
    prepared_set; None when the set has no per-image verdict or the part is empty."""
    parts = split_by_ood(load_set(Path(run_dir), name))
    if parts is None or len(parts[part].labels) == 0:
        return None
    pset = parts[part]
    boot = PatientBootstrap(pset.patients, len(pset.labels))
    ranking = ranking_only(pset, boot)
    return {"set": pset, "boot": boot, "ranking": ranking, "curves": curve_data(pset, ranking),
            "counts": ThresholdCounts(pset.labels, pset.probs, boot)}


@st.cache_resource(show_spinner=False, max_entries=32)
def shown_curves(run_dir: str, shown: tuple[tuple[str, float], ...], names: tuple[str, ...],
                 filtered: tuple[str, ...]) -> dict:
    """The live view's curves of the (name, mtime) sets shown, those in `filtered` on their images like the
    training data only: threshold-free, built once per choice of sets."""
    roc, pr = {}, {}
    for n, mtime in shown:
        p = (prepared_part(run_dir, n, mtime, 0) if n in filtered else None) or prepared_set(run_dir, n, mtime)
        if p["curves"]["roc"]:
            roc[runs.set_label(n)] = {**p["curves"]["roc"], "colour": colour_of(n, list(names))}
            pr[runs.set_label(n)] = {**p["curves"]["pr"], "colour": colour_of(n, list(names))}
    return operating_curves(roc, pr, roc_title="ROC (test is read, never tuned)")


def colour_of(name: str, names: list[str]) -> str:
    externals = [n for n in names if n.startswith(runs.EXTERNAL_PREFIX)]
    return set_colour(name, externals.index(name) if name in externals else 0)


# The metric names ("PR-AUC (average precision)") shown whole, not cut by the index column's default width.
METRIC_NAMES_COLUMN = {"_index": st.column_config.TextColumn("metric", width="medium")}


def interval_table(summaries: dict[str, dict], heading=runs.set_label) -> pd.DataFrame:
    rows = {METRIC_LABELS[k]: {heading(s): format_interval(summ["metrics"][k]) for s, summ in summaries.items()}
            for k in METRIC_KEYS}
    table = pd.DataFrame(rows).T
    counts = {heading(s): f"{summ['n']} images, {summ['n_patients']} patients"
              + ("" if summ["patients_known"] else " (ids unknown: images resampled)") for s, summ in summaries.items()}
    return pd.concat([table, pd.DataFrame([counts], index=["Images"])])


st.set_page_config(page_title="Thresholds · CXR workbench", layout="wide")
st.title("Decision threshold")
st.caption("Fit the threshold on **validation**, then read **test** (and external folders) at it: tuning on "
           "test makes its numbers optimistic. Every figure carries its 95% interval from 2,000 bootstrap "
           "resamples of patients (not images).")

run_dir = ui.run_picker()
if run_dir is None:
    st.stop()

try:
    runs.operating_point(run_dir)  # a damaged threshold file stops the page here; the views read it themselves
except ValueError as e:
    st.error(ui.plain(e))
    st.stop()
names = runs.prediction_sets(run_dir)
if "val" not in names:
    st.error(ui.plain(f"No validation predictions in {run_dir}: the run has not finished evaluating."))
    st.stop()
prepared = {}
for n in names:  # a damaged set is reported and left out; the others stay usable
    try:
        prepared[n] = prepared_set(str(run_dir), n, ui.file_mtime(runs.predictions_path(run_dir, n)))
    except (FileNotFoundError, ValueError) as e:
        # Validation is needed below (an error); another set is left out and the page goes on (a warning).
        (st.error if n == "val" else st.warning)(ui.plain(f"{runs.set_label(n)} left out: {e}"))
names = list(prepared)
if "val" not in prepared:
    st.stop()

with_verdict = [n for n in names if n != "val" and has_ood(prepared[n]["set"].frame)]
in_distribution_only = False
if with_verdict:
    in_distribution_only = st.toggle(
        "Read test and external sets on their images like the training data only", key="thr_ood_only",
        help="Each image carries the model's own verdict (the out-of-distribution score, and for external folders the "
             "check for images that are not chest X-rays). On: the images it flags are left out of every number and "
             "curve below; the table under 'Like and unlike the training data' shows both parts.")
full_sets = dict(prepared)
if in_distribution_only:
    for n in with_verdict:
        part = prepared_part(str(run_dir), n, ui.file_mtime(runs.predictions_path(run_dir, n)), 0)
        if part is None:
            st.warning(ui.plain(f"{runs.set_label(n)}: every image is flagged as unlike the training data; it is left "
                                "out."))
            del prepared[n]
        else:
            prepared[n] = part
    names = list(prepared)

# Said first: a set the model does not rank better than chance has no threshold worth choosing, and an external
# set of the run's own patients validates nothing.
for n in names:
    overlap = external.overlap_with_run(run_dir, n)
    if overlap:
        st.warning(ui.plain(f"{runs.set_label(n)} is {overlap}. Its numbers below are not external validation."))
chance_sets = {}
for n in names:
    warning = chance_level_warning(prepared[n]["ranking"].get("auc"), runs.set_label(n))
    if warning:
        chance_sets[n] = warning
        st.warning(ui.plain(warning), icon="⛔")

# A new run starts from its own operating threshold, not from the last run's slider position.
if st.session_state.get("threshold_run") != str(run_dir):
    st.session_state["thr_slider"] = runs.operating_point(run_dir).threshold
    st.session_state["threshold_run"] = str(run_dir)


def redraw_page() -> None:
    """The curves' sets also choose calibration's, which is drawn outside the fragment: rerun the whole page."""
    st.rerun()


@st.fragment
def threshold_views(subgroup_box) -> list[str]:
    """Everything that depends on the threshold, from the rule's controls to the confusion matrices and (into
    subgroup_box) the subgroup table; returns the sets whose curves are shown."""
    operating = runs.operating_point(run_dir)
    headline = st.empty()  # filled once a save on this run is handled

    controls = st.columns([1.2, 3, 1])
    fit_on = controls[0].radio("Fit on", names, format_func=lambda n: ui.plain(runs.set_label(n)), key="thr_split",
                               persist_state="session",
                               help="The set the rule is fitted on. Validation is the honest choice; the other sets "
                                    "are read at the threshold it gives.")
    rule = controls[1].radio("Rule", list(RULES), format_func=RULES.get, horizontal=True, key="thr_mode",
                             persist_state="session")
    value = None
    if rule in TARGET_DEFAULTS:
        if rule == "cost":
            value = controls[2].number_input("Missed positive costs (false alarms)", min_value=0.01, max_value=1000.0,
                                             value=TARGET_DEFAULTS["cost"], step=0.5, key="thr_cost",
                                             persist_state="session",
                                             help="Minimises expected cost = k × false negatives + false positives.")
        else:
            value = controls[2].number_input("X", min_value=0.0, max_value=1.0, value=TARGET_DEFAULTS[rule],
                                             step=0.01, format="%.3f", key=f"thr_x_{rule}", persist_state="session")

    fit = prepared[fit_on]["set"]
    if not fit.both_classes:
        st.warning(ui.plain(f"The {runs.set_label(fit_on)} set holds only one class: curves and rules need both."))

    chosen = None
    if rule != "slider" and not fit.both_classes:
        rule = "slider"  # a rule needs both classes: the threshold stays set by hand
    elif rule != "slider":
        chosen = choose_threshold(fit.labels, fit.probs, rule, value)
        st.session_state["thr_slider"] = chosen  # switching back to "by hand" starts from it
    slider_value = st.slider("Threshold (predict positive when probability ≥ threshold)", 0.0, 1.0, step=0.001,
                             format="%.3f", key="thr_slider", persist_state="session", disabled=chosen is not None)
    # A rule's exact threshold, not the slider's rounding of it: recall >= X must hold.
    threshold = float(slider_value if chosen is None else chosen)
    rule_text = describe_rule(rule if rule != "slider" else "manual", value)
    if rule == "slider" and abs(threshold - operating.threshold) < 1e-9:
        # Untouched, the slider holds the operating threshold: say how that one was chosen.
        rule_text, fitted_on = operating.rule, operating.chosen_on or fit_on
    else:
        fitted_on = fit_on
    # A threshold set by hand was fitted on nothing.
    how_chosen = rule_text if rule_text == describe_rule("manual", None) else \
        f"{rule_text}, fitted on {runs.set_label(fitted_on)}"

    if fit_on in chance_sets:
        st.warning(ui.plain(f"A threshold fitted on {runs.set_label(fit_on)} is meaningless: the model does not rank "
                            "its images better than chance. It cannot be saved from this set."))
    if fit_on != "val":
        st.warning(f"You are fitting the threshold on **{ui.plain(runs.set_label(fit_on))}**. Numbers read on the set "
                   "the threshold was fitted on are optimistic; fit on validation and only read the others.")

    summaries = {n: set_summary(p["set"], threshold, p["boot"], p["ranking"], p["counts"])
                 for n, p in prepared.items()}

    top = st.columns([1, 1, 2])
    # The button is handled before the metrics are drawn, so they show the threshold just saved.
    # A threshold fitted on part of a set would be saved as fitted on the whole of it: not offered.
    filtered = in_distribution_only and fit_on in with_verdict
    if filtered:
        top[2].caption("Fitted on the images like the training data only: turn the toggle off to save a threshold "
                       "fitted on this set.")
    if top[2].button("Save as the operating threshold", type="primary", disabled=fit_on in chance_sets or filtered,
                     help="Every view and command then uses this threshold; nothing is retrained."):
        try:
            runs.save_threshold(run_dir, threshold, chosen_on=fit_on, target=rule_text,
                                rule=rule if rule != "slider" else "manual", value=value)
        except (ValueError, OSError) as e:
            top[2].error(ui.plain(f"Could not save the threshold: {e}"))
        else:
            operating = runs.operating_point(run_dir)
            top[2].success(ui.plain(f"Saved: operating threshold {operating.describe()}."))
    headline.info(f"**{ui.plain(f'Operating threshold {operating.describe()}.')}** Train's summary, Compare, "
                  "Mistakes, Predict, `python -m core runs / evaluate` and the report all use it. Saving another one "
                  "below changes them all.")
    top[0].metric("Threshold on this page", f"{threshold:.3f}",
                  help=ui.plain(how_chosen))
    top[1].metric("Operating threshold", f"{operating.threshold:.3f}", help=ui.plain(operating.describe()))
    if abs(threshold - operating.threshold) > 1e-12:
        top[2].caption(f"Not saved: the views use {operating.threshold:.3f} until you save.")

    for other in [n for n in names if n != "val"]:
        gaps = shift_warnings(summaries["val"], summaries[other], runs.set_label(other))
        if gaps:
            st.warning(f"**Validation does not represent {ui.plain(runs.set_label(other))}.** "
                       + ui.plain("; ".join(gaps) + f". {external.set_origin(run_dir, other)}: ")
                       + "the threshold fitted on validation does not give validation's rates there.")

    st.subheader(ui.plain(f"Metrics at threshold {threshold:.3f} ({how_chosen})"))
    filtered_sets = set(with_verdict) if in_distribution_only else set()
    st.dataframe(interval_table(summaries, lambda n: runs.set_label(n) + (" (like the training data only)"
                                                                          if n in filtered_sets else "")),
                 column_config=METRIC_NAMES_COLUMN)
    st.caption("Value [95% interval]. A dash: undefined (no images of that kind, or too few resamples defined). "
               f"Positive class: {ui.plain(fit.class_names[1])}. PPV and NPV depend on each set's prevalence.")

    if with_verdict:
        with st.expander("Like and unlike the training data: does the model do better where it claims to know the "
                         "data?", expanded=bool(set(with_verdict) - {"test"})):
            for n in with_verdict:
                parts = [prepared_part(str(run_dir), n, ui.file_mtime(runs.predictions_path(run_dir, n)), i)
                         for i in (0, 1)]
                total = len(full_sets[n]["set"].labels)
                flagged = len(parts[1]["set"].labels) if parts[1] else 0
                st.markdown(ui.plain(f"{runs.set_label(n)}: {flagged} of {total} images "
                                     f"({flagged / max(total, 1):.0%}) flagged as unlike the training data; metrics at "
                                     f"threshold {threshold:.3f}"))
                part_summaries = {f"{label} ({len(p['set'].labels)} images)": set_summary(
                    p["set"], threshold, p["boot"], p["ranking"], p["counts"])
                                  for label, p in zip(("like the training data", "unlike it"), parts) if p}
                st.dataframe(pd.DataFrame({METRIC_LABELS[k]: {c: format_interval(v["metrics"][k])
                                                              for c, v in part_summaries.items()}
                                           for k in METRIC_KEYS}).T, column_config=METRIC_NAMES_COLUMN)
            st.caption("Value [95% interval], patients resampled within each part. The verdict is the run's own: a "
                       "feature distance above the threshold that 95% of validation images pass, or an image that is "
                       "not a chest X-ray (colour, blank, mostly white, elongated; external folders only).")

    shown = st.multiselect("Curves of", names, default=[n for n in ("val", "test") if n in names],
                           format_func=runs.set_label, key="thr_curves", on_change=redraw_page)
    markers = []
    for n in shown:
        m = summaries[n]["metrics"]
        markers.append({"name": f"{runs.set_label(n)} at {threshold:.3f}", "fpr": 1 - m["specificity"]["value"],
                        "tpr": m["sensitivity"]["value"], "recall": m["sensitivity"]["value"],
                        "precision": m["ppv"]["value"], "colour": colour_of(n, names)})
    matrices = [{"title": f"{runs.set_label(n)} (n={summaries[n]['n']})", "counts": summaries[n]["counts"],
                 "classes": prepared[n]["set"].class_names} for n in shown]
    curves = shown_curves(str(run_dir), tuple((n, ui.file_mtime(runs.predictions_path(run_dir, n))) for n in shown),
                          tuple(names), tuple(with_verdict) if in_distribution_only else ())
    ui.operating_view(operating_view_data(curves, markers, matrices), key="thr_operating_view")

    with subgroup_box:
        subgroup_views(threshold)
    return shown


def subgroup_views(threshold: float) -> None:
    read_on = st.selectbox("Set", names, index=names.index("test") if "test" in names else 0,
                           format_func=runs.set_label, key="thr_subgroup_set")
    groups_csv = st.text_input("Groups CSV (optional): a path column plus group columns", key="thr_groups_csv")
    try:
        csv_path = groups_csv.strip()
        subgroups, group_notes, has_metadata = prepared_subgroups(
            str(run_dir), read_on, ui.file_mtime(runs.predictions_path(run_dir, read_on)), csv_path,
            ui.file_mtime(Path(csv_path)) if csv_path else 0.0)
    except ValueError as e:
        st.error(ui.plain(e))
        subgroups, group_notes, has_metadata = [], [], True
    if not subgroups:
        st.caption("No subgroups: file names do not follow Kermany's patterns; give a groups CSV.")
    else:
        table = subgroup_table(subgroups, threshold)
        for key in ("sensitivity", "specificity", "auc"):
            if key in table:
                table[key] = table[key].map(lambda iv: format_interval(iv) if isinstance(iv, dict) else "—")
        st.dataframe(table, hide_index=True)
        st.caption(f"At threshold {threshold:.3f}, on {ui.plain(runs.set_label(read_on))}; 95% intervals from "
                   "resampling patients within each group. Sensitivity needs positives and specificity negatives: a "
                   "pneumonia subtype has only a sensitivity, a normal series only a specificity. Age bands in years "
                   "(0-4 and 5-17: children; 18-39, 40-64 and 65+: adults); unknown: no value, or none that is an age. "
                   f"Groups under {MIN_GROUP_IMAGES} images get no interval.")
    for note in group_notes:
        st.info(ui.plain(f"{note}."))
    if not has_metadata:
        st.caption(ui.plain(NO_METADATA))


# The page in reading order; the fragment fills the first box and the subgroups one.
views, calibration_box, subgroup_box = st.container(), st.container(), st.container()
subgroup_box.header("Subgroups")  # an outside container takes a fragment's writes once it holds something

st.header("Report")
st.caption("One self-contained HTML file (opens offline): data and leakage, config, training curves, the operating "
           "point with intervals, validation vs test curves, calibration, subgroups, external sets, a sample of "
           "mistakes with Grad-CAM, limitations. It uses the saved operating threshold, not this page's unsaved one.")


def report_html() -> bytes:
    from core.report import build_report_html

    return build_report_html(run_dir, None).encode()


st.download_button("Download the HTML report", data=report_html, file_name=f"{run_dir.name}-report.html",
                   mime="text/html", key="thr_report", on_click="ignore")

with views:
    shown = threshold_views(subgroup_box)

with calibration_box:
    st.header("Calibration")
    report = runs.read_report(run_dir)
    temperature = report.get("temperature")
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
        temperature = 1.0  # none recorded (or damaged): the probabilities are shown as saved
    st.caption(ui.plain(temperature_note(report)))
    calibration_sets = tuple((n, colour_of(n, names), ui.file_mtime(runs.predictions_path(run_dir, n)))
                             for n in shown or ["val"])
    reliability, calibration_figures = prepared_calibration(str(run_dir), calibration_sets, float(temperature))
    cal_cols = st.columns([2, 1])
    cal_cols[0].plotly_chart(reliability, key="reliability")
    cal_cols[1].dataframe(calibration_figures)
    cal_cols[1].caption(f"ECE: expected calibration error over {N_BINS} equal-width probability bins. Brier: mean "
                        "squared error of the probability, with its 95% interval (patients resampled as above). Lower "
                        "is better for both. ECE has no interval: it adds up absolute gaps, so chance alone inflates "
                        "it on a few hundred images (a well-calibrated model scores above 0), and a resampled "
                        "interval would not cover its true value. Marker size grows with the "
                        "images in a bin. Temperature scaling minimises validation log-loss, not ECE: ECE can rise a "
                        "little.")
