"""Where a front end's sessions run: a model in this process (:class:`InProcessBackend`), or, with the same verbs,
a model behind ``spa serve`` (:class:`~.service.client.SPAClient`). ``spa serve`` itself runs its sessions here.

A backend belongs to one user. ``backend.session(image, plane=…, structure=…)`` gives a session with
``start`` / ``choose`` / ``undo`` / ``accept`` (accepting folds the mixture into that user's profile for
the structure), ``current``, ``state`` and ``start_record``; ``backend.propagate(volume, plane, mask, …)``
carries an accepted mask through a volume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from .embeddings import EmbeddingCache
from .errors import InputError, ProfileError
from .model.spa import SPAModel
from .profiles import Profile, validate_name
from .propagation import PropagationResult, propagate
from .rounds import DEFAULT_SAMPLES, Round
from .service.protocol import PlaneSpec
from .session import Session, SessionState


class ProfileBook(Protocol):
    """What a backend needs of a profile store (the folder store and the SQLite store both are one)."""

    def initial_weights(self, user: str, structure: str) -> Any: ...

    def update(self, user: str, structure: str, mixture: Any, rounds: int | None = None) -> Profile: ...


def plane_image(image: np.ndarray, plane: PlaneSpec | None) -> np.ndarray:
    """The 2-D image a session works on: ``image`` itself, or ``plane`` of a (slices, H, W) volume."""
    if plane is not None:
        return plane.extract(np.asarray(image))
    if image.ndim == 3 and image.shape[-1] not in (3, 4):
        raise InputError(f"the image is a volume {image.shape}; say which plane of it to segment")
    return image


class BackendSession:
    """A :class:`Session` with its owner: accepting updates the owner's profile for the structure."""

    def __init__(
        self, session: Session, profiles: ProfileBook | None, user: str | None, structure: str | None, use_profile: bool
    ) -> None:
        self.session = session
        self.profiles = profiles
        self.user = user
        self.structure = structure
        self.use_profile = use_profile
        self.accepted_weights: np.ndarray | None = None  # the mixture weights of the accepted round
        self.profile: dict[str, Any] | None = None  # what the last accept did to the profile
        self.profile_error: str | None = None  # why the last accept could not update the profile

    @property
    def updates_profile(self) -> bool:
        return self.use_profile and self.profiles is not None and self.user is not None and self.structure is not None

    @property
    def current(self) -> Round | None:
        return self.session.current

    @property
    def state(self) -> dict[str, Any]:
        """The session's state as plain JSON (``SessionState.to_dict``)."""
        return self.session.state().to_dict()

    @property
    def start_record(self) -> dict[str, Any]:
        return self.session.start_record()

    def start(
        self,
        point: tuple[float, float] | None = None,
        box: tuple[float, float, float, float] | None = None,
        label: bool = True,
    ) -> Round:
        return self.session.start(point=point, box=box, label=label)

    def choose(self, k: int) -> Round:
        return self.session.choose(k)

    def undo(self, to_round: int | None = None) -> Round:
        return self.session.undo(to_round)

    def accept(self, candidate: int | None = None) -> np.ndarray:
        """The recommended mask (or candidate ``candidate`` as shown); the owner's profile takes the mixture (a
        profile that cannot be updated is reported in ``profile_error``; the accept stands)."""
        current = self.session.current
        mask = self.session.accept(candidate)
        mixture = self.session.mixture
        self.accepted_weights = mixture.weights.detach().cpu().numpy().astype(np.float32)
        self.profile, self.profile_error = None, None
        if self.updates_profile:
            rounds = 0 if current is None else current.index
            try:
                updated = self.profiles.update(self.user, self.structure, mixture, rounds=rounds)
            except ProfileError as exc:
                self.profile_error = str(exc)
            else:
                self.profile = {"user": updated.user, "structure": updated.structure, "n_sessions": updated.n_sessions}
        return mask


class InProcessBackend:
    """Sessions and propagation on a model in this process, for one user (None: no profiles)."""

    def __init__(
        self,
        model: SPAModel,
        profiles: ProfileBook | None = None,
        user: str | None = None,
        embeddings: EmbeddingCache | None = None,
    ) -> None:
        self.model = model
        self.profiles = profiles
        self.user = None if user is None else validate_name(user, "user")
        self.embeddings = embeddings if embeddings is not None else EmbeddingCache(model)

    def for_user(self, user: str | None) -> InProcessBackend:
        """The same model, cache and profiles, acting for ``user``."""
        return InProcessBackend(self.model, self.profiles, user, self.embeddings)

    def session(
        self,
        image: np.ndarray,
        *,
        plane: PlaneSpec | None = None,
        structure: str | None = None,
        use_profile: bool = True,
        seed: int = 0,
        n_samples: int | None = None,
        window: tuple[float, float] | None = None,
        initial_weights: np.ndarray | None = None,
        digest: str | None = None,
    ) -> BackendSession:
        """A session on ``image`` (or ``plane`` of a volume), started from the user's profile when there is one.
        (``digest``, the image's hash, matters to the service client only.)"""
        structure = None if structure is None else validate_name(structure, "structure")
        if initial_weights is None and use_profile and self.profiles is not None and None not in (self.user, structure):
            initial_weights = self.profiles.initial_weights(self.user, structure)
        session = Session(
            self.model,
            plane_image(image, plane),
            seed=seed,
            n_samples=DEFAULT_SAMPLES if n_samples is None else int(n_samples),
            initial_weights=initial_weights,
            window=window,
            embeddings=self.embeddings,
        )
        return BackendSession(session, self.profiles, self.user, structure, use_profile)

    def restore(
        self,
        image: np.ndarray,
        state: dict[str, Any] | SessionState,
        *,
        plane: PlaneSpec | None = None,
        structure: str | None = None,
        use_profile: bool = True,
    ) -> BackendSession:
        """A session rebuilt from its state (its prompt and choices replayed)."""
        structure = None if structure is None else validate_name(structure, "structure")
        session = Session.restore(self.model, plane_image(image, plane), state, embeddings=self.embeddings)
        return BackendSession(session, self.profiles, self.user, structure, use_profile)

    def propagate(
        self,
        volume: np.ndarray,
        plane: PlaneSpec,
        mask: np.ndarray,
        *,
        weights: np.ndarray | None = None,
        seed: int = 0,
        n_samples: int | None = None,
        window: tuple[float, float] | None = None,
        max_slices: int | None = None,
        progress: Callable[[int, int], bool] | None = None,
        digest: str | None = None,
    ) -> PropagationResult:
        """Carry ``mask`` (on ``plane``) through the volume's parallel planes; ``progress`` returning False cancels."""
        volume = np.asarray(volume)
        plane.extract(volume)  # checks the plane against the volume
        return propagate(
            self.model,
            lambda index: replace(plane, index=index).extract(volume),
            plane.index,
            mask,
            n_slices=volume.shape[plane.axis],
            initial_weights=weights,
            seed=seed,
            n_samples=DEFAULT_SAMPLES if n_samples is None else int(n_samples),
            window=window,
            embeddings=self.embeddings,
            progress=progress,
            max_slices=max_slices,
        )

    def info(self) -> dict[str, Any]:
        """The model's fingerprint and device, and who acts."""
        return {"model_fingerprint": self.model.fingerprint(), "device": str(self.model.device), "user": self.user}
