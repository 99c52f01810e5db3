"""Evaluation metrics: overlap, rounds to a target (NoI), failure rate, confidence intervals,
generalised energy distance, sample and candidate diversity, calibration.

Masks are numpy boolean arrays of shape (H, W); any array that converts to bool is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from .errors import InputError

NOI_FAIL_VALUE = 10
SIZE_BINS = ((0.0, 0.01, "small"), (0.01, 0.10, "medium"), (0.10, 1.01, "large"))  # share of the image
SIZE_NAMES = tuple(name for _, _, name in SIZE_BINS)


def _as_mask_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return both masks as bool arrays, checking that their shapes agree."""
    a = np.asarray(a).astype(bool)
    b = np.asarray(b).astype(bool)
    if a.shape != b.shape:
        raise InputError(f"Masks of shapes {a.shape} and {b.shape} cannot be compared; pass masks of the same shape.")
    return a, b


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap 2|A∩B| / (|A| + |B|); two empty masks agree perfectly (1.0)."""
    a, b = _as_mask_pair(a, b)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union |A∩B| / |A∪B|; two empty masks agree perfectly (1.0)."""
    a, b = _as_mask_pair(a, b)
    union = int(np.logical_or(a, b).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(a, b).sum()) / union


def _check_target(target: float) -> float:
    """Return ``target`` as a float, checking that it is a Dice value in (0, 1]."""
    target = float(target)
    if not 0.0 < target <= 1.0:
        raise InputError(f"Dice target {target} is outside (0, 1]; pass a target such as 0.8 or 0.9.")
    return target


def rounds_to_reach(dice_per_round: Sequence[float], target: float, fail_value: int = NOI_FAIL_VALUE) -> int:
    """NoI: the 1-based round at which Dice first reaches ``target``, else ``fail_value``."""
    target = _check_target(target)
    if len(dice_per_round) == 0:
        raise InputError("The Dice list is empty; pass the Dice of at least one round.")
    for index, value in enumerate(dice_per_round):
        if float(value) >= target:
            return index + 1
    return int(fail_value)


