from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import compressed_bomb_png, write_bad_entries
from conftest import make_xray, write_dataset
from PIL import Image

from core.cache import decode_images
from core.dataset import (
    DatasetError,
    ImageTooLargeError,
    assign_splits,
    image_summary,
    leakage_report,
    load_grayscale,
    load_thumbnail,
    patient_id,
    scan_dataset,
    to_grayscale_uint8,
)


@pytest.mark.parametrize("name, expected", [
    ("person1_bacteria_1.jpeg", "person1"),
    ("person1000_virus_1681.jpeg", "person1000"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-0095-0001.jpeg", "NORMAL2-IM-0095"),
    ("scan_42.png", "scan_42"),
])
def test_patient_id_from_kermany_names(name, expected):
    assert patient_id(name) == expected


def test_scan_split_layout_classes_and_positive(tiny_dataset):
    index = scan_dataset(tiny_dataset)
    assert index.has_official_splits
    assert index.classes == ["NORMAL", "PNEUMONIA"] and index.positive_class == "PNEUMONIA"
    assert index.counts() == {"train": {"NORMAL": 24, "PNEUMONIA": 40}, "test": {"NORMAL": 24, "PNEUMONIA": 40}}
    assert all(r.label == (r.class_name == "PNEUMONIA") for r in index.records)


def test_scan_tree_without_splits_and_configurable_positive(tmp_path):
    root = write_dataset(tmp_path / "d", {"NORMAL": 4, "PNEUMONIA": 4}, splits=None)
    index = scan_dataset(root, positive_class="NORMAL")
    assert not index.has_official_splits
    assert index.classes == ["PNEUMONIA", "NORMAL"]
    assert {r.label for r in index.records if r.class_name == "NORMAL"} == {1}


def test_scan_descends_into_kaggle_wrapper_folders(tmp_path):
    write_dataset(tmp_path / "download" / "chest_xray", {"NORMAL": 2, "PNEUMONIA": 2})
    (tmp_path / "download" / "__MACOSX").mkdir()
    assert scan_dataset(tmp_path / "download").root.endswith("chest_xray")


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "not found"),
    (lambda p: p.mkdir(), "No class folders"),
    (lambda p: (p / "NORMAL").mkdir(parents=True) or make_xray().save(p / "NORMAL" / "a.png"), "only the class"),
    (lambda p: [(p / c).mkdir(parents=True) for c in ("NORMAL", "PNEUMONIA")]
     and make_xray().save(p / "NORMAL" / "a.png"), "holds no images"),
])
def test_bad_layouts_give_clear_errors_naming_the_path(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DatasetError, match=message) as err:
        scan_dataset(root)
    assert str(tmp_path) in str(err.value)


def test_validation_is_grouped_by_patient_stratified_and_seeded(tmp_path):
    root = write_dataset(tmp_path / "d", {"NORMAL": 60, "PNEUMONIA": 120}, splits=("train", "test"))
    index = scan_dataset(root)
    splits = assign_splits(index, val_fraction=0.2, seed=3)
    assert splits == assign_splits(index, val_fraction=0.2, seed=3)
    assert splits != assign_splits(index, val_fraction=0.2, seed=4)
    by_patient: dict[str, set[str]] = {}
    for r, s in zip(index.records, splits):
        by_patient.setdefault(r.patient, set()).add(s)
        if r.official_split == "test":
            assert s == "test"  # the official test split stays the benchmark
    assert all(len(s) == 1 for s in by_patient.values())
    val = [r for r, s in zip(index.records, splits) if s == "val"]
    assert 0.12 < len(val) / 180 < 0.28
    assert 0.2 < sum(r.label == 0 for r in val) / len(val) < 0.45  # stratified: ~1/3 normal


def test_tree_without_splits_gets_patient_grouped_test_split(tmp_path):
    root = write_dataset(tmp_path / "d", {"NORMAL": 40, "PNEUMONIA": 60}, splits=None)
    splits = assign_splits(scan_dataset(root), 0.15, 0.2, seed=0)
    assert {"train", "val", "test"} == set(splits)


def test_leakage_report_counts_shared_patients_and_identical_files(tmp_path):
    index = scan_dataset(write_dataset(tmp_path / "d", {"NORMAL": 4, "PNEUMONIA": 4}, splits=None))
    records = index.records
    splits = ["train"] * 4 + ["test"] * 4
    hashes = ["a", "b", "c", "d", "a", "f", "g", "g"]
    report = leakage_report(records, splits, hashes)
    assert list(report["patients_per_split"]) == ["train", "test"]  # listed in the order train, val, test
    assert list(report["shared_patients"]) == ["train-test"]
    assert report["identical_file_groups"] == 2
    assert report["identical_files_across_splits"] == 1


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "I;16", "CMYK"])
def test_any_mode_decodes_to_single_channel_uint8(tmp_path, mode):
    base = make_xray(64, 1)
    if mode == "I;16":
        arr = (np.asarray(base, dtype=np.uint16) * 257)
        img = Image.fromarray(arr)  # uint16 array: a 16-bit image
    else:
        img = base.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_grayscale(path, 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert out.max() > 150  # the bright blob survives every conversion, 16-bit rescaled included


def test_huge_image_is_resized(tmp_path):
    path = tmp_path / "big.jpeg"
    make_xray(64).resize((5000, 4000)).save(path, quality=80)
    assert load_grayscale(path, 128).shape == (128, 128)


def test_pixel_bomb_is_refused_from_its_header_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(compressed_bomb_png(9_000))  # decodable, 81 megapixels, a few kB
    assert path.stat().st_size < 200_000
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="9000 x 9000 pixels"):
        load_grayscale(path, 64)
    assert time.perf_counter() - started < 0.5  # nothing was decoded
    # The header summary the Data page and `data` show says so instead of raising.
    assert "too large" in image_summary([str(path)])[0]["error"]
    with pytest.raises(ValueError, match="too large"):
        load_thumbnail(path, 64)


