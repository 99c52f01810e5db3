"""Aggregation, k-means candidates, signed differences and feedback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from SPASegmentationLib.candidates import aggregate, cluster_candidates, feedback_from_choice
from SPASegmentationLib.errors import InputError
from SPASegmentationLib.rounds import signed_differences
from SPASegmentationLib.simulation.choices import nearest_candidate


def discs(radii, size=64, soft=1.5):
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(xx - size / 2, yy - size / 2)
    return np.stack([1 / (1 + np.exp((r - radius) / soft)) for radius in radii]).astype(np.float32)


def test_aggregate_thresholds_the_mean_probability_and_reports_spread():
    maps = np.stack([np.full((4, 4), 0.2), np.full((4, 4), 0.9)]).astype(np.float32)
    mean, recommended, std = aggregate(maps)
    assert np.allclose(mean, 0.55) and recommended.all() and np.allclose(std, 0.35)
    assert not aggregate(maps, threshold=0.6)[1].any()


def test_four_groups_give_four_candidates_smallest_first_with_shares():
    radii = [8] * 10 + [20] * 14 + [14] * 12 + [26] * 12
    cands = cluster_candidates(discs(radii), k=4, seed=0)
    assert len(cands) == 4
    areas = cands.masks.sum((1, 2))
    assert list(areas) == sorted(areas)
    assert np.allclose(cands.shares, [10 / 48, 12 / 48, 14 / 48, 12 / 48])
    assert (cands.sample_cluster[:10] == 0).all() and (cands.sample_cluster[10:24] == 2).all()


def test_order_is_stable_under_sample_permutation_and_seed():
    radii = [8] * 10 + [20] * 14 + [14] * 12 + [26] * 12
    maps = discs(radii)
    a = cluster_candidates(maps, seed=0)
    b = cluster_candidates(maps[np.random.default_rng(1).permutation(48)], seed=7)
    assert np.array_equal(a.masks, b.masks)


@pytest.mark.parametrize("radii, expected", [([10] * 48, 1), ([10] * 20 + [20] * 28, 2), ([8, 12, 16] * 16, 3)])
def test_fewer_distinct_predictions_give_fewer_candidates(radii, expected):
    cands = cluster_candidates(discs(radii), k=4)
    assert len(cands) == expected
    assert len({c.tobytes() for c in cands.masks}) == expected
    assert np.isclose(cands.shares.sum(), 1.0)


def test_clusters_with_identical_thresholded_masks_are_merged():
    # Same binary mask (radius 10 disc) but different confidence: k-means separates them, the user could not.
    sharp, soft = discs([10], soft=0.3), discs([10], soft=2.5)
    maps = np.concatenate([np.repeat(sharp, 24, 0), np.repeat(soft, 24, 0)])
    assert len(cluster_candidates(maps, k=4)) == 1


def test_signed_differences_mark_added_and_removed_pixels():
    recommended = np.zeros((3, 3), bool)
    recommended[1, 1] = recommended[0, 0] = True
    candidate = np.zeros((1, 3, 3), bool)
    candidate[0, 1, 1] = candidate[0, 2, 2] = True
    diff = signed_differences(candidate, recommended)
    assert diff.dtype == np.int8
    assert diff[0, 2, 2] == 1 and diff[0, 0, 0] == -1 and diff[0, 1, 1] == 0 and np.abs(diff).sum() == 2


def test_feedback_point_lies_where_the_choice_differs_and_is_labelled_by_it():
    cands = cluster_candidates(discs([8] * 12 + [14] * 12 + [20] * 12 + [26] * 12))
    mean = cands.probabilities.mean(0)
    rng = np.random.default_rng(0)
    point, label, mask = feedback_from_choice(cands, 3, mean, rng)  # the largest: adds an outer ring
    x, y = point
    r = np.hypot(x - 32, y - 32)
    assert label is True and 20 <= r <= 28 and np.array_equal(mask, cands.masks[3])
    point, label, _ = feedback_from_choice(cands, 0, mean, rng)  # the smallest: removes
    assert label is False and np.hypot(point[0] - 32, point[1] - 32) >= 7


def test_feedback_without_disagreement_gives_only_the_mask():
    cands = cluster_candidates(discs([10] * 8))
    point, _, mask = feedback_from_choice(cands, 0, cands.probabilities[0], np.random.default_rng(0))
    assert point is None and mask.any()
    with pytest.raises(InputError, match="does not exist"):
        feedback_from_choice(cands, 1, cands.probabilities[0], np.random.default_rng(0))


def test_simulated_user_picks_the_candidate_nearest_the_target():
    cands = cluster_candidates(discs([8] * 12 + [14] * 12 + [20] * 12 + [26] * 12))
    target = discs([19])[0] >= 0.5
    assert nearest_candidate(cands.masks, target) == 2


# ----- the torch k-means against scikit-learn's -------------------------------------------------------------------
def _sklearn_labels(maps: np.ndarray, k: int, seed: int) -> np.ndarray:
    """scikit-learn's KMeans as the candidates ran it before issue 12: on the same pooled maps, n_init 3."""
    from sklearn.cluster import KMeans

    from SPASegmentationLib.candidates import FEATURE_SIDE, _pooled

    features = _pooled(torch.from_numpy(maps), FEATURE_SIDE).double().numpy()
    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(features)


