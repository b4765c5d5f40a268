"""DICOM radiographs: pixels to the 8-bit picture a reader sees, and the few header fields the tool keeps.

Pixels follow the DICOM display pipeline (PS3.3 C.11): the modality LUT or rescale, then the first VOI LUT or
window, then 8 bits over the VOI's output range; MONOCHROME1 (white = low values) is inverted so that bone is
white as in every other format. Without a VOI the stored 8-bit values are kept as they are (an 8-bit DICOM and
the PNG it was made from give the same pixels); deeper images are stretched from their darkest to their
brightest pixel, as 16-bit PNGs are. Compressed transfer syntaxes are decoded by pydicom's own RLE decoder and the
pylibjpeg plugins (JPEG 2000 through openjpeg, RLE); no GPL decoder is used.

Of the header only the patient id, age, sex and view position are kept (patient data: nothing else is stored or
shown).
"""

from __future__ import annotations

import io
import re
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image

DICOM_EXTENSIONS = {".dcm", ".dicom"}
PREAMBLE_BYTES = 132  # a 128-byte preamble, then "DICM"
MAX_FIELD_LENGTH = 64  # the longest of the kept fields (PatientID) is LO: 64 characters


class DicomError(ValueError):
    """A DICOM file whose pixels cannot be used, with the reason."""


def has_dicom_preamble(head: bytes) -> bool:
    """Whether these first bytes of a file are a DICOM Part 10 file (the 'DICM' magic after the preamble)."""
    return len(head) >= PREAMBLE_BYTES and head[128:132] == b"DICM"


def _read(source: bytes | BinaryIO, stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about many harmless deviations from the standard
            # force: files without the preamble (older exports, or a .dcm written raw) are DICOM too.
            return pydicom.dcmread(stream, force=True, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError,
            NotImplementedError, OverflowError) as e:
        raise DicomError(f"not a readable DICOM file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _int(ds, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword, default)
    try:
        return int(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def check_dimensions(ds, max_pixels: int) -> tuple[int, int]:
    """(width, height) from Rows and Columns; refuses multi-frame images and images over `max_pixels` before any
    pixel is decoded."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomError("DICOM file without pixel data (a report, a structured document or a header only)")
    rows, cols = _int(ds, "Rows", 0) or 0, _int(ds, "Columns", 0) or 0
    if rows < 1 or cols < 1:
        raise DicomError(f"DICOM image has no pixels ({cols} x {rows})")
    frames = _int(ds, "NumberOfFrames", 1) or 1
    if frames > 1:  # which frame is the radiograph is anyone's guess
        raise DicomError(f"DICOM file has {frames} frames (a multi-frame series): give one still image")
    if rows * cols > max_pixels:
        from .dataset import ImageTooLargeError

        raise ImageTooLargeError(f"image too large: {cols} x {rows} pixels (limit {max_pixels // 1_000_000} "
                                 "megapixels); refused before decoding")
    return cols, rows


def _voi_range(ds) -> tuple[float, float] | None:
    """The output range of the dataset's first VOI LUT or window: where its darkest and brightest inputs land
    (found by sending the extremes through pydicom's own function)."""
    from pydicom.pixels import apply_voi_lut

    if "VOILUTSequence" not in ds and not ("WindowCenter" in ds and "WindowWidth" in ds):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extremes = apply_voi_lut(np.array([-(2 ** 40), 2 ** 40], dtype=np.int64), ds, index=0)
    lo, hi = float(np.min(extremes)), float(np.max(extremes))
    return (lo, hi) if np.isfinite([lo, hi]).all() and hi > lo else None


def to_display(ds, arr: np.ndarray) -> Image.Image:
    """Stored pixels to the 8-bit picture: L for grayscale, RGB for colour photometric interpretations."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # RGB, YBR (pydicom converts to RGB) or a palette: a photograph or a screenshot, not a radiograph's
        # grayscale; kept as colour so that the prediction gate sees it.
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            arr = apply_color_lut(arr, ds)
            arr = (arr >> 8).astype(np.uint8) if arr.dtype != np.uint8 else arr
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise DicomError(f"DICOM photometric interpretation {photometric} with pixel shape {arr.shape} is not "
                             "supported")
        if arr.dtype != np.uint8:
            bits = _int(ds, "BitsStored", 8) or 8
            arr = np.clip(arr.astype(np.float64) / max(2 ** bits - 1, 1) * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    if arr.ndim != 2:
        raise DicomError(f"DICOM grayscale image with pixel shape {arr.shape} (expected one plane)")
    bits = _int(ds, "BitsStored", 8) or 8
    rescaled = "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds
    values = apply_modality_lut(arr, ds) if rescaled else arr
    window = _voi_range(ds)
    if window is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a LUT after a rescale reads float input, as the standard has it
            values = apply_voi_lut(values, ds, index=0)
        lo, hi = window
    elif bits <= 8 and not rescaled and arr.dtype.kind == "u":
        lo, hi = 0.0, 255.0  # 8-bit pixels are shown as stored
    else:
        finite = np.isfinite(values)
        if not finite.any():
            raise DicomError("DICOM image has no finite pixel values")
        lo, hi = float(values[finite].min()), float(values[finite].max())
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=lo, posinf=hi, neginf=lo)
    scaled = (values - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(values)
    out = np.clip(scaled, 0, 255).round().astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return Image.fromarray(out, "L")


def read_dicom(source: bytes | BinaryIO, max_pixels: int) -> Image.Image:
    """Decode a DICOM file to the 8-bit picture (see to_display). Raises DicomError (a ValueError) with a reason,
    or ImageTooLargeError before decoding."""
    ds = _read(source)
    check_dimensions(ds, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except (NotImplementedError, RuntimeError) as e:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise DicomError(f"cannot decode this DICOM's compressed pixels (transfer syntax {name}): "
                         f"{str(e).splitlines()[0][:200]}") from None
    except (ValueError, TypeError, AttributeError, KeyError, EOFError, OSError, MemoryError) as e:
        raise DicomError(f"damaged DICOM pixel data ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    try:
        image = to_display(ds, arr)
    except DicomError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as e:
        raise DicomError(f"DICOM display values cannot be applied ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    image.format = "DICOM"
    return image


_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}


def age_in_years(text: str) -> str:
    """A DICOM age string (045Y, 006M, 010W, 003D) as years ('45', '0.5'); '' when it cannot be read."""
    m = _AGE.match(str(text))
    if not m:
        return ""
    years = int(m.group(1)) * _UNIT_YEARS[m.group(2).upper()]
    return f"{years:.0f}" if years >= 2 else f"{years:.2f}".rstrip("0").rstrip(".")


def _clean(value) -> str:
    text = re.sub(r"[\x00-\x1f\x7f]", "", str(value if value is not None else "")).strip()
    return text[:MAX_FIELD_LENGTH]


def header_fields(source: bytes | BinaryIO) -> dict[str, str]:
    """The kept header fields, present ones only: patient (PatientID), age (years), sex, view (ViewPosition)."""
    try:
        ds = _read(source, stop_before_pixels=True)
        out = {"patient": _clean(ds.get("PatientID", "")), "age": age_in_years(_clean(ds.get("PatientAge", ""))),
               "sex": _clean(ds.get("PatientSex", "")).upper(), "view": _clean(ds.get("ViewPosition", "")).upper()}
    except Exception:  # noqa: BLE001 - a damaged header value (pydicom converts lazily) means no metadata
        return {}
    return {k: v for k, v in out.items() if v}
