"""Run the evaluation protocol: simulated users on held-out cases, SPA vs click baselines.

Per case the target preference is a fixed, seeded rater subset (``protocol.fixed_preferences``);
the first prompt is the deepest point of the all-rater region (or a box around the target). Every
method then runs ``max_rounds`` rounds and the Dice of its recommended mask is recorded after each:
- SPA (:class:`SpaMethod`): each round the simulated user picks a candidate (the nearest to the target when the user
  is an oracle; see :class:`SimulatedUser`);
- click baselines (:class:`ClickMethod`, what SAM/MedSAM users do): one correction click per round at the deepest
  pixel of the largest error region, the previous logits as mask prompt, on a backbone's plain decoder: LiteMedSAM as
  shipped, an SPA model's decoder without its preference parts, or a click model trained the SAM way
  (``spa train --method clicks``).
As the protocol says, the user accepts (and stops) once Dice ≥ the highest target; the accepted mask
stays the result for later rounds (``dice``). Each method also runs on to the last round regardless
(``dice_all_rounds``), which shows what choosing does beyond the point a user would stop.
SPA records also say how well the N samples of round 1 and of the last round match the raters (GED, sample
diversity, calibration: :func:`distribution_quality`). The other studies (rater alignment, profiles) are in
:mod:`.studies`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..data.dataset import MultiRaterCase, rater_statistics
from ..data.detect import open_dataset
from ..embeddings import EmbeddingCache
from ..engine import start_prompt
from ..errors import DataError, SPAError
from ..metrics import (
    candidate_diversity,
    dice,
    expected_calibration_error,
    generalized_energy_distance,
    sample_diversity,
    size_bin,
)
from ..model.spa import SPAModel
from ..rounds import DEFAULT_SAMPLES
from ..session import DEFAULT_FOCUS, ChoiceAnchor, FocusMode, Session
from ..simulation.choices import imperfect_choice, largest_error_click, sampled_error_click
from ..simulation.preferences import case_rng, consensus, fixed_preferences
from ..simulation.prompts import FirstPrompt, evaluation_first_prompt

DEFAULT_TARGETS = (0.8, 0.9)
USER_STREAM = 0x55534552  # the simulated user's own random stream per case ("USER")


@dataclass(frozen=True)
class SimulatedUser:
    """How the simulated user behaves: an oracle (accuracy 1) picks the candidate nearest their target and clicks the
    deepest pixel of the largest error; with accuracy p < 1 they pick one of the other candidates, or click anywhere
    in the error, with probability 1 − p. ``stops_when_no_better``: they accept as soon as no candidate is nearer
    their target than the recommendation (SPA only)."""

    accuracy: float = 1.0
    stops_when_no_better: bool = False

    @property
    def is_oracle(self) -> bool:
        return self.accuracy >= 1.0 and not self.stops_when_no_better

    def describe(self, clicks: bool = False) -> str:
        """The user in words, for a method that shows candidates or (``clicks``) one that takes clicks."""
        if self.accuracy >= 1.0:
            words = "oracle"
        elif clicks:
            words = f"clicks the largest error with p = {self.accuracy:g}, anywhere in the error otherwise"
        else:
            words = f"picks the nearest with p = {self.accuracy:g}"
        return words + (", accepts when no candidate is better" if self.stops_when_no_better else "")

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "stops_when_no_better": self.stops_when_no_better}


ORACLE = SimulatedUser()


@dataclass
class SpaMethod:
    """One SPA configuration under evaluation: a model, how rounds follow the user's choice, and the user."""

    label: str
    model: SPAModel
    anchor: ChoiceAnchor = ChoiceAnchor.NONE
    box_search: bool = True  # a lone first click becomes a box around the structure (engine.box_from_point)
    focus: FocusMode = DEFAULT_FOCUS  # when a small structure is segmented in a magnified window around it
    user: SimulatedUser = ORACLE
    n_samples: int | None = None  # N per round (None: the evaluation's)
    tags: dict[str, Any] = field(default_factory=dict)  # what the report groups by (ablation, family)


@dataclass
class ClickMethod:
    """A click baseline: one correction click per round on ``model``'s plain decoder (no preference parts)."""

    label: str
    model: SPAModel
    user: SimulatedUser = ORACLE
    tags: dict[str, Any] = field(default_factory=dict)


Method = SpaMethod | ClickMethod


