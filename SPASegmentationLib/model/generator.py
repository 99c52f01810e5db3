"""The Preference Distribution Generator (paper §3.4): interaction embedding → mixture parameters.

Two networks of six fully connected layers each, as in the paper:
- the μσ network maps the interaction vector c_t to per-component means and standard deviations;
- the π network maps (previous weights, c_t) to new weights, as a residual on log π_{t−1}
  (zero-initialised, so an untrained network keeps the weights it is given, e.g. a user profile).
The interaction vector pools the SAM prompt encoder's output (sparse tokens: mean and max over the
real prompts; dense mask embedding: mean) and the image embedding (mean), so the mixture is
per image and per interaction.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..preference import PreferenceMixture

MIN_STD = 1e-3


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, n_layers: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (n_layers - 1)
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


def interaction_vector(
    sparse: torch.Tensor, sparse_valid: torch.Tensor, dense: torch.Tensor, image_embedding: torch.Tensor
) -> torch.Tensor:
    """(B, T, C) tokens with (B, T) validity, (B, C, e, e) dense and image embeddings → (B, 4C)."""
    valid = sparse_valid.unsqueeze(-1).to(sparse.dtype)
    count = valid.sum(1).clamp_min(1.0)
    mean_tokens = (sparse * valid).sum(1) / count
    max_tokens = sparse.masked_fill(valid == 0, float("-inf")).amax(1)
    max_tokens = torch.where(torch.isfinite(max_tokens), max_tokens, torch.zeros_like(max_tokens))
    return torch.cat([mean_tokens, max_tokens, dense.mean((-2, -1)), image_embedding.mean((-2, -1))], dim=-1)


class PreferenceGenerator(nn.Module):
    """Predicts p_t(z) = Σ_k π_k N(μ_k, σ_k²) from the interaction so far and the previous weights."""

    def __init__(
        self, n_components: int, latent_dim: int, embed_dim: int = 256, hidden_dim: int = 256, n_layers: int = 6
    ):
        super().__init__()
        self.n_components = n_components
        self.latent_dim = latent_dim
        in_dim = 4 * embed_dim
        self.input_norm = nn.LayerNorm(in_dim)
        self.mu_sigma = _mlp(in_dim, hidden_dim, 2 * n_components * latent_dim, n_layers)
        self.pi = _mlp(in_dim + n_components, hidden_dim, n_components, n_layers)
        last = self.mu_sigma[-1]
        nn.init.normal_(last.weight, std=1e-3)
        with torch.no_grad():
            # Distinct component means from the start (breaks the symmetry the E-step needs broken),
            # unit standard deviations (softplus(0.5413) = 1).
            mean_bias = torch.randn(n_components, latent_dim) * 1.0
            std_bias = torch.full((n_components, latent_dim), 0.5413)
            last.bias.copy_(torch.cat([mean_bias, std_bias], dim=-1).reshape(-1))
        nn.init.zeros_(self.pi[-1].weight)
        nn.init.zeros_(self.pi[-1].bias)

    def forward(self, interaction: torch.Tensor, previous_weights: torch.Tensor) -> PreferenceMixture:
        """interaction (B, 4C), previous_weights (B, K_g) → the batch's mixtures."""
        features = self.input_norm(interaction)
        raw = self.mu_sigma(features).reshape(-1, self.n_components, 2 * self.latent_dim)
        means, std_raw = raw[..., : self.latent_dim], raw[..., self.latent_dim :]
        stds = F.softplus(std_raw) + MIN_STD
        log_prev = torch.log(previous_weights.clamp_min(1e-6))
        delta = self.pi(torch.cat([features, log_prev], dim=-1))
        weights = torch.softmax(log_prev + delta, dim=-1)
        return PreferenceMixture(weights=weights, means=means, stds=stds)
