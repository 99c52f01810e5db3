"""Fixtures and builders for tests against real MRML (the headless slicer-core wheel).

    from mrml import add_volume, add_segmentation   # in a test module under Testing/; mrml_scene is a fixture

``mrml_scene`` is a fresh ``vtkMRMLScene`` with the application and segmentations logic attached
(without them segmentations cannot create binary labelmaps) and ``slicer.mrmlScene`` pointing at it
for the duration of the test. The whole module is skipped where slicer-core is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
from vtk.util.numpy_support import numpy_to_vtk  # noqa: E402

# IJK→RAS direction matrices (columns: RAS direction of i, j, k).
RAS_DIRECTIONS = np.eye(3)
# A typical axial DICOM series: i towards patient left, j towards posterior, k towards superior.
LPS_DIRECTIONS = np.diag([-1.0, -1.0, 1.0])
# A sagittal DICOM acquisition: i towards posterior, j towards inferior, k towards patient left.
SAGITTAL_DIRECTIONS = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])

_LOGICS: dict[int, tuple[Any, Any]] = {}
_COLOUR_LOGICS: dict[int, Any] = {}


def new_scene() -> Any:
    """A vtkMRMLScene bootstrapped for segmentations (application + segmentations logic attached)."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    segmentations_logic.SetMRMLApplicationLogic(app_logic)
    _LOGICS[id(scene)] = (app_logic, segmentations_logic)
    return scene


def add_colour_tables(scene: Any) -> Any:
    """Add Slicer's default colour tables (the Grey table volumes display with) to ``scene``; returns the logic."""
    logic = slicer.vtkMRMLColorLogic()
    logic.SetMRMLScene(scene)
    _COLOUR_LOGICS[id(scene)] = logic  # the tables only work while the logic lives
    return logic


def app_logic_of(scene: Any) -> Any:
    """The vtkSlicerApplicationLogic that :func:`new_scene` attached to ``scene``."""
    return _LOGICS[id(scene)][0]


def segmentations_logic_of(scene: Any) -> Any:
    """The vtkSlicerSegmentationsModuleLogic that :func:`new_scene` attached to ``scene``."""
    return _LOGICS[id(scene)][1]


@contextmanager
def installed_scene() -> Iterator[Any]:
    """A fresh bootstrapped scene, installed as ``slicer.mrmlScene`` inside the block (the ``mrml_scene`` fixture)."""
    scene = new_scene()
    missing = object()
    previous = getattr(slicer, "mrmlScene", missing)
    slicer.mrmlScene = scene
    try:
        yield scene
    finally:
        if previous is missing:
            del slicer.mrmlScene
        else:
            slicer.mrmlScene = previous
        scene.Clear(1)
        _LOGICS.pop(id(scene), None)
        _COLOUR_LOGICS.pop(id(scene), None)


def add_volume(
    scene: Any,
    array: np.ndarray,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    directions: np.ndarray = RAS_DIRECTIONS,
    name: str = "volume",
) -> Any:
    """A scalar volume node holding a (k, j, i) array with the given IJK→RAS geometry."""
    array = np.ascontiguousarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a (k, j, i) array, got shape {array.shape}")
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    node.SetSpacing(*[float(v) for v in spacing])
    node.SetOrigin(*[float(v) for v in origin])
    d = np.asarray(directions, dtype=float)
    node.SetIJKToRASDirections(*[float(d[r, c]) for r in range(3) for c in range(3)])
    node.CreateDefaultDisplayNodes()
    return node


def voxel_ras(volume_node: Any, kji: Sequence[float]) -> tuple[float, float, float]:
    """RAS position of the voxel centre at array index (k, j, i)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    point = matrix.MultiplyPoint([float(kji[2]), float(kji[1]), float(kji[0]), 1.0])
    return (point[0], point[1], point[2])


def segment_tag(segment: Any, key: str) -> str | None:
    """A segment's tag value (e.g. DICOM.SegmentAlgorithmType), or None when it is not set."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(key, value) else None


def add_segmentation(scene: Any, volume_node: Any | None = None, name: str = "segmentation") -> Any:
    """An empty segmentation node (display node included), with the volume as reference geometry."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    if volume_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return node


def add_segment(
    segmentation_node: Any,
    name: str,
    mask: np.ndarray | None = None,
    volume_node: Any | None = None,
    colour: Sequence[float] = (0.5, 0.7, 0.3),
) -> str:
    """Add a segment (empty, or holding a (k, j, i) mask on the volume's grid); return its id."""
    segment_id = segmentation_node.GetSegmentation().AddEmptySegment("", name, list(colour))
    if mask is not None:
        if volume_node is None:
            raise ValueError("a mask needs the volume whose grid it is on")
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
        matrix = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(matrix)
        image.SetImageToWorldMatrix(matrix)
        data = np.ascontiguousarray(mask, dtype=np.uint8).ravel()
        image.GetPointData().SetScalars(numpy_to_vtk(data, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE):
            raise RuntimeError(f"could not fill segment {name!r}")
    return segment_id


def segment_array_via_export(scene: Any, segmentation_node: Any, segment_id: str, volume_node: Any) -> np.ndarray:
    """A segment as a (k, j, i) bool array, read through Slicer's labelmap export (an independent path)."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__export__")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not segmentations_logic_of(scene).ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, volume_node
        ):
            raise RuntimeError("ExportSegmentsToLabelmapNode failed")
        image = labelmap.GetImageData()
        dims = image.GetDimensions()
        from vtk.util.numpy_support import vtk_to_numpy

        return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0]) > 0
    finally:
        scene.RemoveNode(labelmap)


def add_fiducial(scene: Any, ras: Sequence[float], name: str = "F") -> Any:
    """A point list markup with one control point at ``ras``."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.AddControlPoint(vtk.vtkVector3d(*[float(v) for v in ras]))
    return node


def add_roi(scene: Any, centre: Sequence[float], size: Sequence[float], name: str = "R") -> Any:
    """An axis-aligned markups ROI with the given centre and size (RAS, mm)."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    node.SetCenter(*[float(v) for v in centre])
    node.SetSize(*[float(v) for v in size])
    return node