def accepted_curve(dice_all_rounds: list[float], accept_at: float) -> list[float]:
    """The protocol's curve: after the first round with Dice ≥ accept_at, that Dice is kept."""
    curve = []
    for value in dice_all_rounds:
        curve.append(curve[-1] if curve and curve[-1] >= accept_at else value)
    return curve


def distribution_quality(
    samples: np.ndarray, probability: np.ndarray, raters: Mapping[str, np.ndarray], weights: np.ndarray
) -> dict:
    """How well one round's N sample masks match the raters: GED² (d = 1 − IoU), the diversity of the samples and of
    the raters (mean 1 − IoU between distinct pairs), the expected calibration error of the probability map
    against the raters' mean, and how many of the mixture's components the samples came from in effect
    (exp of the entropy of its ``weights``)."""
    masks = [np.asarray(m, dtype=bool) for m in raters.values()]
    shares = np.asarray(weights, dtype=np.float64)
    shares = shares[shares > 0] / shares.sum()
    return {
        "effective_components": float(np.exp(-(shares * np.log(shares)).sum())),
        "ged": generalized_energy_distance(list(samples), masks),
        "sample_diversity": sample_diversity(list(samples)),
        "rater_diversity": sample_diversity(masks) if len(masks) > 1 else float("nan"),
        "ece": expected_calibration_error(probability, masks),
    }


def run_spa(
    method: SpaMethod,
    case: MultiRaterCase,
    target: np.ndarray,
    first: dict[str, Any],
    embedding: torch.Tensor,
    max_rounds: int,
    seed: int,
    n_samples: int,
    embeddings: EmbeddingCache | None = None,
    user_rng: np.random.Generator | None = None,
    initial_weights: np.ndarray | None = None,
    measure_distribution: bool = True,
    other_target: np.ndarray | None = None,
    accept_at: float | None = None,
) -> dict[str, Any]:
    """One simulated SPA session: Dice per round, candidate diversity, seconds per round, after each choice whether
    the next recommendation moved away from the chosen candidate (Dice to it fell), and the samples' distribution
    quality in round 1 and the last round. ``initial_weights``: a profile's mixture weights to start from;
    ``other_target``: a second mask the recommendation's Dice is also recorded to each round (``dice_to_other``);
    ``accept_at``: the user accepts (the session ends) once Dice reaches it."""
    user = method.user
    rng = user_rng if user_rng is not None else np.random.default_rng(seed)
    session = Session(
        method.model,
        case.image,
        seed=seed,
        n_samples=method.n_samples or n_samples,
        initial_weights=initial_weights,
        embedding=embedding,
        anchor=method.anchor,
        box_search=method.box_search,
        focus=method.focus,
        embeddings=embeddings,
    )
    round_ = session.start(**first)
    to_other = [] if other_target is None else [dice(round_.recommended, other_target)]
    dices, diversity, seconds = (
        [dice(round_.recommended, target)],
        [candidate_diversity(list(round_.candidates))],
        [round_.seconds],
    )
    quality = {}
    if measure_distribution:
        quality["round_1"] = distribution_quality(
            session.sample_masks(), round_.probability, case.raters, round_.mixture_weights
        )
    to_choice, anchor_weights, stopped = [], [], None
    while round_.index < max_rounds:
        if accept_at is not None and dices[-1] >= accept_at:
            break
        if user.stops_when_no_better:
            best = max(dice(candidate, target) for candidate in round_.candidates)
            if best <= dices[-1]:
                stopped = round_.index
                break
        chosen = imperfect_choice(round_.candidates, target, user.accuracy, rng)
        choice = round_.candidates[chosen]
        before = dice(round_.recommended, choice)
        round_ = session.choose(chosen)
        to_choice.append([before, dice(round_.recommended, choice)])
        anchor_weights.append(round_.anchor_weight)
        dices.append(dice(round_.recommended, target))
        if other_target is not None:
            to_other.append(dice(round_.recommended, other_target))
        diversity.append(candidate_diversity(list(round_.candidates)))
        seconds.append(round_.seconds)
    if measure_distribution and round_.index > 1:
        quality["last_round"] = distribution_quality(
            session.sample_masks(), round_.probability, case.raters, round_.mixture_weights
        )
    return {
        "dice_all_rounds": dices,
        "candidate_diversity": diversity,
        "seconds_per_round": float(np.mean(seconds)),
        "choices": session.choices,
        "dice_to_choice": to_choice,  # per choice: [Dice(recommended, chosen) before, after]
        "anchor_weights": anchor_weights,
        "size": size_bin(target),
        "stopped_at": stopped,  # the round the user accepted because no candidate was better (None: did not)
        "distribution": quality,
        "final_mixture": session.mixture.to_dict(),
        "dice_to_other": to_other,
        **session.start_record(),
    }


