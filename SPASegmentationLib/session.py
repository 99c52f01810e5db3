"""Session: one image, one structure, a few multiple-choice rounds.

    session = Session(model, image, seed=0)
    round1 = session.start(point=(x, y))        # or box=(x0, y0, x1, y1)
    round2 = session.choose(2)                   # the candidate closest to what the user wants
    mask = session.accept()

The image is encoded once. Every round is deterministic given the seed, the prompts and the choices,
so ``state()`` (a :class:`SessionState`, plain JSON through ``to_dict``) is enough to rebuild a
session after a restart, and ``undo`` can go back to any earlier round. Images, masks and maps are
numpy arrays at the image's own size; coordinates are image pixels, (x, y) = (column, row).
Candidate indices are 0-based here (front ends show 1–4). The round itself is :mod:`.engine`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .candidates import N_CANDIDATES
from .embeddings import EmbeddingCache
from .engine import (
    BOX_SEARCH_MAX_SIDES,
    CLICK_REGION_MAX_SHARE,
    ModelRound,
    box_from_point,
    click_mask,
    click_region_share,
    feedback_prompt,
    feedback_seed,
    next_weights,
    picture_on_mask_grid,
    pull_towards,
    round_seed,
    sample_probabilities,
    start_prompt,
    summarise_round,
)
from .enums import TextEnum
from .errors import InputError
from .fingerprints import image_fingerprint
from .metrics import dice
from .model.preprocess import FocusWindow, ImageGeometry, focus_window, intensity_window
from .model.spa import Prompt, SPAModel
from .preference import PreferenceMixture, check_weights, uniform_weights
from .rounds import DEFAULT_SAMPLES, Round, signed_differences

STATE_KIND = "spa-session"
STATE_VERSION = 1
ANCHOR_STEPS = np.linspace(0.0, 1.0, 9)  # the moves towards a choice that ChoiceAnchor.MINIMAL tries, in order


class ChoiceAnchor(TextEnum):
    """How the round after a choice relates to the chosen candidate."""

    NONE = "none"  # the model's new round as it comes (the paper)
    HALF = "half"  # every sample moved halfway to the chosen candidate
    # the smallest move (in steps of 1/8) that keeps the new recommendation at least as close to the chosen
    # candidate as the current one: the loop never moves away from the user's choice
    MINIMAL = "minimal"


DEFAULT_ANCHOR = ChoiceAnchor.MINIMAL


class FocusMode(TextEnum):
    """When a session moves into a magnified window around a small structure (``Session.focus_window``)."""

    OFF = "off"  # always the whole image
    CLICKS = "clicks"  # a click the whole image finds no box for is looked at closer, in a window around it
    ALL = "all"  # also every small structure's box, given or found


DEFAULT_FOCUS = FocusMode.CLICKS


@dataclass(frozen=True)
class SessionStart:
    """The user's first prompt in image pixels."""

    point: tuple[float, float] | None = None
    box: tuple[float, float, float, float] | None = None
    label: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "point": None if self.point is None else [float(v) for v in self.point],
            "label": bool(self.label),
            "box": None if self.box is None else [float(v) for v in self.box],
        }


