"""The one cache of image embeddings: an in-memory LRU, optionally backed by a folder on disk.

    cache = EmbeddingCache(model, capacity=16)                     # Slicer: slices of the open volume
    cache = EmbeddingCache(model, folder=Path("output/cache/embeddings"))   # training, evaluation
    embedding = cache.get(image, window=(-160, 240))               # (1, C, e, e) on the model's device

One key for both tiers: (the backbone's checkpoint, the image's content, the intensity window).
Disk entries are stored as float16 to halve their size; an embedding that goes to disk is returned
rounded the same way, so a result never depends on whether the cache was warm. Thread-safe: the
model worker encodes and prefetches while the front end asks.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from .errors import InputError
from .fingerprints import image_fingerprint
from .io.atomic import write_bytes_atomic

if TYPE_CHECKING:
    from .model.spa import SPAModel
    from .worker import ModelWorker

Window = tuple[float, float]


class EmbeddingKey(NamedTuple):
    """What an embedding depends on."""

    backbone: str  # Backbone.embedding_key: the checkpoint (12 hex of its sha256, or its name) and a lossy precision
    image: str  # fingerprints.image_fingerprint
    window: Window | None


class EmbeddingCache:
    """Image embeddings of one model, in memory (LRU of ``capacity``) and, with ``folder``, on disk."""

    def __init__(self, model: SPAModel, capacity: int = 16, folder: Path | None = None) -> None:
        if isinstance(capacity, bool) or int(capacity) < 1:
            raise InputError(f"the embedding cache needs room for at least one slice, got capacity {capacity!r}")
        self.model = model
        self.capacity = int(capacity)
        self.folder = None if folder is None else Path(folder)
        self._lock = threading.Lock()
        self._entries: OrderedDict[EmbeddingKey, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def key(self, image: np.ndarray, window: Window | None = None, bulk: bool = False) -> EmbeddingKey:
        """The cache key of ``image`` shown through ``window`` (``bulk``: as a propagation encodes it)."""
        window = None if window is None else (float(window[0]), float(window[1]))
        return EmbeddingKey(self.model.backbone.embedding_key(bulk), image_fingerprint(image), window)

    def get(self, image: np.ndarray, window: Window | None = None, bulk: bool = False) -> torch.Tensor:
        """The embedding (1, C, e, e) of ``image``: from memory, from disk, or encoded now (worker thread);
        ``bulk``: a propagation's slice, on the propagation's encoder (and cached under its key)."""
        key = self.key(image, window, bulk)
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return cached
        embedding = self._read_disk(key)
        if embedding is None:
            embedding, _ = self.model.encode(image, window, bulk=bulk)
            if self.folder is not None:
                embedding = self._write_disk(key, embedding)
            with self._lock:
                self.misses += 1
        else:
            with self._lock:
                self.hits += 1
        with self._lock:
            self._store(key, embedding.to(self.model.device))
            return self._entries[key]

    def put(self, image: np.ndarray, embedding: torch.Tensor, window: Window | None = None) -> None:
        """Keep an embedding computed elsewhere (memory only)."""
        with self._lock:
            self._store(self.key(image, window), embedding)

    def contains(self, image: np.ndarray, window: Window | None = None) -> bool:
        """Whether ``image`` is in memory (does not change its recency)."""
        key = self.key(image, window)
        with self._lock:
            return key in self._entries

    def clear(self) -> None:
        """Forget every embedding in memory (e.g. another model was loaded); disk entries stay."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def prefetch_around(
        self,
        worker: ModelWorker,
        slices: Callable[[int], np.ndarray] | np.ndarray,
        index: int,
        n_slices: int,
        radius: int = 2,
        window: Window | None = None,
    ) -> list[int]:
        """Queue the slices within ``radius`` of ``index`` (itself first, then nearest first); returns those queued.

        The images are read here, on the caller's thread, so the worker never touches the source.
        """
        from .worker import neighbour_order

        if radius < 0:
            raise InputError(f"the prefetch radius must be >= 0 slices, got {radius}")
        get = (lambda i: slices[i]) if isinstance(slices, np.ndarray) else slices
        queued = []
        for i in neighbour_order(index, n_slices, radius):
            image = np.array(get(i), copy=True)
            key = self.key(image, window)
            if self.contains(image, window):
                continue
            if worker.prefetch(f"embedding:{id(self)}:{key.image}:{key.window}", self._prefetch_job(image, window)):
                queued.append(i)
        return queued

    # ----- internals -----------------------------------------------------------------------------
    def _prefetch_job(self, image: np.ndarray, window: Window | None) -> Callable[[], None]:
        def job() -> None:
            if not self.contains(image, window):
                self.get(image, window)

        return job

    def _store(self, key: EmbeddingKey, embedding: torch.Tensor) -> None:
        if key not in self._entries:  # a concurrent miss may have stored it already: keep the first
            self._entries[key] = embedding
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def _path(self, key: EmbeddingKey) -> Path:
        assert self.folder is not None
        suffix = "" if key.window is None else f"_window_{key.window[0]:g}_{key.window[1]:g}"
        return self.folder / key.backbone / f"{key.image}{suffix}.pt"

    def _read_disk(self, key: EmbeddingKey) -> torch.Tensor | None:
        if self.folder is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)["embedding"].float()

    def _write_disk(self, key: EmbeddingKey, embedding: torch.Tensor) -> torch.Tensor:
        """Store ``embedding`` as float16 and return it as it will be read back."""
        stored = embedding.detach().cpu().half()
        buffer = io.BytesIO()
        torch.save({"embedding": stored}, buffer)
        write_bytes_atomic(self._path(key), buffer.getvalue())
        return stored.float()
