"""MRML bridge: volume ↔ 2-D slice images, the candidate preview, commits with Slicer's undo.

The only Lib module that imports ``slicer``. It works in the Slicer app and headless with the
``slicer-core`` wheel. Conventions:

- ``volume_array`` gives the voxels as a (k, j, i) numpy array, as ``slicer.util.arrayFromVolume``.
- A :class:`SlicePlane` turns one voxel plane of that array into the 2-D image the way Slicer's
  slice view shows it: axial (Red) columns run towards patient left and rows towards posterior,
  coronal (Green) columns towards left and rows towards inferior, sagittal (Yellow) columns
  towards posterior and rows towards inferior (``vtkMRMLSliceNode`` default presets, screen y
  down). Volumes with flipped or permuted IJK axes (DICOM LPS, sagittal acquisitions) are handled;
  an oblique volume is sliced along the voxel plane closest to the view plane (no resampling).
- Pixel coordinates are (x, y) = (column, row) with pixel centres on integers, as in ``Session``.
- RAS coordinates are world coordinates: a linear parent transform of the volume is applied.
  Segment voxels are read and written in the volume's own frame, so a segmentation must sit under
  the same transform as its volume (both untransformed in the usual case).
- Commits read the segment on the volume's grid, change the requested slices and write it back
  (``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment``, which moves overlapping
  segments to their own layer), so other slices and other segments keep their voxels.
- The preview lives in its own segmentation node ("SPA preview", not saved with the scene, hidden
  from node selectors), holding only the shown slice. Candidate k's colour (Okabe–Ito palette)
  fills where it adds pixels; where it removes pixels only an outline in a darker shade of the same
  colour is drawn, so the image under the recommendation stays visible.
- Threads: ``SceneSession.compute_*`` read the volume and run the model and may run on the model
  worker thread while the main thread leaves the volume alone; all other calls change MRML and
  belong on the main thread.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

from .errors import InputError
from .palette import RECOMMENDED, rgb
from .session import DEFAULT_SAMPLES, Round, Session

if TYPE_CHECKING:
    from .propagation import PropagationResult
    from .profiles import ProfileStore

ORIENTATIONS = ("axial", "coronal", "sagittal")

# Per orientation: (RAS axis of image columns, RAS axis of image rows, RAS axis of the slice normal).
# In every Slicer view both image columns and image rows run towards decreasing RAS coordinates.
_VIEW_AXES = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}

RECOMMENDED_COLOUR: tuple[float, float, float] = rgb(RECOMMENDED)
CANDIDATE_COLOURS: tuple[tuple[float, float, float], ...] = (
    rgb("orange"), rgb("sky blue"), rgb("bluish green"), rgb("reddish purple"),
)
REMOVES_SHADE = 0.6  # "removes" outlines use the candidate's colour darkened by this factor
DEFAULT_PREVIEW_OPACITY = 0.5
PREVIEW_OUTLINE_PX = 2  # outline width in slice views: 1 px rims are hard to see on a CT slice

ALGORITHM_TYPE_TAG = "DICOM.SegmentAlgorithmType"
ALGORITHM_NAME_TAG = "DICOM.SegmentAlgorithmName"
TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"
PREVIEW_ATTRIBUTE = "SPA.Preview"


def removes_colour(k: int) -> tuple[float, float, float]:
    """The outline colour of candidate ``k``'s "removes" region: its colour, darker."""
    return tuple(REMOVES_SHADE * c for c in CANDIDATE_COLOURS[k])  # type: ignore[return-value]


# ----- geometry ------------------------------------------------------------------------------------
def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _node_name(node: Any) -> str:
    return node.GetName() if node is not None and node.GetName() else "(unnamed)"


def ijk_to_ras_matrix(volume_node: Any) -> np.ndarray:
    """The volume's 4×4 IJK→world RAS matrix (its linear parent transform included)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    result = _matrix_to_numpy(matrix)
    transform = volume_node.GetParentTransformNode()
    if transform is not None:
        if not transform.IsTransformToWorldLinear():
            raise InputError(
                f"volume '{_node_name(volume_node)}' is under a non-linear transform; harden the transform "
                "(Data module → right-click → Harden transform) and try again"
            )
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        result = _matrix_to_numpy(to_world) @ result
    return result


def _volume_shape(volume_node: Any) -> tuple[int, int, int]:
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        raise InputError(f"volume '{_node_name(volume_node)}' has no voxels; load the volume again")
    dims = image.GetDimensions()
    return (int(dims[2]), int(dims[1]), int(dims[0]))


def volume_array(volume_node: Any) -> np.ndarray:
    """The voxels as a (k, j, i) numpy view of the volume's image data (no copy)."""
    shape = _volume_shape(volume_node)
    scalars = volume_node.GetImageData().GetPointData().GetScalars()
    if scalars is None or scalars.GetNumberOfComponents() != 1:
        raise InputError(
            f"volume '{_node_name(volume_node)}' is not a single-channel scalar volume; "
            "convert it to scalar (Volumes module → Convert to scalar volume) first"
        )
    return vtk_to_numpy(scalars).reshape(shape)