@torch.no_grad()
def run_click_baseline(
    model: SPAModel,
    case: MultiRaterCase,
    target: np.ndarray,
    first: dict[str, Any],
    embedding: torch.Tensor,
    max_rounds: int,
    user: SimulatedUser = ORACLE,
    user_rng: np.random.Generator | None = None,
    other_target: np.ndarray | None = None,
) -> dict[str, Any]:
    """Click refinement on a plain decoder: one corrective click per round, previous logits as mask;
    ``other_target`` as in :func:`run_spa`."""
    rng = user_rng if user_rng is not None else np.random.default_rng(0)
    geometry = model.geometry_of(case.image)
    side = model.backbone.mask_size
    prompt = start_prompt(geometry, **first)
    dices, seconds, to_other = [], [], []
    for _ in range(max_rounds):
        began = time.perf_counter()
        logits = model.plain_logits(embedding, [prompt])[0]
        prediction = geometry.maps_to_image(logits[None], side)[0].cpu().numpy() > 0
        seconds.append(time.perf_counter() - began)
        dices.append(dice(prediction, target))
        if other_target is not None:
            to_other.append(dice(prediction, other_target))
        if rng.random() < user.accuracy:
            click = largest_error_click(prediction, target)
        else:  # a careless click: anywhere in the error
            click = sampled_error_click(prediction, target, rng, careful_share=0.0)
        if click is None:
            break
        x, y, positive = click
        mx, my = geometry.to_model(np.array([x, y]))
        prompt = prompt.with_feedback((float(mx), float(my)), positive, logits.cpu())
    while len(dices) < max_rounds:
        dices.append(dices[-1])
        if to_other:
            to_other.append(to_other[-1])
    return {
        "dice_all_rounds": dices,
        "dice_to_other": to_other,
        "seconds_per_round": float(np.mean(seconds)),
        "size": size_bin(target),
    }


def user_rng(seed: int, case_id: str, method_name: str) -> np.random.Generator:
    """The simulated user's random stream for one case and method (independent of every other case and method)."""
    base = case_rng(seed, f"{case_id}\x00{method_name}")
    return np.random.default_rng([USER_STREAM, int(base.integers(2**63))])


def load_cases(
    root: Path, split: str, max_cases: int | None
) -> tuple[Any, list[str], dict[str, MultiRaterCase], dict[str, Any]]:
    """(dataset, evaluated case ids, cases, rater statistics) of a split; cases where no rater marked anything are
    counted in the statistics but not evaluated."""
    dataset = open_dataset(root)
    case_ids = dataset.split(split)
    if max_cases is not None:
        case_ids = case_ids[:max_cases]
    if not case_ids:
        raise DataError(f"split {split!r} of {root} has no cases; choose another --split (train, test, all)")
    cases = {case_id: dataset.load(case_id) for case_id in case_ids}
    statistics = rater_statistics(cases.values()).to_dict()
    cases = {cid: c for cid, c in cases.items() if any(m.any() for m in c.raters.values())}
    if not cases:
        raise DataError(f"no case of split {split!r} of {root} has a rater mask with a structure in it")
    return dataset, list(cases), cases, statistics


def embedding_of(cache: EmbeddingCache, case_id: str, case: MultiRaterCase, root: Path) -> torch.Tensor:
    """The case's image embedding; an image the model cannot take (e.g. constant) is named in the message."""
    try:
        return cache.get(case.image)
    except SPAError as exc:
        raise type(exc)(f"case {case_id!r} of {root}: {exc}") from exc


