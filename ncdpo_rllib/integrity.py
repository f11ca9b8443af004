"""Checksum manifests: what a written directory held, so that a damaged file is named when it is read.

Checkpoints (``experiment/checkpoints.py``), pre-trained checkpoints and datasets (``data``) write
``ncdpo_manifest.json`` (the SHA-256 of every other file under the directory) as their last file
before the directory is renamed into place; readers call :func:`manifest_problem` first. A
directory written before manifests existed (or by another tool) has none and is not checked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

MANIFEST = "ncdpo_manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(root: Path) -> None:
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {p.relative_to(root).as_posix(): sha256(p) for p in files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


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
