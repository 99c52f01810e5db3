"""The simulated user's reactions to a round: which candidate they pick, where they would click.

The candidate user (SPA) picks the candidate with the highest Dice to their target; the click user
(SAM-style refinement) clicks the deepest pixel of the largest error region.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..masks import as_mask, deepest_pixel
from ..metrics import dice


def nearest_candidate(candidate_masks: np.ndarray, target: np.ndarray) -> int:
    """The candidate (K, h, w) with the highest Dice to the target (0-based; ties: the first)."""
    return int(np.argmax([dice(mask, target) for mask in candidate_masks]))


def largest_error_click(prediction: np.ndarray, target: np.ndarray) -> tuple[float, float, bool] | None:
    """Correction click (x, y, positive) at the deepest pixel of the largest error region.

    Missed foreground (target, not predicted) and extra foreground (predicted, not target) are
    split into 8-connected components separately; the component with most pixels wins (ties:
    missed before extra, then raster order). ``positive`` is True for a missed region. Returns
    None when the prediction equals the target.
    """
    prediction = as_mask(prediction, "prediction mask")
    target = as_mask(target, "target mask")
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
    row, col = deepest_pixel(best_region)
    return float(col), float(row), best_positive


def sampled_error_click(
    prediction: np.ndarray, target: np.ndarray, rng: np.random.Generator, careful_share: float = 0.5
) -> tuple[float, float, bool] | None:
    """A correction click as SAM trains them: with probability ``careful_share`` the careful user's click
    (:func:`largest_error_click`), otherwise a uniformly drawn pixel of all the error, positive where the structure
    was missed. None when the prediction equals the target."""
    if rng.random() < careful_share:
        return largest_error_click(prediction, target)
    prediction = as_mask(prediction, "prediction mask")
    target = as_mask(target, "target mask")
    errors = prediction != target
    rows, cols = np.nonzero(errors)
    if len(rows) == 0:
        return None
    pick = int(rng.integers(len(rows)))
    row, col = int(rows[pick]), int(cols[pick])
    return float(col), float(row), bool(target[row, col])


def imperfect_choice(candidate_masks: np.ndarray, target: np.ndarray, accuracy: float, rng: np.random.Generator) -> int:
    """A user who is not an oracle: the nearest candidate with probability ``accuracy``, otherwise one of the
    others drawn uniformly (0-based)."""
    nearest = nearest_candidate(candidate_masks, target)
    count = len(candidate_masks)
    if count == 1 or rng.random() < accuracy:
        return nearest
    others = [k for k in range(count) if k != nearest]
    return int(others[int(rng.integers(len(others)))])
