"""Segment voxels: read and write a segment on the volume's grid, tag it as SPA's, and undo.

- Segment voxels are read and written on the volume's voxel grid. The labelmaps handed to Slicer
  are expressed in the segmentation node's own frame (through both nodes' linear parent
  transforms), so a segmentation under another transform than its volume still gets its voxels at
  the right place in the world.
- Only the voxels inside the volume are SPA's: reads crop the segment to the volume's grid, and
  commits keep whatever the segment holds outside it.
- Commits read the segment on the volume's grid, change the requested slices and write it back
  (``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment``, which moves overlapping
  segments to their own layer), so other slices and other segments keep their voxels.
- Labelmaps SPA builds name their scalars "ImageScalars", as ``vtkImageData.AllocateScalars`` does:
  Slicer's DICOM SEG export (QuantitativeReporting's ``isSegmentEmpty``) looks the array up by
  that name and takes a segment without it for empty.
- Terminology works with Slicer 5.10+ (``vtkSegment.SetTerminology``, ``Region*`` entry names) and
  with Slicer 5.8 (the "TerminologyEntry" tag, ``Anatomic*`` entry names), chosen by what the
  objects offer, never by version number.
- :class:`SegmentUndo` is Slicer's own undo (a segmentation history, or the Segment Editor's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

from ..errors import InputError
from .geometry import SlicePlane, check_plane, node_name, volume_shape

ALGORITHM_TYPE_TAG = "DICOM.SegmentAlgorithmType"
ALGORITHM_NAME_TAG = "DICOM.SegmentAlgorithmName"
TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"
SCALARS_NAME = "ImageScalars"  # the name vtkImageData.AllocateScalars gives; DICOM SEG export looks for it


def ijk_to_node_matrix(volume_node: Any, node: Any) -> vtk.vtkMatrix4x4:
    """The volume's IJK → ``node``'s local RAS matrix, through both nodes' parent transforms (linear only)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    if volume_node.GetTransformNodeID() == node.GetTransformNodeID():
        return matrix
    between = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
        volume_node.GetParentTransformNode(), node.GetParentTransformNode(), between
    ):
        raise InputError(
            f"'{node_name(volume_node)}' and '{node_name(node)}' are related by a non-linear transform; "
            "harden the transforms (Data module → right-click → Harden transform) and try again"
        )
    result = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(between, matrix, result)
    return result


def volume_extent(volume_node: Any) -> tuple[int, int, int, int, int, int]:
    """The IJK extent (i0, i1, j0, j1, k0, k1) of the volume's voxels."""
    shape = volume_shape(volume_node)
    return (0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)


def oriented_labelmap(volume_node: Any, node: Any, voxels: np.ndarray, extent: Sequence[int]) -> Any:
    """A uint8 vtkOrientedImageData on the volume's voxel grid, in ``node``'s frame, holding ``voxels``
    ((k, j, i) of the IJK ``extent``); its scalars are named "ImageScalars"."""
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*[int(v) for v in extent])
    image.SetImageToWorldMatrix(ijk_to_node_matrix(volume_node, node))
    data = np.ascontiguousarray(voxels, dtype=np.uint8).ravel()
    scalars = numpy_to_vtk(data, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    scalars.SetName(SCALARS_NAME)
    image.GetPointData().SetScalars(scalars)
    return image


def require_segment(segmentation_node: Any, segment_id: str) -> Any:
    """The segment ``segment_id`` of a segmentation node; an InputError when either is missing."""
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("a segmentation node (vtkMRMLSegmentationNode) is needed; create one in Segment Editor")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise InputError(
            f"segment '{segment_id}' does not exist in segmentation '{node_name(segmentation_node)}'; "
            "select or add a segment first"
        )
    return segment


def _prepare_segmentation(segmentation_node: Any, volume_node: Any) -> None:
    """Make sure the segmentation stores binary labelmaps and has a reference geometry."""
    segmentation = segmentation_node.GetSegmentation()
    labelmap = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if segmentation.GetNumberOfSegments() > 0 and segmentation.GetSourceRepresentationName() != labelmap:
        raise InputError(
            f"segmentation '{node_name(segmentation_node)}' is stored as "
            f"'{segmentation.GetSourceRepresentationName()}', not as a binary labelmap; open it in Segment Editor "
            "once (it offers the conversion) and try again"
        )
    geometry_key = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    if not segmentation.GetConversionParameter(geometry_key):
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)


def _is_empty_extent(extent: Sequence[int]) -> bool:
    return extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]


