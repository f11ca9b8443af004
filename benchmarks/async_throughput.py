"""Synchronous vs asynchronous training throughput: env steps/s and learner samples/s, end to end.

    python benchmarks/async_throughput.py --config configs/pendulum_ncdpo.yaml --ks 5 20 \
        --runners 1 2 --learners 0 1 --steps 24000

Each cell is a real ``ncdpo train`` run (``train()``'s code path, no MLflow) of ``--steps`` env
steps: algorithm ncdpo (RLlib's PPO: the runners wait while the learner trains) or ncdpo-appo
(RLlib's APPO: the runners go on sampling with the weights they have), at each K (K=20 makes the
learner slow on purpose), with 1 or 2 EnvRunners and a local (0) or remote (1) learner. Reported,
over the iterations after the first (start-up and compilation): env steps sampled per second,
samples the learner trained per second (rows x epochs, RLlib's ``num_module_steps_trained``) and
the async path's weight lag. Results go to benchmarks/results/async_throughput.json as cells
finish (an interrupted run resumes; ``--fresh`` discards them) and into docs/benchmarks.md.

On a machine with more cores, add runners (``--runners 1 2 4 8``); on a Ray cluster, run it as a
job (``ray job submit ... -- python benchmarks/async_throughput.py --runners 4 16 --learners 1``)
with ``--set resources.gpus_per_learner=1`` for a GPU learner. Cells run one at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, markdown_table, run_cells, train_with_curve, write_section  # noqa: E402
from ncdpo_rllib.experiment.config import SYNCHRONOUS, load_config  # noqa: E402
from ncdpo_rllib.rl.appo import TRAINED_ROWS  # noqa: E402

ALGORITHMS = ("ncdpo", "ncdpo-appo")
ASYNC = tuple(SYNCHRONOUS)
MODULE = "default_policy"


def run_one(args, algorithm: str, k: int, runners: int, learners: int) -> dict:
    name = f"{algorithm}-k{k}-r{runners}-l{learners}"
    run_root = ROOT / "runs" / "bench" / "async_throughput"
    shutil.rmtree(run_root / name, ignore_errors=True)
    overrides = [f"algorithm={algorithm}", f"diffusion.denoising_steps={k}", f"resources.env_runners={runners}",
                 f"resources.learners={learners}", f"stop.env_steps={args.steps}", "stop.iterations=null",
                 "tracking.enabled=false", "checkpoint.every=0", f"checkpoint.dir={run_root}",
                 f"tracking.run_name={name}", "eval.every=0", *args.set]
    _, curve = train_with_curve(load_config(args.config, overrides), {
        "return": "return_mean",
        # The async learner's own count (RLlib's lifetime count stops moving with a remote learner).
        "trained": f"learner/{MODULE}/{TRAINED_ROWS}" if algorithm in ASYNC else
                   f"learner/{MODULE}/num_module_steps_trained_lifetime",
        "lag": f"learner/{MODULE}/diff_num_grad_updates_vs_sampler_policy",
        "dropped": "env_steps_dropped",
    })
    return {"curve": curve}


def rates(run: dict) -> tuple[float, str, float]:
    """(env steps/s, trained samples/s as text, mean weight lag) over the iterations after the first.
    An asynchronous learner's counts reach the driver late or in bunches; the count is the learner's
    own since its start, so it only lags. Where it arrived once only, the rate is that count over the
    time to its arrival, start-up included, marked with a *."""
    c = run["curve"]
    if len(c["env_steps"]) < 2:
        return float("nan"), "nan", float("nan")
    wall = c["wall_s"][-1] - c["wall_s"][0]
    sampled = c["env_steps"][-1] - c["env_steps"][0]
    seen = [(w, x) for w, x in zip(c["wall_s"], c["trained"]) if not np.isnan(x)]
    if len(seen) > 1:
        trained = f"{(seen[-1][1] - seen[0][1]) / (seen[-1][0] - seen[0][0]):,.0f}"
    else:
        trained = f"{seen[0][1] / seen[0][0]:,.0f}*" if seen else "0"
    return sampled / wall, trained, float(np.nanmean(c["lag"][1:]))


def dropped(run: dict) -> str:
    """Env steps RLlib dropped for a busy remote learner, over the whole run (runs saved before the
    count was recorded: n/a)."""
    counts = run["curve"].get("dropped")
    return "n/a" if counts is None else f"{int(np.nansum(counts)):,}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "pendulum_ncdpo.yaml"))
    p.add_argument("--ks", type=int, nargs="+", default=[5, 20])
    p.add_argument("--runners", type=int, nargs="+", default=[1, 2])
    p.add_argument("--learners", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=24_000)
    p.add_argument("--set", action="append", default=[], help="extra config override for every run")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--tag", default="", help="a separate results file and docs section (e.g. a comparison "
                   "of one setting, made with --set, on a machine shared with another job)")
    args = p.parse_args()
    suffix = f"_{args.tag}" if args.tag else ""
    env_id = load_config(args.config).env.id

    resources = load_config(args.config).resources
    grid, skipped = [], []
    for k, runners, learners in itertools.product(args.ks, args.runners, args.learners):
        cpus = dataclasses.replace(resources, env_runners=runners, learners=learners).cpus_needed
        if cpus > (os.cpu_count() or 1):  # Ray would wait for the CPUs for ever (train() refuses)
            skipped.append(f"{runners} runner(s) with {learners} remote learner(s) (needs {cpus} CPUs)")
            continue
        grid += [(k, runners, learners, algorithm) for algorithm in ALGORITHMS]
    cells = ((f"{algorithm} K={k}, {runners} runner(s), {learners} remote learner(s)",
              {"config": args.config, "algorithm": algorithm, "k": k, "runners": runners, "learners": learners,
               "steps": args.steps, "set": args.set},
              functools.partial(run_one, args, algorithm, k, runners, learners))
             for k, runners, learners, algorithm in grid)
    runs = run_cells(ROOT / "benchmarks" / "results" / f"async_throughput{suffix}.json", cells, fresh=args.fresh,
                     report_only=args.report_only)
    rows = []
    for run in runs:
        env_rate, train_rate, lag = rates(run)
        sync = next((r for r in runs if r["algorithm"] == "ncdpo" and
                     (r["k"], r["runners"], r["learners"]) == (run["k"], run["runners"], run["learners"])), None)
        speedup = env_rate / rates(sync)[0] if sync is not None and run is not sync else None
        rows.append([run["algorithm"], run["k"], run["runners"], run["learners"], f"{env_rate:,.0f}",
                     train_rate, "-" if run["algorithm"] == "ncdpo" else f"{lag:.1f}",
                     "-" if run["algorithm"] == "ncdpo" else dropped(run),
                     f"{speedup:.2f}x" if speedup else "-"])
    table = markdown_table(["algorithm", "K", "env runners", "remote learners", "env steps/s", "trained samples/s",
                            "weight lag", "env steps dropped", "env steps/s vs sync"], rows)
    print(table)
    body = (
        f"{env_id}, {args.steps:,} env steps per cell, rates over the iterations after the first. ncdpo = "
        "synchronous (RLlib's PPO: sampling stops while the learner trains); ncdpo-appo = asynchronous "
        "(RLlib's APPO: the runners sample on with the weights they have, V-trace corrects). 'trained samples/s' "
        "counts rows x epochs the learner trained (* = its count reached the driver once only: that count over "
        "the time to its arrival); 'env steps dropped': sampled, then dropped because the remote learner had "
        "`resources.learner_requests_in_flight` batches outstanding; 'weight lag' is RLlib's count of learner updates since the "
        "weights that sampled a batch (1 = the newest). Same PPO knobs for both (the config's), one cell at a "
        f"time.\n\n{table}\n"
        + (f"\nNot run on this machine ({os.cpu_count()} CPUs): {'; '.join(sorted(set(skipped)))}.\n" if skipped else "")
    )
    write_section(f"async_throughput{':' + args.tag if args.tag else ''}",
                  f"Synchronous vs asynchronous throughput: {env_id}{' (' + args.tag + ')' if args.tag else ''}", body)


if __name__ == "__main__":
    main()
