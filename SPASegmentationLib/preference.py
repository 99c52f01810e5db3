"""The preference distribution: a Gaussian mixture over the latent preference code z.

p(z) = sum_k pi_k N(z; mu_k, diag(sigma_k^2)), with K_g components over a D-dimensional latent.
This module is the one source of truth for drawing from it, for the E-step target that supervises
the mixture weights, and for (de)serialising it into sessions and profiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import ProfileError

DEFAULT_COMPONENTS = 16
DEFAULT_LATENT_DIM = 64
SAMPLING_MODES = ("mixture", "moment_matched")


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
            raise ValueError(
                f"weights {tuple(self.weights.shape)} do not match means {tuple(self.means.shape)}"
            )

    @property
    def n_components(self) -> int:
        return int(self.weights.shape[-1])

    @property
    def latent_dim(self) -> int:
        return int(self.means.shape[-1])

    def sample(
        self, n: int, generator: torch.Generator | None = None, mode: str = "mixture"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw n latents per image: returns (z (..., n, D), component index (..., n)).

        ``mixture`` (the paper): pick a component by pi, then z = mu_k + sigma_k * eps.
        Gradients reach mu and sigma (reparameterisation), not pi: pi is trained by the E-step.
        ``moment_matched`` (the official code): z = sum_k pi_k (mu_k + sigma_k * eps) with one eps
        shared by all components, i.e. a single Gaussian; the index returned is the argmax of pi.
        """
        if mode not in SAMPLING_MODES:
            raise ValueError(f"unknown sampling mode {mode!r}; use one of {SAMPLING_MODES}")
        batch_shape = self.weights.shape[:-1]
        device = self.means.device
        # Randomness is drawn where the generator lives (the CPU by default) and then moved, so a
        # seed gives the same draws on every device.
        draw_device = generator.device if generator is not None else device
        eps = torch.randn(
            (*batch_shape, n, self.latent_dim), generator=generator, device=draw_device, dtype=self.means.dtype
        ).to(device)
        if mode == "moment_matched":
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

    def detach(self) -> "PreferenceMixture":
        return PreferenceMixture(self.weights.detach(), self.means.detach(), self.stds.detach())

    def select(self, i: int) -> "PreferenceMixture":
        """The mixture of image i of a batch."""
        return PreferenceMixture(self.weights[i], self.means[i], self.stds[i])

    def with_weights(self, weights: torch.Tensor) -> "PreferenceMixture":
        return PreferenceMixture(weights, self.means, self.stds)

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
    def from_dict(cls, payload: dict[str, Any]) -> "PreferenceMixture":
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
        if (weights < 0).any() or abs(float(weights.sum()) - 1.0) > 1e-3:
            raise ProfileError(f"preference mixture weights must be >= 0 and sum to 1 (sum {float(weights.sum()):.4f})")
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
) -> torch.Tensor:
    """Posterior mixture weights given how well each component's samples matched the target.

    The E-step of a mixture: r_k ∝ pi_k p(target | k). The likelihood of the target under component
    k is estimated from the samples drawn from k this round, p(target | k) ∝ exp(-mean loss / T).
    Components that drew no sample keep their prior likelihood (the mean over the others).

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
    log_post = torch.log(prior_weights.clamp_min(1e-8)) - mean_loss / temperature
    return torch.softmax(log_post, dim=-1)


def weights_to_numpy(weights: torch.Tensor) -> np.ndarray:
    return weights.detach().cpu().numpy().astype(np.float64)
