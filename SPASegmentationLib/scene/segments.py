"""Segment voxels: read and write a segment on the volume's grid, tag it as SPA's, and undo.

- Segment voxels are read and written in the volume's own frame, so a segmentation must sit under
  the same transform as its volume (both untransformed in the usual case).
- Commits read the segment on the volume's grid, change the requested slices and write it back
  (``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment``, which moves overlapping
  segments to their own layer), so other slices and other segments keep their voxels.
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


def _local_ijk_to_ras(volume_node: Any) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix


def oriented_labelmap(volume_node: Any, voxels: np.ndarray, extent: Sequence[int]) -> Any:
    """A uint8 vtkOrientedImageData in the volume's frame holding ``voxels`` ((k, j, i) of ``extent``)."""
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*[int(v) for v in extent])
    image.SetImageToWorldMatrix(_local_ijk_to_ras(volume_node))
    data = np.ascontiguousarray(voxels, dtype=np.uint8).ravel()
    image.GetPointData().SetScalars(numpy_to_vtk(data, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
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


def read_segment(segmentation_node: Any, segment_id: str, volume_node: Any) -> np.ndarray:
    """A segment's voxels resampled onto the volume's grid, as a (k, j, i) bool array."""
    require_segment(segmentation_node, segment_id)
    shape = volume_shape(volume_node)
    stored = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, stored)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
    reference.SetImageToWorldMatrix(_local_ijk_to_ras(volume_node))
    extent = stored.GetExtent()
    if stored.GetPointData().GetScalars() is None or extent[1] < extent[0]:
        return np.zeros(shape, dtype=bool)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        stored, reference, resampled, False, True
    )
    out_extent = resampled.GetExtent()
    if tuple(out_extent) != (0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1):
        raise RuntimeError(f"resampling the segment gave extent {out_extent}, expected the volume's {shape}")
    return vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(shape) > 0


def _write_segment(segmentation_node: Any, segment_id: str, volume_node: Any, voxels: np.ndarray) -> None:
    shape = volume_shape(volume_node)
    image = oriented_labelmap(volume_node, voxels, (0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1))
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
    require_segment(segmentation_node, segment_id)
    shape = volume_shape(volume_node)
    mask3d = np.asarray(mask3d)
    if tuple(mask3d.shape) != shape:
        raise InputError(
            f"mask of shape {mask3d.shape} does not fit volume '{node_name(volume_node)}' of shape {shape}"
        )
    _prepare_segmentation(segmentation_node, volume_node)
    if planes_touched is None:
        voxels = mask3d.astype(bool)
    else:
        voxels = read_segment(segmentation_node, segment_id, volume_node)
        for plane in planes_touched:
            check_plane(volume_node, plane)
            plane.insert(voxels, plane.extract(mask3d).astype(bool))
    _write_segment(segmentation_node, segment_id, volume_node, voxels)


def terminology_string(structure: str | None) -> str:
    """Slicer's TerminologyEntry tag for a free-text structure name (codes from ``io.terminology.terminology_for``)."""
    from ..io.terminology import terminology_for

    terms = terminology_for(structure)
    entry = slicer.vtkSlicerTerminologyEntry()
    entry.SetTerminologyContextName(TERMINOLOGY_CONTEXT)
    entry.SetRegionContextName(REGION_CONTEXT)
    for target, code in (
        (entry.GetCategoryObject(), terms.category),
        (entry.GetTypeObject(), terms.type),
        (entry.GetRegionObject(), terms.region),
    ):
        if code is None:
            continue
        target.SetCodingSchemeDesignator(code.scheme_designator)
        target.SetCodeValue(code.value)
        target.SetCodeMeaning(code.meaning)
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry)


def tag_spa_segment(segmentation_node: Any, segment_id: str, structure: str | None) -> None:
    """Mark a segment as made by SPA (DICOM algorithm tags) and, when a structure is named, set its terminology."""
    segment = require_segment(segmentation_node, segment_id)
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
