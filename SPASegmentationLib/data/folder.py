"""The generic multi-rater folder format, read and validated.

    <root>/<case>/image.<png|jpg|nii.gz|nrrd|mha|dcm>
    <root>/<case>/rater_<name>.<png|nii.gz|nrrd|mha>    binary masks, same size as the image
    <root>/splits.json                                  optional {"train": [...], "test": [...], "val": [...]}

Any case may have 2–7 raters and rater names may differ between cases. CT in Hounsfield units is
allowed. Masks may be bool, 0/1 or 0/255. Without splits.json a deterministic 80/20 split by a stable
hash of the case id is used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, InputError
from ..io.images import read_image

IMAGE_STEM = "image"
RATER_PREFIX = "rater_"
MIN_RATERS, MAX_RATERS = 2, 7
SPLITS_FILE = "splits.json"


@dataclass
class MultiRaterCase:
    """One image and its raters' masks."""

    case_id: str
    image: np.ndarray
    raters: dict[str, np.ndarray]
    image_path: Path


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".dcm", ".tif", ".tiff", ".bmp"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return ""


class MultiRaterFolder:
    """A folder of multi-rater cases (see the module docstring for the layout)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.exists():
            raise DataError(f"dataset folder {self.root} does not exist; pass a folder of <case>/image.* and rater_<name>.* files")
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder; pass the dataset's root folder")
        self.case_ids = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.case_ids:
            raise DataError(f"dataset folder {self.root} has no case folders; each case is a folder with image.* and rater_<name>.*")
        self._splits = self._read_splits()

    def __len__(self) -> int:
        return len(self.case_ids)

    def _read_splits(self) -> dict[str, list[str]] | None:
        path = self.root / SPLITS_FILE
        if not path.is_file():
            return None
        try:
            splits = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); fix it or remove it to use the default 80/20 split") from exc
        if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
            raise DataError(f"{path} must map split names to lists of case ids, e.g. {{\"train\": [...], \"test\": [...]}}")
        known = set(self.case_ids)
        for name, ids in splits.items():
            unknown = [str(i) for i in ids if str(i) not in known]
            if unknown:
                raise DataError(f"{path} split {name!r} names unknown cases {unknown[:5]}; fix the ids or add the case folders")
        return {name: [str(i) for i in ids] for name, ids in splits.items()}

    def split(self, name: str) -> list[str]:
        """Case ids of a split: from splits.json, else a stable 80/20 train/test split by case-id hash."""
        if self._splits is not None:
            if name not in self._splits:
                raise DataError(f"{self.root / SPLITS_FILE} has no split {name!r}; it has {sorted(self._splits)}")
            return list(self._splits[name])
        if name not in ("train", "test"):
            raise DataError(f"{self.root} has no splits.json, so only 'train' and 'test' exist (not {name!r})")
        in_test = [int(hashlib.sha256(c.encode()).hexdigest(), 16) % 5 == 0 for c in self.case_ids]
        return [c for c, t in zip(self.case_ids, in_test) if t == (name == "test")]

    def _case_files(self, case_id: str) -> tuple[Path, dict[str, Path]]:
        folder = self.root / case_id
        if not folder.is_dir():
            raise DataError(f"case {case_id!r} is not a folder of {self.root}")
        images = [p for p in folder.iterdir() if _stem(p) == IMAGE_STEM]
        if len(images) != 1:
            found = "no image file" if not images else f"{len(images)} image files"
            raise DataError(f"case {folder} has {found}; it needs exactly one image.<png|jpg|nii.gz|nrrd|mha|dcm>")
        raters = {_stem(p)[len(RATER_PREFIX):]: p for p in sorted(folder.iterdir()) if _stem(p).startswith(RATER_PREFIX)}
        if not MIN_RATERS <= len(raters) <= MAX_RATERS:
            raise DataError(
                f"case {folder} has {len(raters)} rater mask(s); SPA needs {MIN_RATERS}-{MAX_RATERS} files named rater_<name>.*"
            )
        return images[0], raters

    def load(self, case_id: str) -> MultiRaterCase:
        """Read and validate one case."""
        image_path, rater_paths = self._case_files(case_id)
        try:
            image = read_image(image_path).array
        except InputError as exc:
            raise DataError(f"case {case_id!r}: {exc}") from exc
        raters = {}
        for name, path in rater_paths.items():
            try:
                mask = read_image(path).array
            except InputError as exc:
                raise DataError(f"case {case_id!r}: {exc}") from exc
            if mask.ndim == 3:
                mask = mask[..., 0]
            if mask.shape != image.shape[:2]:
                raise DataError(f"{path} is {mask.shape[1]}×{mask.shape[0]} but the image is {image.shape[1]}×{image.shape[0]}; masks must match the image")
            values = np.unique(mask)
            if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
                raise DataError(f"{path} is not a binary mask (values {values[:6].tolist()}…); use 0/1 or 0/255")
            if not (mask > 0).any():
                raise DataError(f"{path} is empty; remove the rater file or draw the structure")
            raters[name] = mask > 0
        return MultiRaterCase(case_id, image, raters, image_path)

    def fingerprint(self, case_ids: list[str] | None = None) -> str:
        """16-hex sha256 over the relative paths and bytes of the given cases' files."""
        digest = hashlib.sha256()
        for case_id in case_ids if case_ids is not None else self.case_ids:
            for path in sorted((self.root / case_id).iterdir()):
                if path.is_file():
                    digest.update(f"{case_id}/{path.name}".encode())
                    digest.update(path.read_bytes())
        return digest.hexdigest()[:16]
