"""From N sampled masks to what the user sees, and from the user's choice back to a prompt.

- aggregate: the recommended mask is the mean probability ≥ threshold; the per-pixel spread (std of
  the N probabilities) is the uncertainty.
- candidates: k-means (K = 4) over the N probability maps; each cluster's mean map, thresholded, is a
  candidate. Candidates whose masks coincide are merged, so fewer than K come back when the samples
  do not hold K distinct masks. Order is stable: smallest foreground first (1 = tightest).
- signed differences: +1 where a candidate adds pixels to the recommendation, −1 where it removes.
- feedback: the chosen candidate becomes a point where it differs most from the other candidates
  (one of the top-20 such pixels, labelled by the candidate) plus the candidate itself as mask prompt.

Aggregation and clustering run in torch on the device the maps are on (the model's: a GPU round keeps its
N maps there and copies back only what the user is shown); numpy maps are clustered on the CPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError

N_CANDIDATES = 4
FEATURE_SIDE = 64  # k-means runs on maps pooled to at most this side; centroids use full resolution
FEEDBACK_TOP_PIXELS = 20
MIN_FEEDBACK_SCORE = 0.05
FEEDBACK_SCORE_STEP = 1e-3  # resolution of the score that ranks feedback pixels
KMEANS_RESTARTS = 3  # k-means++ starts per round; the one with the least inertia wins
KMEANS_ITERATIONS = 30  # Lloyd steps, a fixed number (no convergence test: no host synchronisation on a GPU)


@dataclass
class CandidateClusters:
    """The k-means clusters of one round's N samples, in the frame of the maps they came from.

    Each cluster's mean map, thresholded, is a candidate the user is shown.
    """

    probabilities: np.ndarray  # (K', h, w) float32: mean probability map of each cluster
    masks: np.ndarray  # (K', h, w) bool
    shares: np.ndarray  # (K',) share of the N samples in each cluster
    sample_cluster: np.ndarray  # (N,) index of each sample's candidate

    def __len__(self) -> int:
        return int(self.masks.shape[0])


def as_tensor(probabilities: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Probability maps as a float32 tensor, where they are (numpy maps: on the CPU, without a copy when
    they are float32 already)."""
    if isinstance(probabilities, torch.Tensor):
        return probabilities.float()
    return torch.from_numpy(np.ascontiguousarray(probabilities, dtype=np.float32))