def run_method(
    name: str,
    method: Method,
    case_id: str,
    case: MultiRaterCase,
    target: np.ndarray,
    first: dict[str, Any],
    embedding: torch.Tensor,
    max_rounds: int,
    seed: int,
    n_samples: int,
    cache: EmbeddingCache,
    initial_weights: np.ndarray | None = None,
    measure_distribution: bool = True,
    other_target: np.ndarray | None = None,
    accept_at: float | None = None,
) -> dict[str, Any]:
    """One simulated session of any method on one case (the other arguments as :func:`run_spa` takes them)."""
    rng = user_rng(seed, case_id, name)
    device = method.model.device
    if isinstance(method, ClickMethod):
        return run_click_baseline(
            method.model, case, target, first, embedding.to(device), max_rounds, method.user, rng, other_target
        )
    return run_spa(
        method,
        case,
        target,
        first,
        embedding.to(device),
        max_rounds,
        seed,
        n_samples,
        embeddings=cache,
        user_rng=rng,
        initial_weights=initial_weights,
        measure_distribution=measure_distribution,
        other_target=other_target,
        accept_at=accept_at,
    )


def describe_method(method: Method) -> dict[str, Any]:
    """What results.json records of a method: its model and settings."""
    model = method.model
    record = {
        "kind": "click" if isinstance(method, ClickMethod) else "spa",
        "fingerprint": model.fingerprint(),
        "backbone": model.backbone.info.name,
        "user": method.user.to_dict(),
        "tags": dict(method.tags),
        "training": model.training_info.get("train_config", {}),
    }
    if isinstance(method, SpaMethod):
        record |= {
            "conditioning": model.config.conditioning.value,
            "n_components": model.config.n_components,
            "sampling": model.config.sampling.value,
            "feedback_mask": model.config.feedback_mask,
            "carry_mixture": model.config.carry_mixture,
            "anchor": method.anchor.value,
            "box_search": method.box_search,
            "focus": method.focus.value,
            "n_samples": method.n_samples,
        }
    return record


def evaluate(
    methods: Mapping[str, Method],
    root: Path,
    split: str = "test",
    *,
    seed: int = 0,
    max_rounds: int = 6,
    targets: tuple[float, ...] = DEFAULT_TARGETS,
    first_prompt: FirstPrompt | str = FirstPrompt.POINT,
    n_samples: int = DEFAULT_SAMPLES,
    max_cases: int | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    on_case: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate methods (name → SpaMethod or ClickMethod) on one split."""
    methods = dict(methods)
    if not methods:
        raise DataError("nothing to evaluate: give at least one SPA model or click baseline")
    dataset, case_ids, cases, statistics = load_cases(root, split, max_cases)
    preferences = fixed_preferences({cid: c.raters for cid, c in cases.items()}, seed)
    any_model = next(iter(methods.values())).model
    first_prompt = FirstPrompt.parse(first_prompt, "first prompt")
    cache = EmbeddingCache(any_model, folder=cache_dir or Path("output/cache/embeddings"))
    results: dict[str, Any] = {"methods": {}}
    for name, method in methods.items():
        results["methods"][name] = {"label": method.label, "per_case": {}}
    for case_id in tqdm(case_ids, desc=f"evaluating ({split})", disable=not progress, unit="case"):
        case = cases[case_id]
        target = consensus(case.raters, preferences[case_id])
        first = evaluation_first_prompt(case.raters, target, first_prompt)
        embedding = embedding_of(cache, case_id, case, root)
        for name, method in methods.items():
            record = run_method(
                name, method, case_id, case, target, first, embedding, max_rounds, seed, n_samples, cache
            )
            record["dice"] = accepted_curve(record["dice_all_rounds"], max(targets))
            results["methods"][name]["per_case"][case_id] = record
        if on_case:
            on_case(case_id)
    for name in list(results["methods"]):
        if methods[name].user.stops_when_no_better:
            continue  # this user stops by their own rule; there is no "keeps choosing" curve
        method = results["methods"][name]
        results["methods"][f"{name}_all_rounds"] = {
            "label": f"{method['label']}, keeps choosing to round {max_rounds}",
            "per_case": {cid: dict(rec, dice=rec["dice_all_rounds"]) for cid, rec in method["per_case"].items()},
        }
    results.update(
        {
            "kind": "spa-evaluation",
            "seed": seed,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data": {
                "root": str(root),
                "layout": dataset.layout,
                "fingerprint": dataset.fingerprint(case_ids),
                "split": split,
                "cases": case_ids,
                "raters": statistics,
            },
            "model": {name: describe_method(method) for name, method in methods.items()},
            "protocol": {
                "max_rounds": max_rounds,
                "targets": list(targets),
                "first_prompt": first_prompt.value,
                "n_samples": n_samples,
                "accept_at": max(targets),
                "preferences": preferences,
            },
        }
    )
    return results
