"""Atomic file writes: a crash or a full disk never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_target(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file beside ``path`` to write to; on success it is synced and renamed to ``path``.

    On any failure the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented UTF-8 JSON, atomically."""
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))