def aggregate(
    probabilities: np.ndarray | torch.Tensor, threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """N probability maps (N, h, w) → (mean probability, recommended mask, per-pixel std), on the host."""
    maps = as_tensor(probabilities)
    std, mean = torch.std_mean(maps, dim=0, correction=0)
    mean_np = mean.cpu().numpy()
    return mean_np, mean_np >= threshold, std.cpu().numpy()


def _pooled(maps: torch.Tensor, side: int) -> torch.Tensor:
    """(N, h, w) maps averaged over square blocks so that neither side exceeds ``side``; flattened (N, D)."""
    n, h, w = maps.shape
    factor = max(1, math.ceil(max(h, w) / side))
    h2, w2 = (h // factor) * factor, (w // factor) * factor
    if factor == 1 or h2 == 0 or w2 == 0:
        return maps.reshape(n, -1)
    return torch.nn.functional.avg_pool2d(maps[None, :, :h2, :w2], factor)[0].reshape(n, -1)


@functools.lru_cache(maxsize=8)
def _hash_weights(length: int, device: str) -> torch.Tensor:
    """Fixed random int64 weights that hash a flattened mask of ``length`` pixels (see :func:`_distinct_count`)."""
    generator = torch.Generator().manual_seed(0x5350)
    return torch.randint(-(2**62), 2**62, (length,), generator=generator, dtype=torch.int64).to(device)


def _distinct_count(binary: torch.Tensor) -> torch.Tensor:
    """How many different masks the rows of ``binary`` (N, P) hold, as a 0-d tensor on their device.

    Each mask is hashed exactly (integer arithmetic, wrapping in int64) with fixed random weights; equal masks
    hash equal, different ones collide with probability about N² / 2⁶⁴."""
    weights = _hash_weights(binary.shape[1], str(binary.device))
    keys = torch.sort(torch.where(binary, weights, 0).sum(dim=1)).values
    return 1 + (keys[1:] != keys[:-1]).sum()


def _memberships(labels: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Labels (..., N) in 0..k-1 → one-hot memberships (..., N, k) of ``dtype``, by comparison (``one_hot`` may
    check its input on the host)."""
    return (labels[..., None] == torch.arange(k, device=labels.device)).to(dtype)


def _squared_distances(points: torch.Tensor, norms: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(N, D) points with their (N,) squared norms and (I, k, D) centres → (I, N, k) squared distances."""
    cross = torch.matmul(points, centres.transpose(1, 2))  # (I, N, k)
    return (norms[:, None] - 2.0 * cross + centres.square().sum(-1)[:, None, :]).clamp_(min=0.0)


def kmeans_labels(
    features: torch.Tensor,
    k: int,
    active: torch.Tensor,
    generator: torch.Generator,
    restarts: int = KMEANS_RESTARTS,
    iterations: int = KMEANS_ITERATIONS,
) -> torch.Tensor:
    """k-means of (N, D) features → (N,) cluster labels, on the features' device, without host round trips.

    ``active`` (0-d tensor) is how many of the k clusters to use; the rest stay empty. Each of ``restarts``
    starts is seeded by greedy k-means++ (each new centre the best of 2 + ln k draws ∝ squared distance, as
    scikit-learn seeds), refined by up to ``iterations`` Lloyd steps (an emptied cluster keeps its centre); the start
    with the least inertia wins. Float64 throughout, as scikit-learn. ``generator`` lives on the CPU: the same
    seed gives the same starts on any device."""
    n = features.shape[0]
    device = features.device
    points = features.double()
    norms = points.square().sum(-1)
    every = torch.arange(restarts, device=device)
    trials = 2 + int(math.log(k))
    # every draw is made on the CPU generator (the same seed gives the same starts on any device) and copied without
    # waiting (non-blocking): nothing here synchronises with the GPU
    first = torch.randint(n, (restarts,), generator=generator).to(device, non_blocking=True)
    centres = points[first][:, None, :].repeat(1, k, 1)  # (I, k, D); centres not yet drawn repeat the first
    closest = _squared_distances(points, norms, centres[:, :1])[..., 0]  # (I, N)
    for j in range(1, k):
        uniform = torch.rand((restarts, trials), generator=generator, dtype=torch.float64)
        uniform = uniform.to(device, non_blocking=True)
        cumulative = torch.cumsum(closest + 1e-12, dim=1)
        picks = torch.searchsorted(cumulative, uniform * cumulative[:, -1:]).clamp_(max=n - 1)  # (I, T)
        candidates = points[picks]  # (I, T, D)
        potential = torch.minimum(closest[:, None, :], _squared_distances(points, norms, candidates).transpose(1, 2))
        best = potential.sum(-1).argmin(-1)  # (I,)
        centres[:, j] = candidates[every, best]
        closest = potential[every, best]
    unused = torch.where(torch.arange(k, device=device) < active, 0.0, math.inf).double()
    labels = None
    for _ in range(iterations + 1):
        distances = _squared_distances(points, norms, centres) + unused
        previous, labels = labels, distances.argmin(-1)  # (I, N)
        # settled: the next centres would be these again. Tested on the CPU only, where it costs no synchronisation
        # (the result is the same either way: a settled assignment stays settled)
        if device.type == "cpu" and previous is not None and torch.equal(previous, labels):
            break
        members = _memberships(labels, k, torch.float64)  # (I, N, k)
        counts = members.sum(1)  # (I, k)
        centres = torch.where(
            counts[..., None] > 0, (members.transpose(1, 2) @ points) / counts.clamp(min=1)[..., None], centres
        )
    inertia = distances.min(-1).values.sum(-1)  # (I,) of the last assignment
    return labels.index_select(0, inertia.argmin()[None])[0]  # (a tensor index: no host read)


def cluster_candidates(
    probabilities: np.ndarray | torch.Tensor, k: int = N_CANDIDATES, seed: int = 0, threshold: float = 0.5
) -> CandidateClusters:
    """k-means over N probability maps (N, h, w) → at most k distinct candidates, smallest first.

    As many clusters as the samples hold distinct thresholded masks (at most k); clusters whose mean maps
    threshold to the same mask are merged. Runs where the maps are; one copy to the host at the end."""
    maps = as_tensor(probabilities)
    if maps.ndim != 3 or maps.shape[0] < 1:
        raise ValueError(f"expected probability maps (N, h, w), got shape {tuple(maps.shape)}")
    n = maps.shape[0]
    k = max(1, min(k, n))
    flat = maps.reshape(n, -1)
    binary = flat >= threshold
    if k == 1:
        labels = torch.zeros(n, dtype=torch.int64, device=maps.device)
    else:
        generator = torch.Generator().manual_seed(int(seed))
        labels = kmeans_labels(_pooled(maps, FEATURE_SIDE), k, _distinct_count(binary), generator)
    members = _memberships(labels, k, flat.dtype)  # (N, k)
    counts = members.sum(0)
    centroids = (members.T @ flat) / counts.clamp(min=1)[:, None]  # (k, P)
    centroid_masks = centroids >= threshold
    same = (centroid_masks[:, None, :] == centroid_masks[None, :, :]).all(-1)  # (k, k)
    # the one copy back: labels, counts, which thresholded centroids coincide, the centroids
    labels_np, counts_np, same_np = labels.cpu().numpy(), counts.cpu().numpy().astype(np.float64), same.cpu().numpy()
    centroids_np = centroids.cpu().numpy().astype(np.float64)
    return _merged(labels_np, counts_np, same_np, centroids_np, maps.shape[1:], threshold)


def _merged(
    labels: np.ndarray,
    counts: np.ndarray,
    same: np.ndarray,
    centroids: np.ndarray,
    shape: tuple[int, int],
    threshold: float,
) -> CandidateClusters:
    """Clusters whose thresholded mean maps coincide merged into one candidate (the user could not tell them
    apart), ordered by area, then by share."""
    n = labels.shape[0]
    groups: list[list[int]] = []
    for cluster in np.flatnonzero(counts > 0):
        group = next((g for g in groups if same[g[0], cluster]), None)
        if group is None:
            groups.append([int(cluster)])
        else:
            group.append(int(cluster))
    merged_labels = np.empty(n, dtype=np.int64)
    probs, masks, shares = [], [], []
    for new_index, clusters in enumerate(groups):
        merged_labels[np.isin(labels, clusters)] = new_index
        weight = counts[clusters]
        centroid = (weight @ centroids[clusters] / weight.sum()).astype(np.float32).reshape(shape)
        probs.append(centroid)
        masks.append(centroid >= threshold)
        shares.append(weight.sum() / n)
    areas = np.array([m.sum() for m in masks])
    order = np.lexsort((-np.array(shares), areas))  # area ascending, then larger share first
    remap = np.empty(len(order), dtype=np.int64)
    remap[order] = np.arange(len(order))
    return CandidateClusters(
        probabilities=np.stack(probs)[order],
        masks=np.stack(masks)[order],
        shares=np.array(shares, dtype=np.float64)[order],
        sample_cluster=remap[merged_labels],
    )


def feedback_from_choice(
    candidates: CandidateClusters, chosen: int, mean_probability: np.ndarray, rng: np.random.Generator
) -> tuple[tuple[float, float] | None, bool, np.ndarray]:
    """The prompt a choice gives: (point (x, y) in the maps' pixel frame or None, its label, the mask).

    The point is where the chosen candidate differs most from the mean of the others (from the
    recommendation when it is the only candidate), labelled foreground if the candidate includes it.
    No point is given where the candidate agrees with everything (the mask prompt still is).
    """
    if not 0 <= chosen < len(candidates):
        raise InputError(f"candidate {chosen} does not exist; this round has candidates 0..{len(candidates) - 1}")
    selected = candidates.probabilities[chosen]
    if len(candidates) > 1:
        others = np.delete(candidates.probabilities, chosen, axis=0).mean(axis=0)
    else:
        others = mean_probability
    # scores in steps of FEEDBACK_SCORE_STEP, ties in pixel order: rounding-level differences between runtimes
    # (OpenVINO's encoder against PyTorch's, one thread against two) do not reorder the top pixels
    score = np.floor(np.abs(selected - others).ravel() / FEEDBACK_SCORE_STEP) * FEEDBACK_SCORE_STEP
    top = np.argsort(-score, kind="stable")[:FEEDBACK_TOP_PIXELS]
    top = top[score[top] >= MIN_FEEDBACK_SCORE]
    mask = candidates.masks[chosen]
    if top.size == 0:
        return None, True, mask
    flat = int(rng.choice(top))
    row, col = divmod(flat, selected.shape[1])
    return (float(col), float(row)), bool(selected[row, col] >= 0.5), mask
