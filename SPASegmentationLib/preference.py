"""The preference distribution: a Gaussian mixture over the latent preference code z.

p(z) = sum_k pi_k N(z; mu_k, diag(sigma_k^2)), with K_g components over a D-dimensional latent.
This module is the one source of truth for drawing from it, for the E-step target that supervises
the mixture weights, and for (de)serialising it into sessions and profiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .enums import TextEnum
from .errors import InputError, ProfileError

DEFAULT_COMPONENTS = 16
DEFAULT_LATENT_DIM = 64
WEIGHT_SUM_TOLERANCE = 1e-3  # stored weights must sum to 1 within this


class SamplingMode(TextEnum):
    """How latents are drawn from the mixture."""

    MIXTURE = "mixture"  # the paper: a component by pi, then its Gaussian
    MOMENT_MATCHED = "moment_matched"  # the official code: one Gaussian with the pi-weighted moments


def check_weights(
    values: object,
    *,
    n_components: int | None = None,
    sums_to_one: bool = False,
    what: str = "mixture weights",
    error: type[Exception] = InputError,
) -> np.ndarray:
    """Mixture weights as a float64 vector on the simplex (normalised), or ``error`` naming ``what``.

    They must be finite and non-negative with a positive sum, ``n_components`` of them when given,
    and already sum to 1 (within WEIGHT_SUM_TOLERANCE) with ``sums_to_one``.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise error(f"{what} must be a list of numbers, got {type(values).__name__}") from None
    if array.ndim != 1 or array.size == 0:
        raise error(f"{what} must be a non-empty list of numbers, got shape {array.shape}")
    if n_components is not None and array.size != n_components:
        raise error(
            f"{what} have {array.size} values but this model's mixture has {n_components} components; "
            "use weights made with this model"
        )
    if not np.isfinite(array).all() or (array < 0).any():
        raise error(f"{what} must be finite numbers >= 0")
    total = float(array.sum())
    if sums_to_one and abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise error(f"{what} must sum to 1 (sum {total:.4f})")
    if total <= 0:
        raise error(f"{what} must have a positive sum")
    return array / total


