"""The SPA model: a SAM-family backbone + preference generator + preference conditioning.

Everything here works in the model frame (pixel indices of the S × S model input, (x, y) order) on
torch tensors, except :meth:`SPAModel.encode`, which takes an image and gives its embedding and the
geometry that maps image pixels to the model frame (as ``SamPredictor.set_image`` does). Building
and loading models is :mod:`.build`; one round of sampling is :mod:`SPASegmentationLib.engine`.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..enums import TextEnum
from ..errors import CheckpointError, InputError
from ..fingerprints import tensor_fingerprint
from ..preference import DEFAULT_COMPONENTS, DEFAULT_LATENT_DIM, PreferenceMixture, SamplingMode
from .backbone import Backbone, BackboneName
from .conditioning import Conditioning, build_conditioning
from .generator import PreferenceGenerator, interaction_vector
from .preprocess import ImageGeometry, prepare_image, validate_image

WEIGHTS_FORMAT = "spa-weights"
WEIGHTS_VERSION = 1

# Token types of the sparse prompt (SAM's point_embeddings order); PAD is SAM's "not a point".
PAD, NEGATIVE, POSITIVE, BOX_CORNER_1, BOX_CORNER_2 = -1, 0, 1, 2, 3


LATER_SWITCHES = ("feedback_mask", "carry_mixture")  # SPAConfig fields newer than the first shipped weights


@dataclass
class SPAConfig:
    """Everything that fixes the SPA model's architecture and its inference semantics."""

    backbone: BackboneName = BackboneName.LITEMEDSAM
    conditioning: Conditioning = Conditioning.TOKEN  # token (default, fast) or concat (the paper's)
    n_components: int = DEFAULT_COMPONENTS
    latent_dim: int = DEFAULT_LATENT_DIM
    hidden_dim: int = 256
    generator_layers: int = 6
    sampling: SamplingMode = SamplingMode.MIXTURE  # mixture (paper) or moment_matched (official code)
    recommend_threshold: float = 0.5  # on the mean probability; the official code's 0.5 on the mean logit ≈ 0.62
    mask_prompt_logit: float = 4.0  # a candidate given back as mask prompt: ±this logit inside/outside
    # Ablation switches (the paper's Table 3), on in the shipped model: the chosen candidate goes back to the decoder
    # as a mask prompt; the generator receives the previous round's mixture weights (off: the initial ones each round)
    feedback_mask: bool = True
    carry_mixture: bool = True
    vit_spec: dict | None = None  # ViT shape for SAM/MedSAM backbones other than ViT-B (tests)

    def __post_init__(self) -> None:
        self.backbone = BackboneName.parse(self.backbone, "backbone", error=CheckpointError)
        self.conditioning = Conditioning.parse(self.conditioning, "conditioning", error=CheckpointError)
        self.sampling = SamplingMode.parse(self.sampling, "sampling mode", error=CheckpointError)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (enums as their words), as weights files store it."""
        payload = asdict(self)
        for key in ("backbone", "conditioning", "sampling"):
            payload[key] = payload[key].value
        return payload

    def identity(self) -> dict[str, Any]:
        """What a model's fingerprint says of its config: :meth:`to_dict` without the switches added after models
        were shipped, where they keep their defaults (so a model's fingerprint, and its users' profiles, survive
        the upgrade)."""
        payload = self.to_dict()
        for key in LATER_SWITCHES:
            if payload[key] == getattr(SPAConfig, key):
                del payload[key]
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> SPAConfig:
        """The config a weights file stores; unknown keys are refused (they would be silently ignored)."""
        if not isinstance(payload, dict):
            raise CheckpointError(f"the model config must be a mapping, got {type(payload).__name__}")
        unknown = sorted(set(payload) - {f.name for f in fields(cls)})
        if unknown:
            raise CheckpointError(
                f"the model config has unknown keys {unknown}; the weights were written by another SPA "
                "version: load them with that version or retrain"
            )
        return cls(**payload)


@dataclass
class Prompt:
    """One image's prompts in the model frame: points with labels, an optional box, an optional mask.

    mask: (m, m) float logits at the decoder's low resolution, or None.
    """

    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    mask: torch.Tensor | None = None

    def with_feedback(self, point: tuple[float, float] | None, label: bool, mask: torch.Tensor | None) -> Prompt:
        points, labels = list(self.points), list(self.labels)
        if point is not None:
            points.append(point)
            labels.append(label)
        return Prompt(points, labels, self.box, mask)


class RoundPrecision(TextEnum):
    """The arithmetic of a session's round: float32, or half precision under autocast (GPU rounds)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class SPAModel(nn.Module):
    """Backbone + Preference Distribution Generator + preference conditioning."""

    def __init__(self, config: SPAConfig, backbone: Backbone):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.generator = PreferenceGenerator(
            config.n_components, config.latent_dim, hidden_dim=config.hidden_dim, n_layers=config.generator_layers
        )
        self.conditioning = build_conditioning(config.conditioning, config.latent_dim)
        self.training_info: dict[str, Any] = {}
        self._fingerprint: str | None = None
        self.round_precision = RoundPrecision.FLOAT32  # how sessions' rounds compute; see use_round_precision

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def use_round_precision(self, precision: RoundPrecision | str) -> RoundPrecision:
        """Compute sessions' rounds (prompt encoding, mixture, decoding of the N samples) under autocast in
        ``precision``: float16 on a CUDA GPU only, bfloat16 where the device has it; training is unaffected.
        Aggregation and clustering stay float32."""
        chosen = RoundPrecision.parse(precision, "round precision")
        if chosen is RoundPrecision.FLOAT16 and self.device.type != "cuda":
            raise InputError(f"float16 rounds need a CUDA GPU (the model is on {self.device}); use bfloat16 or float32")
        self.round_precision = chosen
        return chosen

    def round_autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of :attr:`round_precision` (none for float32)."""
        if self.round_precision is RoundPrecision.FLOAT32:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.round_precision is RoundPrecision.FLOAT16 else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    # ----- images --------------------------------------------------------------------------------
    def geometry_of(self, image: np.ndarray) -> ImageGeometry:
        """How ``image`` (validated) sits in this model's input."""
        validate_image(image)
        return ImageGeometry(image.shape[0], image.shape[1], self.backbone.image_size)

    @torch.no_grad()
    def encode(
        self, image: np.ndarray, window: tuple[float, float] | None = None, bulk: bool = False
    ) -> tuple[torch.Tensor, ImageGeometry]:
        """Image → (embedding (1, C, e, e) on this model's device, geometry). Cache it to skip re-encoding.

        ``bulk``: a propagation's slice, encoded on the propagation's runtime (Backbone.use_encoder_runtime)."""
        tensor, geometry = prepare_image(image, self.backbone.image_size, window=window)
        return self.backbone.encode(tensor.to(self.device), bulk=bulk), geometry

    # ----- prompts -------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts → (sparse tokens (B, T, C), token validity (B, T), dense embedding (B, C, e, e)).

        Points and box corners are embedded the way SAM's prompt encoder does (coordinates shifted to
        pixel centres, positional encoding plus a learned type embedding); a prompt without a box gets
        SAM's "not a point" padding token, and shorter prompts are padded with it.
        """
        encoder = self.backbone.prompt_encoder
        device = self.device
        rows_coords, rows_types = [], []
        for prompt in prompts:
            coords = [list(p) for p in prompt.points]
            types = [POSITIVE if label else NEGATIVE for label in prompt.labels]
            if prompt.box is not None:
                x0, y0, x1, y1 = prompt.box
                coords += [[x0, y0], [x1, y1]]
                types += [BOX_CORNER_1, BOX_CORNER_2]
            else:
                coords.append([0.0, 0.0])
                types.append(PAD)
            rows_coords.append(coords)
            rows_types.append(types)
        length = max(len(t) for t in rows_types)
        coords = torch.zeros(len(prompts), length, 2)
        types = torch.full((len(prompts), length), PAD, dtype=torch.long)
        for i, (c, t) in enumerate(zip(rows_coords, rows_types, strict=True)):
            coords[i, : len(c)] = torch.tensor(c, dtype=torch.float32)
            types[i, : len(t)] = torch.tensor(t)
        coords, types = coords.to(device), types.to(device)
        side = self.backbone.image_size
        embedding = encoder.pe_layer.forward_with_coords(coords + 0.5, (side, side))
        embedding = torch.where((types == PAD).unsqueeze(-1), torch.zeros_like(embedding), embedding)
        embedding = embedding + torch.where(
            (types == PAD).unsqueeze(-1), encoder.not_a_point_embed.weight, torch.zeros_like(embedding)
        )
        for kind in (NEGATIVE, POSITIVE, BOX_CORNER_1, BOX_CORNER_2):
            embedding = embedding + (types == kind).unsqueeze(-1) * encoder.point_embeddings[kind].weight
        valid = types != PAD

        e = self.backbone.embedding_size
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(len(prompts), -1, e, e)
        has_mask = [p.mask is not None for p in prompts]
        if any(has_mask):
            m = self.backbone.mask_size
            masks = torch.stack(
                [p.mask.to(device) if p.mask is not None else torch.zeros(m, m, device=device) for p in prompts]
            ).unsqueeze(1)
            mask_embedding = encoder.mask_downscaling(masks)
            chosen = torch.tensor(has_mask, device=device).reshape(-1, 1, 1, 1)
            dense = torch.where(chosen, mask_embedding, no_mask)
        else:
            dense = no_mask
        return embedding, valid, dense

    # ----- one round ------------------------------------------------------------------------------
    def mixture(
        self,
        image_embedding: torch.Tensor,
        sparse: torch.Tensor,
        valid: torch.Tensor,
        dense: torch.Tensor,
        previous_weights: torch.Tensor,
    ) -> PreferenceMixture:
        """The preference distribution for this round, per image of the batch."""
        vector = interaction_vector(sparse, valid, dense, image_embedding)
        return self.generator(vector, previous_weights)

    def sample_logits(
        self,
        image_embedding: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        z: torch.Tensor,
        trainable_transformer: bool = True,
    ) -> torch.Tensor:
        """N preference-conditioned mask logits per image: z (B, N, D) → (B, N, m, m)."""
        image_pe = self.backbone.prompt_encoder.get_dense_pe()
        return self.conditioning(
            self.backbone.mask_decoder, image_embedding, image_pe, sparse, dense, z, trainable_transformer
        )

    def plain_logits(self, image_embedding: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        """The backbone's own single prediction for each prompt (no preference) on one image: (B, m, m). Runs in the
        caller's grad mode (the click baseline trains through it)."""
        sparse, _, dense = self.encode_prompts(prompts)
        low_res, _ = self.backbone.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self.backbone.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return low_res[:, 0]

    # ----- weights --------------------------------------------------------------------------------
    def spa_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights SPA owns: generator, conditioning, and the decoder parts training changes."""
        state = {}
        for name, tensor in self.state_dict().items():
            if name.startswith(("generator.", "conditioning.") + TRAINED_DECODER_PREFIXES + DEEP_DECODER_PREFIXES):
                state[name] = tensor
        return state

    def fingerprint(self) -> str:
        """Identifies this exact model (architecture, backbone checkpoint, SPA weights)."""
        if self._fingerprint is None:
            description = {"config": self.config.identity(), "backbone_sha256": self.backbone.info.checkpoint_sha256}
            self._fingerprint = tensor_fingerprint(self.spa_state_dict(), description)
        return self._fingerprint

    def invalidate_fingerprint(self) -> None:
        self._fingerprint = None

    def save(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        """Write the SPA weights (not the backbone's) atomically, as float16 to keep the file small."""
        from ..io.atomic import write_bytes_atomic

        # Round this model's own weights to what the file holds, so that it behaves, and is
        # fingerprinted, exactly like the model that will be loaded from the file.
        with torch.no_grad():
            for tensor in self.spa_state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.half().float())
        self.invalidate_fingerprint()
        payload = {
            "format": WEIGHTS_FORMAT,
            "format_version": WEIGHTS_VERSION,
            "config": self.config.to_dict(),
            "backbone": {
                "name": self.backbone.info.name,
                "checkpoint_sha256": self.backbone.info.checkpoint_sha256,
            },
            "state_dict": {k: v.detach().cpu().half() for k, v in self.spa_state_dict().items()},
            "training": self.training_info,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        write_bytes_atomic(path, buffer.getvalue())


# Backbone parts that SPA training updates: the decoder's upscaling and mask head in every round;
# the decoder transformer and the prompt encoder only through the first round(s) (TrainConfig).
TRAINED_DECODER_PREFIXES = (
    "backbone.mask_decoder.output_upscaling.",
    "backbone.mask_decoder.output_hypernetworks_mlps.0.",
)
DEEP_DECODER_PREFIXES = ("backbone.mask_decoder.transformer.", "backbone.prompt_encoder.")
