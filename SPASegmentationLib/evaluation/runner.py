"""Run the evaluation protocol: simulated users on held-out cases, SPA vs a click baseline.

Per case the target preference is a fixed, seeded rater subset (``protocol.fixed_preferences``);
the first prompt is the deepest point of the all-rater region (or a box around the target). Every
method then runs ``max_rounds`` rounds and the Dice of its recommended mask is recorded after each:
- SPA: the simulated user picks the candidate with the highest Dice to the target each round;
- click baseline (what SAM/MedSAM users do): one click per round at the deepest pixel of the
  largest error region, the previous logits as mask prompt, on the pretrained backbone alone.
As the protocol says, the user accepts (and stops) once Dice ≥ the highest target; the accepted mask
stays the result for later rounds (``dice``). Each method also runs on to the last round regardless
(``dice_all_rounds``), which shows what choosing does beyond the point a user would stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
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
from ..metrics import candidate_diversity, dice, size_bin
from ..model.spa import SPAModel
from ..rounds import DEFAULT_SAMPLES
from ..session import DEFAULT_FOCUS, ChoiceAnchor, FocusMode, Session
from ..simulation.choices import largest_error_click, nearest_candidate
from ..simulation.preferences import consensus, fixed_preferences
from ..simulation.prompts import FirstPrompt, evaluation_first_prompt

DEFAULT_TARGETS = (0.8, 0.9)


@dataclass
class SpaMethod:
    """One SPA configuration under evaluation: a model and how rounds follow the user's choice."""

    label: str
    model: SPAModel
    anchor: ChoiceAnchor = ChoiceAnchor.NONE
    box_search: bool = True  # a lone first click becomes a box around the structure (engine.box_from_point)
    focus: FocusMode = DEFAULT_FOCUS  # when a small structure is segmented in a magnified window around it


def accepted_curve(dice_all_rounds: list[float], accept_at: float) -> list[float]:
    """The protocol's curve: after the first round with Dice ≥ accept_at, that Dice is kept."""
    curve = []
    for value in dice_all_rounds:
        curve.append(curve[-1] if curve and curve[-1] >= accept_at else value)
    return curve


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
) -> dict[str, Any]:
    """One simulated SPA session: Dice per round, candidate diversity, seconds per round, and after each choice
    whether the next recommendation moved away from the chosen candidate (Dice to it fell)."""
    session = Session(
        method.model,
        case.image,
        seed=seed,
        n_samples=n_samples,
        embedding=embedding,
        anchor=method.anchor,
        box_search=method.box_search,
        focus=method.focus,
        embeddings=embeddings,
    )
    round_ = session.start(**first)
    dices, diversity, seconds = (
        [dice(round_.recommended, target)],
        [candidate_diversity(list(round_.candidates))],
        [round_.seconds],
    )
    to_choice, anchor_weights = [], []
    while round_.index < max_rounds:
        chosen = nearest_candidate(round_.candidates, target)
        choice = round_.candidates[chosen]
        before = dice(round_.recommended, choice)
        round_ = session.choose(chosen)
        to_choice.append([before, dice(round_.recommended, choice)])
        anchor_weights.append(round_.anchor_weight)
        dices.append(dice(round_.recommended, target))
        diversity.append(candidate_diversity(list(round_.candidates)))
        seconds.append(round_.seconds)
    return {
        "dice_all_rounds": dices,
        "candidate_diversity": diversity,
        "seconds_per_round": float(np.mean(seconds)),
        "choices": session.choices,
        "dice_to_choice": to_choice,  # per choice: [Dice(recommended, chosen) before, after]
        "anchor_weights": anchor_weights,
        "size": size_bin(target),
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
) -> dict[str, Any]:
    """Click refinement on the backbone alone: one corrective click per round, previous logits as mask."""
    geometry = model.geometry_of(case.image)
    side = model.backbone.mask_size
    prompt = start_prompt(geometry, **first)
    dices, seconds = [], []
    for _ in range(max_rounds):
        began = time.perf_counter()
        logits = model.plain_logits(embedding, [prompt])[0]
        prediction = geometry.maps_to_image(logits[None], side)[0].cpu().numpy() > 0
        seconds.append(time.perf_counter() - began)
        dices.append(dice(prediction, target))
        click = largest_error_click(prediction, target)
        if click is None:
            break
        x, y, positive = click
        mx, my = geometry.to_model(np.array([x, y]))
        prompt = prompt.with_feedback((float(mx), float(my)), positive, logits.cpu())
    while len(dices) < max_rounds:
        dices.append(dices[-1])
    return {"dice_all_rounds": dices, "seconds_per_round": float(np.mean(seconds)), "size": size_bin(target)}