def _candidate_masks(maps: np.ndarray, labels: np.ndarray) -> list[bytes]:
    return sorted((maps[labels == c].mean(0) >= 0.5).tobytes() for c in np.unique(labels))


def _inertia(maps: np.ndarray, labels: np.ndarray) -> float:
    from SPASegmentationLib.candidates import FEATURE_SIDE, _pooled

    features = _pooled(torch.from_numpy(maps), FEATURE_SIDE).double().numpy()
    return float(sum(((features[labels == c] - features[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_kmeans_gives_scikit_learns_candidates_on_separable_samples(seed):
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(seed)
    radii = rng.permutation([8.0] * 9 + [13.0] * 15 + [19.0] * 11 + [25.0] * 13) + rng.normal(0, 0.6, 48)
    maps = np.clip(discs(radii) + rng.normal(0, 0.03, (48, 64, 64)), 0, 1).astype(np.float32)
    ours = cluster_candidates(maps, k=4, seed=seed)
    assert _candidate_masks(maps, ours.sample_cluster) == _candidate_masks(maps, _sklearn_labels(maps, 4, seed))
    assert len(ours) == 4


@pytest.fixture(scope="module")
def real_round_maps(shipped_model):
    """The N sample maps of the first round on five of the real LIDC-IDRI crops (shipped model, seed 0)."""
    from SPASegmentationLib.data.detect import open_dataset
    from SPASegmentationLib.session import Session
    from SPASegmentationLib.simulation.prompts import initial_point

    dataset = open_dataset(Path(__file__).resolve().parent / "data" / "lidc-cimd")
    rounds = []
    for case_id in dataset.split("test")[:5]:
        case = dataset.load(case_id)
        target = max(case.raters.values(), key=np.sum)
        session = Session(shipped_model, case.image, seed=0)
        session.start(point=initial_point(case.raters, target))
        rounds.append(session._sample_maps[-1].float().cpu().numpy())
    return rounds


def test_torch_kmeans_clusters_real_rounds_as_tightly_as_scikit_learn(real_round_maps):
    """On real rounds k-means has near-ties (scikit-learn with another seed changes the candidates of some too):
    the torch clustering must be as good by k-means' own measure (inertia), round by round and overall."""
    pytest.importorskip("sklearn")
    ratios = []
    for maps in real_round_maps:
        ours = cluster_candidates(maps, k=4, seed=0)
        if len(ours) < 4:
            continue
        ratios.append(_inertia(maps, ours.sample_cluster) / _inertia(maps, _sklearn_labels(maps, 4, 0)))
    assert len(ratios) >= 4
    assert np.mean(ratios) <= 1.0 and max(ratios) <= 1.25, ratios


def test_clustering_is_the_same_from_numpy_and_from_a_tensor(real_round_maps):
    maps = real_round_maps[0]
    a = cluster_candidates(maps, seed=3)
    b = cluster_candidates(torch.from_numpy(maps), seed=3)
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.sample_cluster, b.sample_cluster)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_clustering_on_the_gpu_gives_the_cpus_candidates(real_round_maps):
    for maps in real_round_maps:
        here = cluster_candidates(maps, seed=5)
        there = cluster_candidates(torch.from_numpy(maps).cuda(), seed=5)
        assert np.array_equal(here.masks, there.masks)
        assert np.allclose(here.probabilities, there.probabilities, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kmeans_never_waits_for_the_host(real_round_maps):
    """The k-means and the distinct count queue their work without one synchronisation (a round copies to the host
    once, at its end)."""
    from SPASegmentationLib.candidates import FEATURE_SIDE, _distinct_count, _pooled, kmeans_labels

    maps = torch.from_numpy(real_round_maps[0]).cuda()
    features, binary = _pooled(maps, FEATURE_SIDE), maps.reshape(len(maps), -1) >= 0.5
    _distinct_count(binary)  # the hash weights are made (and copied to the GPU) once per size
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        labels = kmeans_labels(features, 4, _distinct_count(binary), torch.Generator().manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert labels.device.type == "cuda" and labels.shape == (len(maps),)
