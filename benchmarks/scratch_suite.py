"""From scratch across the MuJoCo suite: NCDPO at K = 5 and 10 vs RLlib's MLP PPO, one set of PPO knobs.

    python benchmarks/scratch_suite.py --steps 300000 --seeds 0 1 2

Every run is ``ncdpo train``'s code path on ``configs/scratch_suite.yaml`` (the suite's one set of
knobs, for every task and both algorithms) with ``env.id``, the algorithm, K and the seed set per
run. Runs are saved to benchmarks/results/scratch_suite.json as they finish, keyed by the suite
file's content, the budget and ``--set``: an interrupted benchmark resumes, a changed config reruns.

Scores: a run's return at a budget is the mean training-episode return of its last 3 iterations up
to it (the final one: of its last 3 iterations). Normalised score = (R - random) / (PPO's mean final R - random) per task, ``random`` being a
uniform-random policy's mean return (measured once per task, saved in
benchmarks/results/random_returns.json). Aggregates over tasks x seeds (rliable: IQM, 95%
stratified-bootstrap intervals, probability of improvement) at equal env steps and at equal
wall-clock (each run's score when PPO's mean run time on the task had passed); per task, the
seconds each variant took to reach PPO's final return. Writes the section ``scratch_suite`` of
docs/benchmarks.md and a PNG of the curves vs env steps and vs wall-clock.

Several processes may share the results file (e.g. one per seed on a bigger machine):

    for s in 0 1 2; do python benchmarks/scratch_suite.py --seeds $s & done; wait
    python benchmarks/scratch_suite.py --seeds 0 1 2 --report-only
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    IMAGES, ROOT, late_return, locked, markdown_table, plot_runs, run_cells, save_figure, train_with_curve,
    write_section)
from benchmarks.sample_efficiency import variant_overrides  # noqa: E402
from ncdpo_rllib.experiment.config import load_config  # noqa: E402
from ncdpo_rllib.experiment.loader import read_config_data  # noqa: E402

TASKS = {
    "pendulum": "Pendulum-v1",
    "inverted_pendulum": "InvertedPendulum-v5",
    "inverted_double_pendulum": "InvertedDoublePendulum-v5",
    "hopper": "Hopper-v5",
    "walker2d": "Walker2d-v5",
    "halfcheetah": "HalfCheetah-v5",
    "ant": "Ant-v5",
}
SUITE = ROOT / "configs" / "scratch_suite.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "scratch_suite.json"
RANDOM_RETURNS = ROOT / "benchmarks" / "results" / "random_returns.json"
RANDOM_EPISODES = 20
FRACTIONS = (0.25, 0.5, 1.0)


def random_return(env_id: str) -> float:
    """Mean return of a uniform-random policy (``RANDOM_EPISODES`` episodes, seeded), saved per env id."""
    import json

    import gymnasium as gym

    with locked(RANDOM_RETURNS):
        saved = json.loads(RANDOM_RETURNS.read_text()) if RANDOM_RETURNS.exists() else {}
        if env_id not in saved:
            env = gym.make(env_id)
            env.action_space.seed(0)
            returns = []
            for episode in range(RANDOM_EPISODES):
                env.reset(seed=episode)
                total, done = 0.0, False
                while not done:
                    _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
                    total += float(reward)
                    done = terminated or truncated
                returns.append(total)
            env.close()
            saved[env_id] = {"episodes": RANDOM_EPISODES, "return_mean": float(np.mean(returns))}
            RANDOM_RETURNS.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
    return saved[env_id]["return_mean"]


def run_one(args, task: str, variant: str, seed: int) -> dict:
    env_id = TASKS[task]
    root = ROOT / "runs" / "bench" / "scratch-suite" / env_id
    name = f"{variant.replace(':', '-k')}-s{seed}"
    shutil.rmtree(root / name, ignore_errors=True)  # a rerun replaces its own old output
    overrides = [f"env.id={env_id}", *variant_overrides(variant), f"seed={seed}", f"stop.env_steps={args.steps}",
                 "stop.iterations=null", "checkpoint.every=0", f"checkpoint.dir={root}", f"tracking.run_name={name}",
                 *args.set]
    summary, curve = train_with_curve(load_config(args.config, overrides))
    return {"task": task, "variant": variant, "seed": seed, "curve": curve, "mlflow_run_id": summary["mlflow_run_id"]}


def final_return(run: dict) -> float:
    return late_return(run)


def mean_std(values) -> str:
    values = np.asarray(values, dtype=float)
    return "-" if np.isnan(values).all() else f"{np.nanmean(values):.0f} ± {np.nanstd(values):.0f}"


def seconds_to(run: dict, target: float, window: int = 3) -> float:
    """Run time at which the ``window``-iteration mean return first reached ``target`` (inf: never);
    ``ncdpo compare --threshold``'s rule (``first_reaching``) on that smoothed curve."""
    from ncdpo_rllib.experiment.curves import first_reaching

    c = run["curve"]
    r = np.asarray(c["return"], dtype=float)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows stay NaN: never reached there
        smoothed = np.array([np.nanmean(r[max(0, i - window + 1): i + 1]) for i in range(len(r))])
    hit = first_reaching(np.asarray(c["wall_s"], dtype=float), smoothed, target)
    return float("inf") if hit is None else hit


