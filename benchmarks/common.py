"""Shared helpers for benchmark scripts: machine description and docs/benchmarks.md sections."""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
IMAGES = ROOT / "docs" / "images"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def command_line() -> str:
    script = Path(sys.argv[0]).resolve().relative_to(ROOT)
    return " ".join(["python", str(script), *map(shlex.quote, sys.argv[1:])])


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section between BEGIN/END markers named ``name``."""
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\nEvery table below was written by the script and command shown with it.\n"
    section = (
        f"<!-- BEGIN {name} -->\n## {title}\n\n"
        f"Command: `{command_line()}`  \n"
        f"Machine: {machine()}  \nDate: {date.today()}, commit {git_commit()}\n\n{body.strip()}\n"
        f"<!-- END {name} -->"
    )
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    DOCS.write_text(text)
    print(f"wrote section {name!r} of {DOCS.relative_to(ROOT)}")


def learner_cost(learner, episodes, minibatch: int, warmup_episodes) -> tuple[float, int]:
    """(seconds for one update epoch over ``episodes``, bytes autograd saved for backward in
    a second epoch), after a warm-up update: the learner side of throughput.py and
    latency_memory.py."""
    import time

    import torch

    learner.update(episodes=warmup_episodes, num_epochs=1, minibatch_size=minibatch)
    t0 = time.perf_counter()
    learner.update(episodes=episodes, num_epochs=1, minibatch_size=minibatch)
    update_s = time.perf_counter() - t0
    saved = {"bytes": 0}

    def pack(t):
        saved["bytes"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        learner.update(episodes=episodes, num_epochs=1, minibatch_size=minibatch)
    return update_s, saved["bytes"]


def train_with_curve(exp) -> tuple[dict, dict]:
    """``ncdpo train``'s code path for one config; returns (summary, curve) with the curve's
    per-iteration env steps, wall-clock seconds and mean episode return."""
    from ncdpo_rllib.experiment.train import train

    curve = {"env_steps": [], "wall_s": [], "return": []}

    def record(state, metrics):
        curve["env_steps"].append(state.env_steps)
        curve["wall_s"].append(state.wall_s)
        curve["return"].append(metrics.get("return_mean", float("nan")))

    return train(exp, on_iteration=record), curve
