"""Write SPA masks as DICOM Segmentation (SEG) objects that reference their source CT/MR series.

Built with highdicom, outside 3D Slicer, so the ``spa`` command and the Slicer module share it.

Array convention: a mask is a (k, j, i) array — slices, rows, columns — exactly the array that
``sitk.GetArrayFromImage`` returns for the series (and ``slicer.util.arrayFromVolume`` for the
volume Slicer loads from it). Row j and column i are the DICOM Rows and Columns of every slice;
slice k is the k-th source instance when the instances are sorted by ImagePositionPatient
projected on the slice normal (row cosine × column cosine), ascending. When the caller also knows
the mask's own geometry (``ijk_to_lps``), each k slice is instead matched to the source instance
at the same position and the in-plane directions and spacing are checked, so a mask whose k axis
runs the other way, or which belongs to another volume, is placed correctly or refused.

Segments are BINARY. Each carries SNOMED CT category/type codes chosen from a free-text structure
name (see :func:`terminology_for`), algorithm type SEMIAUTOMATIC and the SPA algorithm
identification (name, version, and the model fingerprint and seed as parameters).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.coding import Code

from .. import __version__
from ..errors import InputError
from .atomic import write_bytes_atomic
from .terminology import Terminology, terminology_for

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

# "Artificial Intelligence" from CID 7162 (algorithm families).
_AI_FAMILY = Code("123110", "DCM", "Artificial Intelligence")

# Recommended display colours (CIELab is derived by highdicom from RGB) for segments 1, 2, …
_COLOURS = ((241, 214, 145), (216, 101, 79), (128, 174, 128), (111, 184, 210), (221, 130, 101), (144, 238, 144))


@dataclass
class Segment:
    """One segment to export: its (k, j, i) voxels, its label, and what structure it is."""

    mask: np.ndarray
    label: str
    structure: str | Terminology | None = None


@dataclass
class SourceSeries:
    """The single-frame instances of one DICOM series, sorted ascending along the slice normal."""

    datasets: list[Dataset]
    paths: list[Path | None]
    positions: np.ndarray  # (n, 3) ImagePositionPatient in LPS mm, in sorted order
    row_direction: np.ndarray  # unit vector along a row (increasing column index i)
    column_direction: np.ndarray  # unit vector along a column (increasing row index j)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) as in DICOM PixelSpacing
    repairs: list[str] = field(default_factory=list)  # what was filled in from the files' meta information

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns): the shape a mask for this series must have."""
        first = self.datasets[0]
        return len(self.datasets), int(first.Rows), int(first.Columns)

    @property
    def series_uid(self) -> str:
        """SeriesInstanceUID shared by all instances."""
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal: row direction × column direction."""
        return np.cross(self.row_direction, self.column_direction)


# ----- reading the source series -------------------------------------------------------------------
def _read_dataset(path: Path) -> Dataset | None:
    """The dataset in ``path`` without pixel data, or None when it is not a DICOM file."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        pass  # no preamble: old files still hold DICOM; anything else fails _is_slice below
    except (OSError, ValueError, EOFError):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # forced reads of non-DICOM files warn about the guessed encoding
        try:
            return pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # pydicom raises many kinds of error on files that are not DICOM at all
            return None


def _is_slice(ds: Dataset) -> bool:
    """True for a single-frame image with plane geometry (not a SEG, RTSTRUCT, SR or multi-frame)."""
    try:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        return (
            str(getattr(ds, "SOPClassUID", "")) != SEGMENTATION_STORAGE
            and frames == 1
            and len(ds.ImagePositionPatient) == 3
            and len(ds.ImageOrientationPatient) == 6
            and len(ds.PixelSpacing) == 2
            and int(ds.Rows) > 0
            and int(ds.Columns) > 0
        )
    except Exception:  # a forced read of a damaged file: treat it as not an image slice
        return False


