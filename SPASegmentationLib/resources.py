"""Where the shipped files live: the top-level ``Resources/`` folder (packaged as
``SPASegmentationLib.resources`` in a wheel). ``SPA_RESOURCES`` overrides it."""

from __future__ import annotations

import os
from pathlib import Path


def resources_dir() -> Path:
    """The folder holding shipped model weights, the model card and sample data."""
    override = os.environ.get("SPA_RESOURCES")
    if override:
        return Path(override)
    source_checkout = Path(__file__).resolve().parent.parent / "Resources"
    if source_checkout.is_dir():
        return source_checkout
    from importlib.resources import files

    return Path(str(files("SPASegmentationLib.resources")))


def default_model_path() -> Path:
    """The SPA weights trained on this project's data and shipped with it."""
    return resources_dir() / "models" / "spa_litemedsam.pt"


SAMPLE_CASES = {"lidc": "lidc_nodule", "synthetic": "demo_case"}  # spa demo --sample word → folder
DEFAULT_SAMPLE = "lidc"  # a real LIDC-IDRI nodule crop with four radiologists' masks


def sample_case_dir(sample: str = DEFAULT_SAMPLE) -> Path:
    """A bundled multi-rater sample case for ``spa demo``: the real LIDC crop, or the procedural CT."""
    return resources_dir() / "samples" / SAMPLE_CASES[sample]


def spa_home() -> Path:
    """Per-user state (profiles, caches): ``SPA_HOME`` or ``~/.spa``."""
    return Path(os.environ.get("SPA_HOME", Path.home() / ".spa"))
