"""The generic multi-rater folder format, read and validated.

    <root>/<case>/image.<png|jpg|nii.gz|nrrd|mha|dcm>
    <root>/<case>/rater_<name>.<png|nii.gz|nrrd|mha>    binary masks, same size as the image
    <root>/splits.json                                  optional {"train": [...], "test": [...], "val": [...]}

Every visible sub-folder of ``<root>`` is a case; its name is the case id. A case holds exactly one
2-D image (CT in Hounsfield units is fine; read with ``io.images.read_image``) and 1–7 rater masks;
rater names may differ between cases. Masks may be bool, 0/1 or 0/255. An empty mask is a valid
opinion (that rater saw no structure here) and one rater is a valid case. Other files in a case
folder are ignored. Without splits.json a deterministic 80/20 train/test split by a stable hash of
the case id is used; split ``all`` is every case. The folder's layout is checked when it is opened;
the pixels of a case when it is loaded. Every problem is a ``DataError`` naming the case, the file
and the fix. Other layouts (the LIDC crops) are in :mod:`.lidc`; :func:`.dataset.open_dataset` picks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..io.images import IMAGE_SUFFIXES
from .dataset import (
    ALL_SPLIT,
    MAX_RATERS,
    MIN_RATERS,
    MultiRaterCase,
    files_fingerprint,
    in_test_by_hash,
    read_case_image,
)

IMAGE_STEM = "image"
RATER_PREFIX = "rater_"
SPLITS_FILE = "splits.json"


@dataclass
class _CaseFiles:
    """Where one case's image and rater masks are."""

    image: Path
    raters: dict[str, Path]

    def all_paths(self) -> list[Path]:
        """The image and the rater masks, sorted."""
        return sorted([self.image, *self.raters.values()])


