"""One interactive SPA segmentation in a scene: :class:`SceneSession`, the MRML glue around ``Session``.

Threads: ``SceneSession.compute_*`` read the volume and run the model and may run on the model
worker thread while the main thread leaves the volume alone; all other calls change MRML and
belong on the main thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..engine import DEFAULT_SAMPLES
from ..errors import InputError
from ..session import Round, Session
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

if TYPE_CHECKING:
    from ..profiles import ProfileStore
    from ..propagation import PropagationResult


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
        profiles: ProfileStore | None = None,
        user: str | None = None,
        structure: str | None = None,
        seed: int = 0,
        n_samples: int = DEFAULT_SAMPLES,
        embeddings: Any = None,
        undo: SegmentUndo | None = None,
        window: tuple[float, float] | None = None,
    ) -> None:
        require_segment(segmentation_node, segment_id)
        volume_shape(volume_node)
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
        """First round on the ``orientation`` slice through the prompt: a point, a ROI node or a RAS box
        (two corners)."""
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
        image = plane.extract(volume_array(self.volume_node))
        session = Session(
            self.model,
            image,
            seed=self.seed,
            n_samples=self.n_samples,
            initial_weights=self.initial_weights(),
            window=self.window,
            embeddings=self.embeddings,
        )
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

    def accept(self, candidate: int | None = None) -> None:
        """Commit the recommended mask, or candidate ``candidate`` (0-based) as shown, into the segment (one undo
        step), tag it, update the profile and clear the preview."""
        session = self._require_session()
        round_ = session.current
        mask = session.accept(candidate)
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
    ) -> PropagationResult:
        """Carry the last accepted mask through neighbouring slices (worker thread; nothing is written).

        ``progress(done, total_estimate)`` returning False cancels; ``max_slices`` caps each direction;
        ``n_samples`` masks are sampled per slice (default: the session's).
        """
        from ..propagation import propagate

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

    def apply_propagation(self, result: PropagationResult) -> None:
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

    def _require_session(self) -> Session:
        if self.session is None or self.session.current is None:
            raise InputError("no SPA segmentation in progress; click inside the structure to start one")
        return self.session
