"""One background thread for every model call, and an in-memory cache of slice embeddings.

    worker = ModelWorker()
    lookup = EmbeddingLookup(model, capacity=16)
    future = worker.submit(session.choose, 2)         # user work: runs before pending prefetches
    lookup.prefetch_around(worker, slice_at, index, n_slices, radius=2)
    round_ = future.result()
    worker.shutdown()

All model work runs on the same persistent thread, so torch's per-thread state (grad mode, cuDNN
handles and caches) is made once. User jobs always run before queued prefetches; prefetches are
de-duplicated by key. Pure Python: no Qt, no slicer; a front end polls or chains the Futures.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import numpy as np
import torch

from .errors import InputError
from .session import encode_image, image_fingerprint

if TYPE_CHECKING:
    from .model.spa import SPAModel

T = TypeVar("T")
log = logging.getLogger(__name__)


class WorkerClosedError(RuntimeError):
    """Work was handed to a ModelWorker after its shutdown."""


class ModelWorker:
    """ONE persistent daemon thread that runs all model calls, user jobs before prefetches."""

    def __init__(self, name: str = "SPA model worker") -> None:
        self.name = name
        self._condition = threading.Condition()
        self._jobs: deque[tuple[concurrent.futures.Future, Callable[..., Any], tuple, dict]] = deque()
        self._prefetches: deque[tuple[str, Callable[[], Any]]] = deque()
        self._prefetch_keys: set[str] = set()  # queued or running
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ----- handing work over ---------------------------------------------------------------------
    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "concurrent.futures.Future[T]":
        """Queue user work ahead of every pending prefetch; its result or exception comes via the Future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._condition:
            if self._closed:
                raise WorkerClosedError(f"{self.name} is shut down; create a new ModelWorker to run more model work")
            self._jobs.append((future, fn, args, kwargs))
            self._condition.notify_all()
        return future

    def prefetch(self, key: str, fn: Callable[[], T]) -> bool:
        """Queue low-priority work under ``key``; dropped (False) if that key is queued or running, or after shutdown."""
        with self._condition:
            if self._closed or key in self._prefetch_keys:
                return False
            self._prefetch_keys.add(key)
            self._prefetches.append((key, fn))
            self._condition.notify_all()
        return True

    def cancel_prefetches(self) -> int:
        """Drop every prefetch that has not started (e.g. the user moved to another volume); returns how many."""
        with self._condition:
            dropped = len(self._prefetches)
            for key, _ in self._prefetches:
                self._prefetch_keys.discard(key)
            self._prefetches.clear()
        return dropped

    # ----- state ---------------------------------------------------------------------------------
    @property
    def thread_id(self) -> int | None:
        """The identifier of the worker thread (threading.get_ident() inside a job)."""
        return self._thread.ident

    def on_worker_thread(self) -> bool:
        """Whether the caller is the worker thread itself."""
        return threading.get_ident() == self._thread.ident

    def is_queued(self, key: str) -> bool:
        """Whether a prefetch with ``key`` is waiting or running."""
        with self._condition:
            return key in self._prefetch_keys

    def pending(self) -> tuple[int, int]:
        """(user jobs, prefetches) waiting to run."""
        with self._condition:
            return len(self._jobs), len(self._prefetches)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running (True), or the timeout passes (False)."""
        if self.on_worker_thread():
            raise RuntimeError("wait_idle() called on the worker thread would wait for itself")
        with self._condition:
            return self._condition.wait_for(lambda: not (self._jobs or self._prefetches or self._busy), timeout)

    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stop taking work; pending user jobs still run (or are cancelled), prefetches are dropped."""
        with self._condition:
            self._closed = True
            if cancel_pending:
                while self._jobs:
                    self._jobs.popleft()[0].cancel()
            for key, _ in self._prefetches:
                self._prefetch_keys.discard(key)
            self._prefetches.clear()
            self._condition.notify_all()
        if wait and not self.on_worker_thread():
            self._thread.join()

    # ----- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._condition:
                self._busy = False
                self._condition.notify_all()
                self._condition.wait_for(lambda: self._jobs or self._prefetches or self._closed)
                if self._jobs:
                    job, prefetch = self._jobs.popleft(), None
                elif self._prefetches:
                    job, prefetch = None, self._prefetches.popleft()
                else:
                    return  # closed and drained
                self._busy = True
            if job is not None:
                self._run_job(*job)
            else:
                self._run_prefetch(*prefetch)

    @staticmethod
    def _run_job(future: concurrent.futures.Future, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - every failure belongs to the caller's Future
            future.set_exception(exc)
        else:
            future.set_result(result)

    def _run_prefetch(self, key: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - a failed prefetch is only a missed speed-up
            log.warning("prefetch %s failed", key, exc_info=True)
        finally:
            with self._condition:
                self._prefetch_keys.discard(key)


class EmbeddingLookup:
    """In-memory LRU of image embeddings keyed by (image fingerprint, window); thread-safe."""

    def __init__(self, model: "SPAModel", capacity: int = 16) -> None:
        if isinstance(capacity, bool) or int(capacity) < 1:
            raise InputError(f"the embedding cache needs room for at least one slice, got capacity {capacity!r}")
        self.model = model
        self.capacity = int(capacity)
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, tuple[float, float] | None], torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(image: np.ndarray, window: tuple[float, float] | None = None) -> tuple[str, tuple[float, float] | None]:
        """The cache key of an image shown through ``window``."""
        return image_fingerprint(image), None if window is None else (float(window[0]), float(window[1]))

    def get(self, image: np.ndarray, window: tuple[float, float] | None = None) -> torch.Tensor:
        """The embedding (1, C, e, e) of ``image``: cached, or encoded now (call on the worker thread)."""
        key = self.key(image, window)
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return cached
        embedding, _ = encode_image(self.model, image, window)
        with self._lock:
            self.misses += 1
            self._store(key, embedding)
            return self._entries[key]

    def put(self, image: np.ndarray, embedding: torch.Tensor, window: tuple[float, float] | None = None) -> None:
        """Store an embedding computed elsewhere (e.g. by a Session)."""
        with self._lock:
            self._store(self.key(image, window), embedding)

    def contains(self, image: np.ndarray, window: tuple[float, float] | None = None) -> bool:
        """Whether ``image`` is cached (does not change its recency)."""
        key = self.key(image, window)
        with self._lock:
            return key in self._entries

    def clear(self) -> None:
        """Forget every embedding (e.g. another model was loaded)."""
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
        window: tuple[float, float] | None = None,
    ) -> list[int]:
        """Queue the slices within ``radius`` of ``index`` (itself first, then nearest first); returns those queued.

        The images are read here, on the caller's thread, so the worker never touches the source.
        """
        if radius < 0:
            raise InputError(f"the prefetch radius must be >= 0 slices, got {radius}")
        get = (lambda i: slices[i]) if isinstance(slices, np.ndarray) else slices
        queued = []
        for i in neighbour_order(index, n_slices, radius):
            image = np.array(get(i), copy=True)
            key = self.key(image, window)
            if self.contains(image, window):
                continue
            if worker.prefetch(f"embedding:{id(self)}:{key[0]}:{key[1]}", self._prefetch_job(image, window)):
                queued.append(i)
        return queued

    def _prefetch_job(self, image: np.ndarray, window: tuple[float, float] | None) -> Callable[[], None]:
        def job() -> None:
            if not self.contains(image, window):
                self.get(image, window)

        return job

    def _store(self, key: tuple[str, tuple[float, float] | None], embedding: torch.Tensor) -> None:
        if key not in self._entries:  # a concurrent miss may have stored it already: keep the first
            self._entries[key] = embedding
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


def neighbour_order(index: int, n_slices: int, radius: int) -> list[int]:
    """Slice indices within ``radius`` of ``index`` inside 0..n_slices-1: index, +1, -1, +2, -2, …"""
    order = [index] if 0 <= index < n_slices else []
    for distance in range(1, radius + 1):
        for i in (index + distance, index - distance):
            if 0 <= i < n_slices:
                order.append(i)
    return order
