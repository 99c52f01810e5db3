"""Carry an accepted 2-D SPA mask through the neighbouring slices of a volume.

    result = propagate(model, volume, start_index=40, start_mask=mask, initial_weights=weights)
    result.masks          # {slice index: (H, W) bool}, the start slice included
    result.stopped        # {"forward": "structure ended", "backward": "image edge"}

Each new slice gets a fresh :class:`~SPASegmentationLib.session.Session` that starts from the
user's adapted mixture weights, prompted with the box (and/or deepest point) of the previous
slice's mask. The slice's recommended mask, reduced to the connected parts that touch the previous
mask, becomes the next slice's mask. A direction stops when the structure ends (the mask vanishes,
shrinks below a fraction of the start area, overlaps the previous slice's mask poorly, or covers
pixels whose intensity no longer looks like the structure's: a box prompt on a slice past the end
of a structure still yields a box-shaped blob), at the volume's edge, after ``max_slices`` slices,
or when ``progress`` returns False. Runs on the caller's thread (the ModelWorker in Slicer); no Qt, no slicer.
The slices' embeddings come from the propagation's encoder (``Backbone.use_encoder_runtime``), one slice
ahead on a background thread while the current slice's round runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage

from .engine import slice_seed
from .enums import TextEnum
from .errors import InputError
from .masks import as_mask, deepest_pixel, keep_touching
from .metrics import dice
from .preference import check_weights
from .rounds import DEFAULT_SAMPLES
from .session import Session

if TYPE_CHECKING:
    from .embeddings import EmbeddingCache
    from .model.spa import SPAModel

DIRECTIONS = ("forward", "backward")
STRUCTURE_ENDED = "structure ended"
IMAGE_EDGE = "image edge"
CANCELLED = "cancelled"
MAX_SLICES = "max slices"
BOX_MARGIN_PX = 2.0  # the simulated users in training widen their boxes by 0-3 px

SliceSource = Callable[[int], np.ndarray] | np.ndarray


class SlicePrompt(TextEnum):
    """What each new slice is prompted with, from the previous slice's mask."""

    BOX = "box"  # its bounding box, widened (as trained)
    POINT = "point"  # its deepest pixel
    BOTH = "both"


@dataclass
class PropagationResult:
    """The masks of one propagation and why each direction stopped."""

    masks: dict[int, np.ndarray]  # slice index -> (H, W) bool mask, includes the start slice
    stopped: dict[str, str]  # "forward"/"backward" -> why it stopped
    seconds: float
    start_index: int = 0
    initial_weights: np.ndarray | None = None  # the mixture weights every slice started from (normalised)
    areas: dict[int, int] = field(default_factory=dict)  # slice index -> foreground pixels
    mixture_weights: dict[int, np.ndarray] = field(
        default_factory=dict
    )  # each slice tried -> weights its round sampled

    @property
    def indices(self) -> list[int]:
        """The slice indices that received a mask, ascending."""
        return sorted(self.masks)

    def stack(self, n_slices: int) -> np.ndarray:
        """The masks as one (n_slices, H, W) bool array, empty where no slice mask exists."""
        first = self.masks[self.start_index]
        volume = np.zeros((n_slices, *first.shape), dtype=bool)
        for index, mask in self.masks.items():
            volume[index] = mask
        return volume


def prompt_from_mask(
    mask: np.ndarray, margin: float = BOX_MARGIN_PX, with_point: bool = True
) -> tuple[tuple[float, float] | None, tuple[float, float, float, float]]:
    """(point, box) for a mask: its deepest pixel (x, y) (None without ``with_point``: a distance transform of the
    whole slice) and its bounds widened by ``margin`` px, clipped."""
    mask = as_mask(mask, "mask")
    if not mask.any():
        raise InputError("the mask is empty; a prompt needs at least one foreground pixel")
    if margin < 0:
        raise InputError(f"the box margin must be >= 0 pixels, got {margin}")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    height, width = mask.shape
    x0, x1 = _widened(float(cols[0]), float(cols[-1]), margin, width)
    y0, y1 = _widened(float(rows[0]), float(rows[-1]), margin, height)
    if not with_point:
        return None, (x0, y0, x1, y1)
    row, col = deepest_pixel(mask)
    return (float(col), float(row)), (x0, y0, x1, y1)


