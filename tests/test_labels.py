"""Label files over a folder of images: the public datasets' own files and any CSV, with every row or image left
out listed with its reason."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import make_xray
from dicom_files import write_dicom

from core.dataset import DatasetError, patient_id
from core.labels import LabelSpec, load_index, scan_labeled, spec_from


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _rsna(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "stage_2_train_images"
    rows = []
    for i in range(8):
        pid = f"0004cfab-14fd-4e49-80ba-63a80b6bddd{i}"
        write_dicom(images / f"{pid}.dcm", np.asarray(make_xray(32, i % 2, seed=i)), patient=pid,
                    sex="MF"[i % 2], age=f"{20 + i:03d}Y", view="AP" if i < 4 else "PA")
        rows += [[pid, 10, 20, 30, 40, 1], [pid, 50, 60, 30, 40, 1]] if i % 2 else [[pid, "", "", "", "", 0]]
    rows.append(["missing-patient", "", "", "", "", 0])  # its image is not there
    rows.append(["0004cfab-14fd-4e49-80ba-63a80b6bddd0", 1, 2, 3, 4, 1])  # contradicts its Target 0 row
    write_dicom(images / "no-row.dcm", np.asarray(make_xray(32)), patient="x")
    labels = _write_csv(tmp_path / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"],
                        rows)
    return images, labels


def test_rsna_rows_are_one_image_per_patient_and_every_left_out_row_says_why(tmp_path):
    images, labels = _rsna(tmp_path)
    index = scan_labeled(images, LabelSpec(str(labels), "rsna"))
    assert len(index.records) == 7  # 8 images, one with contradictory rows
    assert sum(r.label for r in index.records) == 4
    assert index.classes == ["NORMAL", "PNEUMONIA"] and index.patients_from.startswith("column 'patientId'")
    reasons = "\n".join(f"{k}: {v}" for k, v in index.unusable.items())
    assert "missing-patient" in reasons and "image not found" in reasons
    assert "contradictory rows" in index.unusable[str(images / "0004cfab-14fd-4e49-80ba-63a80b6bddd0.dcm")]
    assert "without a row" in index.unusable[str(images / "no-row.dcm")]
    assert {r.patient for r in index.records} == {Path(r.path).stem for r in index.records}


def _nih(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    findings = ["No Finding", "Pneumonia", "Infiltration|Pneumonia", "Effusion", "No Finding", "Pneumonia",
                "No Finding", "Atelectasis|Effusion"]
    rows = []
    for i, f in enumerate(findings):
        name = f"{i // 2 + 1:08d}_{i % 2:03d}.png"
        make_xray(32, int("Pneumonia" in f), seed=i).save(images / name)
        rows.append([name, f, i % 2, i // 2 + 1, 30 + 10 * i, "MF"[i % 2], "PA" if i % 3 else "AP", 2500, 2048, 0.14,
                     0.14])
    labels = _write_csv(tmp_path / "Data_Entry_2017.csv",
                        ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                         "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                         "OriginalImagePixelSpacing[x", "y]"], rows)
    return images, labels


def test_nih_pneumonia_against_no_finding_other_findings_left_out_or_negative_on_request(tmp_path):
    images, labels = _nih(tmp_path)
    index = scan_labeled(images, LabelSpec(str(labels), "nih"))
    assert len(index.records) == 6 and sum(r.label for r in index.records) == 3
    assert "other findings without pneumonia (Effusion)" in index.unusable[str(images / "00000002_001.png")]
    assert "left out" in LabelSpec(str(labels), "nih").describe()
    record = next(r for r in index.records if r.path.endswith("00000001_001.png"))
    assert record.patient == "1" and record.metadata == {"age": "40", "sex": "F", "view": "PA"}
    counted = scan_labeled(images, LabelSpec(str(labels), "nih", other_findings="negative"))
    assert len(counted.records) == 8 and sum(r.label for r in counted.records) == 3
    assert "counted as negative" in LabelSpec(str(labels), "nih", other_findings="negative").describe()


def test_nih_patient_ids_come_from_file_names_without_the_file():
    assert patient_id("00000013_005.png") == "00000013"
    assert patient_id("00030805_000.png") == "00030805"


def _chexpert(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "chexpert"
    rows = []
    values = ["1.0", "0.0", "-1.0", "", "1.0", "0.0", "0.0", "-1.0"]
    for i, v in enumerate(values):
        rel = f"CheXpert-v1.0-small/train/patient{i // 2:05d}/study{i % 2 + 1}/view1_frontal.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        make_xray(32, v == "1.0", seed=i).convert("RGB").save(root / rel)
        rows.append([rel, "Female" if i % 2 else "Male", 50 + i, "Frontal", "AP" if i % 2 else "PA", v])
    labels = _write_csv(tmp_path / "train.csv", ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "Pneumonia"], rows)
    return root / "CheXpert-v1.0-small", labels


@pytest.mark.parametrize("policy, n, positives", [("ignore", 5, 2), ("positive", 7, 4), ("negative", 7, 2)])
def test_chexpert_uncertain_by_the_stated_policy_blank_left_out(tmp_path, policy, n, positives):
    root, labels = _chexpert(tmp_path)
    index = scan_labeled(root, LabelSpec(str(labels), "chexpert", uncertain=policy))
    assert len(index.records) == n and sum(r.label for r in index.records) == positives
    blank = str(root / "train/patient00001/study2/view1_frontal.jpg")
    assert "blank" in index.unusable[blank]
    if policy == "ignore":
        assert "uncertain" in index.unusable[str(root / "train/patient00001/study1/view1_frontal.jpg")]
    record = next(r for r in index.records if "patient00000/study1" in r.path)
    assert record.metadata == {"sex": "M", "age": "50", "view": "PA"}
    assert record.patient == "patient00000" and index.patients_from.startswith("the patientNNNNN folders")


def test_a_generic_csv_with_named_columns_values_and_splits(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    rows = []
    for i in range(10):
        make_xray(32, i % 2, seed=i).save(root / "a" / f"scan{i}.png")
        rows.append([f"a/scan{i}.png", "Pneumonia" if i % 2 else "Healthy", f"pt{i // 2}",
                     "test" if i >= 8 else "train", "site-1"])
    rows.append(["a/scan0.png", "Healthy", "pt0", "train", "site-1"])  # an identical duplicate is one image
    rows.append(["../outside.png", "Healthy", "ptx", "train", "x"])
    rows.append(["a/scan9.png", "Maybe", "pt4", "test", "x"])  # contradicts? no: unknown value, row left out
    labels = _write_csv(tmp_path / "labels.csv", ["file_name", "diagnosis", "subject", "fold", "Hospital"], rows)
    with pytest.raises(DatasetError, match="No label column found.*--label-col"):
        scan_labeled(root, LabelSpec(str(labels)))
    spec = LabelSpec(str(labels), label_col="diagnosis", positive_value="Pneumonia", negative_value="healthy")
    index = scan_labeled(root, spec)
    assert len(index.records) == 10 and index.has_official_splits
    assert sorted({r.official_split for r in index.records}) == ["test", "train"]
    assert {r.patient for r in index.records} == {f"pt{i}" for i in range(5)}
    assert index.records[0].metadata == {"site": "site-1"}
    assert any("outside the image folder" in v for v in index.unusable.values())
    assert any(k.endswith(f"row 14: {root}/a/scan9.png") and "unknown label value 'Maybe'" in v
               and "other row is used" in v for k, v in index.unusable.items())
    with pytest.raises(DatasetError, match="no NORMAL.*unknown label value 'Healthy'"):
        scan_labeled(root, LabelSpec(str(labels), label_col="diagnosis", positive_value="Pneumonia"))


@pytest.mark.parametrize("content, words", [
    (b"", "no rows"), (b"\x00\x01\x02binary", "not a text"), (b"path,label\n", "no rows"),
    (b"x,y\n1,2\n", "No image path column"),
])
def test_unusable_label_files_are_refused_with_the_reason(tmp_path, content, words):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "l.csv").write_bytes(content)
    with pytest.raises(DatasetError, match=words):
        scan_labeled(tmp_path / "imgs", LabelSpec(str(tmp_path / "l.csv")))


def test_options_are_checked_and_without_a_label_file_the_folders_are_read(tiny_dataset):
    class Options:
        labels, labels_format = "x.csv", "kaggle"

    with pytest.raises(ValueError, match="--labels-format must be one of csv, rsna, nih, chexpert"):
        spec_from(Options())
    assert spec_from(object()) is None
    assert load_index(tiny_dataset, None).classes == ["NORMAL", "PNEUMONIA"]


# ---------------------------------------------------------------- end to end on real X-rays

def _real_dicom_dataset(shared_data: Path, root: Path, per_class: int = 24) -> tuple[Path, Path, Path]:
    """Real X-rays written three ways: PNG class folders, a flat DICOM folder in the variants hospitals export
    (MONOCHROME1 and 2, 8 to 16 bits, some files without extension) with an RSNA label file, and a flat PNG folder
    with an NIH Data_Entry file. Returns (png class folders, dicom folder, rsna label file)."""
    from PIL import Image

    variants = [dict(), dict(monochrome1=True), dict(bits=12, window=True), dict(bits=16, rescale=True),
                dict(compression="rle")]
    rows, nih_rows, i = [], [], 0
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for f in sorted((shared_data / "kermany_224" / "train" / cls).glob("*.jpeg"))[:per_class]:
            pixels = np.asarray(Image.open(f).convert("L"))
            pid = f"case{i:04d}"
            write_dicom(root / "dicom" / (pid if i % 3 == 0 else pid + ".dcm"), pixels, patient=pid,
                        sex="MF"[i % 2], view="AP" if i % 4 < 2 else "PA", age=f"{(7 * i) % 90:03d}Y",
                        **variants[i % len(variants)])
            (root / "png" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / "png" / cls / f"{pid}.png")
            (root / "nih").mkdir(exist_ok=True)
            Image.fromarray(pixels).save(root / "nih" / f"{i // 2 + 1:08d}_{i % 2:03d}.png")
            rows += [[pid, "", "", "", "", label]] + ([[pid, 5, 5, 9, 9, 1]] if label else [])
            nih_rows.append([f"{i // 2 + 1:08d}_{i % 2:03d}.png", "Pneumonia" if label else "No Finding", i % 2,
                             i // 2 + 1, 30 + i, "MF"[i % 2], "AP" if i % 4 < 2 else "PA"])
            i += 1
    _write_csv(root / "Data_Entry_2017.csv", ["Image Index", "Finding Labels", "Follow-up #", "Patient ID",
                                              "Patient Age", "Patient Gender", "View Position"], nih_rows)
    labels = _write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    return root / "png", root / "dicom", labels


def test_rsna_dicom_and_nih_files_train_evaluate_and_match_the_png_class_folders(shared_data, tmp_path, capsys):
    import pandas as pd

    from core.cli import main

    png, dicom, labels = _real_dicom_dataset(shared_data, tmp_path)
    rsna = ["--labels", str(labels), "--labels-format", "rsna"]
    assert main(["data", str(dicom), *rsna]) == 0
    out = capsys.readouterr().out
    assert "48 images" in out and "ids from column 'patientId'" in out and "Skipped (unreadable or unusable): 0" in out
    assert "sex: " in out and "view position: AP 24, PA 24" in out

    runs_dir = tmp_path / "runs"
    assert main(["train", "--preset", "tiny", "--data", str(dicom), *rsna, "--runs-dir", str(runs_dir), "--quiet",
                 "--device", "cpu"]) == 0
    run = next(p for p in runs_dir.iterdir() if p.is_dir())
    split = pd.read_csv(run / "split.csv")
    assert set(split["patient"]) == {Path(p).name.split(".")[0] for p in split["path"]}
    test = pd.read_csv(run / "predictions_test.csv")
    assert {"sex", "view", "age"} <= set(test.columns)
    capsys.readouterr()

    assert main(["evaluate", str(run), "--data", str(dicom), *rsna, "--name", "dicom"]) == 0
    out = capsys.readouterr().out
    assert "48 images (NORMAL 24, PNEUMONIA 24), 48 patients" in out and "Labels: label file" in out
    assert main(["evaluate", str(run), "--data", str(png), "--name", "png"]) == 0
    as_dicom = pd.read_csv(run / "external" / "dicom" / "predictions.csv")
    as_png = pd.read_csv(run / "external" / "png" / "predictions.csv")
    as_dicom["case"] = as_dicom["path"].map(lambda p: Path(p).name.split(".")[0])
    as_png["case"] = as_png["path"].map(lambda p: Path(p).stem)
    both = as_dicom.merge(as_png, on="case")
    assert len(both) == 48 and (both["label_x"] == both["label_y"]).all()
    eight_bit = both["case"].str[4:].astype(int) % 5 != 2  # a window or a rescale stretches the deeper variants
    eight_bit &= both["case"].str[4:].astype(int) % 5 != 3
    assert np.array_equal(both.loc[eight_bit, "prob_x"], both.loc[eight_bit, "prob_y"])

    nih = ["--labels", str(tmp_path / "Data_Entry_2017.csv"), "--labels-format", "nih"]
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(tmp_path / "nih"), *nih, "--name", "nih"]) == 0
    out = capsys.readouterr().out
    assert "48 images (NORMAL 24, PNEUMONIA 24), 24 patients" in out
    # Subgroups from the file's metadata, each with its interval (resampled by the file's patients).
    assert re.search(r"sex = F: 24 images \(12 positive\)  sensitivity \d\.\d+ \[", out), out
    assert "view position = AP: 24 images" in out and "age band = 18-39" in out
    saved = pd.read_csv(run / "external" / "nih" / "predictions.csv")
    assert set(saved["view"]) == {"AP", "PA"} and set(saved["sex"]) == {"M", "F"}


def test_dicom_class_folders_take_patients_from_the_patientid_tag(shared_data, tmp_path):
    from core.config import config_from_preset
    from core.trainer import prepare_data

    for i in range(64):
        cls = ("NORMAL", "PNEUMONIA")[i % 2]
        write_dicom(tmp_path / "d" / cls / f"img{i}.dcm", np.asarray(make_xray(48, i % 2, seed=i)),
                    patient=f"PAT-{i // 4}", sex="MF"[i % 2], view="PA")
    data = prepare_data(config_from_preset("tiny", data=str(tmp_path / "d")))
    assert set(data.split_table["patient"]) == {f"PAT-{k}" for k in range(16)}
    assert data.report["patients_from"] == "the DICOM PatientID tag"
    assert set(data.split_table["sex"]) == {"M", "F"}
    shared = data.report["leakage"]["shared_patients"]
    assert all(v["count"] == 0 for v in shared.values())  # the split groups by the tag's patients
