"""Image preprocessing and the exact image ↔ model coordinate mapping."""

from __future__ import annotations

import numpy as np
import pytest

from SPASegmentationLib.errors import InputError
from SPASegmentationLib.model.preprocess import ImageGeometry, normalise_intensity, prepare_image


@pytest.mark.parametrize("shape", [(100, 300), (300, 100), (256, 256), (37, 511)])
def test_coordinates_round_trip_exactly(shape):
    geometry = ImageGeometry(*shape, model_size=256)
    points = np.random.default_rng(0).uniform(-0.5, max(shape) - 0.5, size=(50, 2))
    np.testing.assert_allclose(geometry.to_image(geometry.to_model(points)), points, atol=1e-9)


def test_pixel_centres_map_to_pixel_centres_when_downscaling_by_two():
    geometry = ImageGeometry(512, 512, model_size=256)
    # image pixels 0 and 1 straddle model pixel 0's centre; model pixel 0 covers image 0..1.
    np.testing.assert_allclose(geometry.to_model(np.array([0.5, 0.5])), [0.0, 0.0])
    np.testing.assert_allclose(geometry.to_model(np.array([511.0, 0.0])), [255.25, -0.25])


def test_prepare_image_pads_bottom_right_and_keeps_aspect():
    image = np.zeros((100, 200), dtype=np.uint8)
    image[:, 100:] = 255
    tensor, geometry = prepare_image(image, 256)
    assert tensor.shape == (1, 3, 256, 256)
    assert geometry.valid_shape == (128, 256)
    assert float(tensor[0, 0, 128:].abs().max()) == 0.0  # padding below the image
    assert float(tensor[0, 0, 64, 250]) == pytest.approx(1.0)
    assert float(tensor[0, 0, 64, 5]) == pytest.approx(0.0)


def test_maps_to_image_aligns_a_model_frame_square_with_the_image():
    geometry = ImageGeometry(300, 150, model_size=256)
    mask = np.zeros((300, 150), dtype=bool)
    mask[100:200, 50:100] = True
    model_frame = geometry.mask_to_model(mask, 256)
    back = geometry.maps_to_image(model_frame[None], 256)[0].numpy() >= 0.5
    assert (back ^ mask).sum() / mask.sum() < 0.03


def test_ct_hounsfield_and_8bit_and_rgb_are_scaled_to_unit_range():
    ct = np.random.default_rng(0).normal(0, 300, (64, 64)).astype(np.int16) - 1000
    unit = normalise_intensity(ct)
    assert unit.min() == 0.0 and unit.max() == 1.0
    windowed = normalise_intensity(ct, window=(-1160, -760))
    assert 0.0 <= windowed.mean() <= 1.0
    photo = np.zeros((20, 30, 3), dtype=np.uint8)
    photo[..., 1] = 128
    photo[0, 0] = 255
    assert normalise_intensity(photo)[5, 5, 1] == pytest.approx(128 / 255)
    rgba = np.dstack([photo, np.full((20, 30), 255, np.uint8)])
    assert prepare_image(rgba, 64)[0].shape == (1, 3, 64, 64)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((10, 10)), "constant"),
        (np.full((10, 10), np.nan), "NaN"),
        (np.zeros((4, 10, 10)), "2-D"),
        (np.zeros((1, 10)), "2×2"),
        ("not an array", "numpy"),
    ],
)
def test_bad_images_are_refused_with_a_clear_message(image, message):
    if isinstance(image, np.ndarray) and image.ndim == 2 and image.shape == (1, 10):
        image = image + np.arange(10)
    with pytest.raises(InputError, match=message):
        prepare_image(image, 64)


def test_window_must_be_ordered():
    with pytest.raises(InputError, match="window"):
        normalise_intensity(np.arange(16).reshape(4, 4), window=(5, 5))