def _axes_of(ijk_to_ras: np.ndarray, volume_node: Any) -> tuple[list[int], list[float]]:
    """For each RAS axis r: the IJK axis that runs most nearly along it, and that axis' sign."""
    directions = ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0, keepdims=True)
    dominant = np.argmax(np.abs(directions), axis=0)  # RAS axis of each IJK column
    if sorted(dominant.tolist()) != [0, 1, 2]:
        raise InputError(
            f"volume '{_node_name(volume_node)}' is too oblique to slice along its voxel planes; "
            "resample it to RAS-aligned axes (Resample Scalar Volume) first"
        )
    ijk_of_ras = [0, 0, 0]
    sign_of_ras = [1.0, 1.0, 1.0]
    for ijk_axis, ras_axis in enumerate(dominant.tolist()):
        ijk_of_ras[ras_axis] = ijk_axis
        sign_of_ras[ras_axis] = float(np.sign(directions[ras_axis, ijk_axis]))
    return ijk_of_ras, sign_of_ras


@dataclass(frozen=True)
class SlicePlane:
    """An axis-aligned slice of a volume; its 2-D image is oriented as Slicer's slice view shows it."""

    orientation: str
    slice_axis: int  # numpy axis held fixed (0 = k, 1 = j, 2 = i)
    index: int
    n_slices: int
    row_axis: int  # numpy axis along image rows (y)
    col_axis: int  # numpy axis along image columns (x)
    flip_rows: bool  # image row 0 is the last index of row_axis
    flip_cols: bool  # image column 0 is the last index of col_axis
    volume_shape: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the 2-D image."""
        return (self.volume_shape[self.row_axis], self.volume_shape[self.col_axis])

    def _check_volume(self, volume: np.ndarray) -> None:
        if tuple(volume.shape) != tuple(self.volume_shape):
            raise InputError(f"this slice plane belongs to a volume of shape {self.volume_shape}, not {volume.shape}")

    def _selector(self) -> tuple:
        selector: list[Any] = [slice(None)] * 3
        selector[self.slice_axis] = self.index
        return tuple(selector)

    def extract(self, volume: np.ndarray) -> np.ndarray:
        """The (rows, cols) image of this plane from the (k, j, i) array (a copy)."""
        self._check_volume(volume)
        image = volume[self._selector()]
        if self.row_axis > self.col_axis:  # remaining axes come in numpy order: (min, max)
            image = image.T
        if self.flip_rows:
            image = image[::-1, :]
        if self.flip_cols:
            image = image[:, ::-1]
        return np.ascontiguousarray(image)

    def insert(self, volume: np.ndarray, image: np.ndarray) -> None:
        """Write a (rows, cols) image into this plane of the (k, j, i) array, in place."""
        self._check_volume(volume)
        image = np.asarray(image)
        if tuple(image.shape) != self.shape:
            raise InputError(f"image of shape {image.shape} does not fit the {self.orientation} plane of shape {self.shape}")
        if self.flip_rows:
            image = image[::-1, :]
        if self.flip_cols:
            image = image[:, ::-1]
        if self.row_axis > self.col_axis:
            image = image.T
        volume[self._selector()] = image

    def at(self, index: int) -> "SlicePlane":
        """The same orientation through another slice."""
        index = int(index)
        if not 0 <= index < self.n_slices:
            raise InputError(f"slice {index} does not exist; the {self.orientation} slices are 0..{self.n_slices - 1}")
        return replace(self, index=index)

    def same_slice(self, other: "SlicePlane | None") -> bool:
        """True when ``other`` is this very slice of the same volume layout."""
        return other is not None and (other.orientation, other.slice_axis, other.index, other.volume_shape) == (
            self.orientation, self.slice_axis, self.index, self.volume_shape)

    def pixel_of(self, kji: Sequence[float]) -> tuple[float, float]:
        """(x, y) image coordinates of a continuous (k, j, i) array position (the slice coordinate is dropped)."""
        x = float(kji[self.col_axis])
        y = float(kji[self.row_axis])
        if self.flip_cols:
            x = self.volume_shape[self.col_axis] - 1 - x
        if self.flip_rows:
            y = self.volume_shape[self.row_axis] - 1 - y
        return (x, y)

    def array_index_of(self, xy: Sequence[float]) -> tuple[float, float, float]:
        """The continuous (k, j, i) array position of image point (x, y) on this slice."""
        x, y = float(xy[0]), float(xy[1])
        if self.flip_cols:
            x = self.volume_shape[self.col_axis] - 1 - x
        if self.flip_rows:
            y = self.volume_shape[self.row_axis] - 1 - y
        kji = [0.0, 0.0, 0.0]
        kji[self.slice_axis] = float(self.index)
        kji[self.row_axis] = y
        kji[self.col_axis] = x
        return (kji[0], kji[1], kji[2])


def _ras_to_kji(volume_node: Any, ras: Sequence[float]) -> np.ndarray:
    point = np.asarray([float(v) for v in ras][:3] + [1.0])
    if point.shape != (4,) or not np.isfinite(point).all():
        raise InputError(f"a RAS position needs three finite numbers, got {ras!r}")
    ijk = np.linalg.solve(ijk_to_ras_matrix(volume_node), point)[:3]
    return ijk[::-1]


def _check_plane(volume_node: Any, plane: SlicePlane) -> None:
    shape = _volume_shape(volume_node)
    if shape != tuple(plane.volume_shape):
        raise InputError(
            f"the slice plane was made for a volume of shape {plane.volume_shape} but '{_node_name(volume_node)}' "
            f"has shape {shape}; make the plane from this volume with plane_through()"
        )


def plane_through(volume_node: Any, orientation: str, ras: Sequence[float]) -> SlicePlane:
    """The ``orientation`` slice of the volume that contains the RAS point ``ras``."""
    if orientation not in ORIENTATIONS:
        raise InputError(f"orientation must be one of {', '.join(ORIENTATIONS)}, not {orientation!r}")
    shape = _volume_shape(volume_node)
    ijk_of_ras, sign_of_ras = _axes_of(ijk_to_ras_matrix(volume_node), volume_node)
    col_ras, row_ras, normal_ras = _VIEW_AXES[orientation]
    slice_axis = 2 - ijk_of_ras[normal_ras]
    kji = _ras_to_kji(volume_node, ras)
    index = int(np.floor(kji[slice_axis] + 0.5))
    n_slices = shape[slice_axis]
    if not 0 <= index < n_slices:
        raise InputError(
            f"RAS point ({', '.join(f'{float(v):g}' for v in ras)}) lies outside volume '{_node_name(volume_node)}' "
            f"({orientation} slice {index}, the volume has 0..{n_slices - 1}); click inside the volume"
        )
    return SlicePlane(
        orientation=orientation,
        slice_axis=slice_axis,
        index=index,
        n_slices=n_slices,
        row_axis=2 - ijk_of_ras[row_ras],
        col_axis=2 - ijk_of_ras[col_ras],
        # Image axes run towards decreasing RAS; an IJK axis that increases along RAS must be flipped.
        flip_rows=sign_of_ras[row_ras] > 0,
        flip_cols=sign_of_ras[col_ras] > 0,
        volume_shape=shape,
    )


def ras_to_pixel(volume_node: Any, plane: SlicePlane, ras: Sequence[float]) -> tuple[float, float]:
    """(x, y) in ``plane.extract()``'s image of a RAS point (projected onto the plane)."""
    _check_plane(volume_node, plane)
    return plane.pixel_of(_ras_to_kji(volume_node, ras))


