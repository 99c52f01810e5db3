"""The round engine: one round for inference and training, stage timing from outside, seeds, typed configs,
and the one embedding cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SPASegmentationLib.embeddings import EmbeddingCache
from SPASegmentationLib.engine import (
    feedback_seed,
    round_seed,
    run_model_round,
    sample_round,
    slice_seed,
    start_prompt,
    summarise_round,
    valid_probabilities,
)
from SPASegmentationLib.errors import CheckpointError, InputError
from SPASegmentationLib.model.conditioning import Conditioning
from SPASegmentationLib.model.spa import SPAConfig
from SPASegmentationLib.preference import SamplingMode, uniform_weights
from SPASegmentationLib.stages import StageClock, stage
from SPASegmentationLib.training import TrainConfig

ROUND_STAGES = {"generator", "sampling", "conditioning_and_decoding", "aggregation", "kmeans"}


@pytest.fixture(scope="module")
def encoded(untrained_model):
    from conftest import disc_image

    image = disc_image()
    embedding, geometry = untrained_model.encode(image)
    return image, embedding, geometry


def test_run_model_round_is_the_training_steps_in_sequence(untrained_model, encoded):
    """Inference's round is sample_round + summarise_round, the two calls training makes."""
    model = untrained_model
    _, embedding, geometry = encoded
    prompt = start_prompt(geometry, point=(120, 90))
    weights = uniform_weights(model.config.n_components)
    seed = round_seed(3, 1)
    whole = run_model_round(model, embedding, geometry, prompt, weights, 12, seed)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        sampled = sample_round(model, embedding, [prompt], weights[None], 12, generator)
        parts = summarise_round(
            model, prompt, sampled.mixture.select(0), valid_probabilities(model, sampled.logits[0], geometry), 4, seed
        )
    assert np.array_equal(whole.mean_probability, parts.mean_probability)
    assert np.array_equal(whole.clusters.masks, parts.clusters.masks)
    assert torch.equal(whole.mixture.weights, parts.mixture.weights)


def test_stage_clock_times_each_stage_only_while_active(untrained_model, encoded):
    model = untrained_model
    _, embedding, geometry = encoded
    prompt = start_prompt(geometry, box=(80, 50, 160, 130))
    weights = uniform_weights(model.config.n_components)
    with StageClock(model.device) as clock:
        run_model_round(model, embedding, geometry, prompt, weights, 8, round_seed(0, 1))
    assert set(clock.seconds) == ROUND_STAGES and all(v > 0 for v in clock.seconds.values())
    before = dict(clock.seconds)
    run_model_round(model, embedding, geometry, prompt, weights, 8, round_seed(0, 2))  # no clock active now
    with stage("generator"):
        pass
    assert clock.seconds == before


def test_seeds_are_the_ones_saved_sessions_were_made_with():
    """A saved session replays its rounds from these seeds: their values must never change."""
    assert round_seed(0, 1) == 3964924996 and round_seed(7, 3) == 3466196061
    assert feedback_seed(0, 1) == 1349218077 == round_seed(0, 1001)
    assert slice_seed(4, 6) == 54993459 and slice_seed(4, 6) < 2**31


def test_configs_refuse_unknown_keys_and_words():
    config = SPAConfig(conditioning="concat", sampling="moment_matched")
    assert config.conditioning is Conditioning.CONCAT and config.sampling is SamplingMode.MOMENT_MATCHED
    payload = config.to_dict()
    assert payload["conditioning"] == "concat" and type(payload["conditioning"]) is str
    assert SPAConfig.from_dict(payload) == config
    with pytest.raises(CheckpointError, match=r"unknown keys \['latent_size'\]"):
        SPAConfig.from_dict(payload | {"latent_size": 32})
    with pytest.raises(CheckpointError, match="use one of token, concat"):
        SPAConfig.from_dict(payload | {"conditioning": "film"})
    with pytest.raises(InputError, match="first prompt 'lasso'"):
        TrainConfig(first_prompt="lasso")
    assert TrainConfig(first_prompt="box").to_dict()["first_prompt"] == "box"


def test_embedding_cache_gives_the_same_embedding_cold_and_warm(untrained_model, encoded, tmp_path):
    image = encoded[0]
    cold_cache = EmbeddingCache(untrained_model, folder=tmp_path)
    cold = cold_cache.get(image)
    warm_cache = EmbeddingCache(untrained_model, folder=tmp_path)  # a new process: memory empty, disk warm
    warm = warm_cache.get(image)
    assert torch.equal(cold, warm) and cold_cache.misses == 1 and warm_cache.misses == 0
    windowed = warm_cache.get(image, window=(-100.0, 200.0))
    assert warm_cache.misses == 1 and not torch.equal(windowed, warm)  # the window is part of the key
    assert len(list(tmp_path.rglob("*.pt"))) == 2
    memory_only = EmbeddingCache(untrained_model).get(image)
    assert torch.allclose(memory_only, cold, atol=1e-2) and memory_only.dtype == torch.float32


def test_edge_contrast_sees_real_edges_only():
    from SPASegmentationLib.engine import edge_contrast

    rng = np.random.default_rng(0)
    picture = 0.2 + 0.02 * rng.standard_normal((64, 64))
    picture[20:40, 20:40] += 0.4  # a bright square
    square = np.zeros((64, 64), dtype=bool)
    square[20:40, 20:40] = True
    inner = np.zeros((64, 64), dtype=bool)
    inner[25:35, 25:35] = True  # a region inside the square: no edge in the image
    assert edge_contrast(picture, square) > 5.0
    assert edge_contrast(picture, inner) < 0.5
    assert edge_contrast(picture, np.zeros((64, 64), dtype=bool)) == 0.0


def test_the_click_region_share_tells_an_organs_inside_from_a_nodule_among_vessels(untrained_model):
    from SPASegmentationLib.engine import click_region_share

    rng = np.random.default_rng(0)
    side = untrained_model.backbone.mask_size
    lung = 0.1 + 0.02 * rng.standard_normal((side, side))
    lung[112:144, 112:144] = 0.7  # a nodule ...
    lung[124:132, 144:] = 0.7  # ... touching a vessel that leaves the window
    click = (127.5, 127.5)  # model frame: inside the nodule
    share = click_region_share(untrained_model, lung, click)
    assert share == pytest.approx((32 * 32 + 8 * (side - 144)) / side**2)
    organ = 0.5 + 0.02 * rng.standard_normal((side, side))
    assert click_region_share(untrained_model, organ, click) == 1.0


def test_a_click_inside_a_large_homogeneous_structure_does_not_shrink_to_a_blob(shipped_model):
    """The backbone answers a small box inside a uniform disc with a small blob; without an edge in the image
    that blob is not taken for the structure, and the round still covers the clicked disc."""
    from conftest import disc_image

    from SPASegmentationLib.metrics import dice
    from SPASegmentationLib.session import Session

    image = disc_image()  # radius 35 around (120, 90)
    truth = np.hypot(*(np.mgrid[:180, :240][::-1] - np.array([120, 90])[:, None, None])) < 35
    session = Session(shipped_model, image, seed=0, n_samples=16)
    round_ = session.start(point=(120, 90))
    if session.found_box is not None:
        x0, y0, x1, y1 = session.found_box
        assert x1 - x0 > 50 and y1 - y0 > 50
    assert round_.recommended[90, 120] and dice(round_.recommended, truth) > 0.8
