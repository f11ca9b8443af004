"""Final checkpoints evaluated offline: the deterministic policy vs the stochastic one (what PPO optimises).

    python benchmarks/final_eval.py runs/bench/finetune-*/*/ --episodes 10

Each run directory's final checkpoint is evaluated with ``ncdpo evaluate``'s code path (one env,
so no episode-length bias; the same evaluation seeds for every checkpoint), ``--episodes`` episodes
of the deterministic policy and as many of the stochastic one (``--explore``). Results go to
benchmarks/results/final_eval.json (resumable: a checkpoint already evaluated, unchanged since, is
reused) and a table into docs/benchmarks.md. NCDPO's deterministic action (the final mean, chain
noise drawn) can be far worse than its stochastic policy on Hopper; this measures how often.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, markdown_table, run_cells, write_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "final_eval.json"


def evaluate_both(ckpt: Path, episodes: int, seed: int) -> dict:
    from ncdpo_rllib.experiment.evaluate import evaluate

    out = {}
    for name, explore in (("deterministic", False), ("stochastic", True)):
        s = evaluate(str(ckpt), episodes=episodes, seed=seed, track=False, explore=explore)
        out[name] = {k: s[k] for k in ("return_mean", "return_std", "return_min", "return_max")}
        print(f"[bench] {ckpt}: {name} {s['return_mean']:.0f} +- {s['return_std']:.0f}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (their checkpoints/final is evaluated)")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--section", default="final-eval")
    args = p.parse_args()
    finals = [r.resolve() / "checkpoints" / "final" for r in args.runs if (r / "checkpoints" / "final").is_dir()]
    cells = []
    for ckpt in finals:
        from ncdpo_rllib.experiment.checkpoints import load_checkpoint_meta

        _, exp, state = load_checkpoint_meta(ckpt)
        key = {"run": f"{ckpt.parent.parent.parent.name}/{ckpt.parent.parent.name}", "env": exp.env.id,
               "algorithm": exp.algorithm, "seed": exp.seed, "env_steps": state.env_steps,
               "episodes": args.episodes, "eval_seed": args.seed}
        cells.append((key["run"], key, functools.partial(evaluate_both, ckpt, args.episodes, args.seed)))
    runs = run_cells(RESULTS, cells)
    rows = [[r["env"], r["algorithm"], r["seed"], f"{r['env_steps']:,}",
             *[f"{r[m]['return_mean']:.0f} ± {r[m]['return_std']:.0f}" for m in ("deterministic", "stochastic")],
             f"{r['stochastic']['return_mean'] - r['deterministic']['return_mean']:+.0f}"]
            for r in sorted(runs, key=lambda r: (r["env"], r["algorithm"], r["seed"]))]
    table = markdown_table(["env", "algorithm", "seed", "env steps trained", f"deterministic ({args.episodes} episodes)",
                            f"stochastic ({args.episodes} episodes)", "stochastic - deterministic"], rows)
    gaps = {a: [r["stochastic"]["return_mean"] - r["deterministic"]["return_mean"] for r in runs if r["algorithm"] == a]
            for a in sorted({r["algorithm"] for r in runs})}
    summary = "; ".join(f"{a}: mean gap {np.mean(g):+.0f} over {len(g)} checkpoint(s)" for a, g in gaps.items())
    print(table, summary, sep="\n")
    write_section(args.section, "Final checkpoints: deterministic vs stochastic policy",
                  f"Each run's final checkpoint, evaluated offline with one env (no episode-length bias) and the "
                  f"same seeds: {args.episodes} episodes of the deterministic policy and {args.episodes} of the "
                  f"stochastic one (`ncdpo evaluate --explore`). {summary}.\n\n{table}\n")


if __name__ == "__main__":
    main()
