"""Reading images in the formats users bring, and writing masks that overlay them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SPASegmentationLib.errors import InputError
from SPASegmentationLib.io.images import LoadedImage, mask_extension, read_image, write_mask

DIRECTION_3D = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _square_mask(height: int, width: int) -> np.ndarray:
    """A small rectangle mask for writing tests."""
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 4 : height // 2, width // 3 : width // 2 + 2] = True
    return mask


def _write(array: np.ndarray, path: Path, is_vector: bool = False) -> Path:
    """Save an array with SimpleITK (test helper)."""
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=is_vector), str(path))
    return path


# ----- 2-D pictures -----------------------------------------------------------------------------
def test_gray_png_roundtrip(tmp_path: Path) -> None:
    array = (np.arange(30 * 40) % 251).astype(np.uint8).reshape(30, 40)
    loaded = read_image(_write(array, tmp_path / "gray.png"))
    assert loaded.format == "png" and loaded.slice_index is None
    assert loaded.array.dtype == np.uint8 and loaded.array.shape == (30, 40)
    np.testing.assert_array_equal(loaded.array, array)
    mask = _square_mask(30, 40)
    written = write_mask(tmp_path / "out" / "mask.png", mask, loaded)
    assert written == tmp_path / "out" / "mask.png"
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(written)))
    assert back.dtype == np.uint8 and set(np.unique(back)) == {0, 255}
    np.testing.assert_array_equal(back > 0, mask)
    assert not [p for p in written.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_rgb_and_rgba_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)
    loaded = read_image(_write(rgb, tmp_path / "rgb.png", is_vector=True))
    assert loaded.array.shape == (24, 36, 3) and loaded.array.dtype == np.uint8
    np.testing.assert_array_equal(loaded.array, rgb)
    rgba = np.concatenate([rgb, np.full((24, 36, 1), 128, np.uint8)], axis=2)
    loaded = read_image(_write(rgba, tmp_path / "rgba.png", is_vector=True))
    assert loaded.array.shape == (24, 36, 3)
    np.testing.assert_array_equal(loaded.array, rgb)
    assert mask_extension(loaded) == ".png"


def test_jpeg_mask_becomes_png(tmp_path: Path) -> None:
    array = np.tile(np.linspace(0, 250, 40).astype(np.uint8), (32, 1))
    loaded = read_image(_write(array, tmp_path / "photo.jpg"))
    assert loaded.format == "jpeg" and loaded.array.shape == (32, 40)
    assert mask_extension(loaded) == ".png"
    written = write_mask(tmp_path / "photo_mask.jpg", _square_mask(32, 40), loaded)
    assert written == tmp_path / "photo_mask.png" and written.is_file()
    assert not (tmp_path / "photo_mask.jpg").exists()
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(written)))
    np.testing.assert_array_equal(back > 0, _square_mask(32, 40))


# ----- NIfTI / NRRD -----------------------------------------------------------------------------
def test_nifti_2d_keeps_geometry(tmp_path: Path) -> None:
    array = (np.arange(20 * 30).reshape(20, 30) - 300).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 1.3))
    image.SetOrigin((-12.0, 5.5))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    loaded = read_image(tmp_path / "ct.nii.gz")
    assert loaded.format == "nifti" and loaded.array.dtype == np.int16 and loaded.array.min() < 0
    assert loaded.spacing_xy == pytest.approx((0.7, 1.3))
    assert mask_extension(loaded) == ".nii.gz"
    written = write_mask(tmp_path / "m.png", _square_mask(20, 30), loaded)
    assert written.name == "m.nii.gz"
    back = sitk.ReadImage(str(written))
    assert back.GetSize() == (30, 20)
    assert back.GetSpacing() == pytest.approx((0.7, 1.3)) and back.GetOrigin() == pytest.approx((-12.0, 5.5))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), _square_mask(20, 30).astype(np.uint8))


def _volume(tmp_path: Path, name: str, shape=(5, 20, 30)) -> tuple[Path, np.ndarray]:
    """A 3-D float volume with non-trivial geometry."""
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(DIRECTION_3D)
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path, array


def test_nifti_3d_requires_slice_and_mask_overlays(tmp_path: Path) -> None:
    path, array = _volume(tmp_path, "vol.nii.gz")
    with pytest.raises(InputError, match=r"3-D volume with 5 slices; choose one with --slice K \(0\.\.4\)") as info:
        read_image(path)
    assert str(path) in str(info.value)
    for bad in (5, -1):
        with pytest.raises(InputError, match="slice") as info:
            read_image(path, slice_index=bad)
        assert str(path) in str(info.value)
    loaded = read_image(path, slice_index=3)
    assert loaded.slice_index == 3 and loaded.array.shape == (20, 30)
    np.testing.assert_array_equal(loaded.array, array[3])
    mask = _square_mask(20, 30)
    written = write_mask(tmp_path / "vol_mask.nii.gz", mask, loaded)
    back = sitk.ReadImage(str(written))
    reference = sitk.ReadImage(str(path))
    assert back.GetSize() == reference.GetSize()
    assert back.GetSpacing() == pytest.approx(reference.GetSpacing())
    assert back.GetOrigin() == pytest.approx(reference.GetOrigin(), abs=1e-4)
    assert back.GetDirection() == pytest.approx(reference.GetDirection(), abs=1e-6)
    volume = sitk.GetArrayFromImage(back)
    assert set(np.unique(volume)) == {0, 1}
    assert set(np.nonzero(volume)[0]) == {3}
    np.testing.assert_array_equal(volume[3] > 0, mask)


def test_nrrd_keeps_spacing_origin_direction(tmp_path: Path) -> None:
    path, array = _volume(tmp_path, "vol.nrrd", shape=(1, 16, 24))
    loaded = read_image(path)  # one slice: no --slice needed
    assert loaded.format == "nrrd" and loaded.array.shape == (16, 24)
    assert mask_extension(loaded) == ".nrrd"
    written = write_mask(tmp_path / "mask.nrrd", _square_mask(16, 24), loaded)
    back = sitk.ReadImage(str(written))
    assert back.GetSize() == (24, 16, 1)
    assert back.GetSpacing() == pytest.approx((0.8, 0.9, 2.5))
    assert back.GetOrigin() == pytest.approx((10.0, -20.0, 30.0))
    assert back.GetDirection() == pytest.approx(DIRECTION_3D)

    image2d = sitk.GetImageFromArray(np.ones((10, 12), np.uint16))
    image2d.SetSpacing((0.25, 0.5))
    image2d.SetOrigin((1.0, 2.0))
    image2d.SetDirection((0.0, -1.0, 1.0, 0.0))
    sitk.WriteImage(image2d, str(tmp_path / "flat.nrrd"))
    loaded = read_image(tmp_path / "flat.nrrd")
    back = sitk.ReadImage(str(write_mask(tmp_path / "flat_mask.nrrd", np.eye(10, 12, dtype=bool), loaded)))
    assert back.GetSpacing() == pytest.approx((0.25, 0.5)) and back.GetOrigin() == pytest.approx((1.0, 2.0))
    assert back.GetDirection() == pytest.approx((0.0, -1.0, 1.0, 0.0))


def test_mha_volume_mask_is_mha(tmp_path: Path) -> None:
    path, _ = _volume(tmp_path, "vol.mha", shape=(3, 8, 9))
    loaded = read_image(path, slice_index=1)
    assert loaded.format == "other" and mask_extension(loaded) == ".mha"
    written = write_mask(tmp_path / "vol_mask", np.ones((8, 9), bool), loaded)
    assert written.name == "vol_mask.mha"
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(written))).sum() == 72


# ----- DICOM ------------------------------------------------------------------------------------
def test_dicom_file_keeps_hounsfield_units(tmp_path: Path) -> None:
    pydicom_data = pytest.importorskip("pydicom.data")
    path = Path(pydicom_data.get_testdata_file("CT_small.dcm"))
    loaded = read_image(path)
    assert loaded.format == "dicom" and loaded.array.shape == (128, 128)
    assert loaded.array.dtype == np.int16 and loaded.array.min() < 0
    assert mask_extension(loaded) == ".dcm"
    mask = _square_mask(128, 128)
    written = write_mask(tmp_path / "ct_mask.dcm", mask, loaded)
    back = sitk.ReadImage(str(written))
    assert back.GetSpacing() == pytest.approx(loaded.reference.GetSpacing(), abs=1e-4)
    assert back.GetOrigin() == pytest.approx(loaded.reference.GetOrigin(), abs=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back)[0] > 0, mask)


def _write_dicom_series(folder: Path, n_slices: int = 3) -> np.ndarray:
    """Write an int16 CT series of ``n_slices`` slices, one file each; return the volume."""
    folder.mkdir()
    volume = (np.arange(n_slices * 12 * 14).reshape(n_slices, 12, 14) - 500).astype(np.int16)
    series_uid = "1.2.826.0.1.3680043.2.1125.1.99"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(n_slices):
        image = sitk.GetImageFromArray(volume[k])
        image.SetSpacing((0.6, 0.6))
        image.SetMetaData("0008|0060", "CT")
        image.SetMetaData("0020|000e", series_uid)
        image.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.1.98")
        image.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        image.SetMetaData("0020|0013", str(k + 1))
        image.SetMetaData("0020|0032", f"-10\\-20\\{2.0 * k}")
        image.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        image.SetMetaData("0028|0030", "0.6\\0.6")
        writer.SetFileName(str(folder / f"slice{k}.dcm"))
        writer.Execute(image)
    return volume


def test_dicom_series_folder(tmp_path: Path) -> None:
    volume = _write_dicom_series(tmp_path / "series")
    with pytest.raises(InputError, match="3 slices") as info:
        read_image(tmp_path / "series")
    assert str(tmp_path / "series") in str(info.value)
    loaded = read_image(tmp_path / "series", slice_index=2)
    assert loaded.format == "dicom" and loaded.array.dtype == np.int16
    np.testing.assert_array_equal(loaded.array, volume[2])
    written = write_mask(tmp_path / "series_mask.dcm", _square_mask(12, 14), loaded)
    back = sitk.ReadImage(str(written))
    assert back.GetSize() == (14, 12, 3)
    assert back.GetSpacing() == pytest.approx((0.6, 0.6, 2.0), abs=1e-4)
    assert back.GetOrigin() == pytest.approx((-10.0, -20.0, 0.0), abs=1e-4)
    assert set(np.nonzero(sitk.GetArrayFromImage(back))[0]) == {2}


# ----- errors -----------------------------------------------------------------------------------
def _assert_input_error(path: Path, match: str, **kwargs) -> None:
    """read_image(path) raises an InputError naming the path and matching ``match``."""
    with pytest.raises(InputError, match=match) as info:
        read_image(path, **kwargs)
    assert str(path) in str(info.value)


def test_errors_name_the_path(tmp_path: Path) -> None:
    _assert_input_error(tmp_path / "missing.png", "does not exist")
    (tmp_path / "notes.txt").write_text("not an image")
    _assert_input_error(tmp_path / "notes.txt", "could not be read as an image.*PNG, JPEG")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    _assert_input_error(tmp_path / "broken.png", "could not be read")
    (tmp_path / "empty").mkdir()
    _assert_input_error(tmp_path / "empty", "no DICOM series")

    volumes = [sitk.GetImageFromArray(np.zeros((2, 4, 5), np.float32)) for _ in range(3)]
    sitk.WriteImage(sitk.JoinSeries(volumes), str(tmp_path / "four.nii.gz"))
    _assert_input_error(tmp_path / "four.nii.gz", "4-D")

    (tmp_path / "zero.mha").write_text(
        "ObjectType = Image\nNDims = 2\nDimSize = 0 5\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n"
    )
    _assert_input_error(tmp_path / "zero.mha", "no pixels")

    bad = np.ones((6, 7), np.float32)
    bad[2, 3] = np.nan
    bad[4, 4] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(bad), str(tmp_path / "nan.mha"))
    _assert_input_error(tmp_path / "nan.mha", "2 NaN or infinite")

    _write(np.zeros((6, 7), np.uint8), tmp_path / "flat.png")
    _assert_input_error(tmp_path / "flat.png", "single 2-D image", slice_index=2)


def test_write_mask_rejects_wrong_size(tmp_path: Path) -> None:
    loaded = read_image(_write(np.zeros((6, 7), np.uint8), tmp_path / "small.png"))
    assert isinstance(loaded, LoadedImage)
    with pytest.raises(InputError, match="shape"):
        write_mask(tmp_path / "m.png", np.zeros((7, 6), bool), loaded)
