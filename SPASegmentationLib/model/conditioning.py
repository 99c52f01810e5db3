"""Preference conditioning: how a latent z_i turns one prompt into N different masks.

Both designs run the SAM mask decoder's submodules directly (stock ``MaskDecoder.forward`` repeats
one embedding per prompt and cannot take N embeddings):

``concat`` (the paper, §3.3): tile z_i over the embedding grid, concatenate to E (256 + D channels),
three 1×1 convolutions with ReLU → E_i, then one full decoder pass per sample. Implemented as a
residual E_i = E + convs([E; z_i]) with the last convolution zero-initialised, so training starts
from the pretrained decoder; cost grows with N full decoder passes.

``token`` (this project's default): the decoder's two-way transformer and upscaling run ONCE per
round; z_i shifts the output mask token, t_i = t + g(z_i), and each sample's mask is the
hypernetwork's weights for t_i applied to the shared upscaled features. SAM's own multi-mask output
works the same way (different tokens over shared features), so the sample space is rich, and the
per-sample cost is a small MLP plus one 32-channel dot product.
"""

from __future__ import annotations

import torch
from torch import nn

from ..enums import TextEnum


class Conditioning(TextEnum):
    """How a latent z_i turns one prompt into one of N masks (see the module docstring)."""

    TOKEN = "token"  # this project's default: one decoder pass, N shifted mask tokens
    CONCAT = "concat"  # the paper's: [E; z_i] through 1x1 convs, N decoder passes


def decoder_features(
    mask_decoder: nn.Module,
    image_embedding: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    trainable_transformer: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run SAM's decoder up to the mask head.

    image_embedding: (B, C, e, e), one per prompt; sparse: (B, T, C); dense: (B, C, e, e).
    Returns (mask token after the transformer (B, C), upscaled features (B, C/8, 4e, 4e)).
    With ``trainable_transformer=False`` the transformer runs without building a graph (training
    then updates only what comes after it).
    """
    batch = sparse.shape[0]
    output_tokens = torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)
    src = image_embedding + dense
    pos = image_pe.expand(batch, -1, -1, -1)
    channels, height, width = src.shape[1:]
    with torch.set_grad_enabled(trainable_transformer and torch.is_grad_enabled()):
        hs, src_out = mask_decoder.transformer(src, pos, tokens)
    mask_token = hs[:, 1, :]  # the single-mask output token (multimask_output=False in SAM)
    src_out = src_out.transpose(1, 2).reshape(batch, channels, height, width)
    upscaled = mask_decoder.output_upscaling(src_out)
    return mask_token, upscaled


def masks_from_tokens(mask_decoder: nn.Module, tokens: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, C) with shared features (B, c, h, w) → mask logits (B, N, h, w)."""
    weights = mask_decoder.output_hypernetworks_mlps[0](tokens)  # (B, N, c)
    batch, channels, height, width = upscaled.shape
    logits = torch.bmm(weights, upscaled.reshape(batch, channels, height * width))
    return logits.reshape(batch, -1, height, width)


class TokenConditioning(nn.Module):
    """z_i → an offset of the decoder's mask token (zero at initialisation)."""

    def __init__(self, latent_dim: int, token_dim: int = 256, hidden_dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, token_dim),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(
        self,
        mask_decoder: nn.Module,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        z: torch.Tensor,
        trainable_transformer: bool = True,
    ) -> torch.Tensor:
        """One decoder pass for the prompt, N cheap heads: z (B, N, D) → logits (B, N, 4e, 4e)."""
        token, upscaled = decoder_features(
            mask_decoder, image_embedding, image_pe, sparse, dense, trainable_transformer
        )
        tokens = token.unsqueeze(1) + self.net(z)
        return masks_from_tokens(mask_decoder, tokens, upscaled)


class ConcatConditioning(nn.Module):
    """The paper's design: [E; z_i] → three 1×1 convs with ReLU → E_i, one decoder pass per sample."""

    def __init__(self, latent_dim: int, embed_dim: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(embed_dim + latent_dim, embed_dim, kernel_size=1)
        self.conv2 = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)
        self.conv3 = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)
        nn.init.zeros_(self.conv3.weight)
        nn.init.zeros_(self.conv3.bias)
        self.embed_dim = embed_dim

    def condition(self, image_embedding: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """E (B, C, e, e), z (B, N, D) → preference-aware embeddings (B·N, C, e, e)."""
        batch, n_samples, latent_dim = z.shape
        # conv1 is linear in [E; z]: its E part is computed once and its z part added per sample.
        weight_e = self.conv1.weight[:, : self.embed_dim]
        weight_z = self.conv1.weight[:, self.embed_dim :, 0, 0]
        base = nn.functional.conv2d(image_embedding, weight_e, self.conv1.bias)  # (B, C, e, e)
        shift = torch.einsum("bnd,cd->bnc", z, weight_z)  # (B, N, C)
        hidden = torch.relu(base.unsqueeze(1) + shift[..., None, None]).flatten(0, 1)
        hidden = torch.relu(self.conv2(hidden))
        delta = self.conv3(hidden)
        return image_embedding.repeat_interleave(n_samples, dim=0) + delta

    def forward(
        self,
        mask_decoder: nn.Module,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        z: torch.Tensor,
        trainable_transformer: bool = True,
    ) -> torch.Tensor:
        """N full decoder passes: z (B, N, D) → logits (B, N, 4e, 4e)."""
        batch, n_samples = z.shape[:2]
        embeddings = self.condition(image_embedding, z)
        sparse_n = sparse.repeat_interleave(n_samples, dim=0)
        dense_n = dense.repeat_interleave(n_samples, dim=0)
        # Gradients must flow through the transformer to reach the conditioning convolutions.
        token, upscaled = decoder_features(mask_decoder, embeddings, image_pe, sparse_n, dense_n, True)
        logits = masks_from_tokens(mask_decoder, token.unsqueeze(1), upscaled)
        return logits.reshape(batch, n_samples, *logits.shape[-2:])


def build_conditioning(kind: Conditioning | str, latent_dim: int) -> nn.Module:
    """The conditioning module of design ``kind``."""
    kind = Conditioning.parse(kind, "conditioning", error=ValueError)
    return TokenConditioning(latent_dim) if kind is Conditioning.TOKEN else ConcatConditioning(latent_dim)
