"""Procedural multi-rater data: images with one ambiguous target and raters with fixed styles.

Every case is a 2-D image (CT in int16 Hounsfield units, MR in float32 arbitrary units with a
bias field, or an 8-bit RGB photograph) holding one target: a smooth star-shaped blob (radius
from random Fourier harmonics) with internal texture, a soft partial-volume edge and a faint rim
band of intermediate intensity just outside it. Distractor blobs (air, fat, bone, look-alikes)
sit elsewhere, never touching the target, over a background with a gradient.

With ``d`` the signed distance to the target's core boundary (negative inside), each rater
outlines the target in a fixed style, the same on every case:

- ``tight``: d < -2.5 px, leaving out the partial-volume edge;
- ``core``: d < 0, the core boundary itself;
- ``rim``: d < rim width, including the faint rim;
- ``smooth``: core grown by 2 px, boundary half-way to its convex hull and strongly smoothed;
- ``jagged``: follows the intensity (half-contrast threshold of the noisy, textured image);
- ``generous``: rim plus 3 px;
- ``conservative_smooth``: tight, then strongly smoothed.

Each rater's boundary also carries its own low-frequency wobble (about 1 px, seeded by the case
and the rater's name), so no two raters are pixel-identical. Everything is deterministic for a
seed; ``write_dataset`` writes the folder format read by ``data.folder.MultiRaterFolder``.
"""

from __future__ import annotations

import os
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from skimage.morphology import convex_hull_image

from ..errors import DataError, InputError
from ..io.images import LoadedImage, write_image_atomic, write_mask
from ..jsonio import write_json_atomic

GENERATOR_NAME = "SPASegmentationLib.data.synthetic"
GENERATOR_VERSION = 1

RATER_STYLES: dict[str, str] = {
    "tight": "inside the core, leaving out the partial-volume edge (d < -2.5 px)",
    "core": "along the core boundary (d < 0)",
    "rim": "including the faint rim (d < rim width)",
    "smooth": "core grown 2 px, convexified and strongly smoothed",
    "jagged": "follows the noisy intensity at half contrast; irregular",
    "generous": "rim plus 3 px (d < rim width + 3)",
    "conservative_smooth": "tight, then strongly smoothed",
}
DEFAULT_RATERS: tuple[str, ...] = ("tight", "core", "rim", "smooth")
MODALITIES: dict[str, float] = {"ct": 0.45, "mr": 0.4, "photo": 0.15}  # default mix

MIN_SIDE, MAX_SIDE = 192, 320
MIN_RADIUS, MAX_RADIUS = 18.0, 60.0
TIGHT_MARGIN = 2.5  # px the tight raters stay inside the core boundary
SMOOTH_GROWTH = 2.0  # px the smooth rater grows the core
GENEROUS_EXTRA = 3.0  # px the generous rater goes beyond the rim
JITTER_SCALES = (0.5, 0.4, 0.3, 0.2)  # per-rater wobble, harmonics 1..4 (about 0.75 px RMS)
SHAPE_SCALES = (0.16, 0.09, 0.06, 0.04)  # target shape, harmonics 2..5 (relative to the radius)
MAX_SHAPE_AMPLITUDE = 0.3

DEMO_SEED = 2024  # the bundled Resources/samples/demo_case (a CT case)
DEMO_MODALITY = "ct"


@dataclass
class SyntheticCase:
    """One generated image with each rater's mask."""

    image: np.ndarray  # (H, W) int16 HU for CT, float32 for MR; (H, W, 3) uint8 for photos
    raters: dict[str, np.ndarray]  # name → (H, W) bool
    modality: str  # "ct", "mr" or "photo"
    spacing: tuple[float, float]  # (x, y) in mm (1.0 for photos)
    params: dict[str, Any] = field(default_factory=dict)  # target centre, radius, rim width, …


