"""A small synthetic CT series written with pydicom, for tests of DICOM import and SEG export.

The slices are single-frame CT Image Storage objects with the patient, study, series, frame of
reference, equipment, image plane, image pixel, CT image and SOP common modules filled in, so
that dicom3tools' ``dciodvfy`` accepts them. Files are written in a shuffled order with names
that do not follow the slice order, so readers must sort by position, not by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROW_SPACING = 0.8  # mm between rows (first value of PixelSpacing)
COLUMN_SPACING = 0.7  # mm between columns (second value of PixelSpacing)
SLICE_SPACING = 2.5  # mm between slice centres along the normal


@dataclass
class SyntheticSeries:
    """What :func:`write_ct_series` wrote: the folder, files in slice order, UIDs and the volume."""

    folder: Path
    files: list[Path]  # sorted ascending along the slice normal (the SimpleITK k order)
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    hounsfield: np.ndarray  # (k, j, i) int16 HU in the same k order as ``files``
    sop_instance_uids: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns) of the volume."""
        return tuple(int(n) for n in self.hounsfield.shape)  # type: ignore[return-value]


def phantom(slices: int = 12, rows: int = 64, columns: int = 64) -> np.ndarray:
    """A (k, j, i) int16 HU body: air outside, soft tissue disc, a brighter ellipsoidal 'organ'."""
    k, j, i = np.mgrid[:slices, :rows, :columns].astype(np.float64)
    body = np.hypot((j - rows / 2) / (rows * 0.45), (i - columns / 2) / (columns * 0.45)) < 1.0
    organ = ellipsoid(
        (slices, rows, columns),
        centre=(slices / 2, rows * 0.45, columns * 0.55),
        radii=(slices * 0.3, rows * 0.2, columns * 0.25),
    )
    hu = np.where(body, 40.0, -1000.0) + np.where(organ, 80.0, 0.0)
    hu += np.random.default_rng(0).normal(0.0, 5.0, hu.shape)
    return np.round(hu).astype(np.int16)


def ellipsoid(
    shape: tuple[int, int, int], centre: tuple[float, float, float], radii: tuple[float, float, float]
) -> np.ndarray:
    """A (k, j, i) boolean ellipsoid, for phantoms and test masks."""
    k, j, i = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float64)
    return ((k - centre[0]) / radii[0]) ** 2 + ((j - centre[1]) / radii[1]) ** 2 + (
        (i - centre[2]) / radii[2]
    ) ** 2 <= 1.0


def _slice_dataset(
    series: dict,
    hu_slice: np.ndarray,
    position: np.ndarray,
    orientation: tuple[float, ...],
    instance_number: int,
    sop_uid: str,
) -> Dataset:
    """One CT Image Storage dataset for one slice."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = series["date"]
    ds.InstanceCreationTime = series["time"]
    # patient
    ds.PatientName = "Phantom^SPA"
    ds.PatientID = "SPA-PHANTOM-1"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    # general study
    ds.StudyInstanceUID = series["study_uid"]
    ds.StudyDate = series["date"]
    ds.StudyTime = series["time"]
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "SPA synthetic phantom"
    # general series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series["series_uid"]
    ds.SeriesNumber = 2
    ds.SeriesDate = series["date"]
    ds.SeriesTime = series["time"]
    ds.SeriesDescription = "Synthetic CT"
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "HFS"
    # frame of reference
    ds.FrameOfReferenceUID = series["frame_uid"]
    ds.PositionReferenceIndicator = ""
    # general equipment
    ds.Manufacturer = "SPA test suite"
    # general image
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.ContentDate = series["date"]
    ds.ContentTime = series["time"]
    ds.AcquisitionNumber = 1
    # image plane
    ds.PixelSpacing = [ROW_SPACING, COLUMN_SPACING]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.SliceThickness = SLICE_SPACING
    ds.SliceLocation = f"{float(position[2]):.4f}"
    # image pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(hu_slice.shape[0]), int(hu_slice.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    stored = (hu_slice.astype(np.int32) + 1024).astype(np.int16)
    ds.SmallestImagePixelValue = int(stored.min())
    ds.LargestImagePixelValue = int(stored.max())
    ds.PixelData = stored.tobytes()
    # CT image
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.KVP = 120
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    return ds


def write_ct_series(
    folder: Path,
    slices: int = 12,
    rows: int = 64,
    columns: int = 64,
    origin: tuple[float, float, float] = (-22.4, -25.6, 100.0),
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    seed: int = 0,
) -> SyntheticSeries:
    """Write a synthetic CT series into ``folder`` (created) and describe it.

    ``orientation`` is ImageOrientationPatient (row cosine, column cosine); slices are stacked along
    their cross product starting at ``origin`` (LPS, mm).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    col_dir = np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row_dir, col_dir)
    hu = phantom(slices, rows, columns)
    series = {
        "study_uid": generate_uid(),
        "series_uid": generate_uid(),
        "frame_uid": generate_uid(),
        "date": "20260101",
        "time": "120000",
    }
    sop_uids = [generate_uid() for _ in range(slices)]
    # instance numbers run against the slice order and files are written shuffled
    order = rng.permutation(slices)
    files: list[Path] = [Path()] * slices
    for name_index, k in enumerate(order):
        position = np.asarray(origin, dtype=np.float64) + k * SLICE_SPACING * normal
        ds = _slice_dataset(series, hu[k], position, orientation, instance_number=slices - int(k), sop_uid=sop_uids[k])
        path = folder / f"IM{name_index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[int(k)] = path
    return SyntheticSeries(
        folder=folder,
        files=files,
        study_uid=series["study_uid"],
        series_uid=series["series_uid"],
        frame_of_reference_uid=series["frame_uid"],
        hounsfield=hu,
        sop_instance_uids=sop_uids,
    )
