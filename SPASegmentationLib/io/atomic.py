"""Atomic file writes: a crash or a full disk never leaves a half-written file behind.

Files get the permissions any new file of the user gets (0666 less the umask), not ``mkstemp``'s 0600, so
results and a team's shared profile folder are readable by others as the user intends. A writer killed
between creating its temporary file and renaming it leaves ``.<name>.spa-<pid>-<random>.tmp``; the next
write of the same file removes such leftovers of processes that no longer run (or older than a day).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STALE_AFTER_S = 24 * 3600.0  # a temporary file this old is a leftover even if its pid runs again


def _umask() -> int:
    """The process's umask (read without changing it where Linux tells it, else by a set-and-restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the leftovers of killed writers of ``path`` (never one of a running process, unless a day old)."""
    pattern = re.compile(re.escape(f".{path.name}.spa-") + r"(\d+)-.*\.tmp.*")
    removed = []
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    now = time.time()
    for candidate in candidates:
        match = pattern.fullmatch(candidate.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            stale = not _alive(int(match.group(1))) or now - candidate.stat().st_mtime > STALE_AFTER_S
            if stale:
                candidate.unlink()
                removed.append(candidate)
        except OSError:
            continue  # another writer cleaned it up first, or it is not ours to remove
    return removed


@contextmanager
def atomic_target(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file beside ``path`` to write to; on success it is synced, given the user's usual permissions
    and renamed to ``path``.

    On any failure the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.spa-{os.getpid()}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
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
