"""A procedural multi-rater generator: ambiguous structures and raters with consistent styles.

Every case has one target structure: a smooth star-shaped blob with internal texture, a soft
partial-volume edge and a faint rim band around it, plus distractor blobs and a background gradient.
With d(x) the (radial) signed distance to the core boundary, negative inside, each rater style is a
fixed rule applied to every case, with its own small low-frequency boundary jitter per case:

=====================  ===================================================================
tight                  d < −t, t ∈ [2, 3] px: leaves out the partial-volume edge
core                   d < 0: the visible core boundary
rim                    d < w: includes the faint rim (w ∈ [3, 7] px)
smooth                 core dilated 2 px, boundary strongly smoothed (convexified)
jagged                 follows the intensity: threshold of the lightly smoothed image
generous               d < w + 3: rim plus a safety margin
conservative_smooth    tight, strongly smoothed
=====================  ===================================================================

That is what makes a preference learnable (the same rater leans the same way on every image) and
testable (raters are distinct, and no two are pixel-identical).

Output is byte-for-byte deterministic for a seed: case ``i`` of ``write_dataset(root, n, seed)`` is
drawn from ``default_rng([seed, i])`` alone, so it does not depend on ``n``. The shipped model was
trained on ``write_dataset(…, n_cases=300, seed=0)`` and the bundled demo case is
``write_demo_case``; any change to the random draws here changes both, so bump GENERATOR_VERSION.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import DataError, InputError
from ..io.atomic import write_json_atomic

GENERATOR_VERSION = 1
RATER_STYLES = ("tight", "core", "rim", "smooth", "jagged", "generous", "conservative_smooth")
DEFAULT_RATERS = ("tight", "core", "rim", "smooth")
MODALITIES = ("ct", "mr", "photo")
MODALITY_WEIGHTS = (0.45, 0.4, 0.15)
DATASET_KIND = "spa-synthetic-multirater"
MIN_RATERS, MAX_RATERS = 2, 7


@dataclass
class SyntheticCase:
    """One generated image with its raters' masks."""

    image: np.ndarray  # (H, W) int16 HU (ct), float32 (mr) or (H, W, 3) uint8 (photo)
    raters: dict[str, np.ndarray]  # name → (H, W) bool
    modality: str
    spacing: tuple[float, float]


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian noise smoothed at scale ``sigma``, rescaled to unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return noise / (noise.std() + 1e-8)


def _radial_profile(
    rng: np.random.Generator, amplitude: float, harmonics: Sequence[int]
) -> Callable[[np.ndarray], np.ndarray]:
    """A random smooth function of the angle: Σ a_k cos(kθ + φ_k), a_k ≤ amplitude/√k."""
    coefficients = [(rng.uniform(0, amplitude) / np.sqrt(k), rng.uniform(0, 2 * np.pi)) for k in harmonics]

    def profile(theta: np.ndarray) -> np.ndarray:
        """The profile's value at each angle (radians)."""
        return sum(a * np.cos(k * theta + phase) for k, (a, phase) in zip(harmonics, coefficients, strict=True))

    return profile


def _smoothed(mask: np.ndarray, sigma: float) -> np.ndarray:
    """A mask with a strongly smoothed boundary: Gaussian blur, then threshold at one half."""
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma) >= 0.5


