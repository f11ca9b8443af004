"""One cross-process lock, for work that several processes on one machine may start at once."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


@contextlib.contextmanager
def exclusive(path: Path):
    """Hold an exclusive ``flock`` on ``path`` for the block: a directory (locked as it is, nothing
    written into it) or a lock file (created if missing, never removed: removing it would let two
    processes hold two different files)."""
    path = Path(path)
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
