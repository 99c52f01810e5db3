"""The LIDC-IDRI nodule crops in the two layouts most users hold them in.

``LidcCropsFolder`` — the folder tree of the CIMD and several other ambiguous-segmentation codes::

    <root>/training/<id>/image_<n>.jpg        8-bit crop (lung window applied)
    <root>/training/<id>/label0_.jpg … label3_.jpg    one mask per radiologist (JPEG: threshold at 127)
    <root>/testing/<id>/…

``LidcPickle`` — the Probabilistic U-Net's pickle: a dict (or list) of entries with ``image``
(H, W), ``masks`` (one (H, W) mask per radiologist) and ``series_uid``. It is read with an
unpickler that only rebuilds plain containers and numpy arrays, so a hostile file cannot run code.
Splits: the tree's own folders (``train`` = training/, ``test`` = testing/); the pickle has none, so
cases are split 80/20 by a hash of their series, keeping each scan's crops on one side.
Empty masks (a radiologist who saw no nodule on this slice) are kept: they are valid opinions.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .dataset import ALL_SPLIT, MAX_RATERS, MultiRaterCase, files_fingerprint, in_test_by_hash, read_case_image

SPLIT_FOLDERS = {"train": ("training", "train"), "test": ("testing", "test"), "val": ("validation", "val")}
JPEG_MASK_THRESHOLD = 127  # the masks are JPEG: compression leaves values around 0 and 255
_IMAGE = re.compile(r"image(_\d+)?\.(jpe?g|png)$", re.IGNORECASE)
_LABEL = re.compile(r"label(\d+)_?\.(jpe?g|png)$", re.IGNORECASE)


def _split_folder(root: Path, split: str) -> Path | None:
    for name in SPLIT_FOLDERS.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    return None


class LidcCropsFolder:
    """LIDC crops as a ``training/`` + ``testing/`` tree of ``image_<n>.jpg`` and ``label<k>_.jpg`` files."""

    layout = "lidc-crops"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._cases: dict[str, tuple[Path, dict[str, Path]]] = {}
        self._splits: dict[str, list[str]] = {}
        for split in SPLIT_FOLDERS:
            folder = _split_folder(self.root, split)
            if folder is None:
                continue
            ids = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_natural)
            self._splits[split] = []
            for case_folder in ids:
                case_id = f"{folder.name}/{case_folder.name}"
                self._cases[case_id] = self._case_files(case_folder)
                self._splits[split].append(case_id)
        if not self._cases:
            raise DataError(
                f"{self.root} holds no LIDC crops; expected training/<id>/image_<n>.jpg with label<k>_.jpg files"
            )

    @staticmethod
    def detect(root: Path) -> bool:
        """Whether ``root`` looks like this layout: a split folder whose case folders hold image_* and label*."""
        for names in SPLIT_FOLDERS.values():
            for name in names:
                folder = root / name
                if not folder.is_dir():
                    continue
                for case_folder in folder.iterdir():
                    if case_folder.is_dir():
                        files = [p.name for p in case_folder.iterdir()]
                        return any(_IMAGE.match(f) for f in files) and any(_LABEL.match(f) for f in files)
        return False

    @staticmethod
    def _case_files(folder: Path) -> tuple[Path, dict[str, Path]]:
        files = sorted(p for p in folder.iterdir() if p.is_file())
        images = [p for p in files if _IMAGE.match(p.name)]
        labels = {f"label{int(m.group(1))}": p for p in files if (m := _LABEL.match(p.name))}
        if len(images) != 1:
            raise DataError(f"LIDC case {folder} has {len(images)} image_<n>.jpg files; it needs exactly one")
        if not 1 <= len(labels) <= MAX_RATERS:
            raise DataError(f"LIDC case {folder} has {len(labels)} label<k>_.jpg masks; it needs 1 to {MAX_RATERS}")
        return images[0], dict(sorted(labels.items()))

    def split(self, name: str) -> list[str]:
        """``train`` (training/), ``test`` (testing/), ``val`` (validation/) or ``all``."""
        if name == ALL_SPLIT:
            return [case_id for ids in self._splits.values() for case_id in ids]
        if name not in self._splits:
            raise DataError(f"{self.root} has no {name!r} split; it has {sorted(self._splits) + [ALL_SPLIT]}")
        return list(self._splits[name])

    def load(self, case_id: str) -> MultiRaterCase:
        """Read one crop and its radiologists' masks (thresholded at 127)."""
        if case_id not in self._cases:
            raise DataError(f"case {case_id!r} is not in {self.root}; cases look like 'testing/12'")
        image_path, labels = self._cases[case_id]
        image = read_case_image(case_id, image_path)
        raters = {}
        for name, path in labels.items():
            mask = read_case_image(case_id, path)
            mask = mask[..., 0] if mask.ndim == 3 else mask
            if mask.shape != image.shape[:2]:
                raise DataError(f"{path} is {mask.shape} but the image is {image.shape[:2]}; masks must match it")
            raters[name] = mask > JPEG_MASK_THRESHOLD
        return MultiRaterCase(case_id, image, raters, image_path)

    def fingerprint(self, case_ids: list[str] | None = None) -> str:
        """16-hex sha256 over the cases' relative paths and file bytes."""
        ids = case_ids if case_ids is not None else list(self._cases)
        return files_fingerprint(
            (case_id, [self._cases[case_id][0], *self._cases[case_id][1].values()]) for case_id in ids
        )


