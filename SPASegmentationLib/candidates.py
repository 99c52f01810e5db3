"""From N sampled masks to what the user sees, and from the user's choice back to a prompt.

- aggregate: the recommended mask is the mean probability ≥ threshold; the per-pixel spread (std of
  the N probabilities) is the uncertainty.
- candidates: k-means (K = 4) over the N probability maps; each cluster's mean map, thresholded, is a
  candidate. Candidates whose masks coincide are merged, so fewer than K come back when the samples
  do not hold K distinct masks. Order is stable: smallest foreground first (1 = tightest).
- signed differences: +1 where a candidate adds pixels to the recommendation, −1 where it removes.
- feedback: the chosen candidate becomes a point where it differs most from the other candidates
  (one of the top-20 such pixels, labelled by the candidate) plus the candidate itself as mask prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

from .errors import InputError

N_CANDIDATES = 4
FEATURE_SIDE = 64  # k-means runs on maps pooled to at most this side; centroids use full resolution
FEEDBACK_TOP_PIXELS = 20
MIN_FEEDBACK_SCORE = 0.05


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


def aggregate(probabilities: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """N probability maps (N, h, w) → (mean probability, recommended mask, per-pixel std)."""
    mean = probabilities.mean(axis=0)
    return mean.astype(np.float32), mean >= threshold, probabilities.std(axis=0).astype(np.float32)


def _pooled(probabilities: np.ndarray, side: int) -> np.ndarray:
    n, h, w = probabilities.shape
    factor = max(1, int(np.ceil(max(h, w) / side)))
    h2, w2 = (h // factor) * factor, (w // factor) * factor
    if factor == 1 or h2 == 0 or w2 == 0:
        return probabilities.reshape(n, -1)
    trimmed = probabilities[:, :h2, :w2].reshape(n, h2 // factor, factor, w2 // factor, factor)
    return trimmed.mean(axis=(2, 4)).reshape(n, -1)


def cluster_candidates(
    probabilities: np.ndarray, k: int = N_CANDIDATES, seed: int = 0, threshold: float = 0.5
) -> CandidateClusters:
    """k-means over N probability maps (N, h, w) → at most k distinct candidates, smallest first."""
    if probabilities.ndim != 3 or probabilities.shape[0] < 1:
        raise ValueError(f"expected probability maps (N, h, w), got shape {probabilities.shape}")
    n = probabilities.shape[0]
    binary = probabilities >= threshold
    distinct = len({np.packbits(m).tobytes() for m in binary})
    n_clusters = max(1, min(k, distinct, n))
    if n_clusters == 1:
        labels = np.zeros(n, dtype=np.int64)
    else:
        features = _pooled(probabilities, FEATURE_SIDE)
        kmeans = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed)
        labels = kmeans.fit_predict(features.astype(np.float64))
    # Merge clusters whose thresholded centroids coincide: the user could not tell them apart.
    groups: dict[bytes, list[int]] = {}
    for cluster in range(n_clusters):
        members = labels == cluster
        if not members.any():
            continue
        centroid = probabilities[members].mean(axis=0)
        groups.setdefault(np.packbits(centroid >= threshold).tobytes(), []).append(cluster)
    merged_labels = np.empty(n, dtype=np.int64)
    probs, masks, shares = [], [], []
    for new_index, clusters in enumerate(groups.values()):
        members = np.isin(labels, clusters)
        merged_labels[members] = new_index
        centroid = probabilities[members].mean(axis=0).astype(np.float32)
        probs.append(centroid)
        masks.append(centroid >= threshold)
        shares.append(members.mean())
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
    score = np.abs(selected - others).ravel()
    top = np.argsort(-score, kind="stable")[:FEEDBACK_TOP_PIXELS]
    top = top[score[top] >= MIN_FEEDBACK_SCORE]
    mask = candidates.masks[chosen]
    if top.size == 0:
        return None, True, mask
    flat = int(rng.choice(top))
    row, col = divmod(flat, selected.shape[1])
    return (float(col), float(row)), bool(selected[row, col] >= 0.5), mask