@dataclass
class PreferenceMixture:
    """Mixture parameters for one image (or a batch of images, with a leading batch axis).

    weights: (..., K_g) on the simplex; means, stds: (..., K_g, D), stds > 0.
    """

    weights: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor

    def __post_init__(self) -> None:
        if self.means.shape != self.stds.shape:
            raise ValueError(f"means {tuple(self.means.shape)} and stds {tuple(self.stds.shape)} differ")
        if self.weights.shape != self.means.shape[:-1]:
            raise ValueError(f"weights {tuple(self.weights.shape)} do not match means {tuple(self.means.shape)}")

    @property
    def n_components(self) -> int:
        return int(self.weights.shape[-1])

    @property
    def latent_dim(self) -> int:
        return int(self.means.shape[-1])

    def sample(
        self, n: int, generator: torch.Generator | None = None, mode: SamplingMode = SamplingMode.MIXTURE
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw n latents per image: returns (z (..., n, D), component index (..., n)).

        ``mixture`` (the paper): pick a component by pi, then z = mu_k + sigma_k * eps.
        Gradients reach mu and sigma (reparameterisation), not pi: pi is trained by the E-step.
        ``moment_matched`` (the official code): z = sum_k pi_k (mu_k + sigma_k * eps) with one eps
        shared by all components, i.e. a single Gaussian; the index returned is the argmax of pi.
        """
        mode = SamplingMode.parse(mode, "sampling mode", error=ValueError)
        batch_shape = self.weights.shape[:-1]
        device = self.means.device
        # Randomness is drawn where the generator lives (the CPU by default) and then moved, so a
        # seed gives the same draws on every device.
        draw_device = generator.device if generator is not None else device
        eps = torch.randn(
            (*batch_shape, n, self.latent_dim), generator=generator, device=draw_device, dtype=self.means.dtype
        ).to(device)
        if mode is SamplingMode.MOMENT_MATCHED:
            w = self.weights.unsqueeze(-1)
            mu = (w * self.means).sum(-2, keepdim=True)
            sigma = (w * self.stds).sum(-2, keepdim=True)
            index = self.weights.argmax(-1, keepdim=True).expand(*batch_shape, n)
            return mu + sigma * eps, index
        flat_weights = self.weights.detach().reshape(-1, self.n_components).clamp_min(0).to(draw_device)
        index = torch.multinomial(flat_weights, n, replacement=True, generator=generator)
        index = index.reshape(*batch_shape, n).to(device)
        gather = index.unsqueeze(-1).expand(*batch_shape, n, self.latent_dim)
        mu = torch.gather(self.means, -2, gather)
        sigma = torch.gather(self.stds, -2, gather)
        return mu + sigma * eps, index

    def detach(self) -> PreferenceMixture:
        return PreferenceMixture(self.weights.detach(), self.means.detach(), self.stds.detach())

    def select(self, i: int) -> PreferenceMixture:
        """The mixture of image i of a batch."""
        return PreferenceMixture(self.weights[i], self.means[i], self.stds[i])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form of an unbatched mixture."""
        if self.weights.dim() != 1:
            raise ValueError("only an unbatched mixture can be serialised; use select(i) first")
        return {
            "n_components": self.n_components,
            "latent_dim": self.latent_dim,
            "weights": [float(v) for v in self.weights.detach().cpu().tolist()],
            "means": self.means.detach().cpu().tolist(),
            "stds": self.stds.detach().cpu().tolist(),
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> PreferenceMixture:
        """Rebuild and validate a mixture written by :meth:`to_dict`."""
        try:
            weights = torch.tensor(payload["weights"], dtype=torch.float32)
            means = torch.tensor(payload["means"], dtype=torch.float32)
            stds = torch.tensor(payload["stds"], dtype=torch.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"preference mixture is malformed ({exc}); it needs weights, means, stds") from exc
        if weights.dim() != 1 or means.dim() != 2 or means.shape != stds.shape or means.shape[0] != weights.shape[0]:
            raise ProfileError(
                f"preference mixture has inconsistent shapes: weights {tuple(weights.shape)}, "
                f"means {tuple(means.shape)}, stds {tuple(stds.shape)}"
            )
        if not (torch.isfinite(weights).all() and torch.isfinite(means).all() and torch.isfinite(stds).all()):
            raise ProfileError("preference mixture contains NaN or infinite values")
        check_weights(weights, sums_to_one=True, what="preference mixture weights", error=ProfileError)
        if (stds <= 0).any():
            raise ProfileError("preference mixture standard deviations must be positive")
        return cls(weights / weights.sum(), means, stds)


def uniform_weights(n_components: int, batch: int | None = None) -> torch.Tensor:
    """The uninformed mixture weights 1/K_g (optionally with a batch axis)."""
    shape = (n_components,) if batch is None else (batch, n_components)
    return torch.full(shape, 1.0 / n_components)


def e_step_weights(
    prior_weights: torch.Tensor,
    component_index: torch.Tensor,
    sample_losses: torch.Tensor,
    temperature: float = 0.05,
    prior_floor: float = 0.0,
) -> torch.Tensor:
    """Posterior mixture weights given how well each component's samples matched the target.

    The E-step of a mixture: r_k ∝ pi_k p(target | k). The likelihood of the target under component
    k is estimated from the samples drawn from k this round, p(target | k) ∝ exp(-mean loss / T).
    Components that drew no sample keep their prior likelihood (the mean over the others).

    ``prior_floor`` mixes the prior with the uniform one, (1 − ε) π + ε / K_g, so that a component the prior has
    all but dropped can win back weight when its samples fit (without it a collapsed mixture is a fixed point).

    prior_weights: (B, K_g); component_index: (B, N) long; sample_losses: (B, N) per-sample loss.
    Returns (B, K_g), detached: it is a target, not a prediction.
    """
    prior_weights = prior_weights.detach()
    sample_losses = sample_losses.detach()
    n_components = prior_weights.shape[-1]
    one_hot = torch.nn.functional.one_hot(component_index, n_components).to(sample_losses.dtype)
    counts = one_hot.sum(-2)
    summed = (one_hot * sample_losses.unsqueeze(-1)).sum(-2)
    drawn = counts > 0
    mean_loss = torch.where(drawn, summed / counts.clamp_min(1), torch.zeros_like(summed))
    fallback = (mean_loss * drawn).sum(-1, keepdim=True) / drawn.sum(-1, keepdim=True).clamp_min(1)
    mean_loss = torch.where(drawn, mean_loss, fallback.expand_as(mean_loss))
    prior = (1.0 - prior_floor) * prior_weights + prior_floor / n_components
    log_post = torch.log(prior.clamp_min(1e-8)) - mean_loss / temperature
    return torch.softmax(log_post, dim=-1)


def balance_loss(weights: torch.Tensor) -> torch.Tensor:
    """How unevenly a batch's mixtures (B, K_g) use their components as a whole: 1 − H(mean weights) / log K_g, 0 when
    every component carries the same share of the batch, 1 when all put their weight on the same one. Each image may
    still favour its own components (a load-balancing term, as mixtures of experts use)."""
    n_components = weights.shape[-1]
    if n_components == 1:
        return weights.sum() * 0.0
    mean = weights.reshape(-1, n_components).mean(0).clamp_min(1e-8)
    entropy = -(mean * torch.log(mean)).sum()
    return 1.0 - entropy / math.log(n_components)