def pixel_to_ras(volume_node: Any, plane: SlicePlane, xy: Sequence[float]) -> tuple[float, float, float]:
    """The RAS position of image point (x, y) on ``plane`` (exact inverse of :func:`ras_to_pixel`)."""
    _check_plane(volume_node, plane)
    k, j, i = plane.array_index_of(xy)
    ras = ijk_to_ras_matrix(volume_node) @ np.array([i, j, k, 1.0])
    return (float(ras[0]), float(ras[1]), float(ras[2]))


def box_from_ras(
    volume_node: Any, plane: SlicePlane, corner_a: Sequence[float], corner_b: Sequence[float]
) -> tuple[float, float, float, float]:
    """The pixel box (x0, y0, x1, y1) of the RAS box with opposite corners ``corner_a`` and ``corner_b``."""
    a = [float(v) for v in corner_a]
    b = [float(v) for v in corner_b]
    corners = [(x, y, z) for x in (a[0], b[0]) for y in (a[1], b[1]) for z in (a[2], b[2])]
    pixels = np.array([ras_to_pixel(volume_node, plane, c) for c in corners])
    rows, cols = plane.shape
    x0, y0 = np.maximum(pixels.min(axis=0), -0.5)
    x1, y1 = pixels.max(axis=0)
    x1, y1 = min(x1, cols - 0.5), min(y1, rows - 0.5)
    if not (x1 > x0 and y1 > y0):
        raise InputError(
            f"the box does not overlap the {plane.orientation} slice {plane.index} of '{_node_name(volume_node)}' "
            "in the image plane; draw the box over the structure"
        )
    return (float(x0), float(y0), float(x1), float(y1))


def box_from_roi(volume_node: Any, plane: SlicePlane, roi_node: Any) -> tuple[float, float, float, float]:
    """The pixel box (x0, y0, x1, y1) on ``plane`` covered by a markups ROI (its world bounding box)."""
    if roi_node is None or not roi_node.IsA("vtkMRMLMarkupsROINode"):
        raise InputError("box_from_roi needs a markups ROI node (vtkMRMLMarkupsROINode); draw a box with the ROI tool")
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)
    if not all(np.isfinite(bounds)) or bounds[1] < bounds[0]:
        raise InputError(f"ROI '{_node_name(roi_node)}' has no size yet; finish placing it first")
    return box_from_ras(volume_node, plane, bounds[0::2], bounds[1::2])


