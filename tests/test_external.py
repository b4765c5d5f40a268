"""External validation (core.external): class maps, folders with and without split folders, saved sets that
the other views read, the warning for data the run has seen, re-picking the threshold by patient, and the
list of evaluations."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA, make_xray

from core import external, runs
from core.dataset import DatasetError
from core.metrics import metrics_at_threshold
from core.operating import load_set

RUN_CLASSES = ["NORMAL", "PNEUMONIA"]
ORIGINALS = SHARED_DATA / "kermany_original_train_subset"


def write_folder(root: Path, per_folder: dict[str, int], size: int = 48, suffix: str = ".png",
                 split: str | None = None, images_per_patient: int = 1) -> Path:
    """Class folders with names the run does not use. Patients are person5xxx (absent from Kermany train)
    when `images_per_patient` > 1, else file names carry no patient id at all."""
    for k, (folder, n) in enumerate(per_folder.items()):
        d = root / split / folder if split else root / folder
        d.mkdir(parents=True, exist_ok=True)
        positive = int(folder.lower() not in ("normal", "no_findings", "healthy"))
        for i in range(n):
            name = (f"person{5000 + 1000 * k + i // images_per_patient}_virus_{i}"
                    if images_per_patient > 1 else f"site-{folder}-{i:03d}")
            make_xray(size, positive, seed=zlib.crc32(f"{split}{folder}{i}".encode())).save(d / f"{name}{suffix}")
    return root


# ---------------------------------------------------------------- class maps

def test_parse_class_map_reads_entries_and_refuses_bad_syntax():
    assert external.parse_class_map("No_findings=NORMAL,Pneumonia=PNEUMONIA") == {
        "No_findings": "NORMAL", "Pneumonia": "PNEUMONIA"}
    assert external.parse_class_map(" Bacterial = PNEUMONIA , Viral=PNEUMONIA, Other=ignore,") == {
        "Bacterial": "PNEUMONIA", "Viral": "PNEUMONIA", "Other": "ignore"}
    assert external.parse_class_map("") == {}
    assert external.parse_class_map("a=NORMAL,A=normal") == {"a": "NORMAL"}  # the same entry twice is fine
    for bad in ("No_findings", "=NORMAL", "No_findings=", "a=b=c", "a=NORMAL,A=PNEUMONIA", ",,,", " , "):
        with pytest.raises(ValueError, match="No_findings=NORMAL,Pneumonia=PNEUMONIA|twice"):
            external.parse_class_map(bad)
    assert external.parse_class_map(external.format_class_map({"x": "NORMAL"})) == {"x": "NORMAL"}
    # Double quotes make a name a JSON string: commas, '=', quotes and edge spaces kept.
    assert external.parse_class_map('" a,b "=NORMAL, "x=y" = ignore,"q\\"t"=PNEUMONIA') == {
        " a,b ": "NORMAL", "x=y": "ignore", 'q"t': "PNEUMONIA"}
    for bad in ('"open=NORMAL', '"a"b=NORMAL', '""=NORMAL', '"a"'):
        with pytest.raises(ValueError, match="quote"):
            external.parse_class_map(bad)


# Folder names a class map must be able to name: edge spaces, separators, quotes, shell characters.
NASTY_FOLDERS = [" lead", "trail ", "a,b", "a=b", 'q"uote', "back\\slash", "it's $HOME;", "Ünï code", "tab\tin",
                 "<NORMAL>"]


@pytest.mark.parametrize("folder", NASTY_FOLDERS)
def test_every_folder_name_round_trips_through_the_class_map(folder):
    class_map = {folder: "NORMAL", "plain": "ignore"}
    assert external.parse_class_map(external.format_class_map(class_map)) == class_map


def test_the_suggested_class_map_is_accepted_as_written_for_nasty_folder_names(tmp_path):
    import shlex

    root = write_folder(tmp_path / "site", {name: 1 for name in NASTY_FOLDERS} | {"PNEUMONIA": 1})
    with pytest.raises(DatasetError) as err:
        external.scan_external(str(root), RUN_CLASSES, None)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    # What a user pastes into a shell: the argument after --class-map, with each placeholder filled in.
    [argument] = shlex.split(message.split("--class-map ", 1)[1].split(", or --class-map-file")[0])
    suggested = external.parse_class_map(argument.replace("<NORMAL|PNEUMONIA|ignore>", "NORMAL"))
    assert suggested == {name: "NORMAL" for name in NASTY_FOLDERS} | {"PNEUMONIA": "PNEUMONIA"}
    index = external.scan_external(str(root), RUN_CLASSES, suggested)
    assert index.counts() == {"NORMAL": len(NASTY_FOLDERS), "PNEUMONIA": 1}


def test_class_map_file_as_csv_or_json(tmp_path):
    import csv

    root = write_folder(tmp_path / "site", {name: 1 for name in NASTY_FOLDERS} | {"PNEUMONIA": 1})
    wanted = {name: "NORMAL" for name in NASTY_FOLDERS}
    with open(tmp_path / "map.csv", "w", newline="") as f:
        csv.writer(f).writerows([["folder", "class"], *wanted.items()])
    (tmp_path / "map.json").write_text(json.dumps(wanted))
    for name in ("map.csv", "map.json"):
        assert external.read_class_map_file(tmp_path / name) == wanted
        assert external.scan_external(str(root), RUN_CLASSES, wanted).counts()["NORMAL"] == len(NASTY_FOLDERS)
    for text, message in (("a,NORMAL,extra\n", "line 1: 3 columns"), ("", "maps no folder"),
                          ('{"a": 1}', "class name in quotes"), ('{"a": "NORMAL", "A": "PNEUMONIA"}', "twice"),
                          ("{broken", "not valid JSON"), ("a,\n", "not FOLDER=CLASS")):
        (tmp_path / "bad").write_text(text)
        with pytest.raises(ValueError, match=message):
            external.read_class_map_file(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        external.read_class_map_file(tmp_path / "missing.csv")


def test_parse_refit_rule():
    assert external.parse_refit_rule("youden") == ("youden", None)
    assert external.parse_refit_rule("Recall:0.9") == ("recall", 0.9)
    with pytest.raises(ValueError, match="RULE"):
        external.parse_refit_rule("sharpness:1")
    with pytest.raises(ValueError, match="not a number"):
        external.parse_refit_rule("recall:high")


def test_folder_names_match_run_classes_case_insensitively(tmp_path):
    root = write_folder(tmp_path / "site", {"normal": 3, "Pneumonia": 4})
    index = external.scan_external(str(root), RUN_CLASSES, None)
    assert index.class_map == {"normal": "NORMAL", "Pneumonia": "PNEUMONIA"}
    assert index.counts() == {"NORMAL": 3, "PNEUMONIA": 4}
    assert {(r.source_class, r.class_name, r.label) for r in index.records} == {
        ("normal", "NORMAL", 0), ("Pneumonia", "PNEUMONIA", 1)}
    assert index.splits_found == [] and all(r.split is None for r in index.records)
    assert not index.warnings()


def test_class_map_with_ignore_and_several_folders_per_class(tmp_path):
    root = write_folder(tmp_path / "site", {"No_findings": 3, "Bacterial": 2, "Viral": 2, "Tuberculosis": 2})
    (root / "README.txt").write_text("not an image")
    class_map = external.parse_class_map("no_findings=normal,BACTERIAL=PNEUMONIA,viral=Pneumonia,Tuberculosis=IGNORE")
    index = external.scan_external(str(root), RUN_CLASSES, class_map)
    assert index.class_map == {"Bacterial": "PNEUMONIA", "No_findings": "NORMAL", "Tuberculosis": "ignore",
                               "Viral": "PNEUMONIA"}
    assert index.counts() == {"NORMAL": 3, "PNEUMONIA": 4}
    assert index.folder_counts() == {"Bacterial": 2, "No_findings": 3, "Viral": 2}
    assert [(f["folder"], f["files"]) for f in index.ignored_folders] == [("Tuberculosis", 2)]
    assert index.ignored_files == [str(root / "README.txt")]
    assert not any("Tuberculosis" in r.path for r in index.records)


def test_unmapped_folder_is_an_error_naming_it_and_the_syntax(tmp_path):
    root = write_folder(tmp_path / "site", {"No_findings": 2, "Pneumonia": 2})
    with pytest.raises(DatasetError) as err:
        external.scan_external(str(root), RUN_CLASSES, None)
    message = str(err.value)
    assert "'No_findings'" in message and "--class-map 'No_findings=<NORMAL|PNEUMONIA|ignore>,Pneumonia=PNEUMONIA'," \
        in message
    assert "Folders found: No_findings, Pneumonia" in message and "'Pneumonia'" not in message


def test_class_map_entries_must_name_a_folder_and_a_class_of_the_run(tmp_path):
    root = write_folder(tmp_path / "site", {"No_findings": 2, "Pneumonia": 2})
    with pytest.raises(DatasetError, match="'COVID'.*not a class of this run"):
        external.scan_external(str(root), RUN_CLASSES, {"No_findings": "COVID"})
    with pytest.raises(DatasetError, match="'Healthy'.*no such class folder"):
        external.scan_external(str(root), RUN_CLASSES, {"Healthy": "NORMAL"})
    with pytest.raises(DatasetError, match="nothing is left"):
        external.scan_external(str(root), RUN_CLASSES, {"No_findings": "ignore", "Pneumonia": "ignore"})


def test_split_folders_all_or_one(tmp_path):
    root = tmp_path / "site"
    write_folder(root, {"NORMAL": 2, "PNEUMONIA": 3}, split="train")
    write_folder(root, {"NORMAL": 1, "PNEUMONIA": 2}, split="test")
    layout = external.describe_folder(str(root))
    assert layout.splits == ["train", "test"] and layout.folders() == ["NORMAL", "PNEUMONIA"]
    everything = external.scan_external(str(root), RUN_CLASSES, None)
    assert len(everything.records) == 8 and {r.split for r in everything.records} == {"train", "test"}
    test = external.scan_external(str(root), RUN_CLASSES, None, split="test")
    assert test.counts() == {"NORMAL": 1, "PNEUMONIA": 2} and {r.split for r in test.records} == {"test"}
    with pytest.raises(DatasetError, match="no 'val' split folder"):
        external.scan_external(str(root), RUN_CLASSES, None, split="val")
    # One class map serves the whole tree, also when a folder exists in another split only.
    write_folder(root, {"Viral": 2}, split="train")
    assert external.scan_external(str(root), RUN_CLASSES, {"viral": "PNEUMONIA"}, split="test").counts() == {
        "NORMAL": 1, "PNEUMONIA": 2}
    assert external.scan_external(str(root), RUN_CLASSES, {"viral": "PNEUMONIA"}).counts() == {
        "NORMAL": 3, "PNEUMONIA": 7}
    flat = write_folder(tmp_path / "flat", {"NORMAL": 1, "PNEUMONIA": 1})
    with pytest.raises(DatasetError, match="no split folders"):
        external.scan_external(str(flat), RUN_CLASSES, None, split="test")
    with pytest.raises(DatasetError, match="not found"):
        external.scan_external(str(tmp_path / "missing"), RUN_CLASSES, None)
    with pytest.raises(DatasetError, match="No folder given"):
        external.describe_folder("  ")


def test_one_class_folder_warns_that_auc_is_undefined(tmp_path):
    root = write_folder(tmp_path / "site", {"PNEUMONIA": 3})
    index = external.scan_external(str(root), RUN_CLASSES, None)
    [warning] = index.warnings()
    assert "AUC" in warning and "undefined" in warning and "sensitivity" in warning


def test_names_are_sanitised_and_never_paths(tmp_path):
    assert external.sanitize_name("my site/2024 (test)") == "my_site_2024_test"
    assert external.sanitize_name("..") == "external"
    assert external.default_name(str(tmp_path / "Other Site") + "/", "test") == "Other_Site-test"
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="not an evaluation name"):
            external.external_dir(tmp_path, bad)


def test_given_names_are_refused_rather_than_cut_or_changed():
    assert external.check_name(" site-B_2.0 ") == "site-B_2.0"
    assert external.check_name("x" * 64) == "x" * 64
    with pytest.raises(ValueError, match="300 characters long: at most 64"):
        external.check_name("x" * 300)
    for bad, suggestion in (("my site", "my_site"), ("../x", "x"), (".hidden", "hidden"), ("a/b\nc", "a_b_c")):
        with pytest.raises(ValueError, match=f"'{suggestion}', say") as err:
            external.check_name(bad)
        assert len(str(err.value).splitlines()) == 1
    with pytest.raises(ValueError, match="empty"):
        external.check_name("  ")


# ---------------------------------------------------------------- evaluating a run

def test_evaluate_saves_a_set_the_other_views_read(run_copy, tmp_path):
    root = write_folder(tmp_path / "Other site", {"No_findings": 4, "Pneumonia": 5})
    (root / "Pneumonia" / "broken.png").write_bytes(b"not an image")
    result = external.evaluate_external(run_copy, str(root), {"No_findings": "NORMAL"}, device="cpu")
    name = "Other_site"
    assert result["name"] == name and result["n"] == 9 and result["counts"] == {"NORMAL": 4, "PNEUMONIA": 5}
    assert [s["path"] for s in result["skipped"]] == [str((root / "Pneumonia" / "broken.png").resolve())]
    saved = run_copy / "external" / name
    assert sorted(p.name for p in saved.iterdir()) == ["predictions.csv", "summary.json"]  # no temp files left

    table = runs.read_predictions(run_copy, f"external:{name}")
    assert list(table.columns) == list(external.PREDICTION_COLUMNS)
    assert set(table["source_class"]) == {"No_findings", "Pneumonia"}
    assert set(zip(table["class_name"], table["label"])) == {("NORMAL", 0), ("PNEUMONIA", 1)}
    assert table["prob"].between(0, 1).all() and table["prob_uncalibrated"].between(0, 1).all()
    assert f"external:{name}" in runs.prediction_sets(run_copy)
    assert load_set(run_copy, f"external:{name}").class_names == RUN_CLASSES

    summary = json.loads((saved / "summary.json").read_text())
    operating = runs.operating_point(run_copy)
    assert summary["threshold"]["value"] == pytest.approx(operating.threshold)
    assert summary["class_map"] == {"No_findings": "NORMAL", "Pneumonia": "PNEUMONIA"}
    assert summary["root"] == str(root.resolve()) and summary["split"] == "all" and summary["created"]
    assert summary["overlap"]["checked"] and summary["overlap"]["shared_patients"]["images"] == 0
    # An unrelated folder gets only the threshold-transfer warning, which is always there.
    assert summary["warnings"] == [external.THRESHOLD_TRANSFER_WARNING]
    expected = metrics_at_threshold(table["label"], table["prob"], operating.threshold)
    assert summary["metrics"]["metrics"]["sensitivity"]["value"] == pytest.approx(expected["sensitivity"])
    text = external.format_external(result)
    assert "9 images (NORMAL 4, PNEUMONIA 5)" in text and "broken.png" in text and "WARNING: A threshold" in text

    # The same name again is refused before any work, and replaces the evaluation only when asked to.
    saved_bytes = (saved / "predictions.csv").read_bytes(), (saved / "summary.json").read_bytes()
    (root / "Pneumonia" / "broken.png").unlink()
    shutil.rmtree(root / "No_findings")
    for given in (name, None):
        with pytest.raises(ValueError, match="nothing was replaced") as err:
            external.evaluate_external(run_copy, str(root), None, name=given, device="cpu")
        assert "--replace" in str(err.value)
    assert ((saved / "predictions.csv").read_bytes(), (saved / "summary.json").read_bytes()) == saved_bytes
    again = external.evaluate_external(run_copy, str(root), None, name=name, device="cpu", replace=True)
    assert again["n"] == 5 and len(runs.read_predictions(run_copy, f"external:{name}")) == 5
    assert any("Only PNEUMONIA images" in w for w in again["warnings"])
    assert sorted(p.name for p in (run_copy / "external").iterdir()) == [name]  # nothing staged left behind
    runs.check_deletable(run_copy)  # what an evaluation leaves in a run is the tool's own: the run stays deletable


def test_evaluating_the_images_the_run_was_trained_on_warns_that_auc_means_nothing(run_copy):
    if not ORIGINALS.is_dir():
        pytest.skip(f"real X-rays not found at {ORIGINALS}")
    result = external.evaluate_external(run_copy, str(ORIGINALS), device="cpu")
    assert result["name"] == "kermany_original_train_subset" and result["n"] == 400
    split = pd.read_csv(run_copy / "split.csv")
    seen = split[split["split"].isin(["train", "val"])]
    overlap = result["overlap"]
    assert overlap["shared_patients"]["patients"] == seen["patient"].nunique()
    assert overlap["shared_patients"]["images"] == overlap["identical_files"]["images"] == len(seen)
    patients, identical = result["warnings"][0], result["warnings"][1]
    assert f"{len(seen)} of 400 images" in patients and "mean nothing as external validation" in patients
    assert "byte-identical" in identical
    # Views that show the set beside the run's own say so in one line, and never that it comes from elsewhere.
    overlap = external.overlap_with_run(run_copy, "external:kermany_original_train_subset")
    assert overlap == (f"not independent of the run: {len(seen)} of 400 images are of {seen['patient'].nunique()} "
                       f"patients in its training or validation data; {len(seen)} of 400 files are identical to its "
                       "training or validation images")
    origin = external.set_origin(run_copy, "external:kermany_original_train_subset")
    assert origin.startswith("This folder is not independent") and "elsewhere" not in origin


def test_where_a_set_comes_from_follows_the_run_and_the_evaluation(run_copy):
    # The session's run was trained on a folder without split folders: test is carved like validation.
    assert external.set_origin(run_copy, "test").startswith("Validation and test are both carved by patient")
    report = json.loads((run_copy / "data_report.json").read_text())
    report["official_counts"] = {"train": {"NORMAL": 5, "PNEUMONIA": 5}, "test": {"NORMAL": 2, "PNEUMONIA": 2}}
    (run_copy / "data_report.json").write_text(json.dumps(report))
    assert "the folder's own test split" in external.set_origin(run_copy, "test")
    (run_copy / "data_report.json").write_text("{damaged")
    assert external.set_origin(run_copy, "test").startswith("Validation and test are both carved")
    # An evaluation without overlap, one that cannot be read, and the run's own sets.
    assert external.overlap_with_run(run_copy, "external:nowhere") is None
    assert external.set_origin(run_copy, "external:nowhere").startswith("This folder comes from elsewhere")
    assert external.overlap_with_run(run_copy, "test") is None
    clean = {"n": 10, "overlap": {"checked": True, "shared_patients": {"patients": 0, "images": 0, "examples": []},
                                  "same_file_names": {"images": 3, "examples": ["a.png"]},
                                  "identical_files": {"images": 0, "examples": []}}}
    assert external.not_independent(clean) is None  # same names alone are weaker evidence: the page lists them
    assert external.not_independent({"n": 10, "overlap": {"checked": False, "reason": "no split.csv"}}) is None
    damaged = {"n": 10, "overlap": {"checked": True, "identical_files": {"images": 2}}}
    assert external.not_independent(damaged) == ("not independent of the run: 2 of 10 files are identical to its "
                                                 "training or validation images")
    assert external.overlap_warnings(damaged["overlap"], 10)[0].startswith("2 of 10 files are byte-identical")


def test_files_shared_with_an_older_run_are_found_by_hashing(run_copy, tmp_path):
    """Runs from before the sha256 column: the run's train/val files that still exist are hashed."""
    if not ORIGINALS.is_dir():
        pytest.skip(f"real X-rays not found at {ORIGINALS}")
    split = pd.read_csv(run_copy / "split.csv")
    split.drop(columns=["sha256"]).to_csv(run_copy / "split.csv", index=False)
    train = split[split["split"] == "train"]
    folder = tmp_path / "renamed"
    for cls in RUN_CLASSES:
        (folder / cls).mkdir(parents=True)
        for i, path in enumerate(train[train["class_name"] == cls]["path"][:2]):
            shutil.copy(path, folder / cls / f"copy-{i}.jpeg")  # no patient id left in the name
    result = external.evaluate_external(run_copy, str(folder), device="cpu")
    assert result["overlap"]["shared_patients"]["images"] == 0
    assert result["overlap"]["identical_files"]["images"] == 4
    assert any("4 of 4 files are byte-identical" in w for w in result["warnings"])


