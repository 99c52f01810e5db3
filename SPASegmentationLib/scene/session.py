"""One interactive SPA segmentation in a scene: :class:`SceneSession`, the MRML glue around a backend session.

The model runs behind a backend: ``SPAClient`` (``spa serve``, local or remote; the Slicer module's
way) or ``InProcessBackend`` (scripts and tests). Threads: MRML is read and written only on the
main thread. ``SceneSession`` copies the volume's voxels when it is made; ``prepare_start`` turns the
prompt into a slice plane and pixels (MRML, main thread); the ``compute_*`` calls use only that copy
and the backend, so they may run on a worker thread; everything else touches MRML.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..rounds import DEFAULT_SAMPLES, Round
from ..service.protocol import array_digest
from .geometry import (
    SlicePlane,
    box_from_ras,
    box_from_roi,
    plane_through,
    ras_to_pixel,
    volume_array,
    volume_shape,
)
from .overlay import CandidateOverlay
from .segments import SegmentUndo, commit_mask, commit_volume_mask, require_segment, tag_spa_segment


@dataclass(frozen=True)
class StartRequest:
    """A first prompt made ready on the main thread: the slice it is on and the pixels of the point and/or box."""

    plane: SlicePlane
    point: tuple[float, float] | None
    box: tuple[float, float, float, float] | None


class SceneSession:
    """One interactive SPA segmentation in a scene: MRML glue around a backend session, no Qt.

    ``backend`` is an ``SPAClient`` or an ``InProcessBackend`` acting for the user; with ``structure``
    (and ``use_profile``) the user's profile for it starts each session and takes each accepted one.
    ``start``/``choose`` are compute + show in one call, for tests and scripts.
    """

    def __init__(
        self,
        scene: Any,
        backend: Any,
        volume_node: Any,
        segmentation_node: Any,
        segment_id: str,
        *,
        structure: str | None = None,
        use_profile: bool = True,
        seed: int = 0,
        n_samples: int = DEFAULT_SAMPLES,
        undo: Any = None,
        window: tuple[float, float] | None = None,
    ) -> None:
        require_segment(segmentation_node, segment_id)
        volume_shape(volume_node)
        self.scene = scene
        self.backend = backend
        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.segment_id = segment_id
        self.structure = structure
        self.use_profile = bool(use_profile)
        self.seed = int(seed)
        self.n_samples = int(n_samples)
        self.window = window
        # The voxels the model sees: copied here (main thread), so that compute_* never read MRML.
        self.volume = np.array(volume_array(volume_node), copy=True)
        self._digest: str | None = None
        self.undo = undo if undo is not None else SegmentUndo(segmentation_node)
        self.overlay = CandidateOverlay(scene, volume_node)
        self.plane: SlicePlane | None = None
        self.session: Any = None  # the backend's session of the current interaction
        self.accepted_mask: np.ndarray | None = None  # the last accepted slice mask (start of propagation)
        self.accepted_weights: np.ndarray | None = None  # the mixture weights it was accepted with
        self.profile_error: str | None = None  # why the last accept could not update the profile, if it could not

    @property
    def digest(self) -> str:
        """The content hash of the volume copy (how the service knows it; computed once, off the main thread)."""
        if self._digest is None:
            self._digest = array_digest(self.volume)
        return self._digest

    # ----- main thread -----
    def prepare_start(
        self,
        orientation: str,
        point_ras: Sequence[float] | None = None,
        roi_node: Any = None,
        box_ras: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> StartRequest:
        """The slice through the prompt (``orientation``) and the prompt in its pixels: a point, a ROI node or a
        RAS box (two corners). Reads MRML: main thread."""
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
            anchor = [(float(a) + float(b)) / 2.0 for a, b in zip(box_ras[0], box_ras[1], strict=True)]
        plane = plane_through(self.volume_node, orientation, anchor)
        point = None if point_ras is None else ras_to_pixel(self.volume_node, plane, point_ras)
        box = None
        if roi_node is not None:
            box = box_from_roi(self.volume_node, plane, roi_node)
        elif box_ras is not None:
            box = box_from_ras(self.volume_node, plane, box_ras[0], box_ras[1])
        return StartRequest(plane, point, box)

    # ----- compute (worker thread: the volume copy and the backend only) -----
    def compute_start(self, request: StartRequest) -> Round:
        """First round of a prepared start."""
        session = self.backend.session(
            self.volume,
            plane=request.plane.spec(),
            structure=self.structure,
            use_profile=self.use_profile,
            seed=self.seed,
            n_samples=self.n_samples,
            window=self.window,
            digest=self.digest,
        )
        round_ = session.start(point=request.point, box=request.box)
        self.session, self.plane = session, request.plane
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
        """prepare_start + compute_start + show."""
        round_ = self.compute_start(
            self.prepare_start(orientation, point_ras=point_ras, roi_node=roi_node, box_ras=box_ras)
        )
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

    def compute_undo(self) -> Round | None:
        """The previous round (worker thread); None when already at the first round (nothing changes)."""
        session = self.session
        if session is None or session.current is None or session.current.index <= 1:
            return None
        return session.undo()

    def undo_round(self) -> Round | None:
        """compute_undo + show."""
        round_ = self.compute_undo()
        if round_ is not None:
            self.show(round_)
        return round_

    def compute_accept(self, candidate: int | None = None) -> np.ndarray:
        """The backend accepts the recommended mask, or candidate ``candidate`` (0-based) as shown, and folds the
        session into the user's profile (worker thread); returns the mask for :meth:`commit`."""
        return self._require_session().accept(candidate)

    def accept(self, candidate: int | None = None) -> np.ndarray:
        """compute_accept + commit."""
        mask = self.compute_accept(candidate)
        self.commit(mask)
        return mask

    def commit(self, mask: np.ndarray) -> None:
        """Write an accepted mask into the segment on the session's slice (one undo step), tag it and clear the
        preview (main thread). A profile the backend could not update is reported in ``profile_error``; the
        commit stands."""
        session = self._require_session()
        if getattr(session, "accepted_weights", None) is None:
            raise InputError("accept the round first (compute_accept); only an accepted mask is committed")
        self.undo.save()
        commit_mask(self.segmentation_node, self.segment_id, self.volume_node, self.plane, mask)
        tag_spa_segment(self.segmentation_node, self.segment_id, self.structure)
        self.overlay.clear()
        self.accepted_mask = mask
        self.accepted_weights = np.asarray(session.accepted_weights)
        self.profile_error = getattr(session, "profile_error", None)
        self.session = None

    def cancel(self) -> None:
        """Drop the current interaction: the preview goes, the segmentation is untouched."""
        self.overlay.clear()
        self.session = None

    def compute_propagate(
        self,
        progress: Callable[[int, int], bool] | None = None,
        max_slices: int | None = None,
        n_samples: int | None = None,
    ) -> Any:
        """Carry the last accepted mask through neighbouring slices (worker thread; nothing is written): a result
        with ``masks`` (slice index -> mask in the plane's orientation).

        ``progress(done, total_estimate)`` returning False cancels; ``max_slices`` caps each direction;
        ``n_samples`` masks are sampled per slice (default: the session's).
        """
        if self.accepted_mask is None or self.plane is None:
            raise InputError("accept a segmentation on one slice first; propagation starts from it")
        return self.backend.propagate(
            self.volume,
            self.plane.spec(),
            self.accepted_mask,
            weights=self.accepted_weights,
            seed=self.seed,
            n_samples=self.n_samples if n_samples is None else int(n_samples),
            window=self.window,
            max_slices=max_slices,
            progress=progress,
            digest=self.digest,
        )

    def apply_propagation(self, result: Any) -> None:
        """Write a propagation's slices into the segment as one undo step (other slices unchanged)."""
        if self.plane is None:
            raise InputError("there is no slice to propagate from; start and accept a segmentation first")
        if not result.masks:
            return
        shape = volume_shape(self.volume_node)
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

    def _require_session(self) -> Any:
        if self.session is None or self.session.current is None:
            raise InputError("no SPA segmentation in progress; click inside the structure to start one")
        return self.session
