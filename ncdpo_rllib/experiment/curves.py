"""Learning curves of a group of runs, as ``ncdpo compare`` draws and tabulates them: pure numpy.

Aggregation: each run's metric history (``step`` = env steps) is linearly interpolated onto
a common grid of ``GRID_POINTS`` points spanning only the range *every* run of the group
covers (``max`` of the first steps .. ``min`` of the last steps), so a short run never gets
extrapolated and a long one is cut to the shared range. The line is the mean over runs, the
band is min..max over runs. Wall-clock curves use, as x, the ``wall_s`` metric logged at the
same step (interpolated over steps where a step lacks it) and the same rule.

Table statistics are per run and then mean +- std (population std, ddof=0, so one run gives
0) over the runs of a group: final = the run's last logged value, best = its maximum,
time-to-threshold = the first *logged* point whose value is >= the threshold (no
interpolation between points), averaged over the runs that reached it and shown with k/n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

GRID_POINTS = 200


# ---------------------------------------------------------------- data classes


@dataclass
class Series:
    """One curve: x ascending, y the metric at those x."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class Band:
    """A group's aggregated curve on its common grid: mean line and min..max band."""

    x: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def to_dict(self) -> dict[str, list[float]]:
        return {k: [float(v) for v in getattr(self, k)] for k in ("x", "mean", "lo", "hi")}


@dataclass
class RunStats:
    """Per-run numbers the table aggregates."""

    run_id: str
    final: float
    best: float
    steps_to_threshold: Optional[float]
    wall_to_threshold: Optional[float]
    throughput: Optional[float]


@dataclass
class Group:
    label: str
    run_ids: list[str] = field(default_factory=list)
    env_curves: list[Series] = field(default_factory=list)
    wall_curves: list[Series] = field(default_factory=list)
    stats: list[RunStats] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)  # per run: its value of --task-key (aggregates)


# ---------------------------------------------------------------- pure helpers


def group_value(tags: dict[str, str], params: dict[str, str], key: str) -> str:
    """A tag named ``key``, else a param, else ``-``; ``tags.``/``params.`` prefixes force one."""
    if key.startswith("tags."):
        return tags.get(key[5:], "-")
    if key.startswith("params."):
        return params.get(key[7:], "-")
    if key in tags:
        return tags[key]
    return params.get(key, "-")


def group_label(tags: dict[str, str], params: dict[str, str], keys: Sequence[str]) -> str:
    """``algorithm=ncdpo, denoising_steps=5``: readable in legends and tables."""
    return ", ".join(f"{k.split('.', 1)[1] if k.startswith(('tags.', 'params.')) else k}="
                     f"{group_value(tags, params, k)}" for k in keys)


def history_series(points: Sequence[tuple[int, float]]) -> Series:
    """(step, value) pairs -> a Series sorted by step, last value kept per step, non-finite dropped.

    A resumed run may log a step twice; the later value is the one the run ended with."""
    by_step: dict[int, float] = {}
    for step, value in points:
        if value is not None and math.isfinite(value):
            by_step[int(step)] = float(value)
    steps = sorted(by_step)
    return Series(np.asarray(steps, dtype=float), np.asarray([by_step[s] for s in steps], dtype=float))


def wall_clock_series(metric: Series, wall: Series) -> Series:
    """The metric against ``wall_s`` at the same step (wall interpolated over steps if missing)."""
    if len(wall.x) == 0:
        return Series(np.empty(0), np.empty(0))
    return Series(np.interp(metric.x, wall.x, wall.y), metric.y.copy())


def common_grid(curves: Sequence[Series], points: int = GRID_POINTS) -> np.ndarray:
    """Grid over the x range every curve covers; empty if the ranges do not overlap."""
    curves = [c for c in curves if len(c.x)]
    if not curves:
        return np.empty(0)
    lo = max(float(c.x[0]) for c in curves)
    hi = min(float(c.x[-1]) for c in curves)
    if hi < lo:
        return np.empty(0)
    if hi == lo:
        return np.asarray([lo])
    return np.linspace(lo, hi, points)


def aggregate(curves: Sequence[Series], points: int = GRID_POINTS) -> Band:
    """Mean and min..max band of the curves, interpolated onto their common grid."""
    grid = common_grid(curves, points)
    if len(grid) == 0:
        e = np.empty(0)
        return Band(e, e, e, e)
    ys = np.stack([np.interp(grid, c.x, c.y) for c in curves if len(c.x)])
    return Band(grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0))


def short_range_note(label: str, run_ids: Sequence[str], curves: Sequence[Series],
                     min_fraction: float = 0.5) -> Optional[str]:
    """Say which run cuts a group's curve when the shared range is < ``min_fraction`` of the longest.

    The common-range rule means one short run (a smoke test, a crash) truncates its whole
    group; the note names it so the user can filter it out."""
    if len(curves) < 2:
        return None
    ends = [float(c.x[-1]) for c in curves]
    start = max(float(c.x[0]) for c in curves)
    longest = max(ends) - min(float(c.x[0]) for c in curves)
    if longest <= 0 or (min(ends) - start) >= min_fraction * longest:
        return None
    short = run_ids[int(np.argmin(ends))]
    return (f"group '{label}': curve cut at step {min(ends):,.0f} (runs go to {max(ends):,.0f}) by run {short}; "
            f"to leave short runs out, e.g. --filter \"metrics.env_steps >= {max(ends):.0f}\"")


def first_reaching(x: np.ndarray, y: np.ndarray, threshold: float) -> Optional[float]:
    """x of the first logged point with y >= threshold; None if the run never got there."""
    hit = np.nonzero(np.asarray(y) >= threshold)[0]
    return float(np.asarray(x)[hit[0]]) if len(hit) else None


def run_stats(run_id: str, env: Series, wall: Series, throughput: Series,
              threshold: Optional[float]) -> RunStats:
    """Final (last value), best (max), time to threshold in env steps and in wall seconds."""
    steps = wall_s = None
    if threshold is not None:
        steps = first_reaching(env.x, env.y, threshold)
        wall_s = first_reaching(wall.x, wall.y, threshold) if len(wall.x) else None
    return RunStats(
        run_id=run_id,
        final=float(env.y[-1]),
        best=float(env.y.max()),
        steps_to_threshold=steps,
        wall_to_threshold=wall_s,
        throughput=float(throughput.y.mean()) if len(throughput.y) else None,
    )


def mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """Mean and population std of the non-None values; (None, None) if there are none."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return None, None
    return float(v.mean()), float(v.std())


def summary_row(group: Group, threshold: Optional[float]) -> dict[str, Any]:
    """One table row: numbers as floats (CSV), None where not applicable/not reached."""
    s = group.stats
    final_m, final_s = mean_std([r.final for r in s])
    best_m, best_s = mean_std([r.best for r in s])
    steps_m, steps_s = mean_std([r.steps_to_threshold for r in s])
    wall_m, wall_s = mean_std([r.wall_to_threshold for r in s])
    reached = sum(r.steps_to_threshold is not None for r in s) if threshold is not None else None
    tput_m, _ = mean_std([r.throughput for r in s])
    return {
        "group": group.label,
        "runs": len(s),
        "final_mean": final_m, "final_std": final_s,
        "best_mean": best_m, "best_std": best_s,
        "threshold": threshold,
        "reached": reached,
        "env_steps_to_threshold_mean": steps_m, "env_steps_to_threshold_std": steps_s,
        "wall_s_to_threshold_mean": wall_m, "wall_s_to_threshold_std": wall_s,
        "env_steps_per_s_mean": tput_m,
    }
