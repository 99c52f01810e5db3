"""Which layout a multi-rater dataset is in: the one entry point for reading any of them."""

from __future__ import annotations

from pathlib import Path

from .dataset import MultiRaterDataset
from .folder import MultiRaterFolder
from .lidc import LidcCropsFolder, LidcPickle


def open_dataset(path: str | Path) -> MultiRaterDataset:
    """The dataset at ``path``, its layout detected: an LIDC pickle file, an LIDC crops tree, or an SPA folder."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in LidcPickle.SUFFIXES:
        return LidcPickle(path)
    if path.is_dir() and LidcCropsFolder.detect(path):
        return LidcCropsFolder(path)
    return MultiRaterFolder(path)