# ----- segment voxels ------------------------------------------------------------------------------
def _local_ijk_to_ras(volume_node: Any) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix


def _oriented_labelmap(volume_node: Any, voxels: np.ndarray, extent: Sequence[int]) -> Any:
    """A uint8 vtkOrientedImageData in the volume's frame holding ``voxels`` ((k, j, i) of ``extent``)."""
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*[int(v) for v in extent])
    image.SetImageToWorldMatrix(_local_ijk_to_ras(volume_node))
    data = np.ascontiguousarray(voxels, dtype=np.uint8).ravel()
    image.GetPointData().SetScalars(numpy_to_vtk(data, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    return image


def _segment(segmentation_node: Any, segment_id: str) -> Any:
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("a segmentation node (vtkMRMLSegmentationNode) is needed; create one in Segment Editor")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise InputError(
            f"segment '{segment_id}' does not exist in segmentation '{_node_name(segmentation_node)}'; "
            "select or add a segment first"
        )
    return segment


def _prepare_segmentation(segmentation_node: Any, volume_node: Any) -> None:
    """Make sure the segmentation stores binary labelmaps and has a reference geometry."""
    segmentation = segmentation_node.GetSegmentation()
    labelmap = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if segmentation.GetNumberOfSegments() > 0 and segmentation.GetSourceRepresentationName() != labelmap:
        raise InputError(
            f"segmentation '{_node_name(segmentation_node)}' is stored as "
            f"'{segmentation.GetSourceRepresentationName()}', not as a binary labelmap; open it in Segment Editor "
            "once (it offers the conversion) and try again"
        )
    geometry_key = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    if not segmentation.GetConversionParameter(geometry_key):
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)


def read_segment(segmentation_node: Any, segment_id: str, volume_node: Any) -> np.ndarray:
    """A segment's voxels resampled onto the volume's grid, as a (k, j, i) bool array."""
    _segment(segmentation_node, segment_id)
    shape = _volume_shape(volume_node)
    stored = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, stored)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
    reference.SetImageToWorldMatrix(_local_ijk_to_ras(volume_node))
    extent = stored.GetExtent()
    if stored.GetPointData().GetScalars() is None or extent[1] < extent[0]:
        return np.zeros(shape, dtype=bool)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(stored, reference, resampled, False, True)
    out_extent = resampled.GetExtent()
    if tuple(out_extent) != (0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1):
        raise RuntimeError(f"resampling the segment gave extent {out_extent}, expected the volume's {shape}")
    return vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(shape) > 0