def intensity_shift(
    previous_image: np.ndarray, previous_mask: np.ndarray, image: np.ndarray, mask: np.ndarray, ring_px: int = 3
) -> float | None:
    """How far the new mask's median intensity moved from the previous mask's, in units of the previous contrast.

    The contrast is the previous mask's median minus the median of a ``ring_px`` ring around it. None
    when that contrast is within three noise standard deviations (the structure is not told apart
    by intensity, so intensity says nothing about where it ends) or a mask is empty.
    """
    if not mask.any() or not previous_mask.any():
        return None
    previous_values = _grey(previous_image)
    ring = ndimage.binary_dilation(previous_mask, iterations=ring_px) & ~previous_mask
    if not ring.any():
        return None
    inside = previous_values[previous_mask]
    inside_median = float(np.median(inside))
    contrast = inside_median - float(np.median(previous_values[ring]))
    noise = 1.4826 * float(np.median(np.abs(inside - inside_median)))
    if abs(contrast) <= 3.0 * noise or contrast == 0.0:
        return None
    return abs(float(np.median(_grey(image)[mask])) - inside_median) / abs(contrast)


def propagate(
    model: SPAModel,
    slices: SliceSource,
    start_index: int,
    start_mask: np.ndarray,
    *,
    n_slices: int | None = None,
    initial_weights: np.ndarray | torch.Tensor | None = None,
    seed: int = 0,
    n_samples: int = DEFAULT_SAMPLES,
    window: tuple[float, float] | None = None,
    embeddings: EmbeddingCache | None = None,
    progress: Callable[[int, int], bool] | None = None,
    max_slices: int | None = None,
    min_area_fraction: float = 0.05,
    min_dice: float = 0.3,
    max_intensity_shift: float | None = 0.5,
    prompt: SlicePrompt | str = SlicePrompt.BOX,
    box_margin: float = BOX_MARGIN_PX,
) -> PropagationResult:
    """Propagate ``start_mask`` (on slice ``start_index``) forward, then backward, through the volume.

    ``slices`` is a (n_slices, H, W) array or a callable index -> (H, W) image (then ``n_slices`` is
    required). ``max_slices`` caps the new slices per direction. ``progress(done, total_estimate)``
    is called before the first slice and after each one; returning False cancels, keeping the masks
    made so far. A slice's mask ends its direction when it is empty, smaller than
    ``min_area_fraction`` of the start mask, or its Dice with the previous slice's mask is below
    ``min_dice``, or its median intensity moved by more than ``max_intensity_shift`` times the previous
    slice's structure-to-surroundings contrast (see :func:`intensity_shift`; None turns that test
    off); that slice gets no mask. ``prompt`` is "box" (as trained), "point" or "both".
    """
    began = time.perf_counter()
    get_slice, total_slices = _slice_source(slices, n_slices)
    if isinstance(start_index, bool) or not isinstance(start_index, (int, np.integer)):
        raise InputError(f"the start slice index must be an integer, got {start_index!r}")
    start_index = int(start_index)
    if not 0 <= start_index < total_slices:
        raise InputError(f"start slice {start_index} is outside the volume (slices 0..{total_slices - 1})")
    start_mask = as_mask(start_mask, "start mask")
    if not start_mask.any():
        raise InputError("the start mask is empty; accept a segmentation on the start slice before propagating")
    start_image = np.asarray(get_slice(start_index))
    if start_image.shape[:2] != start_mask.shape:
        raise InputError(
            f"the start mask is {start_mask.shape[0]}×{start_mask.shape[1]} but slice {start_index} is "
            f"{start_image.shape[0]}×{start_image.shape[1]}; pass the mask of that slice"
        )
    if max_slices is not None and (isinstance(max_slices, bool) or int(max_slices) < 0):
        raise InputError(f"max_slices must be a non-negative number of slices, got {max_slices!r}")
    if not 0.0 <= min_area_fraction < 1.0 or not 0.0 <= min_dice <= 1.0:
        raise InputError(
            f"min_area_fraction ({min_area_fraction}) must be in [0, 1) and min_dice ({min_dice}) in [0, 1]"
        )
    prompt = SlicePrompt.parse(prompt, "propagation prompt")
    weights = (
        None
        if initial_weights is None
        else check_weights(initial_weights, n_components=model.config.n_components, what="the adapted mixture weights")
    )

    masks: dict[int, np.ndarray] = {start_index: start_mask.copy()}
    areas = {start_index: int(start_mask.sum())}
    mixture_weights: dict[int, np.ndarray] = {}
    stopped: dict[str, str] = {}
    reach = {
        "forward": total_slices - 1 - start_index,
        "backward": start_index,
    }
    if max_slices is not None:
        reach = {direction: min(n, int(max_slices)) for direction, n in reach.items()}
    minimum_area = min_area_fraction * areas[start_index]
    done = 0

    def estimate(remaining: dict[str, int]) -> int:
        return done + sum(remaining[d] for d in DIRECTIONS if d not in stopped)

    def result() -> PropagationResult:
        return PropagationResult(
            masks,
            {d: stopped[d] for d in DIRECTIONS},
            time.perf_counter() - began,
            start_index,
            None if weights is None else weights.copy(),
            areas,
            mixture_weights,
        )

    remaining = dict(reach)
    ahead = _SlicePrefetch(model, get_slice, window, embeddings, total_slices, start_mask.shape)
    try:
        if progress is not None and progress(0, estimate(remaining)) is False:
            stopped.update({d: CANCELLED for d in DIRECTIONS})
            return result()

        for direction in DIRECTIONS:  # the first slice of each direction is encoded while the other one runs
            if reach[direction]:
                ahead.request(start_index + (1 if direction == "forward" else -1))
        for direction in DIRECTIONS:
            step = 1 if direction == "forward" else -1
            previous, previous_image = start_mask, start_image
            index = start_index
            for count in range(1, reach[direction] + 1):
                index += step
                if count < reach[direction]:
                    ahead.request(index + step)  # the next slice's embedding, while this one's round runs
                image, embedding = ahead.take(index)
                mask, mixture_weights[index] = _segment_slice(
                    model,
                    image,
                    previous,
                    index,
                    seed=seed,
                    n_samples=n_samples,
                    window=window,
                    weights=weights,
                    embedding=embedding,
                    prompt=prompt,
                    box_margin=box_margin,
                )
                done += 1
                remaining[direction] -= 1
                area = int(mask.sum())
                shift = None if max_intensity_shift is None else intensity_shift(previous_image, previous, image, mask)
                if (
                    area == 0
                    or area < minimum_area
                    or dice(mask, previous) < min_dice
                    or (shift is not None and shift > max_intensity_shift)
                ):
                    stopped[direction] = STRUCTURE_ENDED
                else:
                    masks[index] = mask
                    areas[index] = area
                    previous, previous_image = mask, image
                if progress is not None and progress(done, estimate(remaining)) is False:
                    for d in DIRECTIONS:
                        stopped.setdefault(d, CANCELLED)
                    break
                if direction in stopped:
                    break
            if direction not in stopped:
                at_edge = index == (total_slices - 1 if direction == "forward" else 0)
                stopped[direction] = IMAGE_EDGE if at_edge else MAX_SLICES
            if all(d in stopped for d in DIRECTIONS):
                break
        return result()
    finally:
        ahead.close()


