"""Shared fixtures: one real LiteMedSAM-backed SPA model per test run, small synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def untrained_model():
    """SPA on the real pretrained LiteMedSAM backbone, SPA parts freshly initialised (seeded)."""
    from SPASegmentationLib.model.build import build_model
    from SPASegmentationLib.model.spa import SPAConfig

    torch.manual_seed(0)
    return build_model(SPAConfig())


@pytest.fixture(scope="session")
def shipped_model():
    """The SPA weights shipped in Resources/."""
    from SPASegmentationLib.model.build import default_model

    return default_model()


@pytest.fixture
def mrml_scene():
    """A fresh headless MRML scene (slicer-core), installed as ``slicer.mrmlScene`` while the test runs."""
    pytest.importorskip("slicer")
    from mrml import installed_scene

    with installed_scene() as scene:
        yield scene


def disc_image(
    height: int = 180, width: int = 240, centre=(120, 90), radius: float = 35.0, seed: int = 0
) -> np.ndarray:
    """A CT-like int16 image (HU) with a bright disc and a faint rim."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    r = np.hypot(xx - centre[0], yy - centre[1])
    image = 40 + 90 * (r < radius) + 30 * ((r >= radius) & (r < radius + 5)) + rng.normal(0, 8, (height, width))
    return image.astype(np.int16)


@pytest.fixture
def ct_image() -> np.ndarray:
    return disc_image()
