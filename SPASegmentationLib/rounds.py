"""Round: what the user sees in one round, as plain numpy (no torch), shared by ``Session`` and the service client."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_SAMPLES = 48  # N masks sampled per round at inference (the paper's N)


def signed_differences(candidate_masks: np.ndarray, recommended: np.ndarray) -> np.ndarray:
    """(K, h, w) candidates vs the recommended (h, w) mask → int8 maps: +1 added, −1 removed, 0 same."""
    added = candidate_masks & ~recommended
    removed = ~candidate_masks & recommended
    return added.astype(np.int8) - removed.astype(np.int8)


@dataclass
class Round:
    """What the user sees in one round, at the image's size (the model-frame round is ``engine.ModelRound``)."""

    index: int  # 1-based round number
    probability: np.ndarray  # (H, W) float32 mean probability of the N samples
    recommended: np.ndarray  # (H, W) bool
    uncertainty: np.ndarray  # (H, W) float32 std of the N sample probabilities
    candidates: np.ndarray  # (K, H, W) bool, K ≤ 4, smallest first
    differences: np.ndarray  # (K, H, W) int8: +1 added vs recommended, −1 removed
    candidate_shares: np.ndarray  # (K,) share of the N samples behind each candidate
    mixture_weights: np.ndarray  # (K_g,) the mixture weights this round sampled from
    seconds: float  # compute time of the round
    anchor_weight: float = 0.0  # how far the samples were moved towards the previous round's choice (0..1)

    @property
    def n_candidates(self) -> int:
        return int(self.candidates.shape[0])
