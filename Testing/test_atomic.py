"""Atomic writes: the user's usual file permissions, and leftovers of killed writers cleaned up on the next write."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from SPASegmentationLib.io.atomic import STALE_AFTER_S, write_bytes_atomic


def dead_pid() -> int:
    """The pid of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_files_get_the_users_usual_permissions(tmp_path: Path) -> None:
    code = (
        "import os, sys; from SPASegmentationLib.io.atomic import write_bytes_atomic; "
        "os.umask(int(sys.argv[2], 8)); write_bytes_atomic(sys.argv[1], b'x')"
    )
    for umask, mode in (("022", 0o644), ("002", 0o664), ("077", 0o600)):
        target = tmp_path / f"out_{umask}.json"
        subprocess.run([sys.executable, "-c", code, str(target), umask], check=True)
        assert target.stat().st_mode & 0o777 == mode, umask


def test_leftovers_of_killed_writers_go_on_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "profile.json"
    orphan = tmp_path / f".profile.json.spa-{dead_pid()}-abc123.tmp"
    orphan.write_bytes(b"half a profile")
    running = tmp_path / f".profile.json.spa-{os.getppid()}-def456.tmp"  # a live writer's: kept
    running.write_bytes(b"being written")
    ancient = tmp_path / f".profile.json.spa-{os.getppid()}-ghi789.tmp"  # a day old: a leftover whatever the pid
    ancient.write_bytes(b"old")
    old = time.time() - STALE_AFTER_S - 60
    os.utime(ancient, (old, old))
    other = tmp_path / f".other.json.spa-{dead_pid()}-jkl012.tmp"  # another file's: not this write's business
    other.write_bytes(b"other")
    image_orphan = tmp_path / f".profile.json.spa-{dead_pid()}-mno345.tmp.nii.gz"
    image_orphan.write_bytes(b"image")

    write_bytes_atomic(target, b"{}")
    assert target.read_bytes() == b"{}"
    assert not orphan.exists() and not ancient.exists() and not image_orphan.exists()
    assert running.exists() and other.exists()
