"""The evaluation's two further studies (paper Table 2 and §4.3.2), on the same simulated users and sessions as
:mod:`.runner`.

- Rater alignment: the user's preference is a fixed subset of the raters (every non-empty proper subset, in turn);
  per round, the Dice of the recommendation to the included raters' consensus and to the excluded raters'. Choosing
  should pull the mask towards the included raters and away from the excluded ones.
- Profiles: a user of one consistent style segments a sequence of images of one structure; each session starts
  either fresh (uniform mixture weights) or from the profile of the sessions before it (folded exactly as the
  product's profile store does, ``profiles.fold_session``). Rounds to each target, both ways, per style.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..embeddings import EmbeddingCache
from ..errors import InputError
from ..preference import PreferenceMixture
from ..profiles import fold_session
from ..simulation.preferences import consensus
from ..simulation.prompts import FirstPrompt, evaluation_first_prompt
from .runner import Method, SpaMethod, embedding_of, load_cases, run_method

SPLIT_SEPARATOR = "|"  # "a+b|c+d": raters a and b included, c and d excluded


def rater_splits(names: Sequence[str]) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Every (included, excluded) split of the raters into two non-empty groups, smaller included groups first."""
    ordered = sorted(str(n) for n in names)
    splits = []
    for size in range(1, len(ordered)):
        for included in itertools.combinations(ordered, size):
            splits.append((included, tuple(n for n in ordered if n not in included)))
    return splits


def split_key(included: Sequence[str], excluded: Sequence[str]) -> str:
    return "+".join(included) + SPLIT_SEPARATOR + "+".join(excluded)


