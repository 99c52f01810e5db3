"""Read the images users bring and write masks back in the same format and geometry.

Reading goes through SimpleITK: PNG, JPEG, BMP, TIFF, NIfTI, NRRD, MetaImage, a single DICOM
file, or a folder holding one DICOM series. The result is always one 2-D image: a scalar (H, W)
array in its native type (CT stays int16 Hounsfield units) or an (H, W, 3) uint8 colour array.
From a 3-D volume the caller picks one slice (axis 0 of the array, the SimpleITK k axis).

Masks are written so that they open on top of their image in any viewer: 2-D pictures get an
8-bit PNG (0/255, never the lossy JPEG); medical formats get the same format with the same
spacing, origin and direction; for a slice of a volume the whole volume is written, zero outside
that slice. Every file is written to a temporary name in the target folder and then renamed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..limits import MAX_VOLUME_VOXELS, pixels_message
from .atomic import atomic_target

SUPPORTED_FORMATS = (
    "PNG, JPEG, BMP, TIFF, NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MetaImage (.mha/.mhd), "
    "a DICOM file, or a folder holding one DICOM series"
)

# SimpleITK's reader class for a file → our format name.
_FORMAT_BY_IO = {
    "PNGImageIO": "png",
    "JPEGImageIO": "jpeg",
    "NiftiImageIO": "nifti",
    "NrrdImageIO": "nrrd",
    "GDCMImageIO": "dicom",
}

# File name endings we recognise, longest first so ".nii.gz" wins over ".gz".
IMAGE_SUFFIXES = (
    ".nii.gz",
    ".nii",
    ".nrrd",
    ".nhdr",
    ".mha",
    ".mhd",
    ".dcm",
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
)

# Endings a mask may keep, per mask extension (anything else is replaced by the right one).
_ACCEPTED_MASK_SUFFIXES = {
    ".png": (".png",),
    ".nii.gz": (".nii.gz", ".nii"),
    ".nrrd": (".nrrd",),
    ".mha": (".mha",),
    ".dcm": (".dcm",),
}


class SliceRequiredError(InputError):
    """A 3-D volume was given without choosing which of its ``n_slices`` slices to use."""

    def __init__(self, message: str, n_slices: int) -> None:
        super().__init__(message)
        self.n_slices = n_slices


@dataclass
class LoadedImage:
    """One 2-D image ready for segmentation, plus what is needed to write masks that overlay it."""

    array: np.ndarray  # (H, W) scalar in its native dtype, or (H, W, 3) uint8 colour
    reference: sitk.Image  # the image as read (2-D or 3-D), for geometry
    path: Path
    format: str  # "png", "jpeg", "nifti", "nrrd", "dicom" or "other"
    slice_index: int | None = None  # which k slice of a 3-D reference the array is

    @property
    def spacing_xy(self) -> tuple[float, float]:
        """Pixel spacing (x, y) in the image's physical units (mm for medical images)."""
        spacing = self.reference.GetSpacing()
        return float(spacing[0]), float(spacing[1])

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the 2-D image."""
        return int(self.array.shape[0]), int(self.array.shape[1])


def _suffix(path: Path) -> str:
    """The recognised image ending of ``path`` in lower case, or "" when there is none."""
    name = path.name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def _unreadable(path: Path) -> str:
    """The message for a file that is not an image SimpleITK can read."""
    return f"{path} could not be read as an image (unsupported or damaged file); save it as one of: {SUPPORTED_FORMATS}"


def _format_of(path: Path) -> str:
    """Our format name for a file, from the reader SimpleITK would pick for it."""
    io_name = sitk.ImageFileReader.GetImageIOFromFileName(str(path))
    if io_name == "":
        raise InputError(_unreadable(path))
    return _FORMAT_BY_IO.get(io_name, "other")


def _read_dicom_series(folder: Path) -> sitk.Image:
    """Read the one DICOM series in ``folder`` as a volume."""
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise InputError(f"the folder {folder} could not be searched for DICOM files; check it is readable") from exc
    if len(series_ids) == 0:
        raise InputError(f"the folder {folder} holds no DICOM series; pass an image file or a folder of DICOM slices")
    if len(series_ids) > 1:
        raise InputError(
            f"the folder {folder} holds {len(series_ids)} DICOM series; "
            "move the series you want into a folder of its own"
        )
    file_names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    if file_names:
        _check_size(Path(file_names[0]), n_files=len(file_names))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(file_names)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            f"the DICOM series in {folder} could not be read (damaged or unsupported files); export it again"
        ) from exc


def read_reference(path: str | os.PathLike) -> tuple[sitk.Image, str]:
    """Read an image file or DICOM series folder as SimpleITK sees it: (image, format name)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path to the image")
    if path.is_dir():
        return _read_dicom_series(path), "dicom"
    image_format = _format_of(path)
    _check_size(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        if image_format not in ("png", "jpeg"):
            raise InputError(_unreadable(path)) from exc
        image = _read_with_pillow(path)
    if image_format == "nifti":
        _check_nifti_finite(path)
    return image, image_format


def _check_size(path: Path, n_files: int = 1) -> None:
    """Refuse an image beyond SPA's limits from its header alone, before any pixel is read."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        size = [int(s) for s in reader.GetSize()]
    except RuntimeError as exc:
        size = _pillow_size(path)
        if size is None:
            raise InputError(_unreadable(path)) from exc
    problem = pixels_message(size[1] if len(size) > 1 else 1, size[0], str(path))
    if problem:
        raise InputError(problem)
    voxels = int(np.prod(size, dtype=np.int64)) * n_files
    if voxels > MAX_VOLUME_VOXELS:
        raise InputError(
            f"{path} holds {voxels:,} voxels, more than SPA's limit of {MAX_VOLUME_VOXELS:,}; crop or split the volume"
        )


def _pillow_size(path: Path) -> list[int] | None:
    """(width, height) from a PNG/JPEG header that ITK does not understand (grey + alpha, palettes), or None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            return [int(picture.size[0]), int(picture.size[1])]
    except (OSError, UnidentifiedImageError):
        return None


def _read_with_pillow(path: Path) -> sitk.Image:
    """A PNG/JPEG that ITK cannot read (grey + alpha, palette): grey or RGB pixels, alpha dropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            if picture.mode in ("LA", "La"):
                picture = picture.convert("L")
            elif picture.mode not in ("L", "I;16", "I;16B", "I", "RGB"):
                picture = picture.convert("RGB")  # palettes, RGBA, CMYK …: colour without alpha
            array = np.asarray(picture)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise InputError(_unreadable(path)) from exc
    return sitk.GetImageFromArray(array, isVector=array.ndim == 3)


def _check_nifti_finite(path: Path) -> None:
    """NIfTI pixels as stored: ITK's reader turns NaN and infinity into 0, so they are looked at here (nibabel)."""
    import nibabel

    try:
        image = nibabel.load(str(path))
        if image.get_data_dtype().kind != "f" and image.dataobj.slope in (1, None) and image.dataobj.inter in (0, None):
            return
        values = np.asarray(image.dataobj)
    except Exception as exc:  # nibabel's many error types: a file ITK read but nibabel cannot is damaged
        raise InputError(_unreadable(path)) from exc
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise InputError(
            f"{path} has {bad} NaN or infinite voxel(s); replace them with finite values and save it again"
        )


def _colour_to_uint8(array: np.ndarray) -> np.ndarray:
    """An (H, W, 3) colour array of any numeric type as uint8."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return np.round(array / 257.0).astype(np.uint8)
    values = array.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 255.0:
        return np.round(values).astype(np.uint8)
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((values - low) / (high - low) * 255.0).astype(np.uint8)


def _pixels(array: np.ndarray, components: int, path: Path) -> np.ndarray:
    """Drop alpha and keep colour as (H, W, 3) uint8; scalar pixels are returned unchanged."""
    if components == 1:
        return array
    if components == 2:  # grey + alpha
        return array[..., 0]
    if components in (3, 4):  # RGB or RGBA
        return _colour_to_uint8(array[..., :3])
    raise InputError(
        f"{path} has {components} values per pixel; save it as a greyscale or RGB image (one or three channels)"
    )


def _narrow_dicom_integers(array: np.ndarray) -> np.ndarray:
    """GDCM returns rescaled CT as int32; keep it int16 when the Hounsfield units fit."""
    if array.dtype.kind in "iu" and array.dtype.itemsize > 2 and array.size > 0:
        info = np.iinfo(np.int16)
        if int(array.min()) >= info.min and int(array.max()) <= info.max:
            return array.astype(np.int16)
    return array


def read_image(path: str | os.PathLike, slice_index: int | None = None) -> LoadedImage:
    """Read one 2-D image (or one slice of a 3-D volume) from a file or a DICOM series folder."""
    path = Path(path)
    reference, image_format = read_reference(path)
    dimension = reference.GetDimension()
    size = reference.GetSize()
    if dimension not in (2, 3):
        raise InputError(f"{path} is a {dimension}-D image; export a single 2-D image or 3-D volume from it")
    if any(extent == 0 for extent in size):
        raise InputError(f"{path} has size {'×'.join(str(s) for s in size)} with no pixels; pass a non-empty image")
    array = sitk.GetArrayViewFromImage(reference)
    used_slice: int | None = None
    if dimension == 3:
        n_slices = int(size[2])
        if slice_index is None and n_slices == 1:
            slice_index = 0
        if slice_index is None:
            raise SliceRequiredError(
                f"{path} is a 3-D volume with {n_slices} slices; choose one with --slice K (0..{n_slices - 1})",
                n_slices,
            )
        if not 0 <= slice_index < n_slices:
            raise InputError(
                f"slice {slice_index} does not exist in {path}, which has {n_slices} slices; choose 0..{n_slices - 1}"
            )
        array = array[slice_index]
        used_slice = int(slice_index)
    elif slice_index not in (None, 0):
        raise InputError(
            f"slice {slice_index} does not exist in {path}, which is a single 2-D image; leave out --slice"
        )
    array = _pixels(np.array(array), reference.GetNumberOfComponentsPerPixel(), path)
    if image_format == "dicom":
        array = _narrow_dicom_integers(array)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise InputError(
            f"{path} has {bad} NaN or infinite pixel(s); replace them with finite values and save it again"
        )
    if array.dtype.kind not in "biuf":
        raise InputError(f"{path} has pixels of type {array.dtype}; save it with integer or real-valued pixels")
    return LoadedImage(array=array, reference=reference, path=path, format=image_format, slice_index=used_slice)


def mask_extension(like: LoadedImage) -> str:
    """The file ending masks for this image are written with: .png, .nii.gz, .nrrd, .mha or .dcm."""
    if like.format in ("png", "jpeg"):
        return ".png"
    if like.format == "nifti":
        return ".nii.gz"
    if like.format == "nrrd":
        return ".nrrd"
    if like.format == "dicom":
        return ".dcm"
    if _suffix(like.path) in (".mha", ".mhd") or like.reference.GetDimension() == 3:
        return ".mha"
    return ".png"


def _mask_path(path: Path, extension: str) -> Path:
    """``path`` with its ending replaced by ``extension`` unless it already is an accepted one."""
    suffix = _suffix(path)
    if suffix in _ACCEPTED_MASK_SUFFIXES[extension]:
        return path
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.with_name(stem + extension)


def _copy_geometry(target: sitk.Image, reference: sitk.Image) -> None:
    """Give ``target`` the spacing, origin and direction of ``reference`` (same dimension)."""
    target.SetSpacing(reference.GetSpacing())
    target.SetOrigin(reference.GetOrigin())
    target.SetDirection(reference.GetDirection())


def _mask_image(mask: np.ndarray, like: LoadedImage, extension: str) -> sitk.Image:
    """The SimpleITK image to write for ``mask``: PNG 0/255, otherwise 0/1 in the input's geometry."""
    if extension == ".png" and like.reference.GetDimension() == 2:
        return sitk.GetImageFromArray(mask.astype(np.uint8) * 255)
    reference = like.reference
    if reference.GetDimension() == 3:
        size = reference.GetSize()
        volume = np.zeros((size[2], size[1], size[0]), dtype=np.uint8)
        volume[like.slice_index or 0] = mask
        image = sitk.GetImageFromArray(volume)
    else:
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
    _copy_geometry(image, reference)
    return image


def window_to_uint8(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Intensities (e.g. CT in HU) shown through the window [low, high] as 0..255, the way a viewer displays them."""
    return np.rint(np.clip((image.astype(float) - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)


def write_image_atomic(image: sitk.Image, path: Path, compress: bool = True) -> None:
    """Write a SimpleITK image through a temporary file in the same folder, then rename it."""
    with atomic_target(path, suffix=f".tmp{_suffix(path) or path.suffix}") as tmp:
        sitk.WriteImage(image, str(tmp), compress)


def write_mask(path: str | os.PathLike, mask: np.ndarray, like: LoadedImage) -> Path:
    """Write a (H, W) binary mask of ``like`` in its format and geometry; return the path written.

    The ending of ``path`` is replaced when it does not fit the format (e.g. ``.jpg`` → ``.png``).
    """
    mask = np.asarray(mask)
    if mask.shape != like.shape:
        raise InputError(
            f"the mask has shape {mask.shape} but the image {like.path} is {like.shape}; "
            "pass a mask of the image's size"
        )
    extension = mask_extension(like)
    final = _mask_path(Path(path), extension)
    image = _mask_image(mask.astype(bool), like, extension)
    try:
        write_image_atomic(image, final, compress=extension != ".dcm")
    except RuntimeError as exc:
        raise InputError(f"the mask could not be written to {final}; check the folder exists and is writable") from exc
    return final
