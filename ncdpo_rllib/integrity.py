"""What was written is what is read: checksum manifests, and writes that fail for lack of space.

Checkpoints (``experiment/checkpoints.py``), pre-trained checkpoints and datasets (``data``) write
``ncdpo_manifest.json`` (the SHA-256 of every other file under the directory) as their last file
before the directory is renamed into place; readers call :func:`manifest_problem` first. A
directory written before manifests existed (or by another tool) has none and is not checked.

Writers build a directory under a temporary name and rename it into place, so a write that fails
(:func:`out_of_space`) leaves the previous version untouched; they then raise one line
(:func:`no_space_message`) naming the path, the space needed and the space free.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

MANIFEST = "ncdpo_manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: str | bytes, mode: int = 0o666) -> None:
    """Write a file (text or bytes) under ``.<name>.tmp`` and rename it into place: a reader sees the
    old file or the new one, never half of one (a failed write removes the temporary file). ``mode``
    (before the umask) applies from creation: 0o600 leaves no moment where a secret is readable by others."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode),
                       "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_manifest(root: Path) -> None:
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (MANIFEST, f".{MANIFEST}.tmp"))
    manifest = {p.relative_to(root).as_posix(): sha256(p) for p in files}
    write_atomic(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def manifest_problem(root: Path) -> Optional[str]:
    """What is wrong with a directory by its manifest ("incomplete: ... missing", "corrupt: ...
    differs ..."), or None (intact, or no manifest to check against)."""
    manifest = Path(root) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        expected = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"corrupt: {MANIFEST} is unreadable"
    if not isinstance(expected, dict):
        return f"corrupt: {MANIFEST} is unreadable"
    for rel, digest in expected.items():
        path = Path(root) / rel
        if not path.is_file():
            return f"incomplete: {rel} missing"
        if sha256(path) != digest:
            return f"corrupt: {rel} differs from the checksum written with it (truncated or altered)"
    return None


NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "file too large", "database or disk is full")


def out_of_space(e: BaseException) -> bool:
    """Whether an exception (or one it was raised from) says a write failed for lack of space:
    ENOSPC / EDQUOT / EFBIG, or the same in the message of a library that wraps it (h5py, sqlite)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            return True
        if any(text in str(e).lower() for text in _NO_SPACE_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def tree_size(path: Path) -> int:
    """Bytes of disk the files under path take (allocated blocks, not lengths; 0 when it does not exist)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return sum(max(p.stat().st_blocks * 512, p.stat().st_size) for p in files)


def no_space_message(what: str, path: Path, needed: int) -> str:
    """'no space left to write <what> <path>: it needs about N MB, M MB free there'."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    return (f"no space left to write {what} {path}: it needs about {needed / 1e6:.1f} MB, "
            f"{free / 1e6:.1f} MB free there")


class NoSpace(Exception):
    """A staged directory could not be written for lack of space; ``written``: bytes it had reached."""

    def __init__(self, written: int):
        super().__init__(f"no space left after {written} bytes")
        self.written = written


@contextlib.contextmanager
def staged(tmp: Path):
    """Build a directory at the temporary path ``tmp`` (the caller renames it into place afterwards).
    Any failure removes it; one for lack of space (:func:`out_of_space`) becomes :class:`NoSpace`."""
    tmp = Path(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
    except Exception as e:
        written = tree_size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if out_of_space(e):
            raise NoSpace(written) from None
        raise
