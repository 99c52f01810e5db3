"""Propagation of an accepted mask through a synthetic CT volume with a known ellipsoid."""

from __future__ import annotations

import numpy as np
import pytest

from SPASegmentationLib.embeddings import EmbeddingCache
from SPASegmentationLib.engine import slice_seed
from SPASegmentationLib.errors import InputError
from SPASegmentationLib.masks import keep_touching
from SPASegmentationLib.model.runtimes import EncoderRuntime
from SPASegmentationLib.propagation import (
    CANCELLED,
    IMAGE_EDGE,
    MAX_SLICES,
    STRUCTURE_ENDED,
    dice,
    intensity_shift,
    prompt_from_mask,
    propagate,
)

N_SLICES, SIZE, START = 10, 96, 4
SAMPLES = 8


def ellipsoid_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(CT-like int16 volume, ground truth): a bright ellipsoid on slices 1..8, nothing on 0 and 9."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:N_SLICES, :SIZE, :SIZE]
    inside = ((xx - 48) / 26.0) ** 2 + ((yy - 50) / 26.0) ** 2 + ((zz - 4.5) / 3.9) ** 2 < 1
    volume = 40 + 140 * inside + rng.normal(0, 8, inside.shape)
    return volume.astype(np.int16), inside


@pytest.fixture(scope="module")
def volume():
    return ellipsoid_volume()


@pytest.fixture(scope="module")
def lookup(untrained_model):
    """One embedding cache for the module: every slice is encoded once."""
    return EmbeddingCache(untrained_model, capacity=N_SLICES + 2)


@pytest.fixture(scope="module")
def propagated(untrained_model, volume, lookup):
    """(result, progress calls) of the reference propagation from the middle slice."""
    image, truth = volume
    calls = []
    result = propagate(
        untrained_model,
        image,
        START,
        truth[START],
        n_samples=SAMPLES,
        seed=4,
        embeddings=lookup,
        progress=lambda done, total: calls.append((done, total)) is None,
    )
    return result, calls


def test_prompt_from_mask_point_is_deep_inside_and_box_holds_the_mask():
    mask = np.zeros((40, 50), dtype=bool)
    mask[5:35, 10:16] = True  # a "C": its centroid lies outside the mask
    mask[5:11, 10:40] = True
    mask[29:35, 10:40] = True
    (x, y), (x0, y0, x1, y1) = prompt_from_mask(mask)
    yy, xx = np.mgrid[:40, :50]
    assert mask[np.hypot(xx - x, yy - y) <= 2.5].all()  # deep inside, not near an edge
    rows, cols = np.nonzero(mask)
    assert (x0, y0, x1, y1) == (8.0, 3.0, 41.0, 36.0)  # bounds 10..39 × 5..34 widened by 2 px
    assert x0 <= cols.min() and x1 >= cols.max() and y0 <= rows.min() and y1 >= rows.max()
    corner = np.zeros((20, 20), dtype=bool)
    corner[0, 18:] = True  # touching the image edges: the box is clipped and never empty
    (cx, cy), box = prompt_from_mask(corner)
    assert corner[int(cy), int(cx)] and box == (16.0, 0.0, 19.0, 2.0)
    with pytest.raises(InputError, match="empty"):
        prompt_from_mask(np.zeros((8, 8), dtype=bool))


def test_keep_touching_and_intensity_shift():
    mask = np.zeros((30, 30), dtype=bool)
    mask[2:8, 2:8] = True
    mask[20:26, 20:26] = True
    reference = np.zeros_like(mask)
    reference[7:10, 7:10] = True
    kept = keep_touching(mask, reference)
    assert kept[2:8, 2:8].all() and not kept[20:26, 20:26].any()
    assert not keep_touching(mask, np.zeros_like(mask)).any()
    image = np.full((30, 30), 40.0)
    image[2:8, 2:8] = 180.0
    assert intensity_shift(image, mask & kept, image, mask & kept) == 0.0
    background = np.zeros_like(mask)
    background[12:16, 12:16] = True
    assert intensity_shift(image, kept, image, background) == pytest.approx(1.0)
    flat = np.full((30, 30), 40.0)
    assert intensity_shift(flat, kept, flat, kept) is None  # no contrast: intensity cannot tell


