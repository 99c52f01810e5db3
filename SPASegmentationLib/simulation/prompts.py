"""The simulated user's first prompt: a click inside the structure or a box around it.

Evaluation uses fixed prompts (the deepest pixel of the region all raters mark, or the target's
bounding box); training draws varied ones (a random pixel of that region, a box with a random
margin and jitter) so the model learns from the prompts real users give. Prompts are image-pixel
keyword arguments for ``Session.start`` / ``engine.start_prompt``: {"point": (x, y)} or {"box": (x0, y0, x1, y1)}.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..enums import TextEnum
from ..errors import InputError
from ..masks import as_mask, deepest_pixel
from .preferences import _rater_masks

TRAINING_BOX_MARGIN_PX = (0.0, 3.0)  # training boxes are widened by a uniform draw in this range
TRAINING_BOX_JITTER_PX = 2.0  # then each side moves by up to this much


class FirstPrompt(TextEnum):
    """Which first prompt the simulated user gives."""

    POINT = "point"
    BOX = "box"
    MIXED = "mixed"  # training only: point or box, half each


def initial_point(raters: Mapping[str, np.ndarray], target: np.ndarray) -> tuple[float, float]:
    """First click (x, y): the deepest pixel of the region all raters mark, within the target.

    When the raters share no pixel inside the target, the deepest pixel of the target is used.
    Ties go to the lowest row, then the lowest column. An empty target raises InputError.
    """
    target = as_mask(target, "target mask")
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
    row, col = deepest_pixel(region)
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
    target = as_mask(target, "target mask")
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


def evaluation_first_prompt(
    raters: Mapping[str, np.ndarray], target: np.ndarray, kind: FirstPrompt | str
) -> dict[str, Any]:
    """The fixed first prompt of the evaluation: the target's box, or the deepest all-rater point."""
    kind = FirstPrompt.parse(kind, "first prompt")
    if kind is FirstPrompt.MIXED:
        raise InputError("the evaluation's first prompt is a point or a box, not mixed")
    if kind is FirstPrompt.BOX:
        return {"box": initial_box(target)}
    return {"point": initial_point(raters, target)}


def training_first_prompt(
    raters: Mapping[str, np.ndarray], target: np.ndarray, kind: FirstPrompt | str, rng: np.random.Generator
) -> dict[str, Any]:
    """A varied first prompt for training: a jittered box with a random margin, or a random point
    of the region all raters (and the target) mark. ``mixed`` picks either with probability 1/2;
    a box too thin to hold a pixel becomes a point."""
    kind = FirstPrompt.parse(kind, "first prompt")
    if kind is FirstPrompt.MIXED:
        kind = FirstPrompt.POINT if rng.random() < 0.5 else FirstPrompt.BOX
    if kind is FirstPrompt.BOX:
        margin = float(rng.uniform(*TRAINING_BOX_MARGIN_PX))
        box = initial_box(target, margin_px=margin, rng=rng, jitter_px=TRAINING_BOX_JITTER_PX)
        if box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
            return {"box": box}
    agreed = np.logical_and.reduce([m for m in raters.values()] + [target])
    region = agreed if agreed.any() else target
    rows, cols = np.nonzero(region)
    pick = int(rng.integers(len(rows)))
    return {"point": (float(cols[pick]), float(rows[pick]))}