def _segment_on_volume_grid(
    segmentation_node: Any, segment_id: str, volume_node: Any, keep_outside: bool
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The segment resampled (nearest neighbour) onto the volume's voxel grid: (k, j, i) bool voxels and their
    IJK extent, which is the volume's, or with ``keep_outside`` the union of the volume's and the segment's."""
    extent = volume_extent(volume_node)
    stored = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, stored)
    if stored.GetPointData().GetScalars() is None or _is_empty_extent(stored.GetExtent()):
        return np.zeros(volume_shape(volume_node), dtype=bool), extent
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(*extent)
    reference.SetImageToWorldMatrix(ijk_to_node_matrix(volume_node, segmentation_node))
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        stored, reference, resampled, False, keep_outside
    ):
        raise RuntimeError(f"Slicer could not resample segment '{segment_id}' onto the volume's grid")
    out_extent = tuple(int(v) for v in resampled.GetExtent())
    dims = resampled.GetDimensions()
    voxels = vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0]) > 0
    return voxels, out_extent


def _starts(extent: Sequence[int]) -> tuple[int, int, int]:
    """The (k, j, i) volume index of element [0, 0, 0] of an array with IJK ``extent``."""
    return (int(extent[4]), int(extent[2]), int(extent[0]))


def _volume_block(extent: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """Where the volume's voxels lie in a (k, j, i) array of IJK ``extent`` (which must contain them)."""
    starts = _starts(extent)
    ends = (int(extent[5]) + 1, int(extent[3]) + 1, int(extent[1]) + 1)
    if any(start > 0 or end < size for start, end, size in zip(starts, ends, shape, strict=True)):
        raise RuntimeError(f"extent {tuple(extent)} does not contain the volume's voxels {tuple(shape)}")
    return tuple(slice(-start, size - start) for start, size in zip(starts, shape, strict=True))


def _crop_to_volume(voxels: np.ndarray, extent: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The part of (k, j, i) ``voxels`` (IJK ``extent``) on the volume's grid; volume voxels it misses are False."""
    out = np.zeros(tuple(shape), dtype=bool)
    target, source = [], []
    for start, n, size in zip(_starts(extent), voxels.shape, shape, strict=True):
        low, high = max(0, start), min(size, start + n)
        if high <= low:
            return out
        target.append(slice(low, high))
        source.append(slice(low - start, high - start))
    out[tuple(target)] = voxels[tuple(source)]
    return out


def read_segment(segmentation_node: Any, segment_id: str, volume_node: Any) -> np.ndarray:
    """A segment's voxels on the volume's grid, as a (k, j, i) bool array; voxels outside the volume are left out."""
    require_segment(segmentation_node, segment_id)
    voxels, extent = _segment_on_volume_grid(segmentation_node, segment_id, volume_node, keep_outside=False)
    return _crop_to_volume(voxels, extent, volume_shape(volume_node))


def _write_segment(
    segmentation_node: Any, segment_id: str, volume_node: Any, voxels: np.ndarray, extent: Sequence[int]
) -> None:
    """Replace the segment by ``voxels`` ((k, j, i) on the volume's grid, IJK ``extent``)."""
    image = oriented_labelmap(volume_node, segmentation_node, voxels, extent)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise RuntimeError(f"Slicer could not write segment '{segment_id}' of '{node_name(segmentation_node)}'")


def commit_mask(segmentation_node: Any, segment_id: str, volume_node: Any, plane: SlicePlane, mask: np.ndarray) -> None:
    """Replace the segment on ``plane``'s slice by ``mask`` (rows, cols); other slices and segments stay."""
    require_segment(segmentation_node, segment_id)
    check_plane(volume_node, plane)
    mask = np.asarray(mask)
    if tuple(mask.shape) != plane.shape:
        raise InputError(
            f"mask of shape {mask.shape} does not fit the {plane.orientation} slice of shape {plane.shape}"
        )
    _prepare_segmentation(segmentation_node, volume_node)
    grid, extent = _segment_on_volume_grid(segmentation_node, segment_id, volume_node, keep_outside=True)
    plane.insert(grid[_volume_block(extent, plane.volume_shape)], mask.astype(bool))  # a view: writes into grid
    _write_segment(segmentation_node, segment_id, volume_node, grid, extent)


def commit_volume_mask(
    segmentation_node: Any,
    segment_id: str,
    volume_node: Any,
    mask3d: np.ndarray,
    planes_touched: Sequence[SlicePlane] | None = None,
) -> None:
    """Write a (k, j, i) mask into the segment: only the slices in ``planes_touched``, or the whole volume when None
    (the segment's voxels outside the volume stay)."""
    require_segment(segmentation_node, segment_id)
    shape = volume_shape(volume_node)
    mask3d = np.asarray(mask3d)
    if tuple(mask3d.shape) != shape:
        raise InputError(
            f"mask of shape {mask3d.shape} does not fit volume '{node_name(volume_node)}' of shape {shape}"
        )
    for plane in planes_touched or ():
        check_plane(volume_node, plane)
    _prepare_segmentation(segmentation_node, volume_node)
    grid, extent = _segment_on_volume_grid(segmentation_node, segment_id, volume_node, keep_outside=True)
    voxels = grid[_volume_block(extent, shape)]  # a view: writes go into grid
    if planes_touched is None:
        voxels[...] = mask3d.astype(bool)
    else:
        for plane in planes_touched:
            plane.insert(voxels, plane.extract(mask3d).astype(bool))
    _write_segment(segmentation_node, segment_id, volume_node, grid, extent)


# ----- terminology: Slicer 5.10+ and Slicer 5.8 ----------------------------------------------------
def _set_code(target: Any, code: Any) -> None:
    """Copy a pydicom Code into a vtkSlicerTerminologyType / Category (nothing when ``code`` is None)."""
    if code is None:
        return
    target.SetCodingSchemeDesignator(code.scheme_designator)
    target.SetCodeValue(code.value)
    target.SetCodeMeaning(code.meaning)


def set_entry_region(entry: Any, context_name: str, code: Any) -> None:
    """Set a vtkSlicerTerminologyEntry's region context and region code, with whichever names it offers."""
    if hasattr(entry, "SetRegionContextName") and hasattr(entry, "GetRegionObject"):
        entry.SetRegionContextName(context_name)  # Slicer 5.10+
        _set_code(entry.GetRegionObject(), code)
    else:
        set_entry_region_anatomic(entry, context_name, code)


def set_entry_region_anatomic(entry: Any, context_name: str, code: Any) -> None:
    """Slicer 5.8's way: the region is the entry's "anatomic" context and region object."""
    entry.SetAnatomicContextName(context_name)
    _set_code(entry.GetAnatomicRegionObject(), code)


def terminology_string(structure: str | None) -> str:
    """Slicer's TerminologyEntry tag for a free-text structure name (codes from ``io.terminology.terminology_for``).

    The format (the same in Slicer 5.8 and 5.10+): seven "~"-separated fields, terminology context,
    category, type, type modifier, region context, region, region modifier, each code "scheme^value^meaning".
    """
    from ..io.terminology import terminology_for

    terms = terminology_for(structure)
    entry = slicer.vtkSlicerTerminologyEntry()
    entry.SetTerminologyContextName(TERMINOLOGY_CONTEXT)
    _set_code(entry.GetCategoryObject(), terms.category)
    _set_code(entry.GetTypeObject(), terms.type)
    set_entry_region(entry, REGION_CONTEXT, terms.region)
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry)


def segment_has_terminology(segment: Any) -> bool:
    """True when the segment has a terminology that is not empty."""
    if hasattr(segment, "HasTerminology"):
        return bool(segment.HasTerminology())  # Slicer 5.10+
    return segment_has_terminology_tag(segment)


def segment_has_terminology_tag(segment: Any) -> bool:
    """Slicer 5.8's way: the segment's "TerminologyEntry" tag is set and not empty."""
    value = vtk.reference("")
    return bool(segment.GetTag(segment.GetTerminologyEntryTagName(), value)) and bool(str(value))


def set_segment_terminology(segment: Any, serialized: str) -> None:
    """Set a segment's terminology (a string as :func:`terminology_string` makes)."""
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(serialized)  # Slicer 5.10+
    else:
        set_segment_terminology_tag(segment, serialized)


def set_segment_terminology_tag(segment: Any, serialized: str) -> None:
    """Slicer 5.8's way: the terminology is the segment's "TerminologyEntry" tag."""
    segment.SetTag(segment.GetTerminologyEntryTagName(), serialized)


def tag_spa_segment(segmentation_node: Any, segment_id: str, structure: str | None) -> None:
    """Mark a segment as made by SPA (DICOM algorithm tags) and, when a structure is named, set its terminology."""
    segment = require_segment(segmentation_node, segment_id)
    segment.SetTag(ALGORITHM_TYPE_TAG, "SEMIAUTOMATIC")
    segment.SetTag(ALGORITHM_NAME_TAG, "SPA")
    if structure or not segment_has_terminology(segment):
        set_segment_terminology(segment, terminology_string(structure))


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
