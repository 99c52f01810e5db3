"""The organ-scale test set: axial slices of a CT volume with one structure of its label map each.

The volumes here are generated; the real pair (TotalSegmentator's committed example CT and its label
map) is what the model card's organ-scale numbers come from.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from SPASegmentationLib.data.detect import open_dataset
from SPASegmentationLib.data.labelmap_slices import read_label_names, structure_slices, write_labelmap_dataset
from SPASegmentationLib.errors import DataError


def write_pair(tmp_path, label_offset_slices: int = 2):
    """A 12-slice CT (HU) with a large 'organ' and a small 'node' beside a separate speck of the same label,
    and a label map covering slices 2..9 only, on its own (shifted) origin like TotalSegmentator's."""
    z, y, x = np.mgrid[:12, :40, :50]
    hu = np.full((12, 40, 50), -50.0, dtype=np.float32)
    organ = (x - 18) ** 2 + (y - 20) ** 2 < (8 + z % 3) ** 2
    node = (x - 38) ** 2 + (y - 12) ** 2 < 9
    speck = (x == 45) & (y == 35)
    hu[organ] = 60.0
    hu[node] = 120.0
    labels = np.zeros_like(hu, dtype=np.uint8)
    labels[organ] = 5
    labels[node | speck] = 9
    ct = sitk.GetImageFromArray(hu)
    ct.SetSpacing((2.0, 2.0, 3.0))
    ct.SetOrigin((10.0, 20.0, 30.0))
    part = sitk.GetImageFromArray(labels[label_offset_slices : label_offset_slices + 8])
    part.SetSpacing((2.0, 2.0, 3.0))
    part.SetOrigin((10.0, 20.0, 30.0 + 3.0 * label_offset_slices))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(part, str(tmp_path / "seg.nii.gz"))
    return hu, labels


def test_every_structure_gives_slices_with_its_largest_region_as_the_one_rater(tmp_path):
    hu, labels = write_pair(tmp_path)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"5": "liver", "9": "lymph node"}))
    root = write_labelmap_dataset(
        tmp_path / "out", tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", names=read_label_names(names)
    )
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["kind"] == "ct-labelmap" and set(meta["structures"]) == {"liver", "lymph node"}
    # the label map covers CT slices 2..9 only; chosen slices lie there and are the largest + spread out
    assert meta["structures"]["liver"]["slices"] == structure_slices(
        np.array([(labels[z] == 5).sum() if 2 <= z < 10 else 0 for z in range(12)])
    )
    assert all(2 <= z < 10 for s in meta["structures"].values() for z in s["slices"])
    dataset = open_dataset(root)
    assert dataset.split("train") == [] and len(dataset.split("test")) == meta["counts"]["test"] == 6
    z = meta["structures"]["lymph node"]["slices"][-1]
    case = dataset.load(f"lymph_node_z{z:03d}")
    assert list(case.raters) == ["labelmap"] and case.image.dtype == np.uint8
    node = case.raters["labelmap"]
    assert node.sum() == (labels[z] == 9).sum() - 1  # the one-pixel speck of the same label is dropped
    # the picture is the soft-tissue window of the HU slice: -50 HU → 70, 120 HU → 178 of 255
    assert case.image[12, 38] == round((120 + 160) / 400 * 255) and case.image[0, 0] == round((-50 + 160) / 400 * 255)


def test_slices_are_the_largest_then_spread_over_the_extent():
    areas = np.array([0, 0, 12, 30, 80, 40, 20, 11, 0, 5])
    assert structure_slices(areas) == [3, 4, 6]
    assert structure_slices(areas, per_structure=1) == [4]
    assert structure_slices(np.array([0, 3, 9])) == []  # under MIN_PIXELS everywhere


def test_bad_inputs_name_the_problem(tmp_path):
    write_pair(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        write_labelmap_dataset(tmp_path / "out", tmp_path / "missing.nii.gz", tmp_path / "seg.nii.gz")
    floats = sitk.Cast(sitk.ReadImage(str(tmp_path / "seg.nii.gz")), sitk.sitkFloat32) * 0.5
    sitk.WriteImage(floats, str(tmp_path / "float_seg.nii.gz"))
    with pytest.raises(DataError, match="non-integer"):
        write_labelmap_dataset(tmp_path / "out", tmp_path / "ct.nii.gz", tmp_path / "float_seg.nii.gz")
    (tmp_path / "names.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="label value"):
        read_label_names(tmp_path / "names.json")
    with pytest.raises(DataError, match="window"):
        write_labelmap_dataset(tmp_path / "out", tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", window=(10, 10))
