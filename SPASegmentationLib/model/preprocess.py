"""Image → model input, and exact coordinate mapping between image pixels and the model frame.

Any 2-D image (CT in Hounsfield units, MR, 8-bit photographs, RGB; any size and aspect) becomes a
3 × S × S float tensor: intensities scaled to [0, 1], longest side resized to S, padded at the
bottom/right (as SAM does). Coordinates use pixel indices with pixel centres at integers, in both
frames: model = (image + 0.5) * scale − 0.5, and back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

# Percentiles for scaling images that are not 8-bit (CT, MR, floats): robust to outliers and
# metal, the way MedSAM prepares MR; CT users can pass an explicit window instead.
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5


@dataclass(frozen=True)
class ImageGeometry:
    """How an image of size (height, width) sits in the square model input of side ``model_size``."""

    height: int
    width: int
    model_size: int

    @property
    def scale(self) -> float:
        return self.model_size / max(self.height, self.width)

    @property
    def valid_shape(self) -> tuple[int, int]:
        """(rows, cols) of the model input covered by the image; the rest is padding."""
        return self.valid_shape_at(self.model_size)

    def to_model(self, xy: np.ndarray) -> np.ndarray:
        """Image pixel coordinates (..., 2) as (x, y) → model input coordinates."""
        return (np.asarray(xy, dtype=np.float64) + 0.5) * self.scale - 0.5

    def to_image(self, xy: np.ndarray) -> np.ndarray:
        """Model input coordinates (..., 2) → image pixel coordinates (exact inverse of to_model)."""
        return (np.asarray(xy, dtype=np.float64) + 0.5) / self.scale - 0.5

    def valid_shape_at(self, side: int) -> tuple[int, int]:
        """(rows, cols) covered by the image in a model-frame map of resolution side × side."""
        factor = self.scale * side / self.model_size
        return max(1, int(round(self.height * factor))), max(1, int(round(self.width * factor)))

    def maps_to_image(self, maps: torch.Tensor, side: int) -> torch.Tensor:
        """Model-frame maps (..., h, w) of a side × side grid → image size (..., H, W), bilinear.

        The maps may be the full grid or already cropped to its valid part; the padding is cropped,
        so that model pixel centres land on image pixel centres.
        """
        rows, cols = self.valid_shape_at(side)
        cropped = maps[..., :rows, :cols]
        lead = cropped.shape[:-2]
        flat = cropped.reshape(-1, 1, rows, cols).float()
        resized = F.interpolate(flat, size=(self.height, self.width), mode="bilinear", align_corners=False)
        return resized.reshape(*lead, self.height, self.width)

    def mask_to_model(self, mask: np.ndarray, side: int) -> torch.Tensor:
        """An image-size mask (H, W) → the model frame at resolution side × side (area-weighted)."""
        valid_rows, valid_cols = self.valid_shape_at(side)
        tensor = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
        resized = F.interpolate(tensor, size=(valid_rows, valid_cols), mode="area")
        out = torch.zeros(side, side)
        out[:valid_rows, :valid_cols] = resized[0, 0]
        return out


def validate_image(image: np.ndarray) -> np.ndarray:
    """Check a 2-D image (H, W) or (H, W, 3|4) and return it as a float64 array without alpha."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"the image must be a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = image[..., :3]
    elif image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    elif image.ndim != 2:
        raise InputError(
            f"the image has shape {image.shape}; SPA segments one 2-D slice: pass (H, W) or (H, W, 3), "
            "or choose a slice of a volume"
        )
    if min(image.shape[:2]) < 2:
        raise InputError(f"the image is {image.shape[0]}×{image.shape[1]} pixels; it needs at least 2×2")
    if not np.issubdtype(image.dtype, np.number) and image.dtype != np.bool_:
        raise InputError(f"the image has non-numeric pixels ({image.dtype})")
    values = image.astype(np.float64)
    if not np.isfinite(values).all():
        raise InputError("the image contains NaN or infinite pixels; replace them (e.g. with the background value)")
    if values.max() == values.min():
        raise InputError(f"the image is constant (every pixel is {values.flat[0]:g}); there is nothing to segment")
    return values