def test_propagation_covers_the_structure_and_stops_where_it_ends(propagated, volume, lookup):
    result, calls = propagated
    _, truth = volume
    assert result.indices == list(range(1, 9))  # slices 0 and 9 hold no structure
    assert result.stopped == {"forward": STRUCTURE_ENDED, "backward": STRUCTURE_ENDED}
    stack = result.stack(N_SLICES)
    assert dice(stack, truth) > 0.95
    for index in range(2, 8):
        assert dice(result.masks[index], truth[index]) > 0.9, index
    assert np.array_equal(result.masks[START], truth[START])
    assert all(result.areas[i] == int(result.masks[i].sum()) for i in result.indices)
    # progress: starts at 0 of the 9 reachable slices, counts every slice tried, ends when done == total
    assert calls[0] == (0, 9) and [c[0] for c in calls] == list(range(len(calls)))
    assert calls[-1][0] == calls[-1][1] == 9
    assert lookup.misses == N_SLICES - 1 and result.initial_weights is None  # the start slice needs no model


def test_propagation_is_deterministic_and_reuses_embeddings(untrained_model, propagated, volume, lookup):
    image, truth = volume
    before = lookup.misses
    again = propagate(
        untrained_model, image, START, truth[START], n_samples=SAMPLES, seed=4, embeddings=lookup, max_slices=2
    )
    assert lookup.misses == before  # every slice came from the cache
    assert again.indices == [2, 3, 4, 5, 6]
    assert all(np.array_equal(again.masks[i], propagated[0].masks[i]) for i in again.indices)
    assert slice_seed(4, 6) == slice_seed(4, 6) and slice_seed(4, 6) != slice_seed(4, 7) != slice_seed(5, 7)


def test_image_edge_and_max_slices(untrained_model, volume, lookup):
    image, truth = volume
    inner = image[2:8]  # the structure fills every slice of this sub-volume
    result = propagate(
        untrained_model, lambda i: inner[i], 2, truth[4], n_slices=len(inner), n_samples=SAMPLES, embeddings=lookup
    )
    assert result.stopped == {"forward": IMAGE_EDGE, "backward": IMAGE_EDGE}
    assert result.indices == list(range(6))
    capped = propagate(untrained_model, image, START, truth[START], n_samples=SAMPLES, embeddings=lookup, max_slices=1)
    assert capped.stopped == {"forward": MAX_SLICES, "backward": MAX_SLICES}
    assert capped.indices == [3, 4, 5]


def test_cancel_keeps_the_masks_made_so_far(untrained_model, volume, lookup, propagated):
    image, truth = volume
    result = propagate(
        untrained_model,
        image,
        START,
        truth[START],
        n_samples=SAMPLES,
        seed=4,
        embeddings=lookup,
        progress=lambda done, total: done < 2,
    )
    assert result.stopped == {"forward": CANCELLED, "backward": CANCELLED}
    assert result.indices == [4, 5, 6]
    assert all(np.array_equal(result.masks[i], propagated[0].masks[i]) for i in (5, 6))
    at_once = propagate(untrained_model, image, START, truth[START], embeddings=lookup, progress=lambda d, t: False)
    assert at_once.indices == [START] and at_once.stopped["backward"] == CANCELLED


def test_adapted_weights_seed_every_slice(untrained_model, volume, lookup):
    image, truth = volume
    k = untrained_model.config.n_components
    leaning = np.zeros(k)
    leaning[3] = 2.0
    leaning[7] = 2.0
    other = np.zeros(k)
    other[11] = 1.0
    a = propagate(
        untrained_model,
        image,
        START,
        truth[START],
        n_samples=SAMPLES,
        embeddings=lookup,
        max_slices=1,
        initial_weights=leaning,
    )
    b = propagate(
        untrained_model,
        image,
        START,
        truth[START],
        n_samples=SAMPLES,
        embeddings=lookup,
        max_slices=1,
        initial_weights=other,
    )
    np.testing.assert_allclose(a.initial_weights, leaning / 4.0)
    assert set(a.mixture_weights) == {3, 5}
    for index in (3, 5):
        assert not np.allclose(a.mixture_weights[index], b.mixture_weights[index])