def task_table(args, runs: list[dict], random: dict[str, float]) -> tuple[str, dict]:
    """Per task x variant: returns at the budgets, the normalised final score vs PPO, wall-clock and the
    time to PPO's final return; and {variant: {task: [normalised final score per seed]}}."""
    header = (["task", "variant", "seeds"] + [f"return @ {int(f * args.steps):,}" for f in FRACTIONS]
              + ["final vs PPO (normalised)", "wall s", "s to PPO's final return"])
    rows, scores = [], {}
    for task in args.tasks:
        by_variant = {v: [r for r in runs if r["task"] == task and r["variant"] == v] for v in args.variants}
        ppo = by_variant.get("ppo") or []
        ppo_final = float(np.mean([final_return(r) for r in ppo])) if ppo else float("nan")
        span = ppo_final - random[task]  # NaN without PPO runs; <= 0 where PPO did not beat random
        for v, vr in by_variant.items():
            if not vr:
                continue
            cells = [mean_std([late_return(r, f * args.steps if f < 1 else float("inf")) for r in vr])
                     for f in FRACTIONS]
            norm = [(final_return(r) - random[task]) / span for r in vr] if span > 0 else []
            scores.setdefault(v, {})[task] = norm
            times = [seconds_to(r, ppo_final) for r in vr] if ppo else []
            reached = [t for t in times if np.isfinite(t)]
            to_final = "-" if not ppo else (f"{np.mean(reached):.0f} ({len(reached)}/{len(vr)} seeds)" if reached
                                           else f"not reached (0/{len(vr)})")
            rows.append([TASKS[task], v, len(vr), *cells, f"{np.mean(norm):.2f}" if norm else "-",
                         f"{np.mean([r['curve']['wall_s'][-1] for r in vr]):.0f}", to_final])
    return markdown_table(header, rows), scores


def wall_scores(args, runs: list[dict], random: dict[str, float]) -> dict:
    """{variant: {task: [normalised score at PPO's mean run time on the task]}}; a run with no finished
    episode by then scores 0 (the random policy's)."""
    out = {}
    for task in args.tasks:
        ppo = [r for r in runs if r["task"] == task and r["variant"] == "ppo"]
        if not ppo:
            continue
        span = float(np.mean([final_return(r) for r in ppo])) - random[task]
        if not span > 0:
            continue
        budget = float(np.mean([r["curve"]["wall_s"][-1] for r in ppo]))
        for v in args.variants:
            vr = [r for r in runs if r["task"] == task and r["variant"] == v]
            if vr:
                at = [late_return(r, budget, "wall_s") for r in vr]
                out.setdefault(v, {})[task] = [0.0 if np.isnan(x) else (x - random[task]) / span for x in at]
    return out


