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
    assert "'No_findings'" in message and "--class-map No_findings=<NORMAL|PNEUMONIA|ignore>,Pneumonia=PNEUMONIA " \
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

    # The same name again replaces the evaluation.
    (root / "Pneumonia" / "broken.png").unlink()
    shutil.rmtree(root / "No_findings")
    again = external.evaluate_external(run_copy, str(root), None, name=name, device="cpu")
    assert again["n"] == 5 and len(runs.read_predictions(run_copy, f"external:{name}")) == 5
    assert any("Only PNEUMONIA images" in w for w in again["warnings"])


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
    assert external.format_external(saved, refit_only=True).startswith("Threshold re-picked on 24 images")


def test_refit_refuses_bad_input(run_copy, tmp_path):
    one_class = external.evaluate_external(run_copy, str(write_folder(tmp_path / "one", {"PNEUMONIA": 4})),
                                           device="cpu")["name"]
    with pytest.raises(ValueError, match="one class only"):
        external.refit_threshold(run_copy, one_class, "youden")
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        external.refit_threshold(run_copy, one_class, "youden", fraction=1.0)
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
