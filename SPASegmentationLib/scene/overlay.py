"""The candidate preview: one round drawn on one slice in its own segmentation node.

The preview lives in its own segmentation node ("SPA preview", not saved with the scene, hidden
from node selectors), holding only the shown slice. It sits under the volume's parent transform,
so it is drawn where the volume is, on the volume's voxel grid. Candidate k's colour (Okabe–Ito
palette) fills where it adds pixels; where it removes pixels only an outline in a darker shade of
the same colour is drawn, so the image under the recommendation stays visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import slicer

from ..errors import InputError
from ..palette import RECOMMENDED, rgb
from ..rounds import Round
from .geometry import SlicePlane, check_plane
from .segments import oriented_labelmap

RECOMMENDED_COLOUR: tuple[float, float, float] = rgb(RECOMMENDED)
CANDIDATE_COLOURS: tuple[tuple[float, float, float], ...] = (
    rgb("orange"),
    rgb("sky blue"),
    rgb("bluish green"),
    rgb("reddish purple"),
)
REMOVES_SHADE = 0.6  # "removes" outlines use the candidate's colour darkened by this factor
DEFAULT_PREVIEW_OPACITY = 0.5
PREVIEW_OUTLINE_PX = 2  # outline width in slice views: 1 px rims are hard to see on a CT slice
PREVIEW_ATTRIBUTE = "SPA.Preview"


def removes_colour(k: int) -> tuple[float, float, float]:
    """The outline colour of candidate ``k``'s "removes" region: its colour, darker."""
    return tuple(REMOVES_SHADE * c for c in CANDIDATE_COLOURS[k])  # type: ignore[return-value]


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
        self._follow_volume_transform()
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

    def _follow_volume_transform(self) -> None:
        """Put the preview under the volume's parent transform (none when the volume has none)."""
        transform_id = self.volume_node.GetTransformNodeID()
        if self.node.GetTransformNodeID() != transform_id:
            self.node.SetAndObserveTransformNodeID(transform_id)

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
        image = oriented_labelmap(self.volume_node, self.node, slab, extent)
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.SetBinaryLabelmapToSegment(image, self.node, segment_id, logic.MODE_REPLACE):
            raise RuntimeError(f"Slicer could not write preview segment '{segment_id}'")

    def show(self, round_: Round, plane: SlicePlane) -> None:
        """Show a round on ``plane``: recommended outline, each candidate's adds (filled) and removes (outline)."""
        check_plane(self.volume_node, plane)
        if tuple(round_.recommended.shape) != plane.shape:
            raise InputError(f"the round is {round_.recommended.shape} pixels but the slice is {plane.shape}")
        differences = np.asarray(round_.differences)
        regions: dict[str, np.ndarray | None] = {}
        for k in range(len(CANDIDATE_COLOURS)):
            shown = k < differences.shape[0]
            regions[self.adds_id(k)] = differences[k] > 0 if shown else None
            regions[self.removes_id(k)] = differences[k] < 0 if shown else None
        self._follow_volume_transform()  # the volume may have been moved under another transform since
        was_modifying = self.node.StartModify()
        try:
            self._write_slice(self.RECOMMENDED_ID, plane, np.asarray(round_.recommended, dtype=bool))
            for segment_id, mask in regions.items():
                self._write_slice(segment_id, plane, mask)
            self._stack_smallest_on_top(
                {segment_id: 0 if mask is None else int(np.count_nonzero(mask)) for segment_id, mask in regions.items()}
            )
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
