"""The synthetic multi-rater generator and the generic folder format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SPASegmentationLib.data.folder import MultiRaterFolder
from SPASegmentationLib.data.synthetic import (
    DEFAULT_RATERS, RATER_STYLES, generate_case, write_dataset, write_demo_case,
)
from SPASegmentationLib.errors import DataError, InputError
from SPASegmentationLib.evaluation.metrics import dice


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("synth"), n_cases=20, seed=3)


def test_dataset_loads_with_splits_and_all_modalities(dataset):
    folder = MultiRaterFolder(dataset)
    assert len(folder) == 20 and len(folder.split("train")) == 16 and len(folder.split("test")) == 4
    assert not set(folder.split("train")) & set(folder.split("test"))
    dtypes = set()
    for case_id in folder.case_ids:
        case = folder.load(case_id)
        assert sorted(case.raters) == sorted(DEFAULT_RATERS)
        assert all(m.shape == case.image.shape[:2] and m.dtype == bool for m in case.raters.values())
        dtypes.add(str(case.image.dtype))
    assert {"int16", "float32", "uint8"} <= dtypes  # CT in HU, MR, photographs
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["seed"] == 3 and meta["raters"] == list(DEFAULT_RATERS)


def test_generation_is_deterministic_per_seed(tmp_path):
    a = write_dataset(tmp_path / "a", n_cases=3, seed=7)
    b = write_dataset(tmp_path / "b", n_cases=3, seed=7)
    c = write_dataset(tmp_path / "c", n_cases=3, seed=8)
    assert MultiRaterFolder(a).fingerprint() == MultiRaterFolder(b).fingerprint() != MultiRaterFolder(c).fingerprint()


def test_rater_styles_are_consistent_across_cases_and_distinct():
    areas = {name: [] for name in RATER_STYLES}
    pairwise = []
    for index in range(20):
        case = generate_case(np.random.default_rng([11, index]), RATER_STYLES)
        for name, mask in case.raters.items():
            areas[name].append(mask.sum())
        names = sorted(case.raters)
        pairwise += [dice(case.raters[x], case.raters[y]) for i, x in enumerate(names) for y in names[i + 1:]]
        # Consistent styles: on every image the tight rater is inside the core, the rim one outside it.
        assert case.raters["tight"].sum() < case.raters["core"].sum() < case.raters["rim"].sum() < case.raters["generous"].sum()
    mean = {k: np.mean(v) for k, v in areas.items()}
    assert mean["conservative_smooth"] < mean["core"] < mean["smooth"] < mean["generous"]
    assert 0.6 < np.median(pairwise) < 0.97 and max(pairwise) < 1.0


def test_demo_case_is_reproducible(tmp_path):
    shipped = Path(__file__).resolve().parents[1] / "Resources" / "samples" / "demo_case"
    write_demo_case(tmp_path / "demo_case")
    for path in shipped.iterdir():
        assert (tmp_path / "demo_case" / path.name).read_bytes() == path.read_bytes(), path.name


def test_generator_refuses_bad_requests():
    with pytest.raises(InputError, match="unknown rater"):
        generate_case(np.random.default_rng(0), ["nobody", "core"])
    with pytest.raises(InputError, match="2-7 raters"):
        generate_case(np.random.default_rng(0), ["core"])


def write_png(path: Path, array: np.ndarray) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


@pytest.fixture
def tiny_root(tmp_path) -> Path:
    case = tmp_path / "root" / "p1"
    case.mkdir(parents=True)
    write_png(case / "image.png", (np.arange(400).reshape(20, 20) % 255).astype(np.uint8))
    for name, size in (("a", 5), ("b", 7)):
        mask = np.zeros((20, 20), np.uint8)
        mask[5:5 + size, 5:5 + size] = 255
        write_png(case / f"rater_{name}.png", mask)
    return tmp_path / "root"


def test_folder_without_splits_uses_a_stable_split(tiny_root):
    folder = MultiRaterFolder(tiny_root)
    assert sorted(folder.split("train") + folder.split("test")) == ["p1"]
    case = folder.load("p1")
    assert case.raters["a"].sum() == 25 and case.raters["b"].sum() == 49


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: (r / "p1" / "rater_b.png").unlink(), "1 rater mask"),
        (lambda r: (r / "p1" / "image.png").unlink(), "no image file"),
        (lambda r: write_png(r / "p1" / "rater_b.png", np.zeros((10, 10), np.uint8) + 255), "must match the image"),
        (lambda r: write_png(r / "p1" / "rater_b.png", np.full((20, 20), 7, np.uint8)), "not a binary mask"),
        (lambda r: write_png(r / "p1" / "rater_b.png", np.zeros((20, 20), np.uint8)), "empty"),
        (lambda r: (r / "splits.json").write_text('{"train": ["p9"]}'), "unknown cases"),
        (lambda r: (r / "splits.json").write_text("{oops"), "not valid JSON"),
    ],
)
def test_folder_problems_are_named_with_the_fix(tiny_root, damage, message):
    damage(tiny_root)
    with pytest.raises(DataError, match=message):
        folder = MultiRaterFolder(tiny_root)
        folder.load("p1")


def test_missing_or_empty_root_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        MultiRaterFolder(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no case folders"):
        MultiRaterFolder(tmp_path)
