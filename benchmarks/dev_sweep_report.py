"""The development sweep's result (``benchmarks/dev_sweep.sh``): one table per algorithm, and the winner.

    python benchmarks/dev_sweep_report.py [--experiment dev-sweep-button-press]

Reads the sweeps' child runs from MLflow (``sqlite:///mlflow.db``); per grid point (over its
seeds): the final evaluation success rate (the decision), the mean of the last three
evaluations (the tie-break), the median per-iteration approx KL, the fraction of iterations
whose epochs the target-KL stop cut, and the clip fraction (iterations after the critic-only
warm-up). Writes docs/benchmarks.md, section
dev-sweep:<experiment>.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, markdown_table, write_section  # noqa: E402
from ncdpo_rllib.experiment.tracking import find_experiment, metric_history, mlflow_client, search_all_runs  # noqa: E402


def history(client, run_id: str, key: str) -> list[float]:
    return [v for _, v in sorted(metric_history(client, run_id, key))]


def learner(client, run_id: str, key: str) -> list[float]:
    """A learner metric's history over the iterations in which the actor trained (no warm-up)."""
    values = history(client, run_id, f"learner/default_policy/{key}")
    frozen = history(client, run_id, "learner/default_policy/actor_frozen")
    return [v for v, f in zip(values, frozen) if not f] or [float("nan")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="dev-sweep-button-press")
    p.add_argument("--uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    p.add_argument("--sweeps", nargs="+", default=["ncdpo", "dppo"], help="sweep names (= algorithms)")
    args = p.parse_args()
    client = mlflow_client(args.uri)
    exp = find_experiment(client, args.experiment)
    body, winners = [], {}
    for sweep in args.sweeps:
        runs = search_all_runs(client, exp.experiment_id, f"tags.sweep = '{sweep}'")
        points: dict[str, list] = {}
        grid_keys = sorted({k[len("grid."):] for r in client.search_runs(
            [exp.experiment_id], filter_string=f"tags.stage = 'sweep' and attributes.run_name = '{sweep}'")
            for k in r.data.params if k.startswith("grid.") and k != "grid.seeds"})
        for r in runs:
            if r.info.status != "FINISHED":
                continue
            label = ", ".join(f"{k}={r.data.params.get(k, '?')}" for k in grid_keys)
            points.setdefault(label, []).append(r)
        rows, scores = [], {}
        for label, rs in sorted(points.items()):
            ev = [[v for v in history(client, r.info.run_id, "eval_success_rate")] for r in rs]
            final = [e[-1] for e in ev if e]
            last3 = [np.mean(e[-3:]) for e in ev if e]
            kl = [np.median(learner(client, r.info.run_id, "approx_kl")) for r in rs]
            stop = [np.mean(learner(client, r.info.run_id, "kl_stop_fraction")) for r in rs]
            clipf = [np.mean(learner(client, r.info.run_id, "clip_fraction")) for r in rs]
            scores[label] = (np.mean(final), np.mean(last3))
            rows.append([label, len(rs), f"{np.mean(final):.2f} ({', '.join(f'{v:.2f}' for v in final)})",
                         f"{np.mean(last3):.2f}", f"{np.mean(kl):.3g}", f"{np.mean(stop):.2f}", f"{np.mean(clipf):.2f}"])
        if not scores:
            continue
        best = max(scores, key=lambda k: scores[k])
        winners[sweep] = best
        body.append(f"**{sweep}** (winner: `{best}`)\n\n" + markdown_table(
            ["grid point", "seeds", "final eval success (per seed)", "mean of last 3 evals",
             "median approx KL / iter", "KL-stopped iterations", "clip fraction"], rows))
    text = "\n\n".join(body)
    print(text)
    write_section(f"dev-sweep:{args.experiment}", "Choosing the fine-tuning defaults on the development task",
                  "Made by `bash benchmarks/dev_sweep.sh` (the grids and the budget are in it: the same "
                  "number of points, seeds and env steps for each algorithm), then this report.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