@dataclass
class _Target:
    """The target's geometry on the image grid."""

    distance: np.ndarray  # signed distance d to the core boundary, negative inside
    unit: np.ndarray  # exp(i·angle) around the target centre, for angular wobbles
    centre: tuple[float, float]  # (x, y)
    radius: float  # mean radius R0
    extent: float  # largest radius of the core boundary


def _check_raters(raters: Sequence[str]) -> list[str]:
    """The rater names as a list, after checking they are known and distinct."""
    names = [str(name) for name in raters]
    unknown = [name for name in names if name not in RATER_STYLES]
    if unknown:
        raise InputError(f"unknown rater style(s) {unknown}; choose from {', '.join(RATER_STYLES)}")
    if len(set(names)) != len(names) or not 1 <= len(names) <= len(RATER_STYLES):
        raise InputError(f"rater styles {names} must be 1 to {len(RATER_STYLES)} distinct names from {', '.join(RATER_STYLES)}")
    return names


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, float32."""
    return (1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))).astype(np.float32)


def _harmonics(unit: np.ndarray, coefficients: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Σ Re(c_k e^{ikθ}) and its derivative in θ, for k = first, first+1, …"""
    value = np.zeros(unit.shape, np.float32)
    slope = np.zeros(unit.shape, np.float32)
    power = unit ** first
    for offset, c in enumerate(coefficients):
        k = first + offset
        term = c * power
        value += term.real
        slope -= k * term.imag  # d/dθ Re(c e^{ikθ}) = Re(i k c e^{ikθ}) = -k Im(c e^{ikθ})
        power = power * unit
    return value, slope


def _random_coefficients(rng: np.random.Generator, scales: Sequence[float]) -> np.ndarray:
    """Complex Fourier coefficients with random phases and magnitudes up to ``scales``."""
    magnitudes = rng.uniform(0.0, 1.0, len(scales)) * np.asarray(scales)
    phases = rng.uniform(0.0, 2 * np.pi, len(scales))
    return (magnitudes * np.exp(1j * phases)).astype(np.complex64)


def _blob(
    xx: np.ndarray, yy: np.ndarray, centre: tuple[float, float], radius: float, coefficients: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance (approximate, normal-corrected) to a star-shaped blob, and exp(i·angle)."""
    dx = xx - np.float32(centre[0])
    dy = yy - np.float32(centre[1])
    rho = np.hypot(dx, dy)
    unit = (dx + 1j * dy).astype(np.complex64) / np.maximum(rho, 1e-6)
    shape, slope = _harmonics(unit, coefficients, first=2)
    boundary = radius * (1.0 + shape)
    normal = np.sqrt(1.0 + (radius * slope / boundary) ** 2)
    return ((rho - boundary) / normal).astype(np.float32), unit


def _smooth_field(rng: np.random.Generator, height: int, width: int, amplitude: float, n_waves: int = 3) -> np.ndarray:
    """A smooth random field (a few long waves) plus a linear gradient, of about ±amplitude."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    scale = float(max(height, width))
    angle = rng.uniform(0, 2 * np.pi)
    result = (np.cos(angle) * (xx / scale - 0.5) + np.sin(angle) * (yy / scale - 0.5)) * rng.uniform(0.5, 1.5)
    for _ in range(n_waves):
        fx, fy = rng.uniform(-1.5, 1.5, 2) / scale
        result += 0.4 * np.cos(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * np.pi))
    return (result * amplitude).astype(np.float32)


def _unit_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian noise smoothed at scale ``sigma`` and rescaled to unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return noise / max(float(noise.std()), 1e-6)