def failure_rate(dice_lists: Sequence[Sequence[float]], target: float) -> float:
    """Share of images whose Dice never reaches ``target`` in any round."""
    target = _check_target(target)
    if len(dice_lists) == 0:
        raise InputError("No images were given; pass one Dice list per image.")
    failures = 0
    for values in dice_lists:
        if len(values) == 0:
            raise InputError("An image has an empty Dice list; pass the Dice of at least one round.")
        if max(float(v) for v in values) < target:
            failures += 1
    return failures / len(dice_lists)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval (mean, low, high); one value gives (v, v, v)."""
    if not 0.0 < confidence < 1.0:
        raise InputError(f"Confidence {confidence} is outside (0, 1); pass a level such as 0.95.")
    data = np.asarray(list(values), dtype=float)
    if data.size == 0:
        raise InputError("No values were given; pass at least one value to average.")
    if not np.all(np.isfinite(data)):
        raise InputError("The values contain NaN or infinity; drop them before computing the mean.")
    mean = float(data.mean())
    if data.size == 1:
        return mean, mean, mean
    standard_error = float(data.std(ddof=1)) / math.sqrt(data.size)
    t_quantile = float(stats.t.ppf(0.5 + confidence / 2.0, df=data.size - 1))
    half_width = t_quantile * standard_error
    return mean, mean - half_width, mean + half_width


def _iou_distances(first: Sequence[np.ndarray], second: Sequence[np.ndarray]) -> np.ndarray:
    """1 − IoU for every pair (i, j) as a matrix, computed on the bounding box of everything marked (two empty masks
    agree perfectly, as :func:`iou` says)."""
    a = np.stack([np.asarray(m).astype(bool) for m in first])
    b = np.stack([np.asarray(m).astype(bool) for m in second])
    if a.shape[1:] != b.shape[1:]:
        raise InputError(
            f"Masks of shapes {a.shape[1:]} and {b.shape[1:]} cannot be compared; pass masks of one image."
        )
    marked = a.any(0) | b.any(0)
    if not marked.any():
        return np.zeros((len(a), len(b)))
    rows, cols = np.nonzero(marked)
    window = (slice(None), slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    fa = a[window].reshape(len(a), -1).astype(np.float32)
    fb = b[window].reshape(len(b), -1).astype(np.float32)
    intersection = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        overlap = np.where(union > 0, intersection / np.maximum(union, 1.0), 1.0)
    return 1.0 - overlap


def _mean_distance(first: Sequence[np.ndarray], second: Sequence[np.ndarray], skip_same_index: bool) -> float:
    """Mean of 1 - IoU over index pairs (i, j); optionally without the pairs with i == j."""
    distances = _iou_distances(first, second)
    if skip_same_index:
        keep = ~np.eye(*distances.shape, dtype=bool)
        return float(distances[keep].mean())
    return float(distances.mean())


def sample_diversity(masks: Sequence[np.ndarray]) -> float:
    """Mean 1 − IoU between distinct pairs of masks (0: all alike); the within-set term of the GED without the
    pairs of a mask with itself. Fewer than 2 masks give NaN."""
    if len(masks) < 2:
        return float("nan")
    return _mean_distance(masks, masks, skip_same_index=True)


CALIBRATION_BINS = 10
CALIBRATION_MARGIN_PX = 3


def expected_calibration_error(
    probability: np.ndarray, rater_masks: Sequence[np.ndarray], bins: int = CALIBRATION_BINS
) -> float:
    """ECE of a probability map against the raters' mean (the share of raters marking each pixel): pixels in equal-width
    probability bins, Σ_b |b|/n · |mean probability − mean rater share| over the pixels near the structure (every pixel
    a rater marks or the map gives ≥ 0.05, grown by ``CALIBRATION_MARGIN_PX``), so the empty background does not
    dilute it."""
    from scipy import ndimage

    probability = np.asarray(probability, dtype=np.float64)
    if len(rater_masks) == 0:
        raise InputError("Calibration needs at least one rater mask.")
    share = np.mean([np.asarray(m).astype(bool) for m in rater_masks], axis=0)
    if share.shape != probability.shape:
        raise InputError(f"The probability map {probability.shape} and the rater masks {share.shape} differ in shape.")
    region = ndimage.binary_dilation((share > 0) | (probability >= 0.05), iterations=CALIBRATION_MARGIN_PX)
    if not region.any():
        return 0.0
    p, y = probability[region], share[region]
    index = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            total += chosen.sum() * abs(p[chosen].mean() - y[chosen].mean())
    return float(total / p.size)


def generalized_energy_distance(
    samples: Sequence[np.ndarray], raters: Sequence[np.ndarray], unbiased: bool = False
) -> float:
    """Squared generalised energy distance GED² = 2E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')], d = 1 - IoU.

    By default every pair is averaged, the pairs of a mask with itself included (as in the
    Probabilistic U-Net and PHiSeg code): the value is then 0 when both sets hold the same masks
    and never negative. ``unbiased=True`` leaves out the pairs of a mask with itself in the two
    within-set terms (an unbiased estimate that can be slightly negative; needs 2+ masks per set).
    """
    if len(samples) == 0 or len(raters) == 0:
        raise InputError("GED needs at least one sample and one rater mask; pass non-empty lists.")
    if unbiased and (len(samples) < 2 or len(raters) < 2):
        raise InputError(
            "Unbiased GED needs at least two samples and two rater masks; pass more or use unbiased=False."
        )
    cross = _mean_distance(samples, raters, skip_same_index=False)
    within_samples = _mean_distance(samples, samples, skip_same_index=unbiased)
    within_raters = _mean_distance(raters, raters, skip_same_index=unbiased)
    return 2.0 * cross - within_samples - within_raters


def candidate_diversity(candidates: Sequence[np.ndarray]) -> float:
    """Mean pairwise Dice between the candidates (lower = more diverse); fewer than 2 gives NaN."""
    if len(candidates) < 2:
        return float("nan")
    values = []
    for i in range(len(candidates)):
        for j in range(i + 1, len(candidates)):
            values.append(dice(candidates[i], candidates[j]))
    return float(np.mean(values))


def size_bin(mask: np.ndarray) -> str:
    """small (< 1 % of the image), medium (< 10 %) or large: the share of the image a structure covers."""
    share = float(np.count_nonzero(mask)) / mask.size
    return next(name for low, high, name in SIZE_BINS if low <= share < high)