def _collect(
    source: str | os.PathLike | Sequence[str | os.PathLike | Dataset],
) -> tuple[list[Dataset], list[Path | None], str]:
    """The image datasets of ``source`` (a folder or a list of files/datasets) and a name for messages."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise InputError(
                f"{folder} is not a folder; pass the folder that holds the DICOM series the mask was drawn on"
            )
        candidates: list[Path | Dataset] = sorted(p for p in folder.iterdir() if p.is_file())
        where = str(folder)
    else:
        candidates = list(source)
        where = f"the {len(candidates)} given source file(s)"
    datasets: list[Dataset] = []
    paths: list[Path | None] = []
    multiframe = 0
    for item in candidates:
        if isinstance(item, Dataset):
            ds, path = item, None
        else:
            path = Path(item)
            if not isinstance(source, (str, os.PathLike)) and not path.is_file():
                raise InputError(
                    f"the source file {path} does not exist; pass the files of the series the mask was drawn on"
                )
            ds = _read_dataset(path)
        if ds is None:
            continue
        if _is_slice(ds):
            datasets.append(ds)
            paths.append(path)
        elif (
            str(ds.get("NumberOfFrames", "1")).strip() not in ("", "1")
            and ds.get("SOPClassUID") != SEGMENTATION_STORAGE
        ):
            multiframe += 1
    if not datasets:
        hint = (
            " (only multi-frame images, which are not supported: convert them to single-frame slices)"
            if multiframe
            else ""
        )
        raise InputError(
            f"{where} holds no DICOM image slices{hint}; pass the folder of the CT/MR series the mask was drawn on"
        )
    return datasets, paths, where


REPAIRABLE_FROM_FILE_META = {"SOPClassUID": "MediaStorageSOPClassUID", "SOPInstanceUID": "MediaStorageSOPInstanceUID"}
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


def _blank(ds: Dataset, keyword: str) -> bool:
    return not str(ds.get(keyword, "") or "").strip()


def repair_from_file_meta(datasets: Sequence[Dataset], where: str) -> list[str]:
    """Fill blank SOP Class / SOP Instance UIDs from each file's meta information (anonymisers blank the former and
    keep the latter); refuse, naming them, the UIDs a SEG needs that nothing can restore. Returns what was repaired."""
    repaired: dict[str, int] = {}
    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        for keyword, meta_keyword in REPAIRABLE_FROM_FILE_META.items():
            if _blank(ds, keyword) and meta is not None and not _blank(meta, meta_keyword):
                setattr(ds, keyword, str(meta.get(meta_keyword)))
                repaired[keyword] = repaired.get(keyword, 0) + 1
    missing = [keyword for keyword in REQUIRED_UIDS if any(_blank(ds, keyword) for ds in datasets)]
    if missing:
        raise InputError(
            f"the slices in {where} have no {', '.join(missing)} (blanked, e.g. by an anonymiser), and a DICOM SEG "
            "must reference its series by them; export the series again with its UIDs (an anonymiser can replace "
            "them with new ones instead of blanking them)"
        )
    return [
        f"{count} slice(s) had a blank {keyword}; it was taken from the file meta information "
        f"({REPAIRABLE_FROM_FILE_META[keyword]})"
        for keyword, count in repaired.items()
    ]


def load_source_series(source: str | os.PathLike | Sequence[str | os.PathLike | Dataset]) -> SourceSeries:
    """Read and sort the one series in a folder (or a list of files or datasets) for SEG export."""
    datasets, paths, where = _collect(source)
    repairs = repair_from_file_meta(datasets, where)
    series_uids = sorted({str(ds.SeriesInstanceUID) for ds in datasets})
    if len(series_uids) > 1:
        raise InputError(
            f"{where} holds {len(series_uids)} DICOM series ({', '.join(series_uids)}); "
            "move the series the mask was drawn on into a folder of its own"
        )
    orientation = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient], dtype=np.float64)
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        raise InputError(f"the slices in {where} have different sizes {sorted(sizes)}; they do not form one volume")
    for ds in datasets:
        other = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        if not np.allclose(other, orientation, atol=1e-4):
            raise InputError(f"the slices in {where} have different orientations; they do not form one volume")
    row_direction = orientation[:3] / np.linalg.norm(orientation[:3])
    column_direction = orientation[3:] / np.linalg.norm(orientation[3:])
    normal = np.cross(row_direction, column_direction)
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in datasets], dtype=np.float64)
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    sorted_distance = distance[order]
    if len(order) > 1 and np.min(np.diff(sorted_distance)) < 1e-3:
        raise InputError(f"{where} holds two or more slices at the same position; remove duplicate instances")
    spacing = tuple(float(v) for v in datasets[0].PixelSpacing)
    return SourceSeries(
        datasets=[datasets[n] for n in order],
        paths=[paths[n] for n in order],
        positions=positions[order],
        row_direction=row_direction,
        column_direction=column_direction,
        pixel_spacing=(spacing[0], spacing[1]),
        repairs=repairs,
    )


# ----- placing the mask ---------------------------------------------------------------------------
def _shape_text(shape: Sequence[int]) -> str:
    """(a, b, c) as "a×b×c"."""
    return "×".join(str(int(n)) for n in shape)


def slice_order_from_geometry(series: SourceSeries, ijk_to_lps: np.ndarray, n_slices: int) -> list[int]:
    """For each mask slice k, the index of the sorted source instance at the same place.

    ``ijk_to_lps`` is the 4×4 matrix taking the mask's (i, j, k, 1) voxel index to LPS millimetres.
    Raises InputError naming what differs when the mask does not lie on the series' voxel grid.
    """
    matrix = np.asarray(ijk_to_lps, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise InputError(f"ijk_to_lps must be a 4×4 matrix, got shape {matrix.shape}")
    column_step, row_step, slice_step = matrix[:3, 0], matrix[:3, 1], matrix[:3, 2]
    row_spacing, column_spacing = series.pixel_spacing
    voxel = min(row_spacing, column_spacing)
    tolerance = 0.05 * voxel  # mm: a twentieth of a pixel
    measured = (float(np.linalg.norm(column_step)), float(np.linalg.norm(row_step)))
    if not np.allclose(measured, (column_spacing, row_spacing), rtol=1e-3, atol=1e-4):
        raise InputError(
            f"the mask's pixel spacing {measured[0]:g}×{measured[1]:g} mm differs from the series' "
            f"{column_spacing:g}×{row_spacing:g} mm; export the mask in the geometry of the series"
        )
    if not (
        np.allclose(column_step / measured[0], series.row_direction, atol=1e-3)
        and np.allclose(row_step / measured[1], series.column_direction, atol=1e-3)
    ):
        raise InputError(
            "the mask's row/column directions differ from the series' ImageOrientationPatient "
            f"{np.round(np.concatenate([series.row_direction, series.column_direction]), 4).tolist()}; "
            "export the mask in the geometry of the series (no reorientation or flips)"
        )
    slice_length = float(np.linalg.norm(slice_step))
    if slice_length == 0.0 or abs(abs(float(slice_step @ series.normal)) - slice_length) > 1e-3 * slice_length:
        raise InputError(
            "the mask's slice axis is not perpendicular to the series' slices; "
            "export the mask in the geometry of the series"
        )
    order: list[int] = []
    for k in range(n_slices):
        corner = matrix[:3, :3] @ np.array([0.0, 0.0, float(k)]) + matrix[:3, 3]
        gaps = np.linalg.norm(series.positions - corner, axis=1)
        nearest = int(np.argmin(gaps))
        if gaps[nearest] > tolerance:
            raise InputError(
                f"slice {k} of the mask (corner at {np.round(corner, 3).tolist()} mm) matches no slice of "
                f"the series (nearest is {gaps[nearest]:.3f} mm away); the mask's origin or slice spacing "
                "differs from the series: export the mask in the geometry of the series"
            )
        order.append(nearest)
    if len(set(order)) != len(order):
        raise InputError(
            "two mask slices fall on the same series slice; the mask's slice spacing differs from the series"
        )
    return order


def _segments_from(
    mask: np.ndarray | Mapping[str, np.ndarray] | Sequence[Segment],
    segment_label: str,
    segment_labels: Mapping[int, str] | None,
    structure: str | Terminology | None,
) -> list[Segment]:
    """Normalise a bool mask, an integer label map, a dict label → mask or a list of Segments."""
    if isinstance(mask, Mapping):
        return [Segment(np.asarray(m), str(label), structure) for label, m in mask.items()]
    if isinstance(mask, (list, tuple)):
        if not all(isinstance(s, Segment) for s in mask):
            raise InputError(
                "a list of masks must hold Segment(mask, label, structure) items; or pass a dict label → mask"
            )
        return [
            Segment(np.asarray(s.mask), s.label, s.structure if s.structure is not None else structure) for s in mask
        ]
    array = np.asarray(mask)
    if array.dtype == bool:
        return [Segment(array, segment_label, structure)]
    if array.dtype.kind not in "iu":
        if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            array = array.astype(np.int64)
        else:
            raise InputError(f"the mask has values of type {array.dtype}; pass a boolean mask or an integer label map")
    values = [int(v) for v in np.unique(array) if v != 0]
    if not values:
        return [Segment(array != 0, segment_label, structure)]
    if values == [1] and not segment_labels:
        return [Segment(array == 1, segment_label, structure)]
    names = dict(segment_labels or {})
    return [Segment(array == v, names.get(v, f"{segment_label} {v}"), structure) for v in values]


def _fingerprint_parameters(
    model_fingerprint: str | None, seed: int | None, extra: Mapping[str, str] | None
) -> dict[str, str] | None:
    """AlgorithmParameters: the model fingerprint, the seed and anything else the caller adds."""
    parameters: dict[str, str] = {}
    if model_fingerprint:
        parameters["model_fingerprint"] = str(model_fingerprint)
    if seed is not None:
        parameters["seed"] = str(seed)
    for key, value in (extra or {}).items():
        parameters[str(key)] = str(value)
    return parameters or None


# ----- export -------------------------------------------------------------------------------------
def build_dicom_seg(
    mask: np.ndarray | Mapping[str, np.ndarray] | Sequence[Segment],
    source: str | os.PathLike | Sequence[str | os.PathLike | Dataset] | SourceSeries,
    *,
    segment_label: str = "SPA segmentation",
    segment_labels: Mapping[int, str] | None = None,
    structure: str | Terminology | None = None,
    ijk_to_lps: np.ndarray | None = None,
    algorithm_name: str = "SPA",
    algorithm_version: str = __version__,
    model_fingerprint: str | None = None,
    seed: int | None = None,
    algorithm_parameters: Mapping[str, str] | None = None,
    series_description: str = "SPA segmentation",
    series_number: int | None = None,
    content_creator: str | None = None,
    content_label: str = "SPA",
) -> Dataset:
    """The highdicom Segmentation dataset for ``mask`` on ``source`` (see :func:`export_dicom_seg`)."""
    import highdicom as hd

    series = source if isinstance(source, SourceSeries) else load_source_series(source)
    segments = _segments_from(mask, segment_label, segment_labels, structure)
    expected = series.shape
    for segment in segments:
        if segment.mask.ndim == 2 and expected[0] == 1:
            segment.mask = segment.mask[np.newaxis]
        if tuple(segment.mask.shape) != expected:
            raise InputError(
                f"the mask has shape {_shape_text(segment.mask.shape)} (slices×rows×columns) but the series "
                f"{series.series_uid} has shape {_shape_text(expected)}; pass a mask drawn on this series"
            )
        if not np.any(segment.mask):
            raise InputError(f"segment {segment.label!r} is empty (no voxel set); segment something before exporting")
    if len({s.label for s in segments}) != len(segments):
        raise InputError("two segments have the same label; give every segment its own label")
    order = (
        list(range(expected[0])) if ijk_to_lps is None else slice_order_from_geometry(series, ijk_to_lps, expected[0])
    )
    # pixel array in source order: frame n is the source instance n of the sorted series
    stacked = np.zeros((expected[0], expected[1], expected[2], len(segments)), dtype=bool)
    for number, segment in enumerate(segments):
        stacked[order, :, :, number] = segment.mask.astype(bool)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name,
        family=_AI_FAMILY,
        version=str(algorithm_version),
        parameters=_fingerprint_parameters(model_fingerprint, seed, algorithm_parameters),
    )
    descriptions = []
    for number, segment in enumerate(segments, start=1):
        terms = terminology_for(segment.structure)
        red, green, blue = _COLOURS[(number - 1) % len(_COLOURS)]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=segment.label[:64],
                segmented_property_category=terms.category,
                segmented_property_type=terms.type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=hd.UID(),
                tracking_id=segment.label[:64],
                anatomic_regions=[terms.region] if terms.region is not None else None,
                display_color=hd.color.CIELabColor.from_rgb(red, green, blue),
            )
        )
    if series_number is None:
        source_number = series.datasets[0].get("SeriesNumber")
        series_number = int(source_number) + 1000 if source_number not in (None, "") else 1000
    try:
        seg = hd.seg.Segmentation(
            source_images=series.datasets,
            pixel_array=stacked,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(series_number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="SPA",
            manufacturer_model_name="SPASegmentationLib",
            software_versions=str(__version__),
            device_serial_number="SPA-" + str(__version__),
            content_description=series_description[:64],
            content_creator_name=content_creator,
            content_label=content_label,
            omit_empty_frames=True,
        )
    except ValueError as exc:
        raise InputError(f"the DICOM SEG could not be built from this series: {exc}") from exc
    seg.SeriesDescription = series_description[:64]
    return seg


def export_dicom_seg(
    mask: np.ndarray | Mapping[str, np.ndarray] | Sequence[Segment],
    source: str | os.PathLike | Sequence[str | os.PathLike | Dataset] | SourceSeries,
    out_path: str | os.PathLike,
    *,
    segment_label: str = "SPA segmentation",
    segment_labels: Mapping[int, str] | None = None,
    structure: str | Terminology | None = None,
    ijk_to_lps: np.ndarray | None = None,
    algorithm_name: str = "SPA",
    algorithm_version: str = __version__,
    model_fingerprint: str | None = None,
    seed: int | None = None,
    algorithm_parameters: Mapping[str, str] | None = None,
    series_description: str = "SPA segmentation",
    series_number: int | None = None,
    content_creator: str | None = None,
    content_label: str = "SPA",
) -> Path:
    """Write ``mask`` as a BINARY DICOM SEG referencing the series in ``source``; return the path.

    ``mask``: a (k, j, i) bool array (one segment named ``segment_label``), an integer label map
    (one segment per non-zero value, named by ``segment_labels`` or "``segment_label`` N"), a dict
    segment label → (k, j, i) mask, or a list of :class:`Segment`. ``source``: the series folder,
    its files or pydicom datasets (e.g. the files of a series in Slicer's DICOM database).
    ``structure``: free text such as "liver tumour" mapped to SNOMED CT codes by
    :func:`terminology_for`, or a :class:`Terminology`. ``ijk_to_lps``: the mask's 4×4 voxel →
    LPS mm matrix, when known, to place slices by position and check the geometry. The file is
    written to a temporary name in the target folder and renamed.
    """
    out = Path(out_path)
    if out.is_dir():
        raise InputError(f"{out} is a folder; give the SEG file to write, e.g. {out / 'segmentation.dcm'}")
    seg = build_dicom_seg(
        mask,
        source,
        segment_label=segment_label,
        segment_labels=segment_labels,
        structure=structure,
        ijk_to_lps=ijk_to_lps,
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        model_fingerprint=model_fingerprint,
        seed=seed,
        algorithm_parameters=algorithm_parameters,
        series_description=series_description,
        series_number=series_number,
        content_creator=content_creator,
        content_label=content_label,
    )
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    write_bytes_atomic(out, buffer.getvalue())
    return out


def ijk_to_lps_from_sitk(image) -> np.ndarray:
    """The 4×4 voxel index (i, j, k) → LPS mm matrix of a 3-D SimpleITK image."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(np.asarray(image.GetSpacing(), dtype=np.float64))
    matrix[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)
    return matrix


def ijk_to_lps_from_ras(ijk_to_ras: np.ndarray) -> np.ndarray:
    """The voxel → LPS matrix from a Slicer IJKToRAS matrix (``slicer.util.arrayFromVTKMatrix``)."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(ijk_to_ras, dtype=np.float64)
