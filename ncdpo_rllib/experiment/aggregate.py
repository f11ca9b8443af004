"""Aggregate statistics over tasks x runs, as ``rliable`` (Agarwal et al., 2021) defines them.

Each algorithm's scores form a (runs, tasks) matrix: one score per (seed, task), e.g. the final
evaluation success rate. From it:

- IQM: the mean of the middle 50% of all runs x tasks scores, with a 95% stratified-bootstrap
  interval (runs resampled within each task);
- probability of improvement P(X > Y): the chance that a run of X on a random task beats a run
  of Y there (ties count half), averaged over tasks, with its bootstrap interval;
- performance profiles: the fraction of runs x tasks with a score above tau, for tau on a grid.

``ncdpo compare --aggregate iqm --task-key env`` applies these to MLflow runs;
``benchmarks/manipulation.py`` to its result file. Scores of different scales (returns of
different tasks) should be normalised first (``normalize``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def score_matrix(task_scores: dict[str, Sequence[float]]) -> tuple[np.ndarray, list[str], Optional[str]]:
    """{task: [score per run]} -> (runs, tasks) array with the same number of runs per task
    (the smallest; extra runs of the other tasks are dropped, and the note says so)."""
    tasks = sorted(task_scores)
    counts = {t: len(task_scores[t]) for t in tasks}
    n = min(counts.values())
    note = None
    if len(set(counts.values())) > 1:
        note = f"runs per task differ ({', '.join(f'{t}: {c}' for t, c in counts.items())}): the first {n} of each used"
    return np.array([[float(task_scores[t][i]) for t in tasks] for i in range(n)]), tasks, note


def normalize(task_scores: dict[str, Sequence[float]], ranges: dict[str, tuple[float, float]]):
    """(score - low) / (high - low) per task, for the tasks that have a range."""
    out = {}
    for task, scores in task_scores.items():
        lo, hi = ranges.get(task, (0.0, 1.0))
        out[task] = [(s - lo) / (hi - lo) for s in scores]
    return out


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean of all entries (rliable's aggregate_iqm)."""
    from rliable import metrics

    return float(metrics.aggregate_iqm(scores))


def aggregate_scores(matrices: dict[str, np.ndarray], *, reps: int = 2000, seed: int = 0,
                     taus: Optional[np.ndarray] = None) -> dict:
    """IQM and mean with 95% stratified-bootstrap intervals per algorithm, the probability of
    improvement of every ordered pair, and performance profiles; JSON-ready."""
    from rliable import library as rly, metrics

    rng_state = np.random.get_state()
    np.random.seed(seed)  # rliable's bootstrap draws from numpy's global generator
    try:
        point, interval = rly.get_interval_estimates(
            matrices, lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)]), reps=reps)
        names = list(matrices)
        pairs = {f"{a} > {b}": (matrices[a], matrices[b]) for a in names for b in names if a != b}
        poi_point, poi_interval = ({}, {}) if not pairs else rly.get_interval_estimates(
            pairs, lambda x, y: np.array([metrics.probability_of_improvement(x, y)]), reps=reps)
    finally:
        np.random.set_state(rng_state)
    if taus is None:
        allv = np.concatenate([m.ravel() for m in matrices.values()])
        taus = np.linspace(min(0.0, allv.min()), max(1.0, allv.max()), 51)
    profiles = {name: [float((m > t).mean()) for t in taus] for name, m in matrices.items()}
    return {
        "algorithms": {
            name: {"runs": int(m.shape[0]), "tasks": int(m.shape[1]),
                   "iqm": float(point[name][0]), "iqm_ci": [float(v) for v in interval[name][:, 0]],
                   "mean": float(point[name][1]), "mean_ci": [float(v) for v in interval[name][:, 1]]}
            for name, m in matrices.items()
        },
        "probability_of_improvement": {
            pair: {"p": float(poi_point[pair][0]), "ci": [float(v) for v in poi_interval[pair][:, 0]]}
            for pair in poi_point
        },
        "profiles": {"tau": [float(t) for t in taus], "fraction_above": profiles},
        "reps": reps,
    }


def aggregate_markdown(agg: dict, score_name: str) -> str:
    """The IQM / mean table and the probability-of-improvement table."""
    lines = [f"| algorithm | runs x tasks | IQM of {score_name} [95% CI] | mean [95% CI] |", "|---|---|---|---|"]
    for name, a in agg["algorithms"].items():
        lines.append(f"| {name} | {a['runs']} x {a['tasks']} | {a['iqm']:.3f} [{a['iqm_ci'][0]:.3f}, {a['iqm_ci'][1]:.3f}]"
                     f" | {a['mean']:.3f} [{a['mean_ci'][0]:.3f}, {a['mean_ci'][1]:.3f}] |")
    if agg["probability_of_improvement"]:
        lines += ["", "| probability of improvement | P [95% CI] |", "|---|---|"]
        for pair, v in agg["probability_of_improvement"].items():
            lines.append(f"| P({pair}) | {v['p']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] |")
    lines.append(f"\n(stratified bootstrap, {agg['reps']} resamples)")
    return "\n".join(lines)


def plot_aggregate(agg: dict, score_name: str, path) -> None:
    """Two panels: IQM with its interval per algorithm, and the performance profiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    names = list(agg["algorithms"])
    for i, name in enumerate(names):
        a = agg["algorithms"][name]
        ax1.errorbar([a["iqm"]], [i], xerr=[[a["iqm"] - a["iqm_ci"][0]], [a["iqm_ci"][1] - a["iqm"]]],
                     fmt="o", capsize=4)
    ax1.set_yticks(range(len(names)), names)
    ax1.set_xlabel(f"IQM of {score_name} (95% CI)")
    ax1.grid(alpha=0.3)
    tau = agg["profiles"]["tau"]
    for name in names:
        ax2.plot(tau, agg["profiles"]["fraction_above"][name], label=name)
    ax2.set_xlabel(f"{score_name} threshold tau")
    ax2.set_ylabel("fraction of runs x tasks > tau")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
