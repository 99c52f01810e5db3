"""The synthetic multi-rater generator and the generic folder format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SPASegmentationLib.data.dataset import rater_statistics
from SPASegmentationLib.data.detect import open_dataset
from SPASegmentationLib.data.folder import MultiRaterFolder
from SPASegmentationLib.data.lidc import LidcCropsFolder, LidcPickle
from SPASegmentationLib.data.synthetic import (
    DEFAULT_RATERS,
    RATER_STYLES,
    generate_case,
    write_dataset,
    write_demo_case,
)
from SPASegmentationLib.errors import DataError, InputError
from SPASegmentationLib.metrics import dice


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


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_deterministic_per_seed(tmp_path):
    a = write_dataset(tmp_path / "a", n_cases=3, seed=7)
    b = write_dataset(tmp_path / "b", n_cases=3, seed=7)
    c = write_dataset(tmp_path / "c", n_cases=3, seed=8)
    assert _all_files(a) == _all_files(b)  # same bytes, splits.json and dataset.json included
    assert MultiRaterFolder(a).fingerprint() == MultiRaterFolder(b).fingerprint() != MultiRaterFolder(c).fingerprint()
    # Rewriting a dataset folder with another seed leaves no stale files behind, and it still loads.
    write_dataset(a, n_cases=3, seed=8)
    assert _all_files(a) == _all_files(c)


def test_generator_does_not_write_into_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a synthetic dataset"):
        write_dataset(tmp_path, n_cases=2, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_rater_styles_are_consistent_across_cases_and_distinct():
    areas = {name: [] for name in RATER_STYLES}
    pairwise = []
    for index in range(20):
        case = generate_case(np.random.default_rng([11, index]), RATER_STYLES)
        for name, mask in case.raters.items():
            areas[name].append(mask.sum())
        names = sorted(case.raters)
        pairwise += [dice(case.raters[x], case.raters[y]) for i, x in enumerate(names) for y in names[i + 1 :]]
        # Consistent styles: on every image the tight rater is inside the core, the rim one outside it.
        assert (
            case.raters["tight"].sum()
            < case.raters["core"].sum()
            < case.raters["rim"].sum()
            < case.raters["generous"].sum()
        )
        masks = list(case.raters.values())
        assert all(m.any() for m in masks)
        assert not any(np.array_equal(masks[i], masks[j]) for i in range(len(masks)) for j in range(i))
    mean = {k: np.mean(v) for k, v in areas.items()}
    assert mean["conservative_smooth"] < mean["core"] < mean["smooth"] < mean["generous"]
    assert mean["tight"] < mean["core"] < mean["smooth"] < mean["rim"]
    assert 0.6 < np.median(pairwise) < 0.97 and max(pairwise) < 1.0


def test_default_raters_differ_in_a_sensible_range():
    """Raters are distinct styles, not noise: mean pairwise Dice of the default four in 0.6–0.95."""
    pairwise = []
    for index in range(20):
        case = generate_case(np.random.default_rng([5, index]), DEFAULT_RATERS)
        assert 192 <= min(case.image.shape[:2]) and max(case.image.shape[:2]) <= 320
        names = sorted(case.raters)
        pairwise.append(
            np.mean([dice(case.raters[x], case.raters[y]) for i, x in enumerate(names) for y in names[i + 1 :]])
        )
    assert 0.6 < np.mean(pairwise) < 0.95


def test_modalities_have_their_native_types():
    rng = np.random.default_rng(0)
    ct, mr, photo = (generate_case(rng, modality=m) for m in ("ct", "mr", "photo"))
    assert ct.image.dtype == np.int16 and -1024 <= ct.image.min() and 80 <= np.percentile(ct.image, 99.5) <= 400
    assert mr.image.dtype == np.float32 and mr.image.min() >= 0
    assert photo.image.dtype == np.uint8 and photo.image.shape[2] == 3
    with pytest.raises(InputError, match="unknown modality"):
        generate_case(rng, modality="xray")


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
    with pytest.raises(InputError, match="distinct"):
        generate_case(np.random.default_rng(0), ["core", "core"])
    with pytest.raises(InputError, match="test_fraction"):
        write_dataset(Path("unused"), n_cases=2, seed=0, test_fraction=1.0)


def write_png(path: Path, array: np.ndarray) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


@pytest.fixture
def tiny_root(tmp_path) -> Path:
    case = tmp_path / "root" / "p1"
    case.mkdir(parents=True)
    write_png(case / "image.png", (np.arange(400).reshape(20, 20) % 255).astype(np.uint8))
    for name, size in (("a", 5), ("b", 7)):
        mask = np.zeros((20, 20), np.uint8)
        mask[5 : 5 + size, 5 : 5 + size] = 255
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
        (lambda r: [(r / "p1" / f"rater_{n}.png").unlink() for n in "ab"], "0 rater mask"),
        (lambda r: (r / "p1" / "image.png").unlink(), "no image file"),
        (lambda r: write_png(r / "p1" / "rater_b.png", np.zeros((10, 10), np.uint8) + 255), "must match the image"),
        (lambda r: write_png(r / "p1" / "rater_b.png", np.full((20, 20), 7, np.uint8)), "not a binary mask"),
        (lambda r: (r / "splits.json").write_text('{"train": ["p9"]}'), "unknown cases"),
        (lambda r: (r / "splits.json").write_text("{oops"), "not valid JSON"),
        (lambda r: (r / "splits.json").write_text('{"train": ["p1"], "test": ["p1"]}'), "in both"),
        (lambda r: (r / "splits.json").write_text('{"train": "p1"}'), "lists of case ids"),
        (lambda r: write_png(r / "p1" / "image.jpg", np.zeros((20, 20), np.uint8)), "2 image files"),
        (lambda r: write_png(r / "p1" / "rater_a.nrrd", np.ones((20, 20), np.uint8)), "two masks for rater 'a'"),
        (
            lambda r: [write_png(r / "p1" / f"rater_x{k}.png", np.ones((20, 20), np.uint8)) for k in range(6)],
            "8 rater mask",
        ),
        (
            lambda r: sitk.WriteImage(
                sitk.GetImageFromArray(
                    np.dstack([np.eye(20, dtype=np.uint8) * 255] * 2 + [np.zeros((20, 20), np.uint8)]), isVector=True
                ),
                str(r / "p1" / "rater_b.png"),
            ),
            "colour image",
        ),
        (lambda r: (r / "p1" / "image.png").write_bytes(b"not a png"), "could not be read"),
        (
            lambda r: (
                (r / "p1" / "image.png").unlink(),
                sitk.WriteImage(
                    sitk.GetImageFromArray(np.zeros((3, 20, 20), np.int16)), str(r / "p1" / "image.nii.gz")
                ),
            ),
            "3-D volume with 3 slices",
        ),
    ],
)
def test_folder_problems_are_named_with_the_fix(tiny_root, damage, message):
    damage(tiny_root)
    with pytest.raises(DataError, match=message):
        folder = MultiRaterFolder(tiny_root)
        folder.load("p1")


def test_problem_messages_name_the_case_file(tiny_root):
    write_png(tiny_root / "p1" / "rater_b.png", np.full((20, 20), 7, np.uint8))
    with pytest.raises(DataError) as info:
        MultiRaterFolder(tiny_root).load("p1")
    assert str(tiny_root / "p1" / "rater_b.png") in str(info.value)


def test_folder_accepts_medical_images_and_mask_encodings(tiny_root):
    case = tiny_root / "p2"
    case.mkdir()
    ct = sitk.GetImageFromArray((np.arange(400).reshape(20, 20) - 1000).astype(np.int16))
    ct.SetSpacing((0.7, 0.7))
    sitk.WriteImage(ct, str(case / "image.nii.gz"))
    one = np.zeros((20, 20), np.uint8)
    one[2:9, 3:8] = 1
    sitk.WriteImage(sitk.GetImageFromArray(one), str(case / "rater_zero_one.nii.gz"))
    write_png(case / "rater_full.png", np.full((20, 20), 255, np.uint8))
    (case / "notes.txt").write_text("ignored")
    (tiny_root / "splits.json").write_text('{"train": ["p1"], "test": ["p2"], "val": []}')
    folder = MultiRaterFolder(tiny_root)
    assert folder.split("test") == ["p2"] and folder.split("val") == []
    with pytest.raises(DataError, match="no split 'extra'"):
        folder.split("extra")
    loaded = folder.load("p2")
    assert loaded.image.dtype == np.int16 and loaded.image.min() == -1000
    assert loaded.raters["zero_one"].sum() == 35 and loaded.raters["full"].all()
    assert loaded.image_path == case / "image.nii.gz"
    before = folder.fingerprint(["p2"])
    (case / "notes.txt").write_text("changed")  # not a case file
    assert MultiRaterFolder(tiny_root).fingerprint(["p2"]) == before != folder.fingerprint(["p1"])
    write_png(case / "rater_full.png", np.full((20, 20), 1, np.uint8))
    assert MultiRaterFolder(tiny_root).fingerprint(["p2"]) != before and len(before) == 16
    with pytest.raises(DataError, match="'p3' is not a case folder"):
        folder.load("p3")


def test_missing_or_empty_root_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        MultiRaterFolder(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        MultiRaterFolder(tmp_path / "file.txt")
    with pytest.raises(DataError, match="no case folders"):
        MultiRaterFolder(tmp_path)
    (tmp_path / "splits.json").write_text("{}")
    with pytest.raises(DataError, match="no case folders"):
        MultiRaterFolder(tmp_path)


def test_an_empty_rater_mask_and_a_single_rater_are_valid_cases(tiny_root):
    write_png(tiny_root / "p1" / "rater_b.png", np.zeros((20, 20), np.uint8))  # rater b saw no structure
    case = MultiRaterFolder(tiny_root).load("p1")
    assert case.raters["a"].sum() == 25 and not case.raters["b"].any()
    (tiny_root / "p1" / "rater_b.png").unlink()
    assert list(MultiRaterFolder(tiny_root).load("p1").raters) == ["a"]
    assert MultiRaterFolder(tiny_root).split("all") == ["p1"]


LIDC = Path(__file__).resolve().parent / "data" / "lidc-cimd"


def test_the_real_lidc_crops_are_read_in_their_own_layout():
    dataset = open_dataset(LIDC)
    assert isinstance(dataset, LidcCropsFolder) and dataset.layout == "lidc-crops"
    assert len(dataset.split("train")) == 19 and len(dataset.split("test")) == 9 and len(dataset.split("all")) == 28
    assert dataset.split("test")[:2] == ["testing/12", "testing/23"]  # natural order of the ids
    case = dataset.load("testing/12")
    assert case.image.shape == (128, 128) and case.image.dtype == np.uint8
    assert sorted(case.raters) == ["label0", "label1", "label2", "label3"]
    assert [int(m.sum()) for m in case.raters.values()] == [0, 0, 0, 15]  # three radiologists saw no nodule
    statistics = rater_statistics(dataset.load(c) for c in dataset.split("all"))
    assert statistics.cases == 28 and statistics.with_empty_rater == 7 and statistics.all_raters_empty == 0
    assert statistics.single_rater == 0 and statistics.empty_rater_masks == 19
    assert dataset.fingerprint(dataset.split("test")) != dataset.fingerprint(dataset.split("train"))
    with pytest.raises(DataError, match="no 'val' split"):
        dataset.split("val")


def test_an_lidc_pickle_is_read_safely(tmp_path):
    import pickle

    rng = np.random.default_rng(0)
    entries = {}
    for k in range(10):
        masks = [np.zeros((16, 16), np.uint8) for _ in range(4)]
        masks[k % 4][4:9, 4:9] = 1
        entries[f"crop{k}"] = {
            "image": rng.random((16, 16)).astype(np.float32),
            "masks": masks,
            "series_uid": f"1.2.3.{k // 2}",
        }
    path = tmp_path / "lidc.pickle"
    path.write_bytes(pickle.dumps(entries))
    dataset = open_dataset(path)
    assert isinstance(dataset, LidcPickle) and len(dataset.split("all")) == 10
    train, test = dataset.split("train"), dataset.split("test")
    assert sorted(train + test) == sorted(entries)
    series = {c: entries[c]["series_uid"] for c in entries}
    assert not {series[c] for c in train} & {series[c] for c in test}  # a scan's crops stay on one side
    case = dataset.load("crop1")
    assert case.image.dtype == np.uint8 and case.raters["label1"].sum() == 25 and not case.raters["label0"].any()

    class Exploit:
        def __reduce__(self):
            return (print, ("owned",))

    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"x": {"image": Exploit(), "masks": []}}))
    with pytest.raises(DataError, match="builtins.print"):
        open_dataset(bad)