def _segment_slice(
    model: SPAModel,
    image: np.ndarray,
    previous: np.ndarray,
    index: int,
    *,
    seed: int,
    n_samples: int,
    window: tuple[float, float] | None,
    weights: np.ndarray | None,
    embedding: torch.Tensor,
    prompt: SlicePrompt,
    box_margin: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One slice: (its recommendation kept where it touches the previous mask, the mixture weights sampled)."""
    session = Session(
        model,
        image,
        seed=slice_seed(seed, index),
        n_samples=n_samples,
        initial_weights=weights,
        window=window,
        embedding=embedding,
    )
    point, box = prompt_from_mask(previous, margin=box_margin, with_point=prompt is not SlicePrompt.BOX)
    recommended, weights_sampled = session.recommend(
        point=None if prompt is SlicePrompt.BOX else point, box=None if prompt is SlicePrompt.POINT else box
    )
    return keep_touching(recommended, previous), weights_sampled


class _SlicePrefetch:
    """A propagation's slice embeddings, encoded on one background thread ahead of need (the propagation's
    encoder, through the embedding cache when there is one); what is still pending at :meth:`close` is dropped.
    A slice whose size is not the start slice's is refused before it is encoded."""

    def __init__(
        self,
        model: SPAModel,
        get_slice: Callable[[int], np.ndarray],
        window: tuple[float, float] | None,
        embeddings: EmbeddingCache | None,
        n_slices: int,
        slice_shape: tuple[int, int],
    ) -> None:
        self._model, self._get_slice, self._window, self._embeddings = model, get_slice, window, embeddings
        self._n_slices, self._slice_shape = n_slices, slice_shape
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spa-propagation-encoder")
        self._pending: dict[int, Future[tuple[np.ndarray, torch.Tensor]]] = {}

    def request(self, index: int) -> None:
        """Start encoding slice ``index`` (if it is in the volume and not asked for already)."""
        if 0 <= index < self._n_slices and index not in self._pending:
            self._pending[index] = self._pool.submit(self._encode, index)

    def take(self, index: int) -> tuple[np.ndarray, torch.Tensor]:
        """Slice ``index`` and its embedding, waiting for them (asked for now if they were not)."""
        self.request(index)
        return self._pending.pop(index).result()

    def close(self) -> None:
        """Drop what has not started; wait for what has (a running encoding cannot be interrupted)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def _encode(self, index: int) -> tuple[np.ndarray, torch.Tensor]:
        image = np.asarray(self._get_slice(index))  # read once: the round uses the slice the embedding is of
        if image.shape[:2] != self._slice_shape:
            height, width = self._slice_shape
            raise InputError(
                f"slice {index} is {image.shape[0]}×{image.shape[1]} but the start slice is {height}×{width}; "
                "every slice must have the same size"
            )
        if self._embeddings is not None:
            return image, self._embeddings.get(image, self._window, bulk=True)
        return image, self._model.encode(image, self._window, bulk=True)[0]


def _slice_source(slices: SliceSource, n_slices: int | None) -> tuple[Callable[[int], np.ndarray], int]:
    """A getter index -> image and the number of slices, from an array or a callable."""
    if isinstance(slices, np.ndarray):
        if slices.ndim not in (3, 4):
            raise InputError(f"the volume has shape {slices.shape}; pass (n_slices, H, W) or a callable index -> image")
        if n_slices is not None and int(n_slices) != slices.shape[0]:
            raise InputError(f"n_slices is {n_slices} but the volume has {slices.shape[0]} slices; leave n_slices out")
        volume = slices
        return (lambda i: volume[i]), int(volume.shape[0])
    if not callable(slices):
        raise InputError(
            f"slices must be a (n_slices, H, W) array or a callable index -> image, got {type(slices).__name__}"
        )
    if n_slices is None or isinstance(n_slices, bool) or int(n_slices) < 1:
        raise InputError(f"with a callable for slices, pass n_slices (the number of slices, >= 1), got {n_slices!r}")
    return slices, int(n_slices)


def _grey(image: np.ndarray) -> np.ndarray:
    """A 2-D float image: the channel mean of an RGB(A) slice."""
    values = np.asarray(image, dtype=np.float64)
    return values[..., :3].mean(axis=-1) if values.ndim == 3 else values


def _widened(low: float, high: float, margin: float, size: int) -> tuple[float, float]:
    """Inclusive pixel bounds widened by ``margin`` and clipped to 0..size-1, at least one pixel apart."""
    low, high = max(0.0, low - margin), min(size - 1.0, high + margin)
    if high - low < 1.0:
        low, high = max(0.0, min(low, size - 2.0)), min(size - 1.0, max(high, low + 1.0))
    return low, high