def generate_case(
    rng: np.random.Generator, raters: Sequence[str] = DEFAULT_RATERS, modality: str | None = None
) -> SyntheticCase:
    """One case: an image with an ambiguous structure and one mask per requested rater style."""
    unknown = [r for r in raters if r not in RATER_STYLES]
    if unknown:
        raise InputError(f"unknown rater style(s) {unknown}; choose from {', '.join(RATER_STYLES)}")
    if not MIN_RATERS <= len(raters) <= MAX_RATERS or len(set(raters)) != len(raters):
        raise InputError(
            f"a case needs 2-7 raters with distinct names, got {list(raters)}; pass 2 to 7 of {', '.join(RATER_STYLES)}"
        )
    modality = modality or str(rng.choice(MODALITIES, p=MODALITY_WEIGHTS))
    if modality not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}; choose from {', '.join(MODALITIES)}")
    height, width = int(rng.integers(192, 321)), int(rng.integers(192, 321))
    radius = float(rng.uniform(18, 60))
    radius = min(radius, 0.3 * min(height, width))
    margin = radius * 1.4 + 8
    cy, cx = rng.uniform(margin, height - margin), rng.uniform(margin, width - margin)
    yy, xx = np.mgrid[:height, :width].astype(np.float64)
    rho, theta = np.hypot(yy - cy, xx - cx), np.arctan2(yy - cy, xx - cx)
    shape = _radial_profile(rng, 0.22, (2, 3, 4, 5))
    distance = rho - radius * (1.0 + shape(theta))  # ≈ signed distance to the core boundary, px
    rim_width = float(rng.uniform(3.0, 7.0))

    core = 1.0 / (1.0 + np.exp(distance / 0.9))
    rim = 1.0 / (1.0 + np.exp((distance - rim_width) / 1.2)) - core
    texture = smooth_noise(rng, (height, width), 2.5)
    background = smooth_noise(rng, (height, width), 25.0) + np.linspace(-1, 1, width)[None] * rng.uniform(-1, 1)
    distractors = np.zeros((height, width))
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(20):
            dy, dx, dr = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(6, 22)
            if np.hypot(dy - cy, dx - cx) > radius * 1.5 + dr + rim_width + 6:
                sign = rng.choice([-1.0, 1.0])
                distractors += sign * 1.0 / (1.0 + np.exp((np.hypot(yy - dy, xx - dx) - dr) / 1.5))
                break

    contrast = rng.uniform(0.8, 1.4)
    rim_level = rng.uniform(0.3, 0.55)
    signal = contrast * (core * (1.0 + 0.15 * texture) + rim_level * rim) + 0.12 * background + 0.5 * distractors
    if modality == "ct":
        noise = rng.normal(0, 1, (height, width)) * rng.uniform(0.06, 0.12)
        hu = 40 + 90 * (signal + noise)
        image = np.clip(hu, -1024, 3071).astype(np.int16)
        spacing = (float(rng.uniform(0.6, 0.9)),) * 2
    elif modality == "mr":
        bias = np.exp(0.25 * smooth_noise(rng, (height, width), 60.0))
        noise = rng.normal(0, 1, (height, width)) * rng.uniform(0.05, 0.1)
        image = (400 + 700 * (signal + noise) * bias).clip(0, None).astype(np.float32)
        spacing = (float(rng.uniform(0.8, 1.2)),) * 2
    else:
        tint = rng.uniform(0.4, 1.0, size=3)
        noise = rng.normal(0, 1, (height, width, 3)) * 0.05
        rgb = 70 + 110 * (signal[..., None] * tint + noise)
        image = np.clip(rgb, 0, 255).astype(np.uint8)
        spacing = (1.0, 1.0)

    masks: dict[str, np.ndarray] = {}
    for name in raters:
        jitter = _radial_profile(rng, 1.6, (1, 2, 3))(theta)
        d = distance + jitter
        if name == "tight":
            mask = d < -rng.uniform(2.0, 3.0)
        elif name == "core":
            mask = d < 0
        elif name == "rim":
            mask = d < rim_width
        elif name == "smooth":
            mask = _smoothed(d < 2.0, 5.0)
        elif name == "jagged":
            grey = ndimage.gaussian_filter(signal, 0.8)
            level = contrast * (0.5 + 0.5 * rim_level) * 0.9
            mask = (grey > level) & (d < rim_width + 2)
            mask = ndimage.binary_opening(mask, iterations=1)
            labels, count = ndimage.label(mask)
            if count > 1:
                sizes = ndimage.sum(mask, labels, range(1, count + 1))
                mask = labels == (1 + int(np.argmax(sizes)))
        elif name == "generous":
            mask = d < rim_width + 3.0
        else:  # conservative_smooth
            mask = _smoothed(d < -2.5, 5.0)
        if not mask.any():
            mask = d < 0
        while any(np.array_equal(mask, other) for other in masks.values()):
            mask = ndimage.binary_dilation(mask)  # never two pixel-identical raters
        masks[name] = mask
    return SyntheticCase(image=image, raters=masks, modality=modality, spacing=spacing)


