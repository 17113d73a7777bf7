"""Advisory file locks (``flock``) between the processes of one machine.

The kernel drops a lock when its holder ends, however it ends (SIGKILL included), so a lock file
nobody holds belongs to no live process.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def try_lock(path: Path) -> int | None:
    """A descriptor holding ``path``'s exclusive lock, or ``None`` when a process holds it or the
    file is gone (also when it was removed and replaced after we opened it)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


def create_locked(path: Path) -> int:
    """Create ``path`` already locked (no other process ever sees it unlocked while we live);
    the descriptor holding its lock. ``path`` must not exist yet."""
    staging = path.with_name(f".{path.name}.new")
    fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.replace(staging, path)
    return fd


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold ``path``'s exclusive lock (created if missing), waiting for the holder if any."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