def _place_target(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, rim_width: float) -> _Target:
    """Draw the target's radius, shape and position, keeping every rater's outline in the image."""
    height, width = xx.shape
    coefficients = _random_coefficients(rng, SHAPE_SCALES)
    total = float(np.abs(coefficients).sum())
    if total > MAX_SHAPE_AMPLITUDE:
        coefficients = coefficients * np.complex64(MAX_SHAPE_AMPLITUDE / total)
        total = MAX_SHAPE_AMPLITUDE
    margin = rim_width + GENEROUS_EXTRA + 10.0
    largest = min(MAX_RADIUS, (min(height, width) / 2.0 - margin) / (1.0 + total))
    radius = float(rng.uniform(MIN_RADIUS, largest))
    extent = radius * (1.0 + total)
    centre = (
        float(rng.uniform(extent + margin, width - extent - margin)),
        float(rng.uniform(extent + margin, height - extent - margin)),
    )
    distance, unit = _blob(xx, yy, centre, radius, coefficients)
    return _Target(distance=distance, unit=unit, centre=centre, radius=radius, extent=extent)


def _distractors(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, target: _Target, keep_out: float
) -> list[np.ndarray]:
    """1–3 soft-edged blobs (alpha maps) away from the target and from each other."""
    height, width = xx.shape
    placed: list[tuple[float, float, float]] = []
    alphas = []
    for _ in range(int(rng.integers(1, 4))):
        radius = float(rng.uniform(6.0, 22.0))
        coefficients = _random_coefficients(rng, (0.2, 0.1))
        for _attempt in range(30):
            cx, cy = float(rng.uniform(0, width)), float(rng.uniform(0, height))
            far_from_target = np.hypot(cx - target.centre[0], cy - target.centre[1]) > target.extent + keep_out + 1.3 * radius + 6
            far_from_others = all(np.hypot(cx - x, cy - y) > 1.3 * (radius + r) + 4 for x, y, r in placed)
            if far_from_target and far_from_others:
                placed.append((cx, cy, radius))
                distance, _ = _blob(xx, yy, (cx, cy), radius, coefficients)
                alphas.append(_sigmoid(-distance / 0.8))
                break
    return alphas


def _compose_ct(rng: np.random.Generator, signal: np.ndarray, alphas: list[np.ndarray], white: np.ndarray) -> tuple[np.ndarray, float, float]:
    """CT in Hounsfield units: (image int16, target contrast in HU, noise sigma in HU)."""
    height, width = signal.shape
    background = float(rng.uniform(30.0, 60.0))
    target_hu = float(rng.uniform(max(80.0, background + 45.0), 160.0))
    image = background + _smooth_field(rng, height, width, float(rng.uniform(5.0, 15.0)))
    image = image + (target_hu - background) * signal
    for alpha in alphas:
        kind = rng.choice(["air", "fat", "bone", "alike"])
        value = {"air": rng.uniform(-950, -700), "fat": rng.uniform(-120, -70), "bone": rng.uniform(300, 900),
                 "alike": target_hu + rng.uniform(-20, 20)}[str(kind)]
        image = image * (1.0 - alpha) + float(value) * alpha
    sigma = float(rng.uniform(6.0, 14.0))
    image = np.round(image + sigma * white)
    return np.clip(image, -1024, 3071).astype(np.int16), target_hu - background, sigma


def _compose_mr(rng: np.random.Generator, signal: np.ndarray, alphas: list[np.ndarray], white: np.ndarray) -> tuple[np.ndarray, float, float]:
    """MR in arbitrary units with a smooth bias field: (image float32, contrast, noise sigma)."""
    height, width = signal.shape
    background = float(rng.uniform(350.0, 700.0))
    sign = 1.0 if rng.uniform() < 0.7 else -1.0
    contrast = sign * background * float(rng.uniform(0.45, 0.9))
    clean = background * (1.0 + _smooth_field(rng, height, width, 0.06)) + contrast * signal
    for alpha in alphas:
        kind = rng.choice(["dark", "bright", "alike"])
        value = {"dark": background * rng.uniform(0.05, 0.25), "bright": min(1500.0, background * rng.uniform(1.8, 2.4)),
                 "alike": background + contrast * rng.uniform(0.8, 1.2)}[str(kind)]
        clean = clean * (1.0 - alpha) + float(value) * alpha
    bias = 1.0 + _smooth_field(rng, height, width, 0.2, n_waves=2)
    sigma = float(rng.uniform(12.0, 30.0))
    image = np.clip(clean * bias + sigma * white, 0.0, None)
    return image.astype(np.float32), abs(contrast), sigma