def test_unusable_entries_are_listed_with_a_reason_and_the_rest_is_indexed(tmp_path):
    root = write_dataset(tmp_path / "d", {"NORMAL": 4, "PNEUMONIA": 4}, splits=None)
    expected = write_bad_entries(root / "PNEUMONIA")
    os.mkdir(os.fsencode(root) + b"/\xfe-folder")  # a class-like folder with a bad name
    index = scan_dataset(root)
    assert len(index.records) == 8 and index.classes == ["NORMAL", "PNEUMONIA"]
    for path, words in expected.items():
        assert words in index.unusable[path], (path, index.unusable)
    assert "not valid UTF-8" in index.unusable[f"{root}/\\xfe-folder"]
    json.dumps(index.unusable)  # printable and storable as they are


def test_a_tree_without_a_train_folder_says_so_instead_of_training_on_val(tmp_path):
    root = write_dataset(tmp_path / "d", {"NORMAL": 6, "PNEUMONIA": 6}, splits=("val", "test"))
    with pytest.raises(DatasetError, match=r"no train folder.*\(val, test\)|split folders \(val, test\) but no train"):
        assign_splits(scan_dataset(root))


def test_one_class_in_train_names_the_missing_class(tmp_path):
    root = write_dataset(tmp_path / "d", {"NORMAL": 6, "PNEUMONIA": 6}, splits=("train", "test"))
    for f in (root / "train" / "NORMAL").iterdir():
        f.unlink()
    (root / "train" / "NORMAL").rmdir()
    with pytest.raises(DatasetError, match="No NORMAL images in the train and val folders"):
        assign_splits(scan_dataset(root))


def test_transparent_pixels_become_black_like_a_radiographs_background():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[1, :, 3] = 0, 128, 255
    gray = np.asarray(to_grayscale_uint8(Image.fromarray(rgba, "RGBA")))
    assert gray[0, 0] == 0 and abs(int(gray[0, 1]) - 100) <= 2 and (gray[1] == 200).all()


def test_files_and_folders_outside_the_class_folders_are_listed_not_dropped(tmp_path):
    root = write_dataset(tmp_path / "d", {"NORMAL": 6, "PNEUMONIA": 6}, splits=("train", "val", "test"))
    make_xray().save(root / "train" / "loose.png")
    (root / "train" / "README.txt").write_text("notes")
    write_dataset(root / "extra", {"NORMAL": 1}, splits=None)
    make_xray().save(root / "train" / "NORMAL" / ".hidden.png")
    (root / "train" / "NORMAL" / ".ipynb_checkpoints").mkdir()
    make_xray().save(root / "train" / "NORMAL" / ".ipynb_checkpoints" / "x.png")
    for f in (root / "val" / "NORMAL").iterdir():  # an empty class folder in val is a note, not an error
        f.unlink()
    index = scan_dataset(root)
    assert "outside the class folders" in index.unusable[str(root / "train" / "loose.png")]
    assert "not a split folder" in index.unusable[str(root / "extra")]
    assert "hidden" in index.unusable[str(root / "train" / "NORMAL" / ".hidden.png")]
    assert "hidden" in index.unusable[str(root / "train" / "NORMAL" / ".ipynb_checkpoints")]
    assert "without images" in index.unusable[str(root / "val" / "NORMAL")]
    assert str(root / "train" / "README.txt") in index.ignored_files
    assert index.counts()["train"] == {"NORMAL": 6, "PNEUMONIA": 6}


@pytest.fixture
def fail_if_blocked():
    """Turn a read that blocks (a FIFO waiting for a writer) into a test failure after 10 s, not a hang."""
    import signal

    def blocked(signum, frame):
        raise TimeoutError("a read blocked")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_path_that_is_no_regular_file_is_refused_without_blocking(tmp_path, fail_if_blocked):
    """A predictions file may name a FIFO, a device, a folder or a missing file: every way of opening an image
    (gallery thumbnail, decode, header summary, the batch decoder) refuses it at once with the reason."""
    from bad_inputs import unreadable_paths

    paths = unreadable_paths(tmp_path / "odd")
    for path, words in paths.items():
        for read in (lambda p: load_thumbnail(p, 64), lambda p: load_grayscale(p, 64),
                     lambda p: load_grayscale(Path(p))):
            with pytest.raises(ValueError, match=words):
                read(path)
        assert words in image_summary([path])[0]["error"]
    good = tmp_path / "good.png"
    make_xray().save(good)
    decoded = decode_images([str(good), *paths], 32, cache_dir=tmp_path / "cache")
    assert decoded.ok_indices == [0]
    assert set(decoded.failed) == set(paths)
    assert all("not a regular file" in decoded.failed[p] for p, words in paths.items() if "regular" in words)
