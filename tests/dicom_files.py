"""DICOM files written by the tests from real (or generated) 8-bit X-ray pixels, in the variants hospitals export:
MONOCHROME1 and 2, 8 / 12 / 16 bits, rescale, window or VOI LUT, compressed, with or without the preamble.
Every variant is built so that the display pipeline gives back exactly the 8-bit pixels it was made from (when
those span 0-255), so a DICOM and the PNG of the same picture must give the same prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

COMPRESSIONS = {"rle": RLELossless, "jpeg2000": JPEG2000Lossless}


def write_dicom(path: Path, pixels: np.ndarray, *, bits: int = 8, monochrome1: bool = False,
                rescale: bool = False, window: bool = False, voi_lut: bool = False, compression: str | None = None,
                preamble: bool = True, patient: str = "P0001", age: str = "045Y", sex: str = "F",
                view: str = "PA", frames: int = 1, declared_rows: int | None = None) -> Path:
    """Write `pixels` (uint8, H x W) as a DICOM file that displays as those pixels."""
    v = np.asarray(pixels, dtype=np.int64)
    if monochrome1:
        v = 255 - v
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID, ds.PatientAge, ds.PatientSex, ds.ViewPosition = patient, age, sex, view
    ds.PatientName = "Test^Patient"  # a tag the tool must not keep
    ds.Rows, ds.Columns = declared_rows or v.shape[0], v.shape[1]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.PixelRepresentation = 0
    if bits == 8:
        stored, dtype = v, np.uint8
    elif bits == 12:
        stored, dtype = v * 16, np.uint16  # 0..4080
    else:
        stored, dtype = v * 200, np.uint16  # 0..51000: room for the rescale offset below
    if rescale:  # modality values = stored * 0.5 - 1024; the stored values carry an offset that the slope undoes
        stored = stored + 2048
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "0.5", "-1024", "US"
    if window:
        top = (stored.max() if not rescale else stored.max() * 0.5 - 1024)
        bottom = (0 if not rescale else 2048 * 0.5 - 1024)
        # LINEAR window whose edges are the darkest and brightest values: the display is a plain stretch.
        ds.WindowCenter = f"{(bottom + top) / 2 + 0.5:.4f}"
        ds.WindowWidth = f"{top - bottom + 1:.4f}"
    if voi_lut:
        assert not rescale and bits == 12
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 8]
        item.LUTData = np.minimum(255, np.arange(4096) // 16).astype(np.uint16).tobytes()
        ds.VOILUTSequence = [item]
    ds.BitsAllocated = 8 if dtype is np.uint8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    if frames > 1:
        ds.NumberOfFrames = frames
        stored = np.stack([stored] * frames)
    ds.PixelData = stored.astype(dtype).tobytes()
    if compression:
        ds.compress(COMPRESSIONS[compression])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=preamble)
    return path