def test_overlap_compares_patient_ids_and_falls_back_to_file_names(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pd.DataFrame({"path": ["/a/0001.png", "/a/person3_virus_1.jpeg", "/a/IM-0009-0001.jpeg"],
                  "split": ["train", "val", "test"], "patient": ["0001", "person3", "IM-0009"],
                  "sha256": ["aa", "bb", "cc"]}).to_csv(run_dir / "split.csv", index=False)
    paths = ["/b/0001.png", "/b/person3_bacteria_7.png", "/b/IM-0009-0002.png", "/b/other.png"]
    overlap = external.training_overlap(run_dir, paths, ["0001", "person3", "IM-0009", "other"], ["", "", "", "aa"])
    assert overlap["shared_patients"] == {"patients": 1, "images": 1, "examples": ["person3"]}  # not test's IM-0009
    assert overlap["same_file_names"]["examples"] == ["0001.png"]
    assert overlap["identical_files"]["examples"] == [["other.png", "/a/0001.png"]]
    warnings = external.overlap_warnings(overlap, 4)
    assert len(warnings) == 3 and "mean nothing as external validation" in warnings[0]
    (run_dir / "split.csv").unlink()
    [missing] = external.overlap_warnings(external.training_overlap(run_dir, paths, paths, paths), 4)
    assert "Could not check" in missing and "split.csv" in missing


# ---------------------------------------------------------------- re-picking the threshold

def test_patient_split_keeps_patients_whole_and_both_classes_on_both_sides():
    patients = np.array([f"p{i // 3}" for i in range(60)])
    labels = np.array([int(i // 3 % 4 == 0) for i in range(60)])
    fit, read = external.patient_split(labels, patients, 0.5, seed=3)
    assert len(fit) + len(read) == 60 and not set(patients[fit]) & set(patients[read])
    assert set(labels[fit]) == set(labels[read]) == {0, 1}
    assert external.patient_split(labels, patients, 0.5, seed=3)[0].tolist() == fit.tolist()  # seeded
    assert len(external.patient_split(labels, patients, 0.25, seed=0)[0]) < len(fit)


@pytest.mark.parametrize("rule, value, check", [
    ("recall", 0.9, lambda m: m["sensitivity"] >= 0.9),
    ("specificity", 0.8, lambda m: m["specificity"] >= 0.8),
])
def test_refit_threshold_fits_on_some_patients_and_reads_the_others(run_copy, tmp_path, rule, value, check):
    root = write_folder(tmp_path / "site", {"NORMAL": 24, "PNEUMONIA": 24}, images_per_patient=2)
    name = external.evaluate_external(run_copy, str(root), device="cpu")["name"]
    refit = external.refit_threshold(run_copy, name, rule, value, fraction=0.5, seed=0)

    pset = load_set(run_copy, f"external:{name}")
    fit, read = external.patient_split(pset.labels, pset.patients, 0.5, seed=0)
    assert not set(pset.patients[fit]) & set(pset.patients[read])
    assert (refit["fit"]["n"], refit["read"]["n"]) == (len(fit), len(read)) and len(fit) + len(read) == 48
    fitted = metrics_at_threshold(pset.labels[fit], pset.probs[fit], refit["threshold"])
    assert check(fitted) and check(refit["fit"]["metrics"])
    assert refit["at_refit"]["threshold"] == pytest.approx(refit["threshold"])
    assert refit["at_operating"]["threshold"] == pytest.approx(runs.operating_threshold(run_copy))
    assert refit["at_refit"]["n"] == len(read)
    read_metrics = metrics_at_threshold(pset.labels[read], pset.probs[read], refit["threshold"])
    assert refit["at_refit"]["metrics"]["specificity"]["value"] == pytest.approx(read_metrics["specificity"])
    assert external.read_external(run_copy, name)["refit"]["threshold"] == pytest.approx(refit["threshold"])
    saved = external.read_external(run_copy, name)
    assert "re-picked" in external.format_external(saved) and "WARNING: A threshold" in external.format_external(saved)
    assert "re-picked" not in external.format_external(saved, include_refit=False)
    assert external.format_refit(saved["refit"]).startswith("Threshold re-picked on 24 images")


def test_refit_refuses_bad_input(run_copy, tmp_path):
    one_class = external.evaluate_external(run_copy, str(write_folder(tmp_path / "one", {"PNEUMONIA": 4})),
                                           device="cpu")["name"]
    with pytest.raises(ValueError, match="one class only"):
        external.refit_threshold(run_copy, one_class, "youden")
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        external.refit_threshold(run_copy, one_class, "youden", fraction=1.0)
    with pytest.raises(ValueError, match="between 0 and 1, not 1.5"):
        external.refit_threshold(run_copy, one_class, "recall", 1.5)
    with pytest.raises(FileNotFoundError, match="No external evaluation 'nothing'"):
        external.refit_threshold(run_copy, "nothing", "youden")


# ---------------------------------------------------------------- the list of evaluations

def test_list_external_survives_a_damaged_summary_and_delete_removes_one(run_copy, tmp_path):
    root = write_folder(tmp_path / "site", {"NORMAL": 2, "PNEUMONIA": 2})
    external.evaluate_external(run_copy, str(root), name="good", device="cpu")
    external.evaluate_external(run_copy, str(root), name="bad", device="cpu")
    (run_copy / "external" / "bad" / "summary.json").write_text("{ half-written")
    entries = {e["name"]: e for e in external.list_external(run_copy)}
    assert entries["good"]["n"] == 4 and not entries["good"]["damaged"] and entries["good"]["warnings"]
    assert entries["bad"]["damaged"] and "summary.json is damaged" in entries["bad"]["error"]
    assert [e["name"] for e in external.list_external(run_copy)][-1] == "bad"  # damaged ones last
    with pytest.raises(ValueError, match="damaged"):
        external.refit_threshold(run_copy, "bad", "youden")

    external.delete_external(run_copy, "bad")
    assert [e["name"] for e in external.list_external(run_copy)] == ["good"]
    assert "external:bad" not in runs.prediction_sets(run_copy)
    with pytest.raises(FileNotFoundError):
        external.delete_external(run_copy, "bad")
    with pytest.raises(ValueError):
        external.delete_external(run_copy, "../good")
    assert (run_copy / "external" / "good").is_dir()


def test_run_classes_fall_back_to_the_data_report(run_copy):
    assert external.run_classes(run_copy) == RUN_CLASSES
    (run_copy / "best.safetensors").unlink()
    assert external.run_classes(run_copy) == RUN_CLASSES
    (run_copy / "data_report.json").unlink()
    with pytest.raises(ValueError, match="names no two classes"):
        external.run_classes(run_copy)


# ---------------------------------------------------------------- nothing lost, nothing overwritten

def saved_files(run_dir: Path, name: str) -> tuple[bytes, bytes]:
    folder = run_dir / "external" / name
    return (folder / "predictions.csv").read_bytes(), (folder / "summary.json").read_bytes()


def test_default_names_never_replace_an_evaluation_of_another_folder(run_copy, tmp_path):
    first = write_folder(tmp_path / "hospA" / "images", {"NORMAL": 2, "PNEUMONIA": 2})
    second = write_folder(tmp_path / "hospB" / "images", {"NORMAL": 3, "PNEUMONIA": 3})
    a = external.evaluate_external(run_copy, str(first), device="cpu")
    kept = saved_files(run_copy, "images")
    b = external.evaluate_external(run_copy, str(second), device="cpu")
    assert (a["name"], a["name_note"], b["name"]) == ("images", None, "images-2")
    assert "Saved as 'images-2'" in b["name_note"] and str(first) in b["name_note"]
    assert "Saved as 'images-2'" in external.format_external(b)
    assert saved_files(run_copy, "images") == kept
    assert external.suggest_name(run_copy, str(second), "all", str(second)) == "images-2"

    # The same folder again: its default name is taken by itself, so it is refused like a given name.
    with pytest.raises(ValueError, match="already evaluated as 'images-2'.*--replace"):
        external.evaluate_external(run_copy, str(second), device="cpu")
    again = external.evaluate_external(run_copy, str(second), device="cpu", replace=True)
    assert again["name"] == "images-2" and saved_files(run_copy, "images") == kept

    # Names over the limit are refused, never cut; long folder names get distinct default names.
    with pytest.raises(ValueError, match="at most 64"):
        external.evaluate_external(run_copy, str(first), name="a" * 299 + "1", device="cpu")
    long_a = write_folder(tmp_path / ("x" * 200 + "a"), {"NORMAL": 1, "PNEUMONIA": 1})
    long_b = write_folder(tmp_path / ("x" * 200 + "b"), {"NORMAL": 1, "PNEUMONIA": 1})
    names = [external.evaluate_external(run_copy, str(d), device="cpu")["name"] for d in (long_a, long_b)]
    assert names[0] != names[1] and all(len(n) <= external.MAX_NAME_LENGTH for n in names)
    assert len(external.list_external(run_copy)) == 4


def test_concurrent_evaluations_of_one_name_save_one_and_refuse_the_other(run_copy, tmp_path, monkeypatch):
    import threading

    folders = [write_folder(tmp_path / f"site{k}", {"NORMAL": 2, "PNEUMONIA": 2}) for k in (1, 2)]
    # Both pass the early name check before either saves: the lock must settle it.
    both_checked = threading.Barrier(2, timeout=60)
    checks: dict[int, int] = {}
    choose_name = external.choose_name

    def racing_choose_name(*args, **kwargs):
        me = threading.get_ident()
        checks[me] = checks.get(me, 0) + 1
        result = choose_name(*args, **kwargs)
        if checks[me] == 1:
            both_checked.wait()
        return result

    monkeypatch.setattr(external, "choose_name", racing_choose_name)
    outcomes: list = []

    def evaluate(folder: Path) -> None:
        try:
            outcomes.append(external.evaluate_external(run_copy, str(folder), name="shared", device="cpu")["n"])
        except ValueError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=evaluate, args=(f,)) for f in folders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    saved = [o for o in outcomes if isinstance(o, int)]
    refused = [o for o in outcomes if isinstance(o, str)]
    assert len(saved) == 1 and len(refused) == 1, outcomes
    assert "nothing was replaced" in refused[0]
    assert [e["name"] for e in external.list_external(run_copy)] == ["shared"]


def test_a_refit_that_cannot_be_done_saves_nothing_and_loads_no_model(run_copy, tmp_path, monkeypatch):
    root = write_folder(tmp_path / "site", {"NORMAL": 3, "PNEUMONIA": 3})
    external.evaluate_external(run_copy, str(root), device="cpu")
    kept = saved_files(run_copy, "site")
    tiny = write_folder(tmp_path / "tiny", {"NORMAL": 1, "PNEUMONIA": 1})

    import core.predict

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(core.predict, "load_run_model", no_model)
    bad = [(root, external.RefitRequest("recall", 1.5), "between 0 and 1, not 1.5"),
           (root, external.RefitRequest("recall", float("nan")), "not a finite number"),
           (root, external.RefitRequest("youden", 0.3), "takes no value"),
           (root, external.RefitRequest("cost", -2.0), "positive number"),
           (root, external.RefitRequest("sharpness"), "Unknown threshold rule"),
           (root, external.RefitRequest("recall", 0.9, fraction=2), "strictly between 0 and 1"),
           (tiny, external.RefitRequest("youden"), "too few to split.*Nothing was saved")]
    for folder, request, message in bad:
        with pytest.raises(ValueError, match=message):
            external.evaluate_external(run_copy, str(folder), name="site", device="cpu", replace=True, refit=request)
        assert saved_files(run_copy, "site") == kept
    assert [e["name"] for e in external.list_external(run_copy)] == ["site"]


def test_evaluation_and_refit_are_saved_together(run_copy, tmp_path):
    root = write_folder(tmp_path / "site", {"NORMAL": 12, "PNEUMONIA": 12}, images_per_patient=2)
    result = external.evaluate_external(run_copy, str(root), device="cpu",
                                        refit=external.RefitRequest("specificity", 0.8, fraction=0.5))
    saved = external.read_external(run_copy, "site")
    assert saved["refit"]["threshold"] == pytest.approx(result["refit"]["threshold"])
    assert saved["refit"]["fit"]["n"] + saved["refit"]["read"]["n"] == saved["n"] == 24
    # The same re-pick on the saved set gives the same threshold: the one write used the saved probabilities.
    again = external.refit_threshold(run_copy, "site", "specificity", 0.8, fraction=0.5)
    assert again["threshold"] == pytest.approx(result["refit"]["threshold"])


def test_cut_short_or_edited_predictions_are_refused(run_copy, tmp_path):
    from core.operating import run_summary

    root = write_folder(tmp_path / "site", {"NORMAL": 4, "PNEUMONIA": 4})
    external.evaluate_external(run_copy, str(root), device="cpu")
    path = run_copy / "external" / "site" / "predictions.csv"
    whole = path.read_text()
    lines = whole.splitlines(keepends=True)
    path.write_text("".join(lines[:5]))  # the header and half the rows
    with pytest.raises(ValueError, match="has 4 rows but summary.json counts 8 images: the file is truncated"):
        load_set(run_copy, "external:site")
    assert "truncated" in run_summary(run_copy, ["external:site"])["errors"]["external:site"]
    for bad_prob in ("1.5", "-0.1", "nan", "inf"):
        table = pd.read_csv(io_text(whole), dtype=str, keep_default_na=False)
        table.loc[0, "prob"] = bad_prob
        table.to_csv(path, index=False)
        with pytest.raises(ValueError, match="probabilities between 0 and 1"):
            load_set(run_copy, "external:site")
    path.write_text(whole)
    assert len(load_set(run_copy, "external:site").labels) == 8


def io_text(text: str):
    import io

    return io.StringIO(text)


def assert_sane(value, where: str = "summary") -> None:
    """Every number finite and within what a view can show; every key a string."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str)
            assert_sane(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            assert_sane(v, f"{where}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        assert np.isfinite(value) and abs(value) <= external.MAX_TARGET * 1e3, where
    else:
        assert value is None or isinstance(value, (str, bool)), where


@pytest.fixture
def refitted(run_copy, tmp_path) -> tuple[Path, dict]:
    root = write_folder(tmp_path / "site", {"NORMAL": 8, "PNEUMONIA": 8}, images_per_patient=2)
    external.evaluate_external(run_copy, str(root), device="cpu", refit=external.RefitRequest("youden"))
    path = run_copy / "external" / "site" / "summary.json"
    return path, json.loads(path.read_text())


def test_damaged_summary_fields_are_dropped_named_and_never_shown(refitted):
    path, raw = refitted
    damaged = dict(raw, n="__HUGE__", n_patients=1e30, counts={"NORMAL": "8", "PNEUMONIA": 8}, refit={},
                   warnings=[1, "kept", None], skipped="not a list", threshold={"value": "__INF__"},
                   metrics={**raw["metrics"], "threshold": "__NAN__"}, image_size=True, split="elsewhere",
                   created=["2024"])
    text = json.dumps(damaged).replace('"__HUGE__"', "1" + "0" * 400).replace('"__INF__"', "1e400") \
        .replace('"__NAN__"', "NaN")
    path.write_text(text)
    summary = external.read_external(path.parents[2], "site")
    assert_sane(summary)
    for key in ("n", "n_patients", "counts", "refit", "threshold", "metrics", "image_size", "split", "created"):
        assert key not in summary, key
    assert summary["skipped"] == [] and summary["warnings"][0] == "kept"
    [note] = [w for w in summary["warnings"] if "damaged fields" in w]
    for key in ("n,", "n_patients", "counts", "refit", "warnings", "skipped", "threshold", "metrics"):
        assert key in note, key
    [entry] = external.list_external(path.parents[2])
    assert not entry["damaged"] and entry["n"] is None and entry["refit"] is None
    assert "External evaluation 'site'" in external.format_external(summary)
    assert len(load_set(path.parents[2], "external:site").labels) == 16  # no count to check against: read


@pytest.mark.parametrize("mutate", [
    lambda r: r.update(threshold="0.5"), lambda r: r.update(threshold=1.5), lambda r: r.update(fraction=1.0),
    lambda r: r["fit"].update(n=-1), lambda r: r["fit"].update(n=2.5), lambda r: r.pop("at_refit"),
    lambda r: r["at_refit"]["metrics"]["auc"].update(value=2.0), lambda r: r["read"].update(n_patients=None),
    lambda r: r["at_operating"]["counts"].update(tp="3"), lambda r: r.update(rule="sharpness"),
    lambda r: r.update(value=float("inf")), lambda r: r.update(rule_described=["x"]),
])
def test_a_damaged_refit_is_dropped_whole(refitted, mutate):
    path, raw = refitted
    mutate(raw["refit"])
    path.write_text(json.dumps(raw))
    summary = external.read_external(path.parents[2], "site")
    assert "refit" not in summary and any("damaged fields (refit)" in w for w in summary["warnings"])
    assert "re-picked" not in external.format_external(summary)


def test_absurd_summaries_are_damaged_files_not_crashes(refitted):
    path, _ = refitted
    for text in ("[" * 100_000 + "]" * 100_000, '{"n": ' + "9" * 5000 + "}", "\xff\xfe", "null", '"text"'):
        path.write_bytes(text.encode("latin-1"))
        with pytest.raises(ValueError, match="is damaged"):
            external.read_external(path.parents[2], "site")
        [entry] = external.list_external(path.parents[2])
        assert entry["damaged"] and len(entry["error"].splitlines()) == 1


def test_refit_rewrites_only_its_own_field(refitted):
    path, raw = refitted
    raw["n_found"] = "not a count"
    path.write_text(json.dumps(raw))
    external.refit_threshold(path.parents[2], "site", "best_f1")
    written = json.loads(path.read_text())
    assert written["n_found"] == "not a count" and written["refit"]["rule"] == "best_f1"
    assert not any("damaged fields" in w for w in written["warnings"])  # the reader's note is not saved


# ---------------------------------------------------------------- out of distribution

def test_each_image_carries_the_models_verdict_and_the_folder_its_shift_test(run_copy, tmp_path):
    from PIL import Image

    root = tmp_path / "mixed"
    originals = SHARED_DATA / "kermany_original_train_subset"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for src in sorted((originals / cls).glob("*.jpeg"))[:6]:
            shutil.copy(src, root / cls / f"site-{src.name}")
    rng = np.random.default_rng(0)
    for i in range(6):  # colour photos filed as NORMAL: not chest X-rays at all
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), "RGB").save(root / "NORMAL" / f"p{i}.png")
    result = external.evaluate_external(run_copy, str(root), device="cpu")
    table = runs.read_predictions(run_copy, "external:mixed")
    photos = table["path"].str.contains("/p[0-9].png$")
    assert table.loc[photos, "ood_flag"].all()
    assert table.loc[photos, "ood_reason"].str.startswith("Not a chest X-ray: the image is in colour").all()
    assert table["ood_score"].notna().all()
    shift = external.read_external(run_copy, "mixed")["ood"]
    assert shift["n"] == 18 and shift["gated"] == 6 and shift["flagged"] >= 6
    assert shift["test"]["p_value"] <= 1 and shift["verdict"] == result["ood"]["verdict"]
    printed = external.format_external(result)
    assert "distributed differently" in printed or "Out-of-distribution check" in printed

    summary_path = run_copy / "external" / "mixed" / "summary.json"
    raw = json.loads(summary_path.read_text())
    raw["ood"]["flagged"] = 1e30
    summary_path.write_text(json.dumps(raw))
    damaged = external.read_external(run_copy, "mixed")
    assert "ood" not in damaged and any("damaged fields (ood)" in w for w in damaged["warnings"])


def test_a_set_ranked_no_better_than_chance_gets_no_re_picked_threshold(run_copy, tmp_path):
    # The same NORMAL films filed half as NORMAL and half as PNEUMONIA: no model can rank them.
    root = tmp_path / "coin"
    files = sorted((SHARED_DATA / "kermany_224" / "test" / "NORMAL").glob("*.jpeg"))[:60]
    for i, src in enumerate(files):
        folder = root / ("NORMAL" if i % 2 else "PNEUMONIA")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / f"c{i:03d}.jpeg")
    result = external.evaluate_external(run_copy, str(root), device="cpu",
                                        refit=external.RefitRequest("recall", 0.95))
    auc = result["metrics"]["metrics"]["auc"]
    assert auc["low"] <= 0.5 <= auc["high"]
    assert "refit" not in result and "better than chance" in result["refit_refused"]
    assert external.format_external(result).startswith("WARNING: The model does not rank")
    with pytest.raises(ValueError, match="better than chance"):
        external.refit_threshold(run_copy, "coin", "youden")
    assert "refit" not in external.read_external(run_copy, "coin")
