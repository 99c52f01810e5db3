"""Shared fixtures: one real LiteMedSAM-backed SPA model per test run, small synthetic images."""

from __future__ import annotations

import os
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch

# Under pytest-xdist (`make test` runs two workers) each worker computes on one core; alone, on two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# Every test, and every `spa` process a test starts with its own SPA_HOME, shares one folder of converted encoders:
# OpenVINO converts LiteMedSAM's encoder once per run (about 10 s and 3 GB), not once per command.
os.environ.setdefault("SPA_ENCODER_CACHE", str(Path(tempfile.gettempdir()) / "spa-test-encoder-cache"))


def _imports_mrml(module) -> bool:
    """Whether a test module imports slicer-core at load time (``slicer`` itself or the ``mrml`` helpers)."""
    for value in vars(module).values():
        name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
        if isinstance(name, str) and name.split(".")[0] in ("slicer", "mrml"):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    """Mark every test on real MRML ``mrml`` (`make test-mrml-5.11` runs them on a second slicer-core)."""
    modules: dict[str, bool] = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__ not in modules:
            modules[module.__name__] = _imports_mrml(module)
        if "mrml_scene" in getattr(item, "fixturenames", ()) or (module is not None and modules[module.__name__]):
            item.add_marker(pytest.mark.mrml)


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