def aggregate(args, scores: dict, label: str, stem: str) -> str:
    from ncdpo_rllib.experiment.aggregate import aggregate_markdown, aggregate_scores, plot_aggregate, score_matrix

    complete = {v: by_task for v, by_task in scores.items()
                if set(by_task) == set(args.tasks) and all(by_task.values())}
    if len(complete) < 2:
        return (f"({label}: no aggregate yet: every variant needs runs on every task, and PPO a final return "
                f"above the random policy's on each.)")
    agg = aggregate_scores({v: score_matrix(by_task)[0] for v, by_task in complete.items()})
    IMAGES.mkdir(parents=True, exist_ok=True)
    image = IMAGES / f"{stem}.png"
    plot_aggregate(agg, "normalised return", image)
    return f"**{label}**\n\n{aggregate_markdown(agg, 'normalised return')}\n\n![{label}]({image.relative_to(ROOT / 'docs')})"


def plot(args, runs: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(args.tasks), figsize=(3.8 * len(args.tasks), 6.5), squeeze=False)
    for col, task in enumerate(args.tasks):
        for v in args.variants:
            vr = [r for r in runs if r["task"] == task and r["variant"] == v]
            if vr:
                plot_runs((axes[0][col], axes[1][col]), vr, "return", f"{v} ({len(vr)})")
        for row, xlabel in enumerate(("env steps", "wall-clock s")):
            ax = axes[row][col]
            ax.set_title(TASKS[task], fontsize=9)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    axes[0][0].set_ylabel("training return")
    axes[1][0].set_ylabel("training return")
    fig.suptitle("From scratch: NCDPO vs MLP PPO (mean, band = min..max over seeds)")
    return save_figure(fig, args.section)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--variants", nargs="+", default=["ppo", "ncdpo:5", "ncdpo:10"], help="ppo or ncdpo:K")
    p.add_argument("--steps", type=int, default=300_000, help="env-step budget of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", type=Path, default=SUITE, help="the suite's knobs (one file for every task)")
    p.add_argument("--set", action="append", default=[], help="extra override for every run")
    p.add_argument("--section", default="scratch_suite", help="docs/benchmarks.md section to (re)write")
    p.add_argument("--results", type=Path, default=RESULTS, help="run results JSON (resumable)")
    p.add_argument("--fresh", action="store_true", help="discard saved run results")
    p.add_argument("--report-only", action="store_true", help="train nothing: report the saved runs")
    args = p.parse_args()
    for v in args.variants:
        variant_overrides(v)  # an unknown variant fails before anything runs

    key = {"steps": args.steps, "set": args.set, "config": read_config_data(args.config)}
    cells = ((f"{task} {variant} seed {seed} ({args.steps:,} env steps)",
              {"task": task, "variant": variant, "seed": seed} | key,
              functools.partial(run_one, args, task, variant, seed))
             for seed in args.seeds for task in args.tasks for variant in args.variants)
    runs = run_cells(args.results, cells, fresh=args.fresh, report_only=args.report_only)
    random = {task: random_return(TASKS[task]) for task in args.tasks}
    table, final_scores = task_table(args, runs, random)
    at_steps = aggregate(args, final_scores, f"at {args.steps:,} env steps", f"{args.section}-aggregate-steps")
    at_wall = aggregate(args, wall_scores(args, runs, random), "at PPO's wall-clock", f"{args.section}-aggregate-wall")
    image = plot(args, runs)
    print(table, at_steps, at_wall, sep="\n\n")
    body = (
        f"Knobs: `{args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}` for every task "
        f"and variant{' plus ' + ', '.join(args.set) if args.set else ''}. Return = mean training-episode return of "
        f"the last 3 iterations up to the budget (the final column: the run's last 3), mean ± std over seeds "
        f"{args.seeds}. Normalised score = (R - random) / (PPO's mean final R - random), random = a uniform-random policy's mean return over {RANDOM_EPISODES} "
        f"episodes ({', '.join(f'{TASKS[t]} {random[t]:.1f}' for t in args.tasks)}). 's to PPO's final return': run "
        f"time until the 3-iteration mean return first reached PPO's mean final return (seeds that reached it).\n\n"
        f"{table}\n\nAggregates over tasks x seeds (rliable):\n\n{at_steps}\n\n{at_wall}\n\n"
        f"![curves]({image.relative_to(ROOT / 'docs')})\n"
    )
    write_section(args.section, "From scratch across the MuJoCo suite: NCDPO vs MLP PPO", body)


if __name__ == "__main__":
    main()