def evaluate(
    methods: dict[str, SpaMethod],
    root: Path,
    split: str = "test",
    *,
    baseline_model: SPAModel | None = None,
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
    """Evaluate SPA configurations (name → SpaMethod) and optionally the click baseline on one split."""
    dataset = open_dataset(root)
    case_ids = dataset.split(split)
    if max_cases is not None:
        case_ids = case_ids[:max_cases]
    if not case_ids:
        raise DataError(f"split {split!r} of {root} has no cases; choose another --split (train, test, all)")
    cases = {case_id: dataset.load(case_id) for case_id in case_ids}
    statistics = rater_statistics(cases.values())
    # A case where no rater marked anything has no preference to reach: it is counted, not evaluated.
    cases = {cid: c for cid, c in cases.items() if any(m.any() for m in c.raters.values())}
    case_ids = list(cases)
    if not case_ids:
        raise DataError(f"no case of split {split!r} of {root} has a rater mask with a structure in it")
    preferences = fixed_preferences({cid: c.raters for cid, c in cases.items()}, seed)
    any_model = baseline_model or next(iter(methods.values())).model
    first_prompt = FirstPrompt.parse(first_prompt, "first prompt")
    cache = EmbeddingCache(any_model, folder=cache_dir or Path("output/cache/embeddings"))
    results: dict[str, Any] = {"methods": {}}
    for name, method in methods.items():
        results["methods"][name] = {"label": method.label, "per_case": {}}
    if baseline_model is not None:
        results["methods"]["click_baseline"] = {
            "label": "Click refinement (LiteMedSAM, one click per round)",
            "per_case": {},
        }
    for case_id in tqdm(case_ids, desc=f"evaluating ({split})", disable=not progress, unit="case"):
        case = cases[case_id]
        target = consensus(case.raters, preferences[case_id])
        first = evaluation_first_prompt(case.raters, target, first_prompt)
        try:
            embedding = cache.get(case.image)
        except SPAError as exc:  # e.g. a constant image: say which case it is
            raise type(exc)(f"case {case_id!r} of {root}: {exc}") from exc
        for name, method in methods.items():
            device = method.model.device
            record = run_spa(
                method, case, target, first, embedding.to(device), max_rounds, seed, n_samples, embeddings=cache
            )
            record["dice"] = accepted_curve(record["dice_all_rounds"], max(targets))
            results["methods"][name]["per_case"][case_id] = record
        if baseline_model is not None:
            record = run_click_baseline(
                baseline_model, case, target, first, embedding.to(baseline_model.device), max_rounds
            )
            record["dice"] = accepted_curve(record["dice_all_rounds"], max(targets))
            results["methods"]["click_baseline"]["per_case"][case_id] = record
        if on_case:
            on_case(case_id)
    for name in list(results["methods"]):
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
                "raters": statistics.to_dict(),
            },
            "model": {
                name: {
                    "fingerprint": method.model.fingerprint(),
                    "conditioning": method.model.config.conditioning.value,
                    "backbone": method.model.backbone.info.name,
                    "anchor": method.anchor.value,
                    "box_search": method.box_search,
                    "focus": method.focus.value,
                    "training": method.model.training_info.get("train_config", {}),
                }
                for name, method in methods.items()
            },
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
