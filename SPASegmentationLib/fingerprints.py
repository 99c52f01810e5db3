"""Content fingerprints: 16 hex digits of sha256 that name an image or a set of weights."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch


def image_fingerprint(image: np.ndarray) -> str:
    """An image's shape, dtype and pixels."""
    digest = hashlib.sha256(f"{image.shape}|{image.dtype}".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()[:16]


def tensor_fingerprint(tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> str:
    """Named tensors (as float32) and a JSON-able description."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]
