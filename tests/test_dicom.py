"""DICOM radiographs: every variant a hospital exports displays as the picture it holds, and gives the prediction
the same picture gets as a PNG."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import SHARED_DATA, make_xray
from dicom_files import write_dicom
from PIL import Image, ImageOps

from core.dataset import (
    ImageTooLargeError,
    image_metadata,
    image_summary,
    is_image_file,
    load_grayscale,
    load_thumbnail,
    scan_dataset,
)
from core.dicom import age_in_years


def _xray_pixels() -> np.ndarray:
    """A real X-ray when the shared data is there (else a generated one), stretched to 0-255 as exports are."""
    found = sorted((SHARED_DATA / "kermany_224" / "test" / "NORMAL").glob("*.jpeg"))[:1]
    image = Image.open(found[0]).convert("L") if found else make_xray(96)
    return np.asarray(ImageOps.autocontrast(image))


VARIANTS = {
    "8-bit MONOCHROME2": dict(),
    "8-bit MONOCHROME1": dict(monochrome1=True),
    "12-bit": dict(bits=12),
    "16-bit": dict(bits=16),
    "16-bit with rescale": dict(bits=16, rescale=True),
    "12-bit with window": dict(bits=12, window=True),
    "16-bit rescale and window": dict(bits=16, rescale=True, window=True),
    "12-bit VOI LUT": dict(bits=12, voi_lut=True),
    "12-bit MONOCHROME1 window": dict(bits=12, monochrome1=True, window=True),
    "RLE lossless": dict(compression="rle"),
    "12-bit RLE": dict(bits=12, compression="rle"),
    "12-bit JPEG 2000 lossless": dict(bits=12, compression="jpeg2000"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_displays_as_the_picture_it_holds(tmp_path, variant):
    pixels = _xray_pixels()
    path = write_dicom(tmp_path / "image.dcm", pixels, **VARIANTS[variant])
    assert np.array_equal(load_grayscale(path), pixels)
    small = load_grayscale(path, 64)
    assert small.shape == (64, 64) and small.dtype == np.uint8


def test_a_window_narrower_than_the_picture_clips_it_as_a_viewer_does(tmp_path):
    pixels = _xray_pixels()
    path = write_dicom(tmp_path / "w.dcm", pixels, bits=12)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = "2040", "1000"  # the middle quarter of the 12-bit range
    ds.save_as(path)
    shown = load_grayscale(path)
    assert (shown == 0).mean() > (pixels == 0).mean() + 0.1 and (shown == 255).mean() > (pixels == 255).mean() + 0.1


def test_files_without_extension_are_found_by_their_preamble(tmp_path):
    pixels = _xray_pixels()
    for cls in ("NORMAL", "PNEUMONIA"):
        for i in range(3):
            write_dicom(tmp_path / "d" / cls / f"1.2.840.{i}", pixels, patient=f"{cls}-{i}")
    (tmp_path / "d" / "NORMAL" / "notes").write_text("not an image")
    index = scan_dataset(tmp_path / "d")
    assert len(index.records) == 6
    assert str(tmp_path / "d" / "NORMAL" / "notes") in index.ignored_files
    assert is_image_file(tmp_path / "d" / "NORMAL" / "1.2.840.0")
    assert np.array_equal(load_grayscale(tmp_path / "d" / "NORMAL" / "1.2.840.0"), pixels)


def test_a_dcm_file_without_preamble_reads_by_its_name(tmp_path):
    pixels = _xray_pixels()
    path = write_dicom(tmp_path / "raw.dcm", pixels, preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    assert np.array_equal(load_grayscale(path), pixels)
    assert image_metadata(path.read_bytes())["patient"] == "P0001"


def test_only_patient_age_sex_and_view_are_kept(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", _xray_pixels(), patient="ABC-12", age="006M", sex="m", view="ap")
    meta = image_metadata(path.read_bytes())
    assert meta == {"patient": "ABC-12", "age": "0.5", "sex": "M", "view": "AP"}
    assert "Test^Patient" not in str(meta)
    assert image_metadata(b"\x89PNG not dicom") == {}


@pytest.mark.parametrize("text, years", [("045Y", "45"), ("006M", "0.5"), ("010W", "0.19"), ("003D", "0.01"),
                                         ("", ""), ("abc", ""), ("12", "12"), ("1000Y", "")])
def test_dicom_ages_read_as_years(text, years):
    assert age_in_years(text) == years


def test_the_pixel_limit_is_checked_from_rows_and_columns_before_decoding(tmp_path):
    path = write_dicom(tmp_path / "big.dcm", np.zeros((8, 8), np.uint8))
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 9000, 9000  # declares 81 megapixels, holds 64 pixels
    ds.save_as(path)
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="9000 x 9000"):
        load_grayscale(path, 64)
    assert time.perf_counter() - started < 0.5
    assert "too large" in image_summary([str(path)])[0]["error"]


@pytest.mark.parametrize("make, words", [
    (lambda p: write_dicom(p, np.zeros((16, 16), np.uint8), frames=3), "3 frames"),
    (lambda p: p.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage"), "dicom"),
    (lambda p: p.write_bytes(write_dicom(p, np.zeros((64, 64), np.uint8)).read_bytes()[:-2000]), "pixel data"),
])
def test_damaged_or_unusable_dicom_is_refused_with_a_reason(tmp_path, make, words):
    path = tmp_path / "bad.dcm"
    make(path)
    with pytest.raises(ValueError, match=f"(?i){words}"):
        load_grayscale(path, 32)
    with pytest.raises(ValueError):
        load_thumbnail(path, 32)


def test_header_summary_names_the_format(tmp_path):
    path = write_dicom(tmp_path / "s", _xray_pixels(), bits=16)
    summary = image_summary([str(path)])[0]
    assert summary["format"] == "DICOM" and summary["mode"] == "L" and summary["width"] > 0


def test_the_same_picture_as_png_and_as_dicom_gets_the_same_prediction(finished_run, tmp_path):
    from core.predict import load_run_model, predict_image

    loaded = load_run_model(finished_run)
    pixels = _xray_pixels()
    Image.fromarray(pixels).save(tmp_path / "x.png")
    png = predict_image(loaded, tmp_path / "x.png")
    for variant in ("8-bit MONOCHROME1", "16-bit rescale and window", "12-bit JPEG 2000 lossless"):
        dicom = predict_image(loaded, write_dicom(tmp_path / variant.replace(" ", "_"), pixels, **VARIANTS[variant]))
        assert dicom["prob"] == png["prob"], variant
        assert dicom["predicted"] == png["predicted"]
