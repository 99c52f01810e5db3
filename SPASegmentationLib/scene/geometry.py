"""Slice geometry: a volume's voxels as the 2-D images Slicer's slice views show, and RAS ↔ pixel.

The lowest module of the package (no ``slicer`` import); the helpers the other modules share live
here. Conventions:

- ``volume_array`` gives the voxels as a (k, j, i) numpy array, as ``slicer.util.arrayFromVolume``.
- A :class:`SlicePlane` turns one voxel plane of that array into the 2-D image the way Slicer's
  slice view shows it: axial (Red) columns run towards patient left and rows towards posterior,
  coronal (Green) columns towards left and rows towards inferior, sagittal (Yellow) columns
  towards posterior and rows towards inferior (``vtkMRMLSliceNode`` default presets, screen y
  down). Volumes with flipped or permuted IJK axes (DICOM LPS, sagittal acquisitions) are handled;
  an oblique volume is sliced along the voxel plane closest to the view plane (no resampling).
- Pixel coordinates are (x, y) = (column, row) with pixel centres on integers, as in ``Session``.
- RAS coordinates are world coordinates: a linear parent transform of the volume is applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from ..errors import InputError
from ..service.protocol import PlaneSpec

ORIENTATIONS = ("axial", "coronal", "sagittal")

# Per orientation: (RAS axis of image columns, RAS axis of image rows, RAS axis of the slice normal).
# In every Slicer view both image columns and image rows run towards decreasing RAS coordinates.
_VIEW_AXES = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}


def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def node_name(node: Any) -> str:
    """A node's name for messages ("(unnamed)" when it has none)."""
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
                f"volume '{node_name(volume_node)}' is under a non-linear transform; harden the transform "
                "(Data module → right-click → Harden transform) and try again"
            )
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        result = _matrix_to_numpy(to_world) @ result
    return result


def volume_shape(volume_node: Any) -> tuple[int, int, int]:
    """The (k, j, i) shape of the volume's voxels; an InputError when it has none."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        raise InputError(f"volume '{node_name(volume_node)}' has no voxels; load the volume again")
    dims = image.GetDimensions()
    return (int(dims[2]), int(dims[1]), int(dims[0]))


def volume_array(volume_node: Any) -> np.ndarray:
    """The voxels as a (k, j, i) numpy view of the volume's image data (no copy)."""
    shape = volume_shape(volume_node)
    scalars = volume_node.GetImageData().GetPointData().GetScalars()
    if scalars is None or scalars.GetNumberOfComponents() != 1:
        raise InputError(
            f"volume '{node_name(volume_node)}' is not a single-channel scalar volume; "
            "convert it to scalar (Volumes module → Convert to scalar volume) first"
        )
    return vtk_to_numpy(scalars).reshape(shape)


def _axes_of(ijk_to_ras: np.ndarray, volume_node: Any) -> tuple[list[int], list[float]]:
    """For each RAS axis r: the IJK axis that runs most nearly along it, and that axis' sign."""
    directions = ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0, keepdims=True)
    dominant = np.argmax(np.abs(directions), axis=0)  # RAS axis of each IJK column
    if sorted(dominant.tolist()) != [0, 1, 2]:
        raise InputError(
            f"volume '{node_name(volume_node)}' is too oblique to slice along its voxel planes; "
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

    def spec(self) -> PlaneSpec:
        """The plane as the backends take it (which numpy axis and index, transposed, flipped)."""
        # the remaining axes come in numpy order (min, max); rows from the later axis means a transpose
        return PlaneSpec(self.slice_axis, self.index, self.row_axis > self.col_axis, self.flip_rows, self.flip_cols)

    def extract(self, volume: np.ndarray) -> np.ndarray:
        """The (rows, cols) image of this plane from the (k, j, i) array (a copy)."""
        self._check_volume(volume)
        return self.spec().extract(volume)

    def insert(self, volume: np.ndarray, image: np.ndarray) -> None:
        """Write a (rows, cols) image into this plane of the (k, j, i) array, in place."""
        self._check_volume(volume)
        image = np.asarray(image)
        if tuple(image.shape) != self.shape:
            raise InputError(
                f"image of shape {image.shape} does not fit the {self.orientation} plane of shape {self.shape}"
            )
        if self.flip_rows:
            image = image[::-1, :]
        if self.flip_cols:
            image = image[:, ::-1]
        if self.row_axis > self.col_axis:
            image = image.T
        volume[self._selector()] = image

    def at(self, index: int) -> SlicePlane:
        """The same orientation through another slice."""
        index = int(index)
        if not 0 <= index < self.n_slices:
            raise InputError(f"slice {index} does not exist; the {self.orientation} slices are 0..{self.n_slices - 1}")
        return replace(self, index=index)

    def same_slice(self, other: SlicePlane | None) -> bool:
        """True when ``other`` is this very slice of the same volume layout."""
        return other is not None and (other.orientation, other.slice_axis, other.index, other.volume_shape) == (
            self.orientation,
            self.slice_axis,
            self.index,
            self.volume_shape,
        )

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


def check_plane(volume_node: Any, plane: SlicePlane) -> None:
    """An InputError unless ``plane`` was made for a volume of this volume's shape."""
    shape = volume_shape(volume_node)
    if shape != tuple(plane.volume_shape):
        raise InputError(
            f"the slice plane was made for a volume of shape {plane.volume_shape} but '{node_name(volume_node)}' "
            f"has shape {shape}; make the plane from this volume with plane_through()"
        )


def plane_through(volume_node: Any, orientation: str, ras: Sequence[float]) -> SlicePlane:
    """The ``orientation`` slice of the volume that contains the RAS point ``ras``."""
    if orientation not in ORIENTATIONS:
        raise InputError(f"orientation must be one of {', '.join(ORIENTATIONS)}, not {orientation!r}")
    shape = volume_shape(volume_node)
    ijk_of_ras, sign_of_ras = _axes_of(ijk_to_ras_matrix(volume_node), volume_node)
    col_ras, row_ras, normal_ras = _VIEW_AXES[orientation]
    slice_axis = 2 - ijk_of_ras[normal_ras]
    kji = _ras_to_kji(volume_node, ras)
    index = int(np.floor(kji[slice_axis] + 0.5))
    n_slices = shape[slice_axis]
    if not 0 <= index < n_slices:
        raise InputError(
            f"RAS point ({', '.join(f'{float(v):g}' for v in ras)}) lies outside volume '{node_name(volume_node)}' "
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
    check_plane(volume_node, plane)
    return plane.pixel_of(_ras_to_kji(volume_node, ras))


def pixel_to_ras(volume_node: Any, plane: SlicePlane, xy: Sequence[float]) -> tuple[float, float, float]:
    """The RAS position of image point (x, y) on ``plane`` (exact inverse of :func:`ras_to_pixel`)."""
    check_plane(volume_node, plane)
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
            f"the box does not overlap the {plane.orientation} slice {plane.index} of '{node_name(volume_node)}' "
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
        raise InputError(f"ROI '{node_name(roi_node)}' has no size yet; finish placing it first")
    return box_from_ras(volume_node, plane, bounds[0::2], bounds[1::2])