def _stem(path: Path) -> str:
    """The file name without a recognised image ending, or "" when the ending is not an image one."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return ""


class MultiRaterFolder:
    """A folder of multi-rater cases (see the module docstring for the layout)."""

    layout = "spa-folder"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.exists():
            raise DataError(
                f"dataset folder {self.root} does not exist; pass a folder of <case>/image.* and rater_<name>.* files"
            )
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder; pass the dataset's root folder")
        self.case_ids: list[str] = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not self.case_ids:
            raise DataError(
                f"dataset folder {self.root} has no case folders; each case is a folder with image.* and rater_<name>.*"
            )
        self._files = {case_id: self._find_case_files(case_id) for case_id in self.case_ids}
        self._splits = self._read_splits()

    def __len__(self) -> int:
        return len(self.case_ids)

    def _read_splits(self) -> dict[str, list[str]] | None:
        """splits.json as {split name: case ids}, checked against the case folders; None when absent."""
        path = self.root / SPLITS_FILE
        if not path.is_file():
            return None
        try:
            splits = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(
                f"{path} is not valid JSON ({exc}); fix it or remove it to use the default 80/20 split"
            ) from exc
        if not isinstance(splits, dict) or not all(
            isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in splits.values()
        ):
            raise DataError(f'{path} must map split names to lists of case ids, e.g. {{"train": [...], "test": [...]}}')
        known = set(self.case_ids)
        for name, ids in splits.items():
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise DataError(
                    f"{path} split {name!r} names unknown cases {unknown[:5]}; fix the ids or add the case folders"
                )
        names = sorted(splits)
        for index, first in enumerate(names):
            for second in names[index + 1 :]:
                shared = sorted(set(splits[first]) & set(splits[second]))
                if shared:
                    raise DataError(
                        f"{path} puts cases {shared[:5]} in both {first!r} and {second!r}; keep each case in one split"
                    )
        return {name: list(ids) for name, ids in splits.items()}

    def split(self, name: str) -> list[str]:
        """Case ids of a split: from splits.json, else a stable 80/20 train/test split by case-id hash."""
        if name == ALL_SPLIT:
            return list(self.case_ids)
        if self._splits is not None:
            if name not in self._splits:
                raise DataError(
                    f"{self.root / SPLITS_FILE} has no split {name!r}; "
                    f"choose one of {sorted(self._splits)} or add it there"
                )
            return list(self._splits[name])
        if name not in ("train", "test"):
            raise DataError(
                f"{self.root} has no splits.json, so only 'train' and 'test' exist (not {name!r}); "
                "add a splits.json to define it"
            )
        return [c for c in self.case_ids if in_test_by_hash(c) == (name == "test")]

    def _find_case_files(self, case_id: str) -> _CaseFiles:
        """The image and rater files of a case folder, checking the layout (not the pixels)."""
        folder = self.root / case_id
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if _stem(p) == IMAGE_STEM]
        if len(images) != 1:
            found = (
                "no image file" if not images else f"{len(images)} image files ({', '.join(p.name for p in images)})"
            )
            raise DataError(f"case {folder} has {found}; it needs exactly one image.<png|jpg|nii.gz|nrrd|mha|dcm>")
        raters: dict[str, Path] = {}
        for path in files:
            stem = _stem(path)
            if not stem.startswith(RATER_PREFIX):
                continue
            name = stem[len(RATER_PREFIX) :]
            if not name:
                raise DataError(f"{path} has no rater name; call it rater_<name>{path.name[len(stem) :]}")
            if name in raters:
                raise DataError(
                    f"case {folder} has two masks for rater {name!r} ({raters[name].name}, {path.name}); "
                    "keep one of them"
                )
            raters[name] = path
        if not MIN_RATERS <= len(raters) <= MAX_RATERS:
            raise DataError(
                f"case {folder} has {len(raters)} rater mask(s); "
                f"SPA needs {MIN_RATERS}-{MAX_RATERS} files named rater_<name>.*"
            )
        return _CaseFiles(images[0], raters)

    def _files_of(self, case_id: str) -> _CaseFiles:
        """The files of a known case, or a DataError naming the unknown id."""
        if case_id not in self._files:
            raise DataError(f"case {case_id!r} is not a case folder of {self.root}; choose one of its sub-folders")
        return self._files[case_id]

    def _read_mask(self, case_id: str, path: Path, image_shape: tuple[int, ...]) -> np.ndarray:
        """A rater mask as a bool array (empty is allowed), checked to be binary and of the image's size."""
        mask = read_case_image(case_id, path)
        if mask.ndim == 3:
            if not (np.array_equal(mask[..., 0], mask[..., 1]) and np.array_equal(mask[..., 0], mask[..., 2])):
                raise DataError(f"{path} is a colour image; save the mask as one channel with values 0/1 or 0/255")
            mask = mask[..., 0]
        if mask.shape != image_shape[:2]:
            raise DataError(
                f"{path} is {mask.shape[1]}×{mask.shape[0]} but the image is {image_shape[1]}×{image_shape[0]}; "
                "masks must match the image"
            )
        values = set(np.unique(mask).tolist())
        if not (values <= {0, 1} or values <= {0, 255}):
            shown = sorted(values)[:6]
            raise DataError(f"{path} is not a binary mask (values {shown}…); save it with values 0/1 or 0/255")
        return mask > 0

    def load(self, case_id: str) -> MultiRaterCase:
        """Read and validate one case."""
        files = self._files_of(case_id)
        image = read_case_image(case_id, files.image)
        raters = {name: self._read_mask(case_id, path, image.shape) for name, path in files.raters.items()}
        return MultiRaterCase(case_id, image, raters, files.image)

    def fingerprint(self, case_ids: list[str] | None = None) -> str:
        """16-hex sha256 over the relative paths and bytes of the given cases' image and mask files."""
        ids = case_ids if case_ids is not None else self.case_ids
        return files_fingerprint((case_id, self._files_of(case_id).all_paths()) for case_id in ids)
