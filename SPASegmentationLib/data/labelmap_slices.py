"""An organ-scale test set from one real CT volume and its label map (e.g. TotalSegmentator's output).

Every labelled structure gives a few axial slices (the slice where it is largest and the slices a
quarter of its extent above and below); each case is the whole slice, shown through one CT window as
an 8-bit picture (what the clinician sees), with the structure's largest connected region in that
slice as the only "rater". A label map is one strong annotator, not a multi-rater truth: this set
measures whether a prompt lands on the right organ and how good round 1 and the rounds after it are,
per structure size; it cannot measure adaptation to several raters. Every case is in the test split.

    spa generate-data OUT --kind ct-labelmap --ct example_ct.nii.gz --labels example_seg.nii.gz \
        --label-names names.json
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import DataError
from ..io.atomic import write_json_atomic

CASE_KIND = "ct-labelmap"
GENERATOR_VERSION = 1
SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # HU shown as 0..255 (level 40, width 400: the abdominal window)
MIN_PIXELS = 10  # a structure's region in a slice must hold at least this many pixels to make a case
SLICES_PER_STRUCTURE = 3
RATER = "labelmap"


def _read_volume(path: Path, what: str):  # -> sitk.Image
    import SimpleITK as sitk

    if not path.is_file():
        raise DataError(f"the {what} {path} does not exist; pass a NIfTI/NRRD/MHA volume")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(f"the {what} {path} cannot be read as a volume ({exc}); pass a NIfTI/NRRD/MHA file") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"the {what} {path} is not a single-channel 3-D volume; pass a CT volume and its label map")
    return sitk.DICOMOrient(image, "LPS")  # rows run anterior → posterior, columns patient right → left


def read_label_names(path: Path | None) -> dict[int, str]:
    """{label value: structure name} from a JSON object such as {"1": "spleen", "5": "liver"}; {} without a file."""
    if path is None:
        return {}
    try:
        payload = json.loads(Path(path).read_text())
        return {int(value): str(name) for value, name in payload.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(
            f'{path} is not a JSON object of label value → name ({exc}); write it as {{"1": "spleen", ...}}'
        ) from exc


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _largest_region(mask: np.ndarray) -> np.ndarray:
    regions, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, regions, index=np.arange(1, count + 1))
    return regions == (1 + int(np.argmax(sizes)))


def structure_slices(areas: np.ndarray, per_structure: int = SLICES_PER_STRUCTURE) -> list[int]:
    """The slices of one structure to test on, from its per-slice areas (those of at least MIN_PIXELS): the
    largest, then evenly spread over its extent (a quarter and three quarters in for three), without repeats."""
    present = np.flatnonzero(areas >= MIN_PIXELS)
    if present.size == 0:
        return []
    chosen = [int(np.argmax(areas))]
    for fraction in np.linspace(0.0, 1.0, per_structure + 2)[1:-1]:
        if len(chosen) == per_structure:
            break
        index = int(present[int(round(fraction * (present.size - 1)))])
        if index not in chosen:
            chosen.append(index)
    return sorted(chosen)


def write_labelmap_dataset(
    out: Path,
    ct: Path,
    labels: Path,
    names: dict[int, str] | None = None,
    window: tuple[float, float] = SOFT_TISSUE_WINDOW,
    per_structure: int = SLICES_PER_STRUCTURE,
) -> Path:
    """Write the organ-scale test set of ``ct`` and its label map ``labels`` as an SPA folder (test split)."""
    import SimpleITK as sitk

    from ..io.images import window_to_uint8, write_image_atomic

    ct, labels = Path(ct), Path(labels)
    ct_image = _read_volume(ct, "CT volume")
    label_image = _read_volume(labels, "label map")
    # The label map may cover part of the CT (TotalSegmentator's example labels 30 of 112 slices): resample it
    # onto the CT grid, nearest neighbour, unlabelled outside.
    label_image = sitk.Resample(label_image, ct_image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    hu = sitk.GetArrayFromImage(ct_image).astype(np.float32)  # (z, rows, cols)
    raw_labels = sitk.GetArrayFromImage(label_image)
    if not np.issubdtype(raw_labels.dtype, np.integer):
        raise DataError(f"the label map {labels} holds non-integer values; pass an integer label map")
    label_volume = raw_labels.astype(np.int64)
    values = [int(v) for v in np.unique(label_volume) if v != 0]
    if not values:
        raise DataError(f"the label map {labels} has no labelled voxel where it overlaps {ct}")
    low, high = window
    if not high > low:
        raise DataError(f"window {window} is empty; pass low,high with low < high (e.g. -160,240)")
    names = names or {}
    out = Path(out)
    case_ids: list[str] = []
    structures: dict[str, dict[str, object]] = {}
    for value in values:
        name = names.get(value, f"label_{value}")
        volume = label_volume == value
        areas = np.array([_largest_region(s).sum() if s.any() else 0 for s in volume])
        chosen = structure_slices(areas, per_structure)
        for z in chosen:
            mask = _largest_region(volume[z])
            picture = window_to_uint8(hu[z], low, high)
            case_id = f"{_safe_name(name)}_z{z:03d}"
            folder = out / case_id
            write_image_atomic(sitk.GetImageFromArray(picture), folder / "image.png")
            write_image_atomic(sitk.GetImageFromArray(mask.astype(np.uint8)), folder / f"rater_{RATER}.nrrd")
            case_ids.append(case_id)
        if chosen:
            structures[name] = {"label": value, "slices": chosen, "largest_area_px": int(areas.max())}
    if not case_ids:
        raise DataError(f"no structure of {labels} reaches {MIN_PIXELS} pixels in any slice; nothing to test on")
    write_json_atomic(out / "splits.json", {"train": [], "val": [], "test": sorted(case_ids)})
    write_json_atomic(
        out / "dataset.json",
        {
            "kind": CASE_KIND,
            "generator_version": GENERATOR_VERSION,
            "ct": {"file": ct.name, "sha256": hashlib.sha256(ct.read_bytes()).hexdigest()[:16]},
            "labels": {"file": labels.name, "sha256": hashlib.sha256(labels.read_bytes()).hexdigest()[:16]},
            "window_hu": [low, high],
            "slice_shape": list(hu.shape[1:]),
            "spacing_mm": list(ct_image.GetSpacing()),
            "structures": structures,
            "counts": {"train": 0, "val": 0, "test": len(case_ids)},
            "note": "one rater (the label map): a strong single annotator, not a multi-rater truth",
        },
    )
    return out