def test_bad_inputs_are_explained(untrained_model, volume, monkeypatch):
    image, truth = volume
    with pytest.raises(InputError, match="start mask is empty"):
        propagate(untrained_model, image, START, np.zeros((SIZE, SIZE), dtype=bool))
    with pytest.raises(InputError, match="outside the volume"):
        propagate(untrained_model, image, N_SLICES, truth[START])
    with pytest.raises(InputError, match="outside the volume"):
        propagate(untrained_model, image, -1, truth[START])
    with pytest.raises(InputError, match="pass the mask of that slice"):
        propagate(untrained_model, image, START, truth[START][:50])
    with pytest.raises(InputError, match="n_slices"):
        propagate(untrained_model, lambda i: image[i], START, truth[START])
    with pytest.raises(InputError, match="n_slices"):
        propagate(untrained_model, image, START, truth[START], n_slices=3)
    with pytest.raises(InputError, match="2-D slice"):
        propagate(untrained_model, image, START, truth)
    with pytest.raises(InputError, match="mixture weights"):
        propagate(untrained_model, image, START, truth[START], initial_weights=-np.ones(4))
    with pytest.raises(InputError, match="components"):
        propagate(untrained_model, image, START, truth[START], initial_weights=np.ones(4))
    with pytest.raises(InputError, match="prompt"):
        propagate(untrained_model, image, START, truth[START], prompt="lasso")
    ragged = {3: image[3][:80], 4: image[4], 5: image[5]}  # slice 5 (forward) is encoded, slice 3 must not be
    encoded: list[tuple[int, ...]] = []
    encode = untrained_model.encode

    def recording_encode(picture, *args, **kwargs):
        encoded.append(np.asarray(picture).shape)
        return encode(picture, *args, **kwargs)

    monkeypatch.setattr(untrained_model, "encode", recording_encode)
    with pytest.raises(InputError, match="slice 3 is 80×.* but the start slice is .*same size"):
        propagate(untrained_model, lambda i: ragged[i], START, truth[START], n_slices=6, n_samples=SAMPLES)
    assert encoded and all(shape[:2] == truth[START].shape for shape in encoded)  # refused before it was encoded


def test_slices_are_encoded_on_the_propagation_encoder_and_cached_under_its_key(untrained_model, volume, propagated):
    """A lossy propagation encoder (bf16) leaves the sessions' float32 one alone, keys its embeddings apart, and its
    masks stay within Dice 0.95 of the float32 propagation's."""
    image, truth = volume
    backbone = untrained_model.backbone
    try:
        assert backbone.use_encoder_runtime("torch", propagation="torch-bf16") is EncoderRuntime.TORCH
        assert (backbone.encoder_runtime, backbone.propagation_runtime) == ("torch", "torch-bf16")
        assert backbone.embedding_key() != backbone.embedding_key(bulk=True) == backbone.embedding_key() + "-bfloat16"
        cache = EmbeddingCache(untrained_model, capacity=N_SLICES + 2)
        result = propagate(untrained_model, image, START, truth[START], n_samples=SAMPLES, seed=4, embeddings=cache)
        assert {key.backbone for key in cache._entries} == {backbone.embedding_key(bulk=True)}
        assert result.indices == propagated[0].indices
        for index in result.indices:
            assert dice(result.masks[index], propagated[0].masks[index]) > 0.95, index
    finally:
        backbone.use_encoder_runtime("torch", propagation="same")
    assert backbone.bulk_encoder is None and backbone.propagation_runtime == "torch"


def test_a_slice_is_the_recommendation_of_its_session_start(shipped_model):
    """recommend() (what a propagation keeps of each slice) is start()'s recommendation and mixture, for a box and
    for a click (box search) on real LIDC-IDRI crops."""
    from pathlib import Path

    from SPASegmentationLib.data.detect import open_dataset
    from SPASegmentationLib.session import Session
    from SPASegmentationLib.simulation.prompts import initial_point

    dataset = open_dataset(Path(__file__).resolve().parent / "data" / "lidc-cimd")
    for case_id in dataset.split("test")[:3]:
        case = dataset.load(case_id)
        target = max(case.raters.values(), key=np.sum)
        _, box = prompt_from_mask(target, with_point=False)
        for prompt in ({"box": box}, {"point": initial_point(case.raters, target)}):
            mask, weights = Session(shipped_model, case.image, seed=2).recommend(**prompt)
            round_ = Session(shipped_model, case.image, seed=2).start(**prompt)
            np.testing.assert_array_equal(mask, round_.recommended)
            np.testing.assert_allclose(weights, round_.mixture_weights)
    assert prompt_from_mask(target, with_point=False)[0] is None
