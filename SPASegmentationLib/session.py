"""Session: one image, one structure, a few multiple-choice rounds.

    session = Session(model, image, seed=0)
    round1 = session.start(point=(x, y))        # or box=(x0, y0, x1, y1)
    round2 = session.choose(2)                   # the candidate closest to what the user wants
    mask = session.accept()

The image is encoded once. Every round is deterministic given the seed, the prompts and the choices,
so ``state()`` (plain JSON) is enough to rebuild a session after a restart, and ``undo`` can go back
to any earlier round. Images, masks and maps are numpy arrays at the image's own size; coordinates
are image pixels, (x, y) = (column, row). Candidate indices are 0-based here (front ends show 1–4).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .candidates import N_CANDIDATES, Candidates, aggregate, cluster_candidates, feedback_from_choice, signed_differences
from .errors import InputError
from .model.preprocess import ImageGeometry, prepare_image
from .model.spa import Prompt, SPAModel
from .preference import PreferenceMixture, uniform_weights

STATE_KIND = "spa-session"
STATE_VERSION = 1
DEFAULT_SAMPLES = 48


@dataclass
class Round:
    """What the user sees in one round, at the image's size."""

    index: int  # 1-based round number
    probability: np.ndarray  # (H, W) float32 mean probability of the N samples
    recommended: np.ndarray  # (H, W) bool
    uncertainty: np.ndarray  # (H, W) float32 std of the N sample probabilities
    candidates: np.ndarray  # (K, H, W) bool, K ≤ 4, smallest first
    differences: np.ndarray  # (K, H, W) int8: +1 added vs recommended, −1 removed
    candidate_shares: np.ndarray  # (K,) share of the N samples behind each candidate
    mixture_weights: np.ndarray  # (K_g,) the mixture weights this round sampled from
    seconds: float  # compute time of the round

    @property
    def n_candidates(self) -> int:
        return int(self.candidates.shape[0])


@dataclass
class ModelRound:
    """One round in the model frame: what the next round's feedback is computed from."""

    prompt: Prompt
    mixture: PreferenceMixture
    candidates: Candidates
    mean_probability: np.ndarray  # (rows, cols) valid part of the low-resolution grid
    std: np.ndarray