class _ArraysOnly(pickle.Unpickler):
    """Rebuilds containers, numbers, strings and numpy arrays; refuses every other class."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the pickle wants to build {module}.{name}, which a dataset never needs")


class LidcPickle:
    """The Probabilistic U-Net's LIDC pickle: entries with ``image``, ``masks`` and ``series_uid``."""

    layout = "lidc-pickle"
    SUFFIXES = (".pickle", ".pkl")

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        try:
            data = self.root.read_bytes()
            payload = _ArraysOnly(io.BytesIO(data)).load()
        except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
            raise DataError(
                f"{self.root} could not be read as an LIDC pickle ({exc}); pass the crops' .pickle"
            ) from exc
        self._digest = hashlib.sha256(data).hexdigest()
        entries = (
            payload.items() if isinstance(payload, dict) else enumerate(payload if isinstance(payload, list) else [])
        )
        self._entries: dict[str, dict[str, Any]] = {}
        for key, entry in entries:
            case_id = str(key) if isinstance(payload, dict) else f"{key:05d}"
            if not isinstance(entry, dict) or "image" not in entry or "masks" not in entry:
                raise DataError(f"{self.root}: entry {case_id!r} needs 'image' and 'masks' (and 'series_uid')")
            self._entries[case_id] = entry
        if not self._entries:
            raise DataError(f"{self.root} holds no entries; expected a dict of {{'image', 'masks', 'series_uid'}}")

    def _group(self, case_id: str) -> str:
        return str(self._entries[case_id].get("series_uid", case_id))

    def split(self, name: str) -> list[str]:
        """``all``, or a stable 80/20 ``train``/``test`` split by series (a scan's crops stay together)."""
        ids = list(self._entries)
        if name == ALL_SPLIT:
            return ids
        if name not in ("train", "test"):
            raise DataError(f"{self.root} has splits 'train', 'test' and 'all', not {name!r}")
        return [c for c in ids if in_test_by_hash(self._group(c)) == (name == "test")]

    def load(self, case_id: str) -> MultiRaterCase:
        """One crop: the image as 8-bit when it is stored in [0, 1], and each radiologist's mask (> 0)."""
        if case_id not in self._entries:
            raise DataError(f"case {case_id!r} is not in {self.root}")
        entry = self._entries[case_id]
        image = np.asarray(entry["image"])
        masks = [np.asarray(m) for m in entry["masks"]]
        if image.ndim != 2 or not 1 <= len(masks) <= MAX_RATERS or any(m.shape != image.shape for m in masks):
            raise DataError(
                f"{self.root}: entry {case_id!r} needs a 2-D image and 1-{MAX_RATERS} masks of its shape, "
                f"got image {image.shape} and masks {[m.shape for m in masks]}"
            )
        if image.dtype.kind == "f" and np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0:
            image = np.rint(image * 255.0).astype(np.uint8)
        raters = {f"label{k}": m > 0 for k, m in enumerate(masks)}
        return MultiRaterCase(case_id, image, raters, self.root)

    def fingerprint(self, case_ids: list[str] | None = None) -> str:
        """16-hex sha256 over the pickle's bytes and the chosen case ids."""
        digest = hashlib.sha256(self._digest.encode())
        for case_id in case_ids if case_ids is not None else list(self._entries):
            digest.update(case_id.encode())
        return digest.hexdigest()[:16]


def _natural(path: Path) -> tuple:
    """Sort key: numbers in names as numbers (2 before 10)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name))
