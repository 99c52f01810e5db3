"""The simulated user's preference: which raters' style they follow on an image.

For each image a non-empty subset of its raters is drawn, all 2^R - 1 subsets equally likely; the
target is the mean of their masks binarised at 0.5. Rater names are always put in sorted order
before drawing, so the order of a dict never changes a draw. Everything is deterministic given the
seed or generator passed in, so an evaluation can be repeated exactly and compared image by image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..masks import as_mask

MAX_PREFERENCE_TRIES = 100
MAX_RATERS = 30


def _rater_masks(raters: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return the rater masks as bool arrays keyed by name, checking that all shapes agree."""
    masks = {str(name): as_mask(mask, f"mask of rater {name!r}") for name, mask in raters.items()}
    shapes = {mask.shape for mask in masks.values()}
    if len(shapes) > 1:
        raise InputError(f"The rater masks have different shapes {sorted(shapes)}; pass masks of one image.")
    return masks


def _draw_subset(names: Sequence[str], rng: np.random.Generator) -> list[str]:
    """Draw a non-empty subset of ``names`` (sorted first), all 2^R - 1 subsets equally likely."""
    ordered = sorted(str(name) for name in names)
    if len(ordered) == 0:
        raise InputError("The image has no raters; pass at least one rater name or mask.")
    if len(ordered) > MAX_RATERS:
        raise InputError(f"The image has {len(ordered)} raters; at most {MAX_RATERS} are supported.")
    if len(set(ordered)) != len(ordered):
        raise InputError(f"The rater names {ordered} repeat; give every rater a distinct name.")
    code = int(rng.integers(1, 2 ** len(ordered)))
    return [name for bit, name in enumerate(ordered) if code & (1 << bit)]


def consensus(raters: Mapping[str, np.ndarray], subset: Sequence[str]) -> np.ndarray:
    """The mean of the chosen raters' masks binarised at 0.5 (bool mask)."""
    masks = _rater_masks(raters)
    if len(subset) == 0:
        raise InputError("The rater subset is empty; pass at least one rater name.")
    missing = [name for name in subset if str(name) not in masks]
    if missing:
        raise InputError(f"Raters {missing} are not among {sorted(masks)}; pass names of this image's raters.")
    stack = np.stack([masks[str(name)] for name in subset]).astype(float)
    return stack.mean(axis=0) >= 0.5


def draw_preference(
    raters: Mapping[str, np.ndarray], rng: np.random.Generator, max_tries: int = MAX_PREFERENCE_TRIES
) -> tuple[list[str], np.ndarray]:
    """Draw a rater subset uniformly over the 2^R - 1 non-empty subsets; return (names, consensus).

    A subset whose consensus is empty (raters that do not overlap enough) is redrawn, up to
    ``max_tries`` draws in all; if every draw is empty, the single rater with the largest mask
    is used (ties: first name in sorted order). Redraws make the subsets with an empty consensus
    impossible and the others equally likely. All-empty rater masks raise InputError.
    """
    masks = _rater_masks(raters)
    if len(masks) == 0:
        raise InputError("The image has no raters; pass at least one rater mask.")
    if max_tries < 1:
        raise InputError(f"max_tries is {max_tries}; pass at least 1.")
    if not any(mask.any() for mask in masks.values()):
        raise InputError("Every rater mask of this image is empty; leave the image out of the evaluation.")
    for _ in range(max_tries):
        subset = _draw_subset(list(masks), rng)
        target = consensus(masks, subset)
        if target.any():
            return subset, target
    ordered = sorted(masks)
    largest = max(ordered, key=lambda name: (int(masks[name].sum()), -ordered.index(name)))
    return [largest], masks[largest].copy()


def case_rng(seed: int, case_id: object) -> np.random.Generator:
    """A generator that depends only on (seed, case id), using a stable hash of the case id."""
    digest = hashlib.sha256(str(case_id).encode("utf-8")).digest()
    case_key = int.from_bytes(digest[:8], "little")
    return np.random.default_rng([int(seed), case_key])


def fixed_preferences(
    case_raters: Mapping[str, Sequence[str] | Mapping[str, np.ndarray]], seed: int
) -> dict[str, list[str]]:
    """Draw one preference subset per case, deterministically from (seed, case id).

    Each case has its own generator seeded by the seed and a stable hash of its id, so adding or
    removing cases never changes another case's draw. Values are either rater names (the subset
    is drawn with no check) or {name: mask} dicts (drawn with :func:`draw_preference`, which
    redraws empty consensuses; its first draw is the same subset as the names-only draw).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise InputError(f"Seed {seed!r} is not a non-negative integer; pass a seed such as 0.")
    preferences: dict[str, list[str]] = {}
    for case_id, raters in case_raters.items():
        rng = case_rng(int(seed), case_id)
        if isinstance(raters, Mapping):
            subset, _ = draw_preference(raters, rng)
        else:
            subset = _draw_subset(list(raters), rng)
        preferences[case_id] = subset
    return preferences
