"""Shared helpers for benchmark scripts: machine description and docs/benchmarks.md sections."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import date
from pathlib import Path

from ncdpo_rllib.experiment.report import markdown_table  # noqa: F401  (the scripts import it from here)

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
    """The command that makes the section (``--report-only``, which re-renders saved runs, left out)."""
    script = Path(sys.argv[0]).resolve().relative_to(ROOT)
    return " ".join(["python", str(script), *map(shlex.quote, (a for a in sys.argv[1:] if a != "--report-only"))])


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


def library_at(rev: str) -> Path:
    """A read-only copy of the library (``ncdpo_rllib/``) at git revision ``rev``, for a "before"
    row measured in the same run as "after" (a child process with LIBRARY_ENV set to it imports
    that library: ``use_library_from_env``); made once per revision."""
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    dest = ROOT / "runs" / "library-at" / commit
    if not (dest / "ncdpo_rllib").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit, "ncdpo_rllib"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


LIBRARY_ENV = "NCDPO_BENCH_LIBRARY"
"""A child process of a benchmark imports ncdpo_rllib from this folder (``library_at``) when set."""


def use_library_from_env() -> None:
    """Called by a benchmark script at import, before it imports ncdpo_rllib."""
    if os.environ.get(LIBRARY_ENV):
        sys.path.insert(0, os.environ[LIBRARY_ENV])


def runner_and_learner(env_id: str, algorithm: str = "ncdpo", *, batch: int, minibatch: int, chunk: int = 1,
                       envs: int = 8, **diffusion):
    """(EnvRunner, Learner) for the speed benchmarks: one in-process EnvRunner with ``envs`` vector
    envs and the observation filter, a local learner (one epoch per update), torch on one thread;
    ``diffusion``: DiffusionConfig fields (unused for ``algorithm="ppo"``, RLlib's MLP PPO)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from ncdpo_rllib.rl import DPPOConfig, NCDPOConfig, mean_std_filter_connector
    from ncdpo_rllib.tasks.envs import register

    torch.set_num_threads(1)
    if algorithm == "ppo":
        cfg = PPOConfig().training(use_kl_loss=False)
    else:
        cfg = (NCDPOConfig() if algorithm == "ncdpo" else DPPOConfig()).diffusion(
            **{k: v for k, v in diffusion.items() if v is not None})
    cfg.environment(register(), env_config={"id": env_id, "action_chunk": chunk}).env_runners(
        num_env_runners=0, num_envs_per_env_runner=envs, env_to_module_connector=mean_std_filter_connector
    ).training(train_batch_size_per_learner=batch, minibatch_size=minibatch, num_epochs=1).debugging(seed=0)
    runner = SingleAgentEnvRunner(config=cfg)
    learner = cfg.build_learner(env=runner.env)
    runner.module.set_state(learner.module["default_policy"].get_state())
    return runner, learner


def best_seconds(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` (the one least disturbed by other work on
    the machine)."""
    import time

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def learner_cost(learner, episodes, minibatch: int, warmup_episodes, repeats: int = 3) -> tuple[float, int]:
    """(seconds for one update epoch over ``episodes``, the fastest of ``repeats``; bytes autograd
    saved for backward in one more epoch), after a warm-up update: the learner side of
    latency_memory.py."""
    learner.update(episodes=warmup_episodes, num_epochs=1, minibatch_size=minibatch)
    update_s = best_seconds(lambda: learner.update(episodes=episodes, num_epochs=1, minibatch_size=minibatch), repeats)
    return update_s, saved_for_backward(lambda: learner.update(episodes=episodes, num_epochs=1, minibatch_size=minibatch))


def saved_for_backward(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while ``fn()`` runs (what backprop
    through the chain costs in memory, device-independent; blind to the inside of a compiled graph)."""
    import torch

    saved = {"bytes": 0}

    def pack(t):
        saved["bytes"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved["bytes"]


def train_with_curve(exp, metrics: dict[str, str] | None = None) -> tuple[dict, dict]:
    """``ncdpo train``'s code path for one config; returns (summary, curve): the curve has the
    per-iteration env steps and wall-clock seconds, and one list per entry of ``metrics`` (curve
    key -> the metric name train() reports; default: the mean episode return as ``return``).
    A metric missing in an iteration (evaluation every few iterations) is NaN there."""
    from ncdpo_rllib.experiment.train import train

    metrics = metrics or {"return": "return_mean"}
    curve: dict[str, list] = {"env_steps": [], "wall_s": [], **{key: [] for key in metrics}}

    def record(state, reported):
        curve["env_steps"].append(state.env_steps)
        curve["wall_s"].append(state.wall_s)
        for key, name in metrics.items():
            curve[key].append(reported.get(name, float("nan")))

    return train(exp, on_iteration=record), curve


def locked(path: Path):
    """An exclusive lock on ``<path>.lock``: benchmark processes that share a results file or a pinned
    checkpoint (e.g. one process per seed on a bigger machine) take turns."""
    from ncdpo_rllib.experiment.filelock import exclusive

    return exclusive(path.with_name(path.name + ".lock"))


def load_results(path: Path, fresh: bool = False) -> list[dict]:
    """A benchmark's saved runs (a JSON list); ``fresh``: empty the file first."""
    with locked(path):
        if fresh:
            _write_json(path, [])
        return _read_json_list(path)


def append_result(path: Path, run: dict) -> list[dict]:
    """Add one finished run to the results file and return all its runs. Re-read under the lock, so
    that several benchmark processes (disjoint seeds or tasks) can share one file."""
    with locked(path):
        saved = _read_json_list(path) + [run]
        _write_json(path, saved)
    return saved


def late_return(run: dict, upto: float = float("inf"), key: str = "env_steps", window: int = 3) -> float:
    """Mean return of the run's last ``window`` iterations (with a finished episode) whose ``key``
    (env_steps or wall_s) is at most ``upto``; NaN if there are none: a benchmark's "return at N
    env steps" (the curve's ``return`` list, NaN where no episode ended)."""
    import numpy as np

    c = run["curve"]
    vals = [r for x, r in zip(c[key], c["return"]) if x <= upto * 1.0001 and not np.isnan(r)]
    return float(np.mean(vals[-window:])) if vals else float("nan")


def run_cells(path: Path, cells, *, fresh: bool = False, report_only: bool = False) -> list[dict]:
    """The resumable loop of every benchmark that trains a grid of runs. ``cells``: (label, match,
    train) per run, in order; ``match`` (a dict) is what a saved run must equal field by field to be
    reused (its identity, e.g. task/variant/seed, and whatever changes its result: steps, overrides,
    the resolved config); ``train()`` trains it and returns its fields, saved together with
    ``match``. The file is re-read before each cell, so processes that share it (disjoint seeds or
    tasks) see each other's finished runs. ``report_only``: train nothing, leave missing runs out.
    Returns the runs of ``cells`` (one per cell that has one), in order."""
    saved = load_results(path, fresh=fresh)
    runs = []
    for label, match, train in cells:
        found = _find(saved, match) or _find(saved := load_results(path), match)
        if found:
            print(f"[bench] {label}: saved result reused", flush=True)
        elif report_only:
            print(f"[bench] {label}: no saved run, left out (--report-only)", flush=True)
        else:
            print(f"[bench] {label}: training", flush=True)
            found = train() | match
            saved = append_result(path, found)
        if found:
            runs.append(found)
    return runs


def _find(saved: list[dict], match: dict) -> dict | None:
    return next((r for r in saved if all(r.get(k) == v for k, v in match.items())), None)


def _read_json_list(path: Path) -> list:
    return json.loads(path.read_text()) if path.exists() else []


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # a reader never sees half a file


PINNED = ROOT / "benchmarks" / "results" / "pretrained"
"""Committed pre-trained checkpoints that benchmarks start from: a benchmark resumed on another day
or machine starts every seed from the same policy. Delete one to pre-train it anew."""


def pinned_pretrained(name: str, make) -> Path:
    """The directory of the pre-trained checkpoint ``name`` (its ``pretrain.json`` inside):
    ``benchmarks/results/pretrained/<name>`` when it is there, else ``make()`` (which pre-trains and
    returns the checkpoint directory), copied there first so that later runs find it."""
    import shutil

    pinned = PINNED / name
    with locked(pinned):  # a second benchmark process waits for the first one's pre-training
        if (pinned / "pretrain.json").is_file():
            return pinned
        made = Path(make())
        tmp = pinned.with_name(f".tmp-{name}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(made, tmp)
        shutil.rmtree(pinned, ignore_errors=True)
        tmp.rename(pinned)
    return pinned


def plot_seed_band(ax, x, ys, label: str, start: float | None = None):
    """Mean over seeds with a min..max band; ``ys`` is seeds x points. Points no seed has (NaN in
    every row: no evaluation, no finished episode that iteration) are dropped; a point some seeds
    lack uses the others. ``start`` (the pre-trained score) is drawn at x = 0."""
    import numpy as np

    ys = np.asarray(ys, dtype=float)
    keep = ~np.isnan(ys).all(axis=0)
    x, ys = np.asarray(x, dtype=float)[keep], ys[:, keep]
    lead_x, lead_y = ([0.0], [start]) if start is not None else ([], [])
    line, = ax.plot([*lead_x, *x], [*lead_y, *np.nanmean(ys, axis=0)], marker=".", label=label)
    ax.fill_between(x, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=line.get_color(), alpha=0.15)
    return line


def plot_runs(axes, runs: list[dict], key: str, label: str, start: float | None = None) -> None:
    """One variant's seeds on a pair of axes: curve ``key`` vs env steps and vs wall-clock seconds (the
    x of each point averaged over seeds), every run cut to the shortest, band = min..max over seeds."""
    import numpy as np
    from matplotlib.ticker import EngFormatter

    n = min(len(r["curve"]["env_steps"]) for r in runs)
    ys = [r["curve"][key][:n] for r in runs]
    for ax, xkey in zip(axes, ("env_steps", "wall_s")):
        plot_seed_band(ax, np.mean([np.asarray(r["curve"][xkey][:n], dtype=float) for r in runs], axis=0), ys,
                       label, start=start)
    axes[0].xaxis.set_major_formatter(EngFormatter(sep=""))  # 300k, 1M: env-step ticks that do not collide


def save_figure(fig, stem: str) -> Path:
    """docs/images/<stem>.png (laid out tight, closed): the path for a markdown image link."""
    import matplotlib.pyplot as plt

    IMAGES.mkdir(parents=True, exist_ok=True)
    out = IMAGES / f"{stem}.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