def _compose_photo(rng: np.random.Generator, signal: np.ndarray, alphas: list[np.ndarray], white: np.ndarray) -> tuple[np.ndarray, float, float]:
    """An 8-bit RGB skin photograph with a pigmented lesion: (image, contrast, noise sigma) in grey levels."""
    height, width = signal.shape
    skin = np.array([rng.uniform(195, 235), rng.uniform(150, 190), rng.uniform(125, 165)], np.float32)
    lesion = np.array([rng.uniform(90, 150), rng.uniform(50, 100), rng.uniform(30, 75)], np.float32)
    shading = 1.0 + _smooth_field(rng, height, width, 0.08)
    weight = np.clip(signal, 0.0, 1.15)[..., None]
    image = (skin * (1.0 - weight) + lesion * weight) * shading[..., None]
    for alpha in alphas:
        if rng.uniform() < 0.3:
            colour = np.array([250.0, 250.0, 245.0], np.float32)  # specular highlight
        else:
            colour = skin * (1.0 - rng.uniform(0.3, 0.8)) + lesion * rng.uniform(0.0, 0.5)
        image = image * (1.0 - alpha[..., None]) + colour * alpha[..., None]
    sigma = float(rng.uniform(2.0, 5.0))
    image = image + sigma * white[..., None]
    contrast = float(np.abs(skin - lesion).mean())
    return np.clip(np.round(image), 0, 255).astype(np.uint8), contrast, sigma


def _wobble(case_seed: int, name: str, unit: np.ndarray) -> np.ndarray:
    """The rater's own smooth boundary offset (px) around the target, seeded by case and name."""
    rng = np.random.default_rng([case_seed, zlib.crc32(name.encode("utf-8"))])
    coefficients = (rng.standard_normal(len(JITTER_SCALES)) + 1j * rng.standard_normal(len(JITTER_SCALES)))
    coefficients = (coefficients * np.asarray(JITTER_SCALES) / np.sqrt(2.0)).astype(np.complex64)
    value, _ = _harmonics(unit, coefficients, first=1)
    return value


def _smoothed(mask: np.ndarray, sigma: float, hull_weight: float) -> np.ndarray:
    """A mask pulled ``hull_weight`` of the way to its convex hull, blurred, thresholded at 0.5."""
    blend = mask.astype(np.float32)
    if hull_weight > 0 and mask.any():
        blend = (1.0 - hull_weight) * blend + hull_weight * convex_hull_image(mask).astype(np.float32)
    return ndimage.gaussian_filter(blend, sigma) > 0.5


def _largest_part_at(mask: np.ndarray, seed_index: tuple[int, int]) -> np.ndarray:
    """The connected part of ``mask`` holding ``seed_index`` (or its largest part), holes filled."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    label = labels[seed_index]
    if label == 0:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
        label = int(np.argmax(sizes)) + 1
    return ndimage.binary_fill_holes(labels == label)


def _rater_mask(
    name: str, distance: np.ndarray, wobble: np.ndarray, rim_width: float, observed: np.ndarray, deepest: tuple[int, int]
) -> np.ndarray:
    """One rater's mask on a crop around the target."""
    if name == "tight":
        return distance < -TIGHT_MARGIN + wobble
    if name == "core":
        return distance < wobble
    if name == "rim":
        return distance < rim_width + wobble
    if name == "generous":
        return distance < rim_width + GENEROUS_EXTRA + wobble
    if name == "smooth":
        return _smoothed(distance < SMOOTH_GROWTH + wobble, sigma=3.0, hull_weight=0.5)
    if name == "conservative_smooth":
        return _smoothed(distance < -TIGHT_MARGIN + wobble, sigma=2.5, hull_weight=0.0)
    if name == "jagged":
        level = 0.5 + 0.08 * wobble
        candidate = (ndimage.gaussian_filter(observed, 0.7) > level) & (distance < rim_width + 2.0)
        return _largest_part_at(candidate, deepest)
    raise AssertionError(name)