def image_fingerprint(image: np.ndarray) -> str:
    """16-hex sha256 of an image's shape, dtype and pixels."""
    digest = hashlib.sha256(f"{image.shape}|{image.dtype}".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()[:16]


def round_seed(seed: int, round_index: int) -> int:
    """The seed of one round, derived from the session seed."""
    return int(np.random.SeedSequence([seed, round_index]).generate_state(1)[0])


@torch.no_grad()
def encode_image(
    model: SPAModel, image: np.ndarray, window: tuple[float, float] | None = None
) -> tuple[torch.Tensor, ImageGeometry]:
    """Image → (embedding (1, C, e, e), geometry). Cache the result to skip re-encoding."""
    tensor, geometry = prepare_image(image, model.backbone.image_size, window=window)
    return model.backbone.encode(tensor.to(model.device)), geometry


@torch.no_grad()
def run_model_round(
    model: SPAModel,
    embedding: torch.Tensor,
    geometry: ImageGeometry,
    prompt: Prompt,
    previous_weights: torch.Tensor,
    n_samples: int,
    seed: int,
    n_candidates: int = N_CANDIDATES,
    timings: dict[str, float] | None = None,
) -> ModelRound:
    """Sample N masks for one prompt, aggregate them and find the candidates (model frame).

    ``timings``, when given, receives the seconds spent in each stage (for ``spa bench``).
    """
    clock = _StageClock(timings, model.device)
    sparse, valid, dense = model.encode_prompts([prompt])
    mixture = model.mixture(embedding, sparse, valid, dense, previous_weights.to(model.device)[None])
    clock.lap("generator")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    z, _ = mixture.sample(n_samples, generator=generator, mode=model.config.sampling)
    clock.lap("sampling")
    logits = model.sample_logits(embedding, sparse, dense, z)[0]
    clock.lap("conditioning_and_decoding")
    rows, cols = geometry.valid_shape_at(model.backbone.mask_size)
    probabilities = torch.sigmoid(logits[:, :rows, :cols]).float().cpu().numpy()
    mean, _, std = aggregate(probabilities, model.config.recommend_threshold)
    clock.lap("aggregation")
    candidates = cluster_candidates(probabilities, n_candidates, seed=seed % (2**31), threshold=model.config.recommend_threshold)
    clock.lap("kmeans")
    return ModelRound(prompt, mixture.select(0).detach(), candidates, mean, std)


class _StageClock:
    """Adds the time since the previous lap to ``timings[stage]`` (no-op without timings)."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device):
        self.timings, self.device = timings, device
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now


def feedback_prompt(model: SPAModel, model_round: ModelRound, chosen: int, seed: int) -> Prompt:
    """The next round's prompt after the user chose candidate ``chosen`` (0-based)."""
    rng = np.random.default_rng(seed)
    point, label, mask = feedback_from_choice(model_round.candidates, chosen, model_round.mean_probability, rng)
    side = model.backbone.mask_size
    grid = torch.zeros(side, side, dtype=torch.bool)
    grid[: mask.shape[0], : mask.shape[1]] = torch.from_numpy(mask)
    mask_logits = (grid.float() * 2.0 - 1.0) * model.config.mask_prompt_logit
    if point is not None:
        factor = model.backbone.image_size / side
        point = ((point[0] + 0.5) * factor - 0.5, (point[1] + 0.5) * factor - 0.5)
    return model_round.prompt.with_feedback(point, label, mask_logits)


def start_prompt(
    geometry: ImageGeometry,
    point: tuple[float, float] | None = None,
    box: tuple[float, float, float, float] | None = None,
    label: bool = True,
) -> Prompt:
    """The first prompt in the model frame from a point and/or box in image pixels, validated."""
    if point is None and box is None:
            raise InputError("start needs a point (x, y) inside the structure or a box (x0, y0, x1, y1)")
    prompt = Prompt()
    height, width = geometry.height, geometry.width
    if point is not None:
        x, y = _pair(point, "point")
        if not (-0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5):
            raise InputError(f"point ({x:g}, {y:g}) is outside the image (x 0..{width - 1}, y 0..{height - 1})")
        mx, my = geometry.to_model(np.array([x, y]))
        prompt = Prompt([(float(mx), float(my))], [bool(label)])
    if box is not None:
        if len(box) != 4:
            raise InputError(f"a box needs four numbers x0,y0,x1,y1, got {len(box)}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (x1 > x0 and y1 > y0):
            raise InputError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty; it needs x0 < x1 and y0 < y1")
        if x0 < -0.5 or y0 < -0.5 or x1 > width - 0.5 or y1 > height - 0.5:
            raise InputError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) extends outside the image (x 0..{width - 1}, y 0..{height - 1})")
        corners = geometry.to_model(np.array([[x0, y0], [x1, y1]]))
        prompt.box = (float(corners[0, 0]), float(corners[0, 1]), float(corners[1, 0]), float(corners[1, 1]))
    return prompt


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
        k = model.config.n_components
        if initial_weights is None:
            weights = uniform_weights(k)
        else:
            weights = torch.as_tensor(np.asarray(initial_weights, dtype=np.float32))
            if weights.shape != (k,) or not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
                raise InputError(f"initial mixture weights must be {k} non-negative numbers, got shape {tuple(weights.shape)}")
            weights = weights / weights.sum()
        self.initial_weights = weights
        if embedding is None:
            self.embedding, self.geometry = encode_image(model, image, window)
        else:
            from .model.preprocess import validate_image

            validate_image(image)
            self.embedding = embedding.to(model.device)
            self.geometry = ImageGeometry(image.shape[0], image.shape[1], model.backbone.image_size)
        self._start: dict[str, Any] | None = None
        self._choices: list[int] = []
        self._model_rounds: list[ModelRound] = []
        self._rounds: list[Round] = []
        self.accepted = False

    # ----- the interaction -----------------------------------------------------------------------
    def start(
        self,
        point: tuple[float, float] | None = None,
        box: tuple[float, float, float, float] | None = None,
        label: bool = True,
    ) -> Round:
        """Begin with a point inside the structure and/or a box (x0, y0, x1, y1) around it."""
        prompt = start_prompt(self.geometry, point, box, label)
        self._start = {"point": None if point is None else [float(v) for v in point], "label": bool(label),
                       "box": None if box is None else [float(v) for v in box]}
        self._choices, self._model_rounds, self._rounds, self.accepted = [], [], [], False
        return self._advance(prompt, self.initial_weights)

    def choose(self, k: int) -> Round:
        """The user picked candidate ``k`` (0-based) of the current round: compute the next round."""
        current = self._require_round()
        if self.accepted:
            raise InputError("this session is already accepted; undo() first to keep refining")
        if not isinstance(k, (int, np.integer)) or not 0 <= k < current.n_candidates:
            raise InputError(f"candidate {k} does not exist; round {current.index} has candidates 0..{current.n_candidates - 1}")
        last = self._model_rounds[-1]
        prompt = feedback_prompt(self.model, last, int(k), round_seed(self.seed, 1000 + current.index))
        self._choices.append(int(k))
        return self._advance(prompt, last.mixture.weights)

    def accept(self) -> np.ndarray:
        """Finish with the current recommended mask (H, W) bool."""
        current = self._require_round()
        self.accepted = True
        return current.recommended.copy()

    def undo(self, to_round: int | None = None) -> Round:
        """Go back one round (or to round ``to_round``, 1-based); undoes an accept first."""
        current = self._require_round()
        if self.accepted and to_round is None:
            self.accepted = False
            return current
        target = current.index - 1 if to_round is None else int(to_round)
        if not 1 <= target <= current.index:
            raise InputError(f"cannot undo to round {target}; rounds 1..{current.index} exist")
        self.accepted = False
        del self._rounds[target:]
        del self._model_rounds[target:]
        del self._choices[target - 1:]
        return self._rounds[-1]

    # ----- what the session holds ----------------------------------------------------------------
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

    def state(self) -> dict[str, Any]:
        """Plain-JSON state: enough, with the same model and image, to rebuild this session."""
        return {
            "kind": STATE_KIND,
            "schema_version": STATE_VERSION,
            "model_fingerprint": self.model.fingerprint(),
            "image_fingerprint": image_fingerprint(self.image),
            "image_shape": list(self.image.shape),
            "seed": self.seed,
            "n_samples": self.n_samples,
            "n_candidates": self.n_candidates,
            "window": None if self.window is None else list(self.window),
            "initial_weights": [float(v) for v in self.initial_weights.tolist()],
            "start": self._start,
            "choices": list(self._choices),
            "accepted": self.accepted,
            "mixture": None if not self._model_rounds else self._model_rounds[-1].mixture.to_dict(),
        }

    @classmethod
    def restore(cls, model: SPAModel, image: np.ndarray, state: dict[str, Any], embedding: torch.Tensor | None = None) -> "Session":
        """Rebuild a session from :meth:`state` by replaying its prompt and choices (deterministic)."""
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise InputError("this is not an SPA session state (missing kind 'spa-session')")
        if state.get("schema_version", 0) > STATE_VERSION:
            raise InputError(f"session state version {state['schema_version']} is newer than this SPA supports; upgrade SPA")
        if state["model_fingerprint"] != model.fingerprint():
            raise InputError(
                f"session state was made with model {state['model_fingerprint']}, this model is {model.fingerprint()}; "
                "load the model it was made with"
            )
        if state["image_fingerprint"] != image_fingerprint(image):
            raise InputError("session state belongs to a different image (fingerprints differ); open the image it was made on")
        window = tuple(state["window"]) if state.get("window") else None
        session = cls(model, image, seed=state["seed"], n_samples=state["n_samples"], n_candidates=state["n_candidates"],
                      initial_weights=np.asarray(state["initial_weights"]), window=window, embedding=embedding)
        start = state.get("start")
        if start:
            session.start(point=start.get("point"), box=start.get("box"), label=start.get("label", True))
            for k in state.get("choices", []):
                session.choose(k)
            session.accepted = bool(state.get("accepted", False))
        return session

    # ----- internals -----------------------------------------------------------------------------
    def _require_round(self) -> Round:
        if not self._rounds:
            raise InputError("the session has not started; call start(point=…) or start(box=…) first")
        return self._rounds[-1]

    def _advance(self, prompt: Prompt, previous_weights: torch.Tensor) -> Round:
        began = time.perf_counter()
        index = len(self._rounds) + 1
        model_round = run_model_round(
            self.model, self.embedding, self.geometry, prompt, previous_weights,
            self.n_samples, round_seed(self.seed, index), self.n_candidates,
        )
        self._model_rounds.append(model_round)
        round_ = self._to_image(index, model_round, time.perf_counter() - began)
        self._rounds.append(round_)
        return round_

    def _to_image(self, index: int, model_round: ModelRound, seconds: float) -> Round:
        side = self.model.backbone.mask_size
        maps = torch.from_numpy(np.concatenate([
            model_round.mean_probability[None], model_round.std[None], model_round.candidates.probabilities,
        ]))
        resized = self.geometry.maps_to_image(maps, side).numpy()
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
            candidate_shares=model_round.candidates.shares.copy(),
            mixture_weights=model_round.mixture.weights.cpu().numpy().astype(np.float64),
            seconds=seconds,
        )


def _pair(value: Any, what: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"a {what} needs two numbers (x, y), got {value!r}") from exc
    if not (np.isfinite(x) and np.isfinite(y)):
        raise InputError(f"the {what} ({x}, {y}) is not finite")
    return x, y
