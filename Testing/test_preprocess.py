"""Image preprocessing and the exact image ↔ model coordinate mapping."""

from __future__ import annotations

import numpy as np
import pytest

from SPASegmentationLib.errors import InputError
from SPASegmentationLib.model.preprocess import (
    FOCUS_MIN_SIDE_PX,
    ImageGeometry,
    focus_window,
    intensity_window,
    normalise_intensity,
    prepare_image,
)


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


def test_a_small_structure_gets_a_square_focus_window_centred_on_it_and_inside_the_image():
    window = focus_window((60, 60, 69, 69), 128, 128)  # a 10-pixel nodule in a 128² crop
    assert (window.width, window.height) == (FOCUS_MIN_SIDE_PX, FOCUS_MIN_SIDE_PX)
    assert window.contains(np.array([[60, 60], [69, 69]]))
    assert abs((window.left + window.width / 2) - 65) <= 1 and abs((window.top + window.height / 2) - 65) <= 1
    edge = focus_window((500, 2, 510, 12), 512, 512)  # near the corner: moved inside, never cut
    assert edge.left + edge.width == 512 and edge.top == 0 and edge.width == edge.height
    bigger = focus_window((100, 100, 139, 119), 512, 512)  # 40 × 20 px: four times the longer side
    assert (bigger.width, bigger.height) == (160, 160)
    narrow = focus_window((200, 10, 209, 19), 30, 600)  # a strip: the window is cut to the image's height
    assert (narrow.width, narrow.height) == (FOCUS_MIN_SIDE_PX, 30)
    assert focus_window((10, 10, 60, 60), 128, 128) is None  # would span most of the image: the whole image


def test_a_focus_window_crops_pastes_and_shifts_coordinates_consistently():
    window = focus_window((60, 60, 69, 69), 128, 100)
    image = np.arange(128 * 100).reshape(128, 100)
    crop = window.crop(image)
    assert crop.shape == (window.height, window.width) and crop[0, 0] == image[window.top, window.left]
    pasted = window.paste(np.ones((2, window.height, window.width), np.float32), (128, 100))
    assert pasted.shape == (2, 128, 100) and pasted.sum() == 2 * crop.size and pasted[:, window.top, window.left].all()
    points = np.array([[61.5, 64.0], [0.0, 0.0]])
    np.testing.assert_allclose(window.to_image(window.to_window(points)), points)
    assert window.contains(points[0]) and not window.contains(points[1])


def test_the_intensity_window_is_the_one_normalisation_uses():
    ct = np.random.default_rng(0).normal(0, 100, (64, 64))
    low, high = intensity_window(ct)
    np.testing.assert_allclose(normalise_intensity(ct), np.clip((ct - low) / (high - low), 0, 1))
    assert intensity_window(np.arange(256, dtype=np.uint8).reshape(16, 16)) == (0.0, 255.0)
    assert intensity_window(ct, (-160, 240)) == (-160.0, 240.0)
