"""Multi-rater datasets in the layouts they ship in, behind one interface.

    dataset = open_dataset(path)            # data.detect: a folder of either layout, or an LIDC pickle
    for case_id in dataset.split("test"):   # "train", "test", "all" (and any split splits.json names)
        case = dataset.load(case_id)        # MultiRaterCase: image + {rater: bool mask}
    dataset.fingerprint(case_ids)           # what results files record

Layouts: the generic SPA folder (:mod:`.folder`), the LIDC crops as the CIMD and Probabilistic
U-Net codes ship them (a ``training/`` + ``testing/`` folder tree, :class:`.lidc.LidcCropsFolder`) and
their pickle (:class:`.lidc.LidcPickle`). An empty rater mask is a valid opinion and a single rater a
valid case in every layout; :func:`rater_statistics` counts them for the reports. The layout is
detected by :func:`SPASegmentationLib.data.detect.open_dataset`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import DataError, InputError
from ..io.images import SliceRequiredError, read_image

ALL_SPLIT = "all"
MIN_RATERS, MAX_RATERS = 1, 7
DEFAULT_TEST_SHARE = 5  # without a split file, one case in five (by hash) is a test case


@dataclass
class MultiRaterCase:
    """One image and its raters' masks."""

    case_id: str
    image: np.ndarray  # as read by io.images.read_image: (H, W) native dtype or (H, W, 3) uint8
    raters: dict[str, np.ndarray]  # rater name → (H, W) bool; a mask may be empty
    image_path: Path


class MultiRaterDataset(Protocol):
    """What training, evaluation and the demo need from a dataset, whatever its layout."""

    root: Path
    layout: str

    def split(self, name: str) -> list[str]: ...

    def load(self, case_id: str) -> MultiRaterCase: ...

    def fingerprint(self, case_ids: list[str] | None = None) -> str: ...


def in_test_by_hash(key: str) -> bool:
    """The stable default split: a case (or a patient) is a test case when sha256(key) is 0 modulo 5."""
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % DEFAULT_TEST_SHARE == 0


def files_fingerprint(cases: Iterable[tuple[str, Iterable[Path]]]) -> str:
    """16-hex sha256 over each case's files (in the order given): their names under the case id and bytes."""
    digest = hashlib.sha256()
    for case_id, paths in cases:
        for path in paths:
            digest.update(f"{case_id}/{path.name}".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def read_case_image(case_id: str, path: Path) -> np.ndarray:
    """One 2-D image or mask file of a case as an array, with read problems turned into DataErrors."""
    try:
        return read_image(path).array
    except SliceRequiredError as exc:
        raise DataError(
            f"case {case_id!r}: {path} is a 3-D volume with {exc.n_slices} slices; save one 2-D slice per case"
        ) from exc
    except InputError as exc:
        raise DataError(f"case {case_id!r}: {exc}") from exc


@dataclass
class RaterStatistics:
    """How many cases have one rater, an empty rater mask, or no rater who marked anything."""

    cases: int = 0
    single_rater: int = 0
    with_empty_rater: int = 0
    empty_rater_masks: int = 0
    all_raters_empty: int = 0

    def add(self, case: MultiRaterCase) -> None:
        """Count one case."""
        empty = sum(not mask.any() for mask in case.raters.values())
        self.cases += 1
        self.single_rater += len(case.raters) == 1
        self.with_empty_rater += empty > 0
        self.empty_rater_masks += empty
        self.all_raters_empty += empty == len(case.raters)

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def rater_statistics(cases: Iterable[MultiRaterCase]) -> RaterStatistics:
    """Count the single-rater cases and the empty rater masks of ``cases``."""
    statistics = RaterStatistics()
    for case in cases:
        statistics.add(case)
    return statistics
