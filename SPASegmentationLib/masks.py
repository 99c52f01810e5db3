"""Binary masks: coercion with a clear message, and the deepest pixel of a region."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .errors import InputError


def as_mask(mask: object, what: str) -> np.ndarray:
    """``mask`` as a 2-D bool array (a copy), or an InputError naming ``what``."""
    array = np.asarray(mask)
    if array.ndim != 2:
        raise InputError(f"the {what} has shape {array.shape}; it must be one 2-D slice (H, W)")
    return array.astype(bool)


def deepest_pixel(region: np.ndarray) -> tuple[int, int]:
    """(row, col) of the pixel farthest from the region's edge (the image border counts as edge).

    Ties go to the lowest row, then the lowest column.
    """
    padded = np.pad(region, 1, mode="constant", constant_values=False)
    depth = ndimage.distance_transform_edt(padded)[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(row), int(col)


def keep_touching(mask: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The 8-connected components of ``mask`` that share at least one pixel with ``reference``."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    touching = np.unique(labels[reference & (labels > 0)])
    return np.isin(labels, touching[touching > 0])