@dataclass
class SessionState:
    """Everything that, with the same model and image, rebuilds a session: its settings and the user's inputs.

    ``to_dict`` gives the plain JSON written into summaries (kind ``spa-session``, schema version 1);
    ``from_dict`` reads it back and names what is wrong with a damaged one.
    """

    model_fingerprint: str
    image_fingerprint: str
    image_shape: tuple[int, ...]
    seed: int
    n_samples: int
    n_candidates: int
    window: tuple[float, float] | None
    initial_weights: tuple[float, ...]
    anchor: ChoiceAnchor = ChoiceAnchor.NONE
    box_search: bool = False  # a lone click became a box (engine.box_from_point); states before it had none
    focus: FocusMode = FocusMode.OFF  # when a magnified window was used; states before it had none
    start: SessionStart | None = None
    choices: list[int] = field(default_factory=list)
    accepted: bool = False
    accepted_candidate: int | None = None  # accepted as candidate k (0-based) instead of the recommendation
    mixture: dict[str, Any] | None = None  # PreferenceMixture.to_dict() of the last round (a record)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON."""
        return {
            "kind": STATE_KIND,
            "schema_version": STATE_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "image_fingerprint": self.image_fingerprint,
            "image_shape": list(self.image_shape),
            "seed": self.seed,
            "n_samples": self.n_samples,
            "n_candidates": self.n_candidates,
            "window": None if self.window is None else list(self.window),
            "initial_weights": [float(v) for v in self.initial_weights],
            "anchor": self.anchor.value,
            "box_search": self.box_search,
            "focus": self.focus.value,
            "start": None if self.start is None else self.start.to_dict(),
            "choices": list(self.choices),
            "accepted": self.accepted,
            "accepted_candidate": self.accepted_candidate,
            "mixture": self.mixture,
        }

    @classmethod
    def from_dict(cls, payload: Any) -> SessionState:
        """Read :meth:`to_dict`'s JSON; InputError naming the problem when it is not a usable state."""
        if not isinstance(payload, dict) or payload.get("kind") != STATE_KIND:
            raise InputError("this is not an SPA session state (missing kind 'spa-session')")
        version = payload.get("schema_version", 0)
        if not isinstance(version, int) or version > STATE_VERSION:
            raise InputError(f"session state version {version!r} is newer than this SPA supports; upgrade SPA")
        try:
            start = payload.get("start")
            window = payload.get("window")
            return cls(
                model_fingerprint=str(payload["model_fingerprint"]),
                image_fingerprint=str(payload["image_fingerprint"]),
                image_shape=tuple(int(v) for v in payload["image_shape"]),
                seed=int(payload["seed"]),
                n_samples=int(payload["n_samples"]),
                n_candidates=int(payload["n_candidates"]),
                window=None if not window else (float(window[0]), float(window[1])),
                initial_weights=tuple(float(v) for v in payload["initial_weights"]),
                anchor=ChoiceAnchor.parse(payload.get("anchor", ChoiceAnchor.NONE.value), "choice anchor"),
                box_search=bool(payload.get("box_search", False)),
                focus=FocusMode.parse(payload.get("focus", FocusMode.OFF.value), "focus mode"),
                start=None
                if not start
                else SessionStart(
                    point=None if start.get("point") is None else tuple(float(v) for v in start["point"]),
                    box=None if start.get("box") is None else tuple(float(v) for v in start["box"]),
                    label=bool(start.get("label", True)),
                ),
                choices=[int(k) for k in payload.get("choices", [])],
                accepted=bool(payload.get("accepted", False)),
                accepted_candidate=None
                if payload.get("accepted_candidate") is None
                else int(payload["accepted_candidate"]),
                mixture=payload.get("mixture"),
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise InputError(
                f"the session state is damaged ({type(exc).__name__}: {exc}); use a state written by SPA"
            ) from exc


class Session:
    """An interactive SPA segmentation of one 2-D image."""

    def __init__(
        self,
        model: SPAModel,
        image: np.ndarray,
        *,
        seed: int = 0,
        n_samples: int = DEFAULT_SAMPLES,
        n_candidates: int = N_CANDIDATES,
        initial_weights: np.ndarray | torch.Tensor | None = None,
        window: tuple[float, float] | None = None,
        embedding: torch.Tensor | None = None,
        anchor: ChoiceAnchor | str = DEFAULT_ANCHOR,
        box_search: bool = True,
        focus: FocusMode | str = DEFAULT_FOCUS,
        embeddings: EmbeddingCache | None = None,
    ):
        if n_samples < 1:
            raise InputError(f"n_samples must be at least 1, got {n_samples}")
        if not 1 <= n_candidates <= n_samples:
            raise InputError(f"n_candidates must be between 1 and n_samples ({n_samples}), got {n_candidates}")
        self.model = model
        self.image = image
        self.seed = int(seed)
        self.n_samples = int(n_samples)
        self.n_candidates = int(n_candidates)
        self.window = window
        self.anchor = ChoiceAnchor.parse(anchor, "choice anchor")
        self.box_search = bool(box_search)
        self.focus = FocusMode.parse(focus, "focus mode")
        self.embeddings = embeddings  # where images (the whole one, focus windows) are encoded, if given
        k = model.config.n_components
        if initial_weights is None:
            self.initial_weights = uniform_weights(k)
        else:
            # float32 first, as the weights are stored and used, then normalised in float32
            as_float32 = torch.as_tensor(
                np.asarray(
                    initial_weights.detach().cpu() if isinstance(initial_weights, torch.Tensor) else initial_weights,
                    dtype=np.float32,
                )
            )
            check_weights(as_float32, n_components=k, what="initial mixture weights")
            self.initial_weights = as_float32 / as_float32.sum()
        self.geometry = model.geometry_of(image)
        self._embedding = None if embedding is None else embedding.to(model.device)
        self._start: SessionStart | None = None
        self.found_box: tuple[float, float, float, float] | None = None  # image pixels, from a lone click
        # The rounds run on the whole image or, for a small structure, on a magnified window around it
        self.focus_window: FocusWindow | None = None
        self._view: tuple[torch.Tensor, ImageGeometry] | None = None
        self._window_views: dict[FocusWindow, tuple[torch.Tensor, ImageGeometry]] = {}
        self._scale: tuple[float, float] | None = None
        self._choices: list[int] = []
        self._model_rounds: list[ModelRound] = []
        self._rounds: list[Round] = []
        self._sample_maps: list[torch.Tensor] = []  # each round's N sample maps (model frame, model's device, float16)
        self.accepted = False
        self.accepted_candidate: int | None = None  # set when a candidate, not the recommendation, was accepted

    # ----- the interaction -----------------------------------------------------------------------
    def start(
        self,
        point: tuple[float, float] | None = None,
        box: tuple[float, float, float, float] | None = None,
        label: bool = True,
    ) -> Round:
        """Begin with a point inside the structure and/or a box (x0, y0, x1, y1) around it.

        With ``box_search`` (the default) a lone positive click is turned into a box around the structure
        under it (:func:`~SPASegmentationLib.engine.box_from_point`); the box is kept in ``found_box``.
        With ``focus`` ``clicks`` (the default), when the box search finds nothing in the whole image, it
        searches again in a window around the click, magnified to the model's input (a small structure beside a
        vessel or the pleura); a box found there moves the rounds into a window around it (``focus_window``;
        masks still come at the image's size), and failing that the click alone is answered in the first window,
        unless its mask runs out of it or the click's tissue fills most of it (a large structure: then the click
        alone in the whole image). With
        ``all``, every small structure's box (given or found) moves the rounds into such a window.
        """
        prompt = self._first_prompt(point, box, label)
        self._start = SessionStart(
            None if point is None else tuple(float(v) for v in point),
            None if box is None else tuple(float(v) for v in box),
            bool(label),
        )
        self._choices, self._model_rounds, self._rounds, self.accepted = [], [], [], False
        self._sample_maps = []
        self.accepted_candidate = None
        return self._advance(prompt, self.initial_weights)

    def recommend(
        self,
        point: tuple[float, float] | None = None,
        box: tuple[float, float, float, float] | None = None,
        label: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """What :meth:`start` would recommend for these prompts, without the rest of its round (candidates, their
        clustering, uncertainty): (the recommended mask at image size, the mixture weights it sampled). For work
        that keeps only the recommendation (a propagation's slices); the session is left unstarted."""
        prompt = self._first_prompt(point, box, label)
        embedding, geometry = self._require_view()
        probabilities, mixture = sample_probabilities(
            self.model, embedding, geometry, prompt, self.initial_weights, self.n_samples, round_seed(self.seed, 1)
        )
        mean = probabilities.mean(dim=0).cpu().numpy()  # as candidates.aggregate, without its std
        recommended = self._maps_to_image(mean[None])[0] >= self.model.config.recommend_threshold
        return recommended, mixture.weights.cpu().numpy().astype(np.float64)

    def _first_prompt(
        self, point: tuple[float, float] | None, box: tuple[float, float, float, float] | None, label: bool
    ) -> Prompt:
        """The first round's prompt in the model frame, with the box search and focus window of :meth:`start`
        applied (``found_box``, ``focus_window`` and the view the rounds run on are set here)."""
        prompt = start_prompt(self.geometry, point, box, label)
        self.found_box, self.focus_window, self._view = None, None, None
        self._window_views.clear()
        if self.box_search and point is not None and box is None and label:
            picture = picture_on_mask_grid(self.model, self.image, self.window)
            found = box_from_point(self.model, self.embedding, self.geometry, prompt.points[0], picture)
            if found is not None:
                prompt = Prompt(box=found)
                corners = self.geometry.to_image(np.array(found).reshape(2, 2))
                self.found_box = tuple(float(v) for v in corners.reshape(-1))
            elif self.focus is not FocusMode.OFF:
                prompt = self._search_near_click(point) or prompt
                if self._view is None and self.found_box is not None:
                    prompt = self._focus(point, box) or prompt
        if self.focus is FocusMode.ALL and label and self._view is None:
            prompt = self._focus(point, box) or prompt
        if self._view is None:
            self._view = (self.embedding, self.geometry)
        return prompt

    def choose(self, k: int) -> Round:
        """The user picked candidate ``k`` (0-based) of the current round: compute the next round."""
        current = self._require_round()
        if self.accepted:
            raise InputError("this session is already accepted; undo the accept first to keep refining")
        if not isinstance(k, (int, np.integer)) or not 0 <= k < current.n_candidates:
            raise InputError(
                f"candidate {k} does not exist; round {current.index} has candidates 0..{current.n_candidates - 1}"
            )
        last = self._model_rounds[-1]
        prompt = feedback_prompt(self.model, last, int(k), feedback_seed(self.seed, current.index))
        self._choices.append(int(k))
        return self._advance(
            prompt, next_weights(self.model, last.mixture.weights, self.initial_weights), chosen=int(k)
        )

    def accept(self, candidate: int | None = None) -> np.ndarray:
        """Finish with the current recommended mask (H, W) bool, or with candidate ``candidate`` (0-based) as shown."""
        current = self._require_round()
        if candidate is not None:
            if isinstance(candidate, bool) or not isinstance(candidate, (int, np.integer)):
                raise InputError(f"the candidate to accept must be a number, got {candidate!r}")
            if not 0 <= candidate < current.n_candidates:
                raise InputError(
                    f"candidate {candidate} does not exist; round {current.index} has candidates "
                    f"0..{current.n_candidates - 1}"
                )
            candidate = int(candidate)
        self.accepted = True
        self.accepted_candidate = candidate
        return (current.recommended if candidate is None else current.candidates[candidate]).copy()

    def undo(self, to_round: int | None = None) -> Round:
        """Go back one round (or to round ``to_round``, 1-based); the session is open again."""
        current = self._require_round()
        target = current.index - 1 if to_round is None else int(to_round)
        if not 1 <= target <= current.index:
            raise InputError(f"cannot undo to round {target}; rounds 1..{current.index} exist")
        self.accepted, self.accepted_candidate = False, None
        del self._rounds[target:]
        del self._model_rounds[target:]
        del self._sample_maps[target:]
        del self._choices[target - 1 :]
        return self._rounds[-1]

    # ----- what the session holds ----------------------------------------------------------------
    def sample_masks(self) -> np.ndarray:
        """The current round's N sample masks (N, H, W) bool at the image's size, after the anchor: what the
        recommendation and the candidates were made from (the evaluation's distribution measures use them)."""
        self._require_round()
        maps = self._sample_maps[-1].float().cpu().numpy()
        return self._maps_to_image(maps) >= self.model.config.recommend_threshold

    @property
    def rounds(self) -> list[Round]:
        return list(self._rounds)

    @property
    def current(self) -> Round | None:
        return self._rounds[-1] if self._rounds else None

    @property
    def choices(self) -> list[int]:
        return list(self._choices)

    @property
    def mixture(self) -> PreferenceMixture:
        """The preference mixture of the current round (the user's adapted preference)."""
        self._require_round()
        return self._model_rounds[-1].mixture

    def state(self) -> SessionState:
        """What rebuilds this session with the same model and image (``.to_dict()`` for JSON)."""
        return SessionState(
            model_fingerprint=self.model.fingerprint(),
            image_fingerprint=image_fingerprint(self.image),
            image_shape=tuple(self.image.shape),
            seed=self.seed,
            n_samples=self.n_samples,
            n_candidates=self.n_candidates,
            window=None if self.window is None else (float(self.window[0]), float(self.window[1])),
            initial_weights=tuple(float(v) for v in self.initial_weights.tolist()),
            anchor=self.anchor,
            box_search=self.box_search,
            focus=self.focus,
            start=self._start,
            choices=list(self._choices),
            accepted=self.accepted,
            accepted_candidate=self.accepted_candidate,
            mixture=None if not self._model_rounds else self._model_rounds[-1].mixture.to_dict(),
        )

    @classmethod
    def restore(
        cls,
        model: SPAModel,
        image: np.ndarray,
        state: SessionState | dict[str, Any],
        embedding: torch.Tensor | None = None,
        embeddings: EmbeddingCache | None = None,
    ) -> Session:
        """Rebuild a session from :meth:`state` (or its JSON) by replaying its prompt and choices (deterministic)."""
        if not isinstance(state, SessionState):
            state = SessionState.from_dict(state)
        if state.model_fingerprint != model.fingerprint():
            raise InputError(
                f"session state was made with model {state.model_fingerprint}, this model is {model.fingerprint()}; "
                "load the model it was made with"
            )
        if state.image_fingerprint != image_fingerprint(image):
            raise InputError(
                "session state belongs to a different image (fingerprints differ); open the image it was made on"
            )
        session = cls(
            model,
            image,
            seed=state.seed,
            n_samples=state.n_samples,
            n_candidates=state.n_candidates,
            initial_weights=np.asarray(state.initial_weights),
            window=state.window,
            anchor=state.anchor,
            box_search=state.box_search,
            focus=state.focus,
            embedding=embedding,
            embeddings=embeddings,
        )
        if state.start is not None:
            session.start(point=state.start.point, box=state.start.box, label=state.start.label)
            for k in state.choices:
                session.choose(k)
            session.accepted = state.accepted
            session.accepted_candidate = state.accepted_candidate if state.accepted else None
        return session

    def start_record(self) -> dict[str, Any]:
        """How the start was answered, for JSON summaries: the box found for a click and the focus window."""
        return {
            "found_box": None if self.found_box is None else [round(v, 2) for v in self.found_box],
            "focus_window": None if self.focus_window is None else self.focus_window.to_dict(),
        }

    @property
    def embedding(self) -> torch.Tensor:
        """The whole image's embedding, encoded on first use (a box start on a small structure never needs it)."""
        if self._embedding is None:
            self._embedding = self._encode(self.image, self.window)
        return self._embedding

    # ----- internals -----------------------------------------------------------------------------
    def _encode(self, image: np.ndarray, window: tuple[float, float] | None) -> torch.Tensor:
        if self.embeddings is not None:
            return self.embeddings.get(image, window).to(self.model.device)
        return self.model.encode(image, window)[0]

    def _intensity_scale(self) -> tuple[float, float]:
        """The whole image's (low, high) intensity scale, which its windows keep (their own percentiles would change
        the contrast); computed once."""
        if self._scale is None:
            self._scale = intensity_window(self.image, self.window)
        return self._scale

    def _window_view(self, window: FocusWindow) -> tuple[torch.Tensor, ImageGeometry]:
        """The embedding and geometry of a window of the image (encoded once per start)."""
        if window not in self._window_views:
            crop = window.crop(self.image)
            embedding = self._encode(crop, self._intensity_scale())
            self._window_views[window] = (embedding, self.model.geometry_of(crop))
        return self._window_views[window]

    def _search_near_click(self, point: tuple[float, float]) -> Prompt | None:
        """The box search in a magnified window around the click. Found: ``found_box`` is set and its box prompt
        (whole image) returned, for :meth:`_focus` to move into the window sized to it. Not found: the session
        works in this window, and the click alone there is returned, unless the backbone's mask for it touches
        more than one of the window's sides inside the image, or the tissue of similar intensity around the
        click fills most of the window (a structure larger than the window: inside an organ). None then, and
        when the image is too small for a window."""
        window = focus_window((point[0], point[1], point[0], point[1]), self.geometry.height, self.geometry.width)
        if window is None:
            return None
        embedding, geometry = self._window_view(window)
        click = start_prompt(geometry, tuple(window.to_window(np.array(point))))
        picture = picture_on_mask_grid(self.model, window.crop(self.image), self._intensity_scale())
        found = box_from_point(self.model, embedding, geometry, click.points[0], picture)
        if found is None:
            mask = click_mask(self.model, embedding, geometry, click.points[0])
            inner_sides = (
                window.left > 0,
                window.top > 0,
                window.left + window.width < self.geometry.width,
                window.top + window.height < self.geometry.height,
            )
            edges = (mask[:, 0].any(), mask[0, :].any(), mask[:, -1].any(), mask[-1, :].any())
            touched = sum(inner and edge for inner, edge in zip(inner_sides, edges, strict=True))
            if (
                touched > BOX_SEARCH_MAX_SIDES
                or click_region_share(self.model, picture, click.points[0]) > CLICK_REGION_MAX_SHARE
            ):
                return None
            self.focus_window, self._view = window, (embedding, geometry)
            return click
        corners = window.to_image(geometry.to_image(np.array(found).reshape(2, 2)))
        self.found_box = tuple(float(v) for v in corners.reshape(-1))
        whole = self.geometry.to_model(corners).reshape(-1)
        return Prompt(box=tuple(float(v) for v in whole))

    def _focus(self, point: tuple[float, float] | None, box: tuple[float, float, float, float] | None) -> Prompt | None:
        """Move the session into a magnified window around a small structure; its first prompt there, or None."""
        if self.found_box is not None:
            point, box = None, self.found_box
        if box is None:
            return None
        window = focus_window(box, self.geometry.height, self.geometry.width)
        if window is None or (point is not None and not window.contains(np.array(point))):
            return None
        low, high = -0.5, np.array([window.width, window.height], dtype=np.float64) - 0.5
        corners = np.clip(window.to_window(np.array(box, dtype=np.float64).reshape(2, 2)), low, high)
        embedding, geometry = self._window_view(window)
        self.focus_window, self._view = window, (embedding, geometry)
        return start_prompt(
            geometry,
            None if point is None else tuple(window.to_window(np.array(point))),
            tuple(corners.reshape(-1)),
        )

    def _maps_to_image(self, maps: np.ndarray) -> np.ndarray:
        """Model-frame maps (n, m, m) of the view the rounds run on → image size (n, H, W)."""
        _, geometry = self._require_view()
        resized = geometry.maps_to_image(torch.from_numpy(maps), self.model.backbone.mask_size).numpy()
        if self.focus_window is None:
            return resized
        return self.focus_window.paste(resized, (self.geometry.height, self.geometry.width))

    def _require_view(self) -> tuple[torch.Tensor, ImageGeometry]:
        if self._view is None:
            raise InputError("the session has not started; call start(point=…) or start(box=…) first")
        return self._view

    def _require_round(self) -> Round:
        if not self._rounds:
            raise InputError("the session has not started; call start(point=…) or start(box=…) first")
        return self._rounds[-1]

    def _advance(self, prompt: Prompt, previous_weights: torch.Tensor, chosen: int | None = None) -> Round:
        began = time.perf_counter()
        index = len(self._rounds) + 1
        seed = round_seed(self.seed, index)
        embedding, geometry = self._require_view()
        probabilities, mixture = sample_probabilities(
            self.model, embedding, geometry, prompt, previous_weights, self.n_samples, seed
        )
        weight = 0.0
        if chosen is not None and self.anchor is not ChoiceAnchor.NONE:
            choice = self._model_rounds[-1].clusters.probabilities[chosen]
            weight = self._anchor_weight(probabilities.mean(dim=0).cpu().numpy(), choice, chosen)
            probabilities = pull_towards(probabilities, choice, weight)
        model_round = summarise_round(self.model, prompt, mixture, probabilities, self.n_candidates, seed)
        self._sample_maps.append(probabilities.half())  # kept for sample_masks() only: half the memory
        self._model_rounds.append(model_round)
        round_ = self._to_image(index, model_round, time.perf_counter() - began)
        round_.anchor_weight = weight
        self._rounds.append(round_)
        return round_

    def _anchor_weight(self, new_mean: np.ndarray, choice: np.ndarray, chosen: int) -> float:
        """How far to move the new round towards the chosen candidate (model-frame maps), by the anchor policy."""
        if self.anchor is ChoiceAnchor.HALF:
            return 0.5
        current = self._rounds[-1]
        target = current.candidates[chosen]
        closeness = dice(current.recommended, target)
        new_image, choice_image = self._maps_to_image(np.stack([new_mean, choice]))
        threshold = self.model.config.recommend_threshold
        for weight in ANCHOR_STEPS:
            recommended = (1.0 - weight) * new_image + weight * choice_image >= threshold
            if dice(recommended, target) >= closeness:
                return float(weight)
        return 1.0

    def _to_image(self, index: int, model_round: ModelRound, seconds: float) -> Round:
        resized = self._maps_to_image(
            np.concatenate(
                [
                    model_round.mean_probability[None],
                    model_round.std[None],
                    model_round.clusters.probabilities,
                ]
            )
        )
        threshold = self.model.config.recommend_threshold
        probability, uncertainty, candidate_probs = resized[0], resized[1], resized[2:]
        recommended = probability >= threshold
        candidates = candidate_probs >= threshold
        return Round(
            index=index,
            probability=probability.astype(np.float32),
            recommended=recommended,
            uncertainty=uncertainty.astype(np.float32),
            candidates=candidates,
            differences=signed_differences(candidates, recommended),
            candidate_shares=model_round.clusters.shares.copy(),
            mixture_weights=model_round.mixture.weights.cpu().numpy().astype(np.float64),
            seconds=seconds,
        )
