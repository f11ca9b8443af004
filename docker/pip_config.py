"""Hand the build machine's pip configuration to an image build, read-only.

    python3 docker/pip_config.py OUT_DIR [--python PY] [--no-local]

Reads what pip on this machine is configured with (``PY -m pip config list``: the config files
and the ``PIP_*`` variables), writes it merged into ``OUT_DIR/pip.conf`` (mode 600: index URLs
may carry credentials) and prints, one per line:

    mount PATH        a local file or directory the configuration names (a CA bundle, a
                      constraints file, a find-links directory, a ``file://`` index); the build
                      mounts it read-only at the same path, so the configuration needs no rewrite
    torch-wheel PATH  a CPU wheel of the pinned torch in a find-links directory

``--no-local`` drops every local path from the configuration instead (docker's builder cannot
mount host paths) and names them in one warning on stderr; what is left are the network indexes. Nothing here is project code: standard
library only, so it runs before the project is installed. docker/build.sh calls it.
"""

from __future__ import annotations

import argparse
import configparser
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

TORCH_WHEEL = re.compile(r"torch-2\.13\.0\+cpu-.*\.whl$")
# Options whose values are paths or URLs, some of them local.
PATHLIKE = {"cert", "client-cert", "constraint", "build-constraint", "find-links", "index-url",
            "extra-index-url", "requirement"}


def read_config(python: str) -> dict[str, dict[str, str]]:
    """{section: {key: value}} with pip's precedence: environment over files."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True,
                         check=True).stdout
    sections: dict[str, dict[str, str]] = {}
    env: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"^([^=]+?)\.([^.=]+)='(.*)'$", line)
        if not m:
            continue
        section, key, value = m.groups()
        if section == ":env:":
            if key != "config-file":  # PIP_CONFIG_FILE names a file whose values are listed already
                env[key] = value
        else:
            sections.setdefault(section, {})[key] = value
    glob = sections.setdefault("global", {})
    for key, value in env.items():  # PIP_X overrides x in every section, as in pip
        glob[key] = value
        for sec in sections.values():
            if key in sec:
                sec[key] = value
    return sections


def local_path(token: str) -> Path | None:
    """The local file or directory a config token names, or None for a network URL / a word."""
    if token.startswith("file:"):
        path = Path(unquote(urlparse(token).path))
        # A PEP 503 index at .../simple links to its files relatively (../../files/...): mount
        # the repository root above it.
        return path.parent if path.name == "simple" else path
    if os.path.isabs(token) and os.path.exists(token):
        return Path(token)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--python", default=sys.executable, help="whose pip configuration to read")
    p.add_argument("--no-local", action="store_true", help="drop local paths instead of listing them")
    args = p.parse_args(argv)

    sections = read_config(args.python)
    mounts: list[Path] = []
    wheels: list[Path] = []
    dropped: list[str] = []
    for sec in sections.values():
        for key in list(sec):
            if key not in PATHLIKE:
                continue
            kept = []
            for token in sec[key].split():
                path = local_path(token)
                if path is None:
                    kept.append(token)
                    continue
                if args.no_local:
                    dropped.append(str(path))
                    continue
                kept.append(token)
                if path not in mounts:
                    mounts.append(path)
                if key == "find-links" and path.is_dir():
                    wheels += [w for w in sorted(path.iterdir()) if TORCH_WHEEL.search(w.name)]
            if kept:
                sec[key] = " ".join(kept)
            else:
                del sec[key]

    cfg = configparser.ConfigParser(interpolation=None)
    for name, sec in sections.items():
        if sec:
            cfg[name] = sec
    args.out_dir.mkdir(parents=True, exist_ok=True)
    target = args.out_dir / "pip.conf"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        cfg.write(f)
    if dropped:
        print("build.sh: docker cannot mount local paths into a build; pip inside uses only the network "
              f"indexes of this machine's configuration (dropped: {' '.join(dropped)})", file=sys.stderr)
    for path in mounts:
        print(f"mount {path}")
    for wheel in wheels:
        print(f"torch-wheel {wheel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
