"""Sample efficiency from scratch: NCDPO at several K vs RLlib's MLP PPO, same PPO knobs and seeds.

    python benchmarks/sample_efficiency.py --config configs/pendulum_ncdpo.yaml \
        --steps 160000 --seeds 0 1 2 --variants ppo ncdpo:5 ncdpo:10 ncdpo:20

Every run goes through the real training runner (``ncdpo train``'s code path) and is logged
to MLflow (experiment ``bench-<env>``). Per-iteration curves are saved to
``benchmarks/results/<env>.json`` as runs finish, so an interrupted benchmark resumes where it
stopped (``--fresh`` discards them). Writes a table and a learning-curve PNG (vs env steps and
vs wall-clock) into docs/benchmarks.md. Runs one training at a time.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, late_return, markdown_table, plot_runs, run_cells, save_figure, train_with_curve, write_section  # noqa: E402
from ncdpo_rllib.experiment.config import load_config  # noqa: E402

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def variant_overrides(variant: str) -> list[str]:
    """ppo / appo: RLlib's MLP on PPO / APPO; ncdpo:K / ncdpo-appo:K: NCDPO at K steps, synchronous or
    asynchronous (``ncdpo train``'s algorithm key)."""
    algorithm, _, k = variant.partition(":")
    if algorithm in ("ppo", "appo") and not k:
        return [f"algorithm={algorithm}"]
    if algorithm in ("ncdpo", "ncdpo-appo") and k.isdigit():
        return [f"algorithm={algorithm}", f"diffusion.denoising_steps={int(k)}"]
    raise SystemExit(f"unknown variant {variant!r}: use ppo, appo, ncdpo:K or ncdpo-appo:K")


def run_one(args, variant: str, seed: int) -> dict:
    run_name = f"{variant.replace(':', '-k')}-s{seed}"
    run_root = ROOT / "runs" / "bench" / args.env_id
    shutil.rmtree(run_root / run_name, ignore_errors=True)  # a rerun replaces its own old output
    overrides = [
        *variant_overrides(variant),
        f"seed={seed}",
        f"stop.env_steps={args.steps}",
        "stop.iterations=null",
        f"tracking.experiment=bench-{args.env_id}",
        f"tracking.run_name={run_name}",
        "checkpoint.every=0",
        f"checkpoint.dir={run_root}",
        *args.set,
    ]
    summary, curve = train_with_curve(load_config(args.config, overrides))
    return {"variant": variant, "seed": seed, "curve": curve, "mlflow_run_id": summary["mlflow_run_id"]}


def summarise(runs: list[dict], variants: list[str], steps: int) -> str:
    header = ["variant", "seeds"] + [f"return @ {int(f * steps):,}" for f in FRACTIONS] + ["wall s (mean)", "final vs PPO"]
    rows = []
    finals = {}
    for v in variants:
        vr = [r for r in runs if r["variant"] == v]
        if not vr:
            continue
        cells = []
        for f in FRACTIONS:
            vals = np.array([late_return(r, f * steps) for r in vr])
            cells.append(f"{np.nanmean(vals):.1f} ± {np.nanstd(vals):.1f}")
        finals[v] = float(np.nanmean([late_return(r, steps) for r in vr]))
        wall = np.mean([r["curve"]["wall_s"][-1] for r in vr])
        rows.append([v, len(vr), *cells, f"{wall:.0f}", None])
    ppo = finals.get("ppo")
    for row in rows:
        f = finals[row[0]]
        # Returns can be negative (Pendulum): report the difference there, the ratio otherwise.
        row[-1] = "-" if ppo is None else (f"{f / ppo:.2f}x" if ppo > 0 and f > 0 else f"{f - ppo:+.1f}")
    return markdown_table(header, rows)


def plot(runs: list[dict], variants: list[str], env_id: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in variants:
        vr = [r for r in runs if r["variant"] == v]
        if not vr:
            continue
        plot_runs(axes, vr, "return", v)
    axes[0].set_xlabel("env steps")
    axes[1].set_xlabel("wall-clock seconds")
    for ax in axes:
        ax.set_ylabel("mean episode return (per iteration)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{env_id}: NCDPO vs MLP PPO from scratch (mean, band = min..max over seeds)")
    return save_figure(fig, f"sample_efficiency_{env_id}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="experiment YAML giving env and PPO knobs")
    p.add_argument("--steps", type=int, default=160_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["ppo", "ncdpo:5", "ncdpo:10", "ncdpo:20"])
    p.add_argument("--set", action="append", default=[], help="extra config override for every run")
    p.add_argument("--fresh", action="store_true", help="discard saved results for this env")
    p.add_argument("--tag", default="", help="a separate results file and docs section (e.g. async: the "
                   "synchronous vs asynchronous comparison, every variant trained in this one run)")
    args = p.parse_args()
    args.env_id = load_config(args.config).env.id
    suffix = f"_{args.tag}" if args.tag else ""

    results_file = ROOT / "benchmarks" / "results" / f"sample_efficiency_{args.env_id}{suffix}.json"
    cells = ((f"{variant} seed {seed} ({args.steps:,} env steps)",
              {"variant": variant, "seed": seed, "steps": args.steps, "set": args.set},
              functools.partial(run_one, args, variant, seed))
             for seed in args.seeds for variant in args.variants)
    runs = run_cells(results_file, cells, fresh=args.fresh)
    table = summarise(runs, args.variants, args.steps)
    image = plot(runs, args.variants, args.env_id + suffix)
    print(table)
    body = (
        f"Return = mean episode return of the iterations ending at that env-step count (mean of "
        f"the last 3 iterations, then mean ± std over seeds {args.seeds}). Same PPO knobs for all "
        f"variants (from `{args.config}`{' plus ' + ', '.join(args.set) if args.set else ''}). "
        f"'final vs PPO' is a ratio for positive returns, a difference otherwise.\n\n{table}\n\n"
        f"![learning curves]({image.relative_to(ROOT / 'docs')})\n"
    )
    write_section(f"sample_efficiency:{args.env_id}{':' + args.tag if args.tag else ''}",
                  f"Sample efficiency from scratch: {args.env_id}{' (' + args.tag + ')' if args.tag else ''}", body)


if __name__ == "__main__":
    main()