def _remove_stale_case_files(folder: Path, keep: set[str]) -> None:
    """Delete image.* and rater_*.* files of an earlier case in ``folder`` that are not in ``keep``."""
    for path in folder.iterdir():
        if path.is_file() and path.name not in keep and re.match(r"(image|rater_.+)\.[A-Za-z.]+$", path.name):
            path.unlink()


def write_case(case: SyntheticCase, folder: Path) -> Path:
    """Write a case in the generic folder format: image.nrrd (CT/MR) or image.png, rater_<name>.png."""
    import SimpleITK as sitk

    from ..io.images import write_image_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image_name = "image.png" if case.image.ndim == 3 else "image.nrrd"
    _remove_stale_case_files(folder, {image_name} | {f"rater_{name}.png" for name in case.raters})
    if case.image.ndim == 3:
        image = sitk.GetImageFromArray(case.image, isVector=True)
        write_image_atomic(image, folder / "image.png", compress=False)
    else:
        image = sitk.GetImageFromArray(case.image)
        image.SetSpacing(case.spacing)
        write_image_atomic(image, folder / "image.nrrd")
    for name, mask in case.raters.items():
        write_image_atomic(
            sitk.GetImageFromArray(mask.astype(np.uint8) * 255), folder / f"rater_{name}.png", compress=False
        )
    return folder


def _check_output_root(root: Path) -> None:
    """Refuse a file, or a non-empty folder that is not an earlier synthetic dataset."""
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is a file; choose a folder for the synthetic dataset")
    if not root.is_dir() or not any(root.iterdir()):
        return
    try:
        kind = json.loads((root / "dataset.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != DATASET_KIND:
        raise DataError(f"{root} already holds files and is not a synthetic dataset; choose an empty or new folder")


def write_dataset(
    root: Path, n_cases: int, seed: int, raters: Sequence[str] = DEFAULT_RATERS, test_fraction: float = 0.2
) -> Path:
    """Generate ``n_cases`` cases under ``root`` with splits.json and dataset.json; deterministic per seed."""
    if n_cases < 1:
        raise InputError(f"n_cases must be at least 1, got {n_cases}; ask for one case or more")
    if not 0.0 <= test_fraction < 1.0:
        raise InputError(f"test_fraction must be in [0, 1), got {test_fraction}; pass e.g. 0.2")
    root = Path(root)
    _check_output_root(root)
    root.mkdir(parents=True, exist_ok=True)
    case_ids = []
    for index in range(n_cases):
        rng = np.random.default_rng([seed, index])
        case_id = f"case_{index:04d}"
        write_case(generate_case(rng, raters), root / case_id)
        case_ids.append(case_id)
    n_test = max(1, int(round(n_cases * test_fraction))) if n_cases > 1 and test_fraction > 0 else 0
    order = np.random.default_rng([seed, 10**6]).permutation(n_cases)
    test = sorted(case_ids[i] for i in order[:n_test])
    train = sorted(set(case_ids) - set(test))
    write_json_atomic(root / "splits.json", {"train": train, "test": test})
    write_json_atomic(
        root / "dataset.json",
        {
            "kind": DATASET_KIND,
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "n_cases": n_cases,
            "raters": list(raters),
            "test_fraction": test_fraction,
        },
    )
    return root


DEMO_SEED = 20251  # chosen so that the target is clearly visible and the raters clearly differ


def write_demo_case(destination: Path) -> Path:
    """Regenerate the bundled demo sample (one CT case) exactly."""
    case = generate_case(np.random.default_rng(DEMO_SEED), DEFAULT_RATERS, modality="ct")
    return write_case(case, destination)