def intensity_window(
    image: np.ndarray, window: tuple[float, float] | None = None, is_8bit: bool | None = None
) -> tuple[float, float]:
    """The (low, high) intensities that become 0 and 1: the window given, 0..255 for 8-bit images, else robust
    percentiles of the image."""
    values = validate_image(image)
    if is_8bit is None:
        is_8bit = image.dtype == np.uint8
    if window is not None:
        low, high = float(window[0]), float(window[1])
        if not high > low:
            raise InputError(f"intensity window ({low:g}, {high:g}) is empty; give (low, high) with low < high")
        return low, high
    if is_8bit:
        return 0.0, 255.0
    low, high = np.percentile(values, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if high <= low:
        low, high = values.min(), values.max()
    return float(low), float(high)


def normalise_intensity(
    image: np.ndarray, window: tuple[float, float] | None = None, is_8bit: bool | None = None
) -> np.ndarray:
    """Scale intensities to [0, 1]: 8-bit images by /255, others by a window or robust percentiles."""
    low, high = intensity_window(image, window, is_8bit)
    return np.clip((validate_image(image) - low) / (high - low), 0.0, 1.0)


def prepare_image(
    image: np.ndarray, model_size: int, window: tuple[float, float] | None = None
) -> tuple[torch.Tensor, ImageGeometry]:
    """Image → (1, 3, S, S) float tensor in [0, 1] plus its geometry."""
    unit = normalise_intensity(image, window=window)
    if unit.ndim == 2:
        unit = np.repeat(unit[..., None], 3, axis=-1)
    geometry = ImageGeometry(height=unit.shape[0], width=unit.shape[1], model_size=model_size)
    tensor = torch.from_numpy(unit.astype(np.float32)).permute(2, 0, 1)[None]
    rows, cols = geometry.valid_shape
    resized = F.interpolate(tensor, size=(rows, cols), mode="bilinear", align_corners=False, antialias=True)
    padded = torch.zeros(1, 3, model_size, model_size)
    padded[:, :, :rows, :cols] = resized.clamp(0.0, 1.0)
    return padded, geometry


# A small structure is segmented in a window around it, magnified to the model's input (the "zoom-in" of
# interactive segmentation): the window's side is FOCUS_CONTEXT times the structure's longer side, at least
# FOCUS_MIN_SIDE_PX image pixels (so a pixel is magnified at most 256 / 48 ≈ 5×), and the whole image is used
# when the window would span FOCUS_MAX_SHARE of the image's longer side anyway. Chosen on the validation crops
# (see the model card).
FOCUS_CONTEXT = 4.0
FOCUS_MIN_SIDE_PX = 48
FOCUS_MAX_SHARE = 0.75


@dataclass(frozen=True)
class FocusWindow:
    """A rectangle of image pixels (columns left..left+width-1, rows top..top+height-1) that a session works in."""

    left: int
    top: int
    width: int
    height: int

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The window's part of an image (H, W) or (H, W, C)."""
        return image[self.top : self.top + self.height, self.left : self.left + self.width]

    def paste(self, maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Window-size maps (..., height, width) → image-size maps (..., H, W), zero outside the window."""
        out = np.zeros((*maps.shape[:-2], *shape), dtype=maps.dtype)
        out[..., self.top : self.top + self.height, self.left : self.left + self.width] = maps
        return out

    def to_window(self, xy: np.ndarray) -> np.ndarray:
        """Image pixel coordinates (..., 2) as (x, y) → the window's pixel coordinates."""
        return np.asarray(xy, dtype=np.float64) - np.array([self.left, self.top], dtype=np.float64)

    def to_image(self, xy: np.ndarray) -> np.ndarray:
        """The window's pixel coordinates (..., 2) → image pixel coordinates."""
        return np.asarray(xy, dtype=np.float64) + np.array([self.left, self.top], dtype=np.float64)

    def contains(self, xy: np.ndarray) -> bool:
        """Whether every point (..., 2) lies inside the window (pixel extents included)."""
        x, y = self.to_window(xy).reshape(-1, 2).T
        return bool(np.all((x >= -0.5) & (x <= self.width - 0.5) & (y >= -0.5) & (y <= self.height - 0.5)))

    def to_dict(self) -> dict[str, int]:
        return {"left": self.left, "top": self.top, "width": self.width, "height": self.height}


def focus_window(box: tuple[float, float, float, float], height: int, width: int) -> FocusWindow | None:
    """The window a structure in ``box`` (x0, y0, x1, y1, image pixels) is segmented in, or None for the whole image.

    A square of FOCUS_CONTEXT × the box's longer side (at least FOCUS_MIN_SIDE_PX) centred on the box, moved
    inside the image and cut to it where the image is narrower.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(FOCUS_CONTEXT * max(x1 - x0 + 1.0, y1 - y0 + 1.0), float(FOCUS_MIN_SIDE_PX))
    if side >= FOCUS_MAX_SHARE * max(height, width):
        return None
    side_x, side_y = min(int(round(side)), width), min(int(round(side)), height)
    left = int(np.clip(round((x0 + x1) / 2.0 - side_x / 2.0), 0, width - side_x))
    top = int(np.clip(round((y0 + y1) / 2.0 - side_y / 2.0), 0, height - side_y))
    return FocusWindow(left, top, side_x, side_y)