def _write_segment(segmentation_node: Any, segment_id: str, volume_node: Any, voxels: np.ndarray) -> None:
    shape = _volume_shape(volume_node)
    image = _oriented_labelmap(volume_node, voxels, (0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise RuntimeError(f"Slicer could not write segment '{segment_id}' of '{_node_name(segmentation_node)}'")


def commit_mask(segmentation_node: Any, segment_id: str, volume_node: Any, plane: SlicePlane, mask: np.ndarray) -> None:
    """Replace the segment on ``plane``'s slice by ``mask`` (rows, cols); other slices and segments stay."""
    _segment(segmentation_node, segment_id)
    _check_plane(volume_node, plane)
    mask = np.asarray(mask)
    if tuple(mask.shape) != plane.shape:
        raise InputError(f"mask of shape {mask.shape} does not fit the {plane.orientation} slice of shape {plane.shape}")
    _prepare_segmentation(segmentation_node, volume_node)
    voxels = read_segment(segmentation_node, segment_id, volume_node)
    plane.insert(voxels, mask.astype(bool))
    _write_segment(segmentation_node, segment_id, volume_node, voxels)


def commit_volume_mask(
    segmentation_node: Any,
    segment_id: str,
    volume_node: Any,
    mask3d: np.ndarray,
    planes_touched: Sequence[SlicePlane] | None = None,
) -> None:
    """Write a (k, j, i) mask into the segment: only the slices in ``planes_touched``, or all of it when None."""
    _segment(segmentation_node, segment_id)
    shape = _volume_shape(volume_node)
    mask3d = np.asarray(mask3d)
    if tuple(mask3d.shape) != shape:
        raise InputError(f"mask of shape {mask3d.shape} does not fit volume '{_node_name(volume_node)}' of shape {shape}")
    _prepare_segmentation(segmentation_node, volume_node)
    if planes_touched is None:
        voxels = mask3d.astype(bool)
    else:
        voxels = read_segment(segmentation_node, segment_id, volume_node)
        for plane in planes_touched:
            _check_plane(volume_node, plane)
            plane.insert(voxels, plane.extract(mask3d).astype(bool))
    _write_segment(segmentation_node, segment_id, volume_node, voxels)


def terminology_string(structure: str | None) -> str:
    """Slicer's TerminologyEntry tag for a free-text structure name (codes from ``io.dicom_seg.terminology_for``)."""
    from .io.dicom_seg import terminology_for

    terms = terminology_for(structure)
    entry = slicer.vtkSlicerTerminologyEntry()
    entry.SetTerminologyContextName(TERMINOLOGY_CONTEXT)
    entry.SetRegionContextName(REGION_CONTEXT)
    for target, code in ((entry.GetCategoryObject(), terms.category), (entry.GetTypeObject(), terms.type),
                         (entry.GetRegionObject(), terms.region)):
        if code is None:
            continue
        target.SetCodingSchemeDesignator(code.scheme_designator)
        target.SetCodeValue(code.value)
        target.SetCodeMeaning(code.meaning)
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry)


def tag_spa_segment(segmentation_node: Any, segment_id: str, structure: str | None) -> None:
    """Mark a segment as made by SPA (DICOM algorithm tags) and, when a structure is named, set its terminology."""
    segment = _segment(segmentation_node, segment_id)
    segment.SetTag(ALGORITHM_TYPE_TAG, "SEMIAUTOMATIC")
    segment.SetTag(ALGORITHM_NAME_TAG, "SPA")
    if structure or not segment.HasTerminology():
        segment.SetTerminology(terminology_string(structure))


class SegmentUndo:
    """Slicer's own undo for a segmentation: a vtkSegmentationHistory, or the Segment Editor logic's."""

    def __init__(self, segmentation_node: Any, *, editor_logic: Any = None, max_states: int = 20) -> None:
        self.segmentation_node = segmentation_node
        self.editor_logic = editor_logic
        self.history = None
        if editor_logic is None:
            self.history = slicer.vtkSegmentationHistory()
            self.history.SetMaximumNumberOfStates(int(max_states))
            self.history.SetSegmentation(segmentation_node.GetSegmentation())

    def save(self) -> None:
        """Remember the segmentation as it is now, before a change."""
        if self.editor_logic is not None:
            self.editor_logic.SaveStateForUndo()
        else:
            self.history.SaveState()

    @property
    def can_undo(self) -> bool:
        """True when a saved state is there to go back to."""
        if self.editor_logic is not None:
            return bool(self.editor_logic.CanUndo())
        return bool(self.history.IsRestorePreviousStateAvailable())

    @property
    def can_redo(self) -> bool:
        """True when an undone change can be re-applied."""
        if self.editor_logic is not None:
            return bool(self.editor_logic.CanRedo())
        return bool(self.history.IsRestoreNextStateAvailable())

    def undo(self) -> bool:
        """Go back to the previous saved state; False when there is none."""
        if not self.can_undo:
            return False
        if self.editor_logic is not None:
            self.editor_logic.Undo()
            return True
        return bool(self.history.RestorePreviousState())

    def redo(self) -> bool:
        """Re-apply the change undone last; False when there is none."""
        if not self.can_redo:
            return False
        if self.editor_logic is not None:
            self.editor_logic.Redo()
            return True
        return bool(self.history.RestoreNextState())


# ----- the candidate preview -----------------------------------------------------------------------
class CandidateOverlay:
    """The preview of one round on one slice, in its own segmentation node (never the user's).

    Segments: "Recommended" (outline, RECOMMENDED_COLOUR); for candidate k (shown as k + 1):
    "Candidate k+1 adds" (filled, CANDIDATE_COLOURS[k]) and "Candidate k+1 removes" (outline only,
    the same colour darkened by REMOVES_SHADE, so adds and removes of one candidate share a hue).
    """

    RECOMMENDED_ID = "SPA_recommended"

    def __init__(self, scene: Any, volume_node: Any, name: str = "SPA preview") -> None:
        self.scene = scene
        self.volume_node = volume_node
        self.node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        self.node.SetSaveWithScene(False)
        self.node.SetHideFromEditors(True)
        self.node.SetAttribute(PREVIEW_ATTRIBUTE, "1")
        self.node.CreateDefaultDisplayNodes()
        self.node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        display = self.node.GetDisplayNode()
        display.SetVisibility3D(False)
        display.SetSliceIntersectionThickness(PREVIEW_OUTLINE_PX)
        segmentation = self.node.GetSegmentation()
        segmentation.AddEmptySegment(self.RECOMMENDED_ID, "Recommended", list(RECOMMENDED_COLOUR))
        display.SetSegmentVisibility2DFill(self.RECOMMENDED_ID, False)
        display.SetSegmentVisibility2DOutline(self.RECOMMENDED_ID, True)
        for k, colour in enumerate(CANDIDATE_COLOURS):
            segmentation.AddEmptySegment(self.adds_id(k), f"Candidate {k + 1} adds", list(colour))
            display.SetSegmentVisibility2DFill(self.adds_id(k), True)
            display.SetSegmentVisibility2DOutline(self.adds_id(k), True)
            segmentation.AddEmptySegment(self.removes_id(k), f"Candidate {k + 1} removes", list(removes_colour(k)))
            display.SetSegmentVisibility2DFill(self.removes_id(k), False)
            display.SetSegmentVisibility2DOutline(self.removes_id(k), True)
        self.set_opacity(DEFAULT_PREVIEW_OPACITY)
        self._plane: SlicePlane | None = None
        self._differences: np.ndarray | None = None

    @staticmethod
    def adds_id(k: int) -> str:
        """Segment id of candidate k's (0-based) "adds" region."""
        return f"SPA_candidate_{k + 1}_adds"

    @staticmethod
    def removes_id(k: int) -> str:
        """Segment id of candidate k's (0-based) "removes" region."""
        return f"SPA_candidate_{k + 1}_removes"

    @property
    def plane(self) -> SlicePlane | None:
        """The slice shown now, or None when the preview is empty."""
        return self._plane

    def _write_slice(self, segment_id: str, plane: SlicePlane, mask: np.ndarray | None) -> None:
        """Replace a preview segment by ``mask`` on ``plane``'s slice only (None: empty it)."""
        if mask is None or not mask.any():
            self.node.GetSegmentation().ClearSegment(segment_id)
            return
        extent = [0, plane.volume_shape[2] - 1, 0, plane.volume_shape[1] - 1, 0, plane.volume_shape[0] - 1]
        ijk_axis = 2 - plane.slice_axis
        extent[2 * ijk_axis] = extent[2 * ijk_axis + 1] = plane.index
        slab_shape = list(plane.volume_shape)
        slab_shape[plane.slice_axis] = 1
        slab = np.zeros(slab_shape, dtype=np.uint8)
        plane.at(plane.index)  # validates the index
        replace(plane, index=0, n_slices=1, volume_shape=tuple(slab_shape)).insert(slab, mask.astype(np.uint8))
        image = _oriented_labelmap(self.volume_node, slab, extent)
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.SetBinaryLabelmapToSegment(image, self.node, segment_id, logic.MODE_REPLACE):
            raise RuntimeError(f"Slicer could not write preview segment '{segment_id}'")

    def show(self, round_: Round, plane: SlicePlane) -> None:
        """Show a round on ``plane``: recommended outline, each candidate's adds (filled) and removes (outline)."""
        _check_plane(self.volume_node, plane)
        if tuple(round_.recommended.shape) != plane.shape:
            raise InputError(f"the round is {round_.recommended.shape} pixels but the slice is {plane.shape}")
        differences = np.asarray(round_.differences)
        regions: dict[str, np.ndarray | None] = {}
        for k in range(len(CANDIDATE_COLOURS)):
            shown = k < differences.shape[0]
            regions[self.adds_id(k)] = differences[k] > 0 if shown else None
            regions[self.removes_id(k)] = differences[k] < 0 if shown else None
        was_modifying = self.node.StartModify()
        try:
            self._write_slice(self.RECOMMENDED_ID, plane, np.asarray(round_.recommended, dtype=bool))
            for segment_id, mask in regions.items():
                self._write_slice(segment_id, plane, mask)
            self._stack_smallest_on_top({segment_id: 0 if mask is None else int(np.count_nonzero(mask))
                                         for segment_id, mask in regions.items()})
        finally:
            self.node.EndModify(was_modifying)
        self.node.Modified()  # emptied segments fire no event of their own; views must redraw them too
        self.node.GetDisplayNode().SetVisibility(True)
        self._plane = plane
        self._differences = differences.copy()

    def _stack_smallest_on_top(self, sizes: dict[str, int]) -> None:
        """Order the preview segments so that slice views draw larger regions first and the recommended
        outline last: a candidate's region nested in another's stays visible (and is what a click there
        picks, see ``candidate_at``). ``sizes``: pixels of each candidate segment."""
        order = sorted(sizes, key=lambda segment_id: -sizes[segment_id]) + [self.RECOMMENDED_ID]
        segmentation = self.node.GetSegmentation()
        for index, segment_id in enumerate(order):
            segmentation.SetSegmentIndex(segment_id, index)

    def set_opacity(self, opacity: float) -> None:
        """Fill opacity of the preview in slice views (0..1); outlines stay more visible than fills."""
        opacity = float(opacity)
        if not 0.0 <= opacity <= 1.0:
            raise InputError(f"opacity must be between 0 and 1, got {opacity:g}")
        display = self.node.GetDisplayNode()
        display.SetOpacity2DFill(opacity)
        display.SetOpacity2DOutline(min(1.0, 2.0 * opacity))

    def candidate_at(self, plane: SlicePlane, xy: Sequence[float]) -> int | None:
        """The candidate (0-based) whose adds/removes region holds pixel ``xy`` on ``plane``; smallest region wins."""
        if self._differences is None or not plane.same_slice(self._plane):
            return None
        x, y = int(np.floor(float(xy[0]) + 0.5)), int(np.floor(float(xy[1]) + 0.5))
        rows, cols = plane.shape
        if not (0 <= x < cols and 0 <= y < rows):
            return None
        hits = [k for k in range(self._differences.shape[0]) if self._differences[k, y, x] != 0]
        if not hits:
            return None
        return min(hits, key=lambda k: (int(np.count_nonzero(self._differences[k])), k))

    def clear(self) -> None:
        """Empty every preview segment."""
        segmentation = self.node.GetSegmentation()
        was_modifying = self.node.StartModify()
        try:
            for index in range(segmentation.GetNumberOfSegments()):
                segmentation.ClearSegment(segmentation.GetNthSegmentID(index))
        finally:
            self.node.EndModify(was_modifying)
        self.node.Modified()  # ClearSegment alone does not make slice views redraw
        self._plane = None
        self._differences = None

    def remove(self) -> None:
        """Take the preview node (and its display node) out of the scene."""
        if self.node is None:
            return
        display = self.node.GetDisplayNode()
        self.scene.RemoveNode(self.node)
        if display is not None and self.scene.IsNodePresent(display):
            self.scene.RemoveNode(display)
        self.node = None
        self._plane = None
        self._differences = None


# ----- one interactive segmentation in a scene -----------------------------------------------------
class SceneSession:
    """One interactive SPA segmentation in a scene: MRML glue around :class:`Session`, no Qt.

    ``compute_*`` only read the volume and run the model, so they may run on the model worker
    thread; everything else touches MRML and belongs on the main thread. ``start``/``choose`` are
    compute + show in one call, for tests and scripts.
    """

    def __init__(
        self,
        scene: Any,
        model: Any,
        volume_node: Any,
        segmentation_node: Any,
        segment_id: str,
        *,
        profiles: "ProfileStore | None" = None,
        user: str | None = None,
        structure: str | None = None,
        seed: int = 0,
        n_samples: int = DEFAULT_SAMPLES,
        embeddings: Any = None,
        undo: SegmentUndo | None = None,
        window: tuple[float, float] | None = None,
    ) -> None:
        _segment(segmentation_node, segment_id)
        _volume_shape(volume_node)
        if (user is None) != (structure is None) and profiles is not None:
            raise InputError("a preference profile needs both a user and a structure name; give both or neither")
        self.scene = scene
        self.model = model
        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.segment_id = segment_id
        self.profiles = profiles
        self.user = user
        self.structure = structure
        self.seed = int(seed)
        self.n_samples = int(n_samples)
        self.embeddings = embeddings
        self.window = window
        self.undo = undo if undo is not None else SegmentUndo(segmentation_node)
        self.overlay = CandidateOverlay(scene, volume_node)
        self.plane: SlicePlane | None = None
        self.session: Session | None = None
        self.accepted_mask: np.ndarray | None = None  # the last accepted slice mask (start of propagation)
        self.accepted_weights: np.ndarray | None = None  # the mixture weights it was accepted with

    @property
    def uses_profile(self) -> bool:
        """True when accepting updates a preference profile."""
        return self.profiles is not None and self.user is not None and self.structure is not None

    def initial_weights(self) -> np.ndarray | None:
        """The user's profile weights for this structure, or None (uniform start)."""
        if not self.uses_profile:
            return None
        weights = self.profiles.initial_weights(self.user, self.structure)
        return None if weights is None else weights.numpy()

    # ----- compute (worker thread) -----
    def compute_start(
        self,
        orientation: str,
        point_ras: Sequence[float] | None = None,
        roi_node: Any = None,
        box_ras: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> Round:
        """First round on the ``orientation`` slice through the prompt: a point, a ROI node or a RAS box (two corners)."""
        if point_ras is None and roi_node is None and box_ras is None:
            raise InputError("start needs a point inside the structure or a box (ROI) around it")
        if roi_node is not None and box_ras is not None:
            raise InputError("give either a ROI node or a RAS box, not both")
        if point_ras is not None:
            anchor = [float(v) for v in point_ras]
        elif roi_node is not None:
            anchor = [0.0, 0.0, 0.0]
            roi_node.GetCenterWorld(anchor)
        else:
            anchor = [(float(a) + float(b)) / 2.0 for a, b in zip(box_ras[0], box_ras[1])]
        plane = plane_through(self.volume_node, orientation, anchor)
        point = None if point_ras is None else ras_to_pixel(self.volume_node, plane, point_ras)
        box = None
        if roi_node is not None:
            box = box_from_roi(self.volume_node, plane, roi_node)
        elif box_ras is not None:
            box = box_from_ras(self.volume_node, plane, box_ras[0], box_ras[1])
        image = plane.extract(volume_array(self.volume_node))
        embedding = None if self.embeddings is None else self.embeddings.get(image, window=self.window)
        session = Session(self.model, image, seed=self.seed, n_samples=self.n_samples,
                          initial_weights=self.initial_weights(), window=self.window, embedding=embedding)
        round_ = session.start(point=point, box=box)
        self.session, self.plane = session, plane
        return round_

    def compute_choose(self, k: int) -> Round:
        """The next round after the user picked candidate ``k`` (0-based)."""
        return self._require_session().choose(k)

    # ----- main thread -----
    def show(self, round_: Round) -> None:
        """Show a round in the preview on the current slice."""
        if self.plane is None:
            raise InputError("nothing to show; start a segmentation first")
        self.overlay.show(round_, self.plane)

    def start(
        self,
        orientation: str,
        point_ras: Sequence[float] | None = None,
        roi_node: Any = None,
        box_ras: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> Round:
        """compute_start + show."""
        round_ = self.compute_start(orientation, point_ras=point_ras, roi_node=roi_node, box_ras=box_ras)
        self.show(round_)
        return round_

    def choose(self, k: int) -> Round:
        """compute_choose + show."""
        round_ = self.compute_choose(k)
        self.show(round_)
        return round_

    def candidate_at_ras(self, ras: Sequence[float]) -> int | None:
        """The candidate (0-based) whose preview region holds the RAS point on the current slice, or None."""
        if self.plane is None:
            return None
        if plane_through(self.volume_node, self.plane.orientation, ras).index != self.plane.index:
            return None
        return self.overlay.candidate_at(self.plane, ras_to_pixel(self.volume_node, self.plane, ras))

    def undo_round(self) -> Round | None:
        """Go back one round and show it; None when already at the first round (nothing changes)."""
        session = self.session
        if session is None or session.current is None or session.current.index <= 1:
            return None
        round_ = session.undo()
        self.show(round_)
        return round_

    def accept(self) -> None:
        """Commit the recommended mask into the segment (one undo step), tag it, update the profile, clear the preview."""
        session = self._require_session()
        round_ = session.current
        mask = session.accept()
        self.undo.save()
        commit_mask(self.segmentation_node, self.segment_id, self.volume_node, self.plane, mask)
        tag_spa_segment(self.segmentation_node, self.segment_id, self.structure)
        self.overlay.clear()
        self.accepted_mask = mask
        self.accepted_weights = session.mixture.weights.detach().cpu().numpy().astype(np.float64)
        self.session = None
        # Last, so that a profile problem (reported as ProfileError) never leaves the commit half done.
        if self.uses_profile:
            self.profiles.update(self.user, self.structure, session.mixture, rounds=round_.index)

    def cancel(self) -> None:
        """Drop the current interaction: the preview goes, the segmentation is untouched."""
        self.overlay.clear()
        self.session = None

    def compute_propagate(
        self,
        progress: Callable[[int, int], bool] | None = None,
        max_slices: int | None = None,
        n_samples: int | None = None,
    ) -> "PropagationResult":
        """Carry the last accepted mask through neighbouring slices (worker thread; nothing is written).

        ``progress(done, total_estimate)`` returning False cancels; ``max_slices`` caps each direction;
        ``n_samples`` masks are sampled per slice (default: the session's).
        """
        from .propagation import propagate

        if self.accepted_mask is None or self.plane is None:
            raise InputError("accept a segmentation on one slice first; propagation starts from it")
        plane = self.plane
        volume = volume_array(self.volume_node)
        return propagate(
            self.model,
            lambda index: plane.at(index).extract(volume),
            plane.index,
            self.accepted_mask,
            n_slices=plane.n_slices,
            initial_weights=self.accepted_weights,
            seed=self.seed,
            n_samples=self.n_samples if n_samples is None else int(n_samples),
            window=self.window,
            embeddings=self.embeddings,
            progress=progress,
            max_slices=max_slices,
        )

    def apply_propagation(self, result: "PropagationResult") -> None:
        """Write a propagation's slices into the segment as one undo step (other slices unchanged)."""
        if self.plane is None:
            raise InputError("there is no slice to propagate from; start and accept a segmentation first")
        if not result.masks:
            return
        shape = _volume_shape(self.volume_node)
        mask3d = np.zeros(shape, dtype=bool)
        planes = []
        for index, mask in sorted(result.masks.items()):
            plane = self.plane.at(index)
            plane.insert(mask3d, np.asarray(mask, dtype=bool))
            planes.append(plane)
        self.undo.save()
        commit_volume_mask(self.segmentation_node, self.segment_id, self.volume_node, mask3d, planes)
        tag_spa_segment(self.segmentation_node, self.segment_id, self.structure)

    def close(self) -> None:
        """End the session and take the preview node out of the scene."""
        self.session = None
        self.overlay.remove()

    def _require_session(self) -> Session:
        if self.session is None or self.session.current is None:
            raise InputError("no SPA segmentation in progress; click inside the structure to start one")
        return self.session
