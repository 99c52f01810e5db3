"""Image embeddings cached on disk, so training and evaluation encode each image once."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from ..jsonio import write_bytes_atomic
from .preprocess import ImageGeometry
from .spa import SPAModel


class EmbeddingCache:
    """Image embeddings on disk, keyed by backbone checkpoint and image content."""

    def __init__(self, folder: Path, model: SPAModel):
        self.folder = Path(folder)
        self.model = model
        self.backbone_key = model.backbone.info.checkpoint_sha256[:12] or model.backbone.info.name

    def get(self, image: np.ndarray) -> tuple[torch.Tensor, ImageGeometry]:
        """The embedding (1, C, e, e) and geometry of ``image``, computed once and then read from disk."""
        from ..session import image_fingerprint

        path = self.folder / self.backbone_key / f"{image_fingerprint(image)}.pt"
        if path.is_file():
            payload = torch.load(path, map_location="cpu", weights_only=True)
            geometry = ImageGeometry(*payload["geometry"])
            return payload["embedding"].float(), geometry
        from ..session import encode_image

        embedding, geometry = encode_image(self.model, image)
        buffer = io.BytesIO()
        torch.save({"embedding": embedding.cpu().half(),
                    "geometry": [geometry.height, geometry.width, geometry.model_size]}, buffer)
        write_bytes_atomic(path, buffer.getvalue())
        return embedding.cpu(), geometry
