"""The simulated user's fixed inputs: preference draws, first prompts and correction clicks.

Everything here is deterministic given its inputs (and the seed or generator passed in), so an
evaluation can be repeated exactly and two runs can be compared image by image.

Preferences: for each image a non-empty subset of its raters is drawn, all 2^R - 1 subsets
equally likely; the target is the mean of their masks binarised at 0.5. Rater names are always
put in sorted order before drawing, so the order of a dict never changes a draw.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..errors import InputError

MAX_PREFERENCE_TRIES = 100
MAX_RATERS = 30


def _as_mask(mask: np.ndarray, what: str) -> np.ndarray:
    """Return ``mask`` as a 2D bool array, or raise naming ``what``."""
    array = np.asarray(mask)
    if array.ndim != 2:
        raise InputError(f"The {what} has shape {array.shape}; pass a 2D (H, W) mask.")
    return array.astype(bool)


def _rater_masks(raters: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return the rater masks as bool arrays keyed by name, checking that all shapes agree."""
    masks = {str(name): _as_mask(mask, f"mask of rater {name!r}") for name, mask in raters.items()}
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


def _case_rng(seed: int, case_id: object) -> np.random.Generator:
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
        rng = _case_rng(int(seed), case_id)
        if isinstance(raters, Mapping):
            subset, _ = draw_preference(raters, rng)
        else:
            subset = _draw_subset(list(raters), rng)
        preferences[case_id] = subset
    return preferences


def _deepest_pixel(region: np.ndarray) -> tuple[int, int]:
    """(row, col) of the pixel farthest from the region's edge (the image border counts as edge).

    Ties go to the lowest row, then the lowest column.
    """
    padded = np.pad(region, 1, mode="constant", constant_values=False)
    depth = ndimage.distance_transform_edt(padded)[1:-1, 1:-1]
    flat_index = int(np.argmax(depth))
    row, col = np.unravel_index(flat_index, depth.shape)
    return int(row), int(col)


def initial_point(raters: Mapping[str, np.ndarray], target: np.ndarray) -> tuple[float, float]:
    """First click (x, y): the deepest pixel of the region all raters mark, within the target.

    When the raters share no pixel inside the target, the deepest pixel of the target is used.
    Ties go to the lowest row, then the lowest column. An empty target raises InputError.
    """
    target = _as_mask(target, "target mask")
    if not target.any():
        raise InputError("The target mask is empty; pass a preference with at least one foreground pixel.")
    masks = _rater_masks(raters)
    region = target.copy()
    for name, mask in masks.items():
        if mask.shape != target.shape:
            raise InputError(
                f"Rater {name!r} has shape {mask.shape} but the target has {target.shape}; pass masks of one image."
            )
        region &= mask
    if not region.any():
        region = target
    row, col = _deepest_pixel(region)
    return float(col), float(row)


def initial_box(
    target: np.ndarray,
    margin_px: float = 0.0,
    rng: np.random.Generator | None = None,
    jitter_px: float = 0.0,
) -> tuple[float, float, float, float]:
    """Box (x0, y0, x1, y1): inclusive pixel bounds of the target, widened and jittered, clipped.

    Each side moves out by ``margin_px``; with ``jitter_px`` > 0 each coordinate is then shifted
    by an independent uniform draw in [-jitter_px, jitter_px] from ``rng`` (required then). The
    box is clipped to the image and kept ordered (x0 <= x1, y0 <= y1).
    """
    target = _as_mask(target, "target mask")
    if not target.any():
        raise InputError("The target mask is empty; pass a preference with at least one foreground pixel.")
    if margin_px < 0 or jitter_px < 0:
        raise InputError(f"margin_px {margin_px} and jitter_px {jitter_px} must be >= 0; pass non-negative values.")
    if jitter_px > 0 and rng is None:
        raise InputError("jitter_px > 0 needs a random generator; pass rng=np.random.default_rng(seed).")
    rows = np.flatnonzero(target.any(axis=1))
    cols = np.flatnonzero(target.any(axis=0))
    x0 = float(cols[0]) - margin_px
    y0 = float(rows[0]) - margin_px
    x1 = float(cols[-1]) + margin_px
    y1 = float(rows[-1]) + margin_px
    if jitter_px > 0:
        shift = rng.uniform(-jitter_px, jitter_px, size=4)
        x0, y0, x1, y1 = x0 + shift[0], y0 + shift[1], x1 + shift[2], y1 + shift[3]
    height, width = target.shape
    x0, x1 = sorted((float(np.clip(x0, 0, width - 1)), float(np.clip(x1, 0, width - 1))))
    y0, y1 = sorted((float(np.clip(y0, 0, height - 1)), float(np.clip(y1, 0, height - 1))))
    return x0, y0, x1, y1


def largest_error_click(prediction: np.ndarray, target: np.ndarray) -> tuple[float, float, bool] | None:
    """Correction click (x, y, positive) at the deepest pixel of the largest error region.

    Missed foreground (target, not predicted) and extra foreground (predicted, not target) are
    split into 8-connected components separately; the component with most pixels wins (ties:
    missed before extra, then raster order). ``positive`` is True for a missed region. Returns
    None when the prediction equals the target.
    """
    prediction = _as_mask(prediction, "prediction mask")
    target = _as_mask(target, "target mask")
    if prediction.shape != target.shape:
        raise InputError(
            f"Prediction {prediction.shape} and target {target.shape} differ in shape; pass masks of one image."
        )
    connectivity = np.ones((3, 3), dtype=bool)
    best_region = None
    best_size = 0
    best_positive = True
    for positive, errors in ((True, target & ~prediction), (False, prediction & ~target)):
        labels, count = ndimage.label(errors, structure=connectivity)
        for label in range(1, count + 1):
            component = labels == label
            size = int(component.sum())
            if size > best_size:
                best_region, best_size, best_positive = component, size, positive
    if best_region is None:
        return None
    row, col = _deepest_pixel(best_region)
    return float(col), float(row), best_positive