def _rater_masks(
    names: list[str], target: _Target, rim_width: float, observed: np.ndarray, case_seed: int
) -> dict[str, np.ndarray]:
    """Every rater's full-size mask: non-empty and no two identical."""
    height, width = target.distance.shape
    reach = int(np.ceil(target.extent + rim_width + GENEROUS_EXTRA + 12))
    cx, cy = int(round(target.centre[0])), int(round(target.centre[1]))
    rows = slice(max(0, cy - reach), min(height, cy + reach + 1))
    cols = slice(max(0, cx - reach), min(width, cx + reach + 1))
    distance = target.distance[rows, cols]
    unit = target.unit[rows, cols]
    deepest = np.unravel_index(int(np.argmin(distance)), distance.shape)
    masks: dict[str, np.ndarray] = {}
    for name in names:
        crop = _rater_mask(name, distance, _wobble(case_seed, name, unit), rim_width, observed[rows, cols], deepest)
        if not crop.any():
            crop = distance < 0
        for other in masks.values():
            if np.array_equal(crop, other[rows, cols]):
                crop = ndimage.binary_dilation(crop)
        full = np.zeros((height, width), dtype=bool)
        full[rows, cols] = crop
        masks[name] = full
    return masks


def generate_case(
    rng: np.random.Generator, raters: Sequence[str] = DEFAULT_RATERS, modality: str | None = None
) -> SyntheticCase:
    """Draw one image with an ambiguous target and the masks of the requested rater styles."""
    names = _check_raters(raters)
    modalities = list(MODALITIES)
    if modality is None:
        weights = np.array([MODALITIES[m] for m in modalities])
        modality = modalities[int(rng.choice(len(modalities), p=weights / weights.sum()))]
    if modality not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}; choose one of {', '.join(modalities)}")
    height, width = 0, 0
    while abs(height - width) < 16:
        height, width = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
    case_seed = int(rng.integers(0, 2**63 - 1))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)

    rim_width = float(rng.uniform(3.0, 6.0))
    rim_level = float(rng.uniform(0.25, 0.42))
    partial_volume = float(rng.uniform(0.7, 1.2))
    target = _place_target(rng, xx, yy, rim_width)
    core = _sigmoid(-target.distance / partial_volume)
    rim = _sigmoid(target.distance / 0.6) * _sigmoid((rim_width - target.distance) / 0.9)
    texture = _unit_noise(rng, (height, width), float(rng.uniform(1.5, 3.0))) * float(rng.uniform(0.08, 0.18))
    signal = core * (1.0 + texture) + rim_level * rim * (1.0 - core)
    alphas = _distractors(rng, xx, yy, target, keep_out=rim_width + GENEROUS_EXTRA + 4.0)
    white = rng.standard_normal((height, width)).astype(np.float32)

    compose = {"ct": _compose_ct, "mr": _compose_mr, "photo": _compose_photo}[modality]
    image, contrast, sigma = compose(rng, signal, alphas, white)
    if modality == "ct":
        step = round(float(rng.uniform(0.55, 0.95)), 3)
    elif modality == "mr":
        step = round(float(rng.uniform(0.7, 1.4)), 3)
    else:
        step = 1.0
    observed = signal + white * np.float32(sigma / max(contrast, 1e-6))
    masks = _rater_masks(names, target, rim_width, observed, case_seed)
    params = {
        "centre_xy": [round(target.centre[0], 2), round(target.centre[1], 2)],
        "radius": round(target.radius, 2),
        "rim_width": round(rim_width, 2),
        "rim_level": round(rim_level, 3),
        "contrast": round(float(contrast), 2),
        "noise_sigma": round(sigma, 2),
        "n_distractors": len(alphas),
    }
    return SyntheticCase(image=image, raters=masks, modality=modality, spacing=(step, step), params=params)