def rater_alignment(
    methods: Mapping[str, Method],
    root: Path,
    split: str,
    *,
    seed: int,
    max_rounds: int,
    first_prompt: FirstPrompt | str,
    n_samples: int,
    max_cases: int | None,
    cache_dir: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Paper Table 2: for every split of the raters (of the cases with the most raters in this split), the target is
    the included raters' consensus; per round the Dice to it and to the excluded raters' consensus. A case is left out
    of a split where either consensus is empty."""
    _, case_ids, cases, _ = load_cases(root, split, max_cases)
    most = max(len(c.raters) for c in cases.values())
    if most < 2:
        raise InputError(f"split {split!r} of {root} has one rater per case; rater alignment needs two or more")
    case_ids = [cid for cid in case_ids if len(cases[cid].raters) == most]
    names = sorted(cases[case_ids[0]].raters)
    case_ids = [cid for cid in case_ids if sorted(cases[cid].raters) == names]
    splits = rater_splits(names)
    first_prompt = FirstPrompt.parse(first_prompt, "first prompt")
    cache = EmbeddingCache(next(iter(methods.values())).model, folder=cache_dir)
    out: dict[str, Any] = {
        "raters": names,
        "cases": case_ids,
        "splits": [split_key(i, e) for i, e in splits],
        "methods": {name: {"label": m.label, "per_split": {}} for name, m in methods.items()},
    }
    for case_id in tqdm(case_ids, desc=f"rater alignment ({split})", disable=not progress, unit="case"):
        case = cases[case_id]
        embedding = embedding_of(cache, case_id, case, root)
        for included, excluded in splits:
            target = consensus(case.raters, included)
            other = consensus(case.raters, excluded)
            if not target.any() or not other.any():
                continue
            first = evaluation_first_prompt(case.raters, target, first_prompt)
            key = split_key(included, excluded)
            for name, method in methods.items():
                record = run_method(
                    f"{name}{SPLIT_SEPARATOR}{key}",
                    method,
                    case_id,
                    case,
                    target,
                    first,
                    embedding,
                    max_rounds,
                    seed,
                    n_samples,
                    cache,
                    measure_distribution=False,
                    other_target=other,
                )
                per_split = out["methods"][name]["per_split"].setdefault(key, {})
                per_split[case_id] = {"included": record["dice_all_rounds"], "excluded": record["dice_to_other"]}
    return out


PROFILE_STYLES = ("generous", "majority", "strict")


def style_target(raters: Mapping[str, np.ndarray], style: str) -> np.ndarray:
    """The mask a user of ``style`` draws on an image: generous (any rater marks it), majority (half of the raters or
    more), strict (every rater), or rater:NAME (that rater's own mask)."""
    masks = [np.asarray(m, dtype=bool) for m in raters.values()]
    if style == "generous":
        return np.logical_or.reduce(masks)
    if style == "majority":
        return consensus(raters, list(raters))
    if style == "strict":
        return np.logical_and.reduce(masks)
    if style.startswith("rater:") and style[len("rater:") :] in raters:
        return np.asarray(raters[style[len("rater:") :]], dtype=bool)
    raise InputError(
        f"unknown profile style {style!r}; use generous, majority, strict or rater:NAME with a rater of every case"
    )


def profile_study(
    methods: Mapping[str, SpaMethod],
    root: Path,
    split: str,
    *,
    styles: Sequence[str],
    seed: int,
    max_rounds: int,
    accept_at: float,
    first_prompt: FirstPrompt | str,
    n_samples: int,
    max_cases: int | None,
    cache_dir: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Paper §4.3.2: per style, the split's cases in order as one user's sequence of images. Each session runs until
    Dice ≥ ``accept_at`` or ``max_rounds``; ``fresh`` starts every image from uniform weights, ``profile`` from the
    profile folded from the sessions before it (the first image is the same both ways and is recorded apart)."""
    _, case_ids, cases, _ = load_cases(root, split, max_cases)
    first_prompt = FirstPrompt.parse(first_prompt, "first prompt")
    cache = EmbeddingCache(next(iter(methods.values())).model, folder=cache_dir)
    out: dict[str, Any] = {
        "styles": list(styles),
        "cases": case_ids,
        "accept_at": accept_at,
        "methods": {name: {"label": m.label, "per_style": {}} for name, m in methods.items()},
    }
    for name, method in methods.items():
        model = method.model
        for style in styles:
            profile = None
            sequence: dict[str, Any] = {"order": [], "fresh": {}, "profile": {}, "profile_sessions": {}}
            for case_id in tqdm(case_ids, desc=f"profiles ({name}, {style})", disable=not progress, unit="case"):
                case = cases[case_id]
                target = style_target(case.raters, style)
                if not target.any():
                    continue
                first = evaluation_first_prompt(case.raters, target, first_prompt)
                embedding = embedding_of(cache, case_id, case, root)
                runs = {}
                for mode, weights in (
                    ("fresh", None),
                    ("profile", None if profile is None else np.asarray(profile.weights, dtype=np.float32)),
                ):
                    if mode == "profile" and profile is None:  # no profile yet: the same session as the fresh one
                        runs[mode] = runs["fresh"]
                        continue
                    runs[mode] = run_method(
                        f"{name}\x00{style}",
                        method,
                        case_id,
                        case,
                        target,
                        first,
                        embedding,
                        max_rounds,
                        seed,
                        n_samples,
                        cache,
                        initial_weights=weights,
                        measure_distribution=False,
                        accept_at=accept_at,
                    )
                for mode, record in runs.items():  # each session ended where the user accepted (or at the last round)
                    sequence[mode][case_id] = record["dice_all_rounds"]
                sequence["profile_sessions"][case_id] = 0 if profile is None else profile.n_sessions
                sequence["order"].append(case_id)
                accepted = runs["profile"]
                mixture = PreferenceMixture.from_dict(accepted["final_mixture"])
                rounds = len(sequence["profile"][case_id])
                profile = fold_session(
                    profile, "simulated", style.replace(":", "_"), model.fingerprint(), mixture, rounds, where=style
                )
            out["methods"][name]["per_style"][style] = sequence
    return out
