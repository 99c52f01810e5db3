"""One background thread for every model call.

    worker = ModelWorker()
    embeddings = EmbeddingCache(model, capacity=16)   # SPASegmentationLib.embeddings
    future = worker.submit(session.choose, 2)         # user work: runs before pending prefetches
    embeddings.prefetch_around(worker, slice_at, index, n_slices, radius=2)
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
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

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
    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Queue user work ahead of every pending prefetch; its result or exception comes via the Future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._condition:
            if self._closed:
                raise WorkerClosedError(f"{self.name} is shut down; create a new ModelWorker to run more model work")
            self._jobs.append((future, fn, args, kwargs))
            self._condition.notify_all()
        return future

    def prefetch(self, key: str, fn: Callable[[], T]) -> bool:
        """Queue low-priority work under ``key``; dropped (False) if that key is queued or running, or after
        shutdown."""
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


def neighbour_order(index: int, n_slices: int, radius: int) -> list[int]:
    """Slice indices within ``radius`` of ``index`` inside 0..n_slices-1: index, +1, -1, +2, -2, …"""
    order = [index] if 0 <= index < n_slices else []
    for distance in range(1, radius + 1):
        for i in (index + distance, index - distance):
            if 0 <= i < n_slices:
                order.append(i)
    return order