def write_case(case_dir: Path, case: SyntheticCase) -> Path:
    """Write one case in the generic folder format: image.nii.gz or image.png, rater_<name>.* masks."""
    case_dir.mkdir(parents=True, exist_ok=True)
    reference = sitk.GetImageFromArray(case.image, isVector=case.image.ndim == 3)
    if case.modality == "photo":
        image_path, image_format = case_dir / "image.png", "png"
    else:
        image_path, image_format = case_dir / "image.nii.gz", "nifti"
        reference.SetSpacing(case.spacing)
    write_image_atomic(reference, image_path)
    like = LoadedImage(array=case.image, reference=reference, path=image_path, format=image_format)
    extension = ".png" if image_format == "png" else ".nii.gz"
    for name, mask in case.raters.items():
        write_mask(case_dir / f"rater_{name}{extension}", mask, like)
    return case_dir


def _case_ids(n_cases: int) -> list[str]:
    """case_0000, case_0001, … (wider when there are more than 10 000)."""
    digits = max(4, len(str(n_cases - 1)))
    return [f"case_{i:0{digits}d}" for i in range(n_cases)]


def _prepare_root(root: Path) -> None:
    """Create ``root``, or clear the cases of an earlier synthetic dataset there; refuse other folders."""
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; choose a folder for the synthetic dataset")
    if not root.exists():
        root.mkdir(parents=True)
        return
    entries = [entry for entry in root.iterdir()]
    if not entries:
        return
    description = root / "dataset.json"
    import json

    try:
        ours = json.loads(description.read_text(encoding="utf-8")).get("generator") == GENERATOR_NAME
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise DataError(f"{root} already holds files and is not a synthetic dataset; choose an empty or new folder")
    for entry in entries:
        if entry.is_dir() and re.fullmatch(r"case_\d+", entry.name):
            shutil.rmtree(entry)


def write_dataset(
    root: str | os.PathLike,
    n_cases: int,
    seed: int,
    raters: Sequence[str] = DEFAULT_RATERS,
    test_fraction: float = 0.2,
) -> Path:
    """Write ``n_cases`` synthetic cases, splits.json and dataset.json under ``root``; return root."""
    root = Path(root)
    names = _check_raters(raters)
    if not 2 <= len(names) <= 7:
        raise InputError(f"a dataset needs 2 to 7 raters per case, not {len(names)}; pass between 2 and 7 rater styles")
    if n_cases < 1:
        raise InputError(f"n_cases is {n_cases}; ask for at least one case")
    if not 0.0 <= test_fraction < 1.0:
        raise InputError(f"test_fraction is {test_fraction}; pass a fraction in [0, 1)")
    _prepare_root(root)
    case_ids = _case_ids(n_cases)
    modalities: dict[str, int] = {}
    for index, case_id in enumerate(case_ids):
        case = generate_case(np.random.default_rng([seed, index]), names)
        write_case(root / case_id, case)
        modalities[case.modality] = modalities.get(case.modality, 0) + 1
    n_test = int(round(test_fraction * n_cases))
    if test_fraction > 0 and n_cases >= 2:
        n_test = min(max(n_test, 1), n_cases - 1)
    order = np.random.default_rng([seed, 1_000_000_007]).permutation(n_cases)
    test = sorted(case_ids[i] for i in order[:n_test])
    train = sorted(case_ids[i] for i in order[n_test:])
    write_json_atomic(root / "splits.json", {"train": train, "test": test})
    write_json_atomic(root / "dataset.json", {
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "raters": names,
        "rater_styles": {name: RATER_STYLES[name] for name in names},
        "n_cases": n_cases,
        "test_fraction": test_fraction,
        "modalities": dict(sorted(modalities.items())),
    })
    return root


def write_demo_case(dest: str | os.PathLike) -> Path:
    """Regenerate the bundled sample case (Resources/samples/demo_case) into the folder ``dest``."""
    case = generate_case(np.random.default_rng(DEMO_SEED), DEFAULT_RATERS, modality=DEMO_MODALITY)
    return write_case(Path(dest), case)
