"""Stage timing from the outside: code labels its stages, a :class:`StageClock` (when one is active) times them.

    with StageClock(device) as clock:        # e.g. in `spa bench`
        run_model_round(...)                 # the engine marks its stages with `with stage("kmeans"):`
    clock.seconds                            # {"generator": 0.01, ..., "kmeans": 0.02}

Without an active clock, ``stage`` does nothing but one context-variable lookup.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_active: ContextVar[StageClock | None] = ContextVar("spa_stage_clock", default=None)


class StageClock:
    """Adds up the seconds spent in each labelled stage while it is active (CUDA work synchronised)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self._token = None

    def __enter__(self) -> StageClock:
        self._token = _active.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _active.reset(self._token)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def add(self, name: str, seconds: float) -> None:
        """Count ``seconds`` towards stage ``name``."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Label the enclosed work as stage ``name`` for the active StageClock, if any."""
    clock = _active.get()
    if clock is None:
        yield
        return
    clock._sync()
    began = time.perf_counter()
    try:
        yield
    finally:
        clock._sync()
        clock.add(name, time.perf_counter() - began)
