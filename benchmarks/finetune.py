"""Fine-tuning from demonstrations: pre-trained policy, then NCDPO vs DPPO vs MLP-PPO from scratch.

    python benchmarks/finetune.py --env hopper --steps 100000 --seeds 0 1 2 \
        --variants ncdpo:10 dppo:10 ppo

Pipeline (each stage reused when its output exists, so an interrupted benchmark resumes):
1. the ``medium`` dataset: ``ncdpo collect configs/<env>_collect.yaml`` when data/<id>/medium
   is missing (trains the PPO expert: the long part);
2. per K, behaviour cloning with ``configs/<env>_pretrain.yaml`` (K overridden), evaluated;
3. per variant and seed, a real ``ncdpo train`` run: ``ncdpo:K`` / ``dppo:K`` fine-tune the
   K-step pre-trained policy (``configs/<env>_finetune_<alg>.yaml``; DPPO fine-tunes the last
   K/2 steps), ``ppo`` trains RLlib's MLP PPO from scratch (``configs/<env>_ppo.yaml``).
   Every run evaluates the deterministic policy every ``--eval-every`` iterations.

Results (curves per run) go to benchmarks/results/finetune_<id>.json; the table and a PNG of
evaluation return vs env steps and vs wall-clock go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import IMAGES, ROOT, markdown_table, write_section  # noqa: E402
from ncdpo_rllib.experiment.config import load_config  # noqa: E402

ENVS = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5"}


def ensure_dataset(args) -> Path:
    from ncdpo_rllib.experiment.collect import collect

    dataset = ROOT / "data" / args.env_id / "medium"
    if not dataset.is_dir():
        print(f"[bench] {dataset} missing: running ncdpo collect configs/{args.env}_collect.yaml", flush=True)
        collect(load_config(ROOT / "configs" / f"{args.env}_collect.yaml", [f"collect.out={ROOT / 'data'}"]))
    return dataset


def ensure_pretrained(args, k: int, dataset: Path) -> dict:
    """The K-step pre-trained checkpoint (trained once, then reused) and its evaluation."""
    from ncdpo_rllib.experiment.pretrain import pretrain

    run_dir = ROOT / "runs" / "bench" / f"finetune-{args.env_id}" / f"pretrain-k{k}"
    meta_file = run_dir / "pretrained" / "pretrain.json"
    if not meta_file.is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[bench] pre-training K={k} on {dataset}", flush=True)
        exp = load_config(
            ROOT / "configs" / f"{args.env}_pretrain.yaml",
            [f"diffusion.denoising_steps={k}", f"pretrain.dataset={dataset}", f"checkpoint.dir={run_dir.parent}",
             f"tracking.run_name={run_dir.name}", f"tracking.experiment=bench-finetune-{args.env_id}",
             f"pretrain.eval_episodes={args.eval_episodes}", *args.pretrain_set],
        )
        pretrain(exp)
    meta = json.loads(meta_file.read_text())
    return {"checkpoint": str(meta_file.parent), "eval": meta.get("eval"), "wall_s": meta.get("wall_s")}


def run_one(args, variant: str, seed: int, pretrained: dict) -> dict:
    from ncdpo_rllib.experiment.train import train

    algo, _, k = variant.partition(":")
    run_root = ROOT / "runs" / "bench" / f"finetune-{args.env_id}"
    run_name = f"{variant.replace(':', '-k')}-s{seed}"
    shutil.rmtree(run_root / run_name, ignore_errors=True)
    common = [
        f"seed={seed}", f"stop.env_steps={args.steps}", "stop.iterations=null",
        f"eval.every={args.eval_every}", f"eval.episodes={args.eval_episodes}",
        f"tracking.experiment=bench-finetune-{args.env_id}", f"tracking.run_name={run_name}",
        "checkpoint.every=0", f"checkpoint.dir={run_root}", *args.set,
    ]
    if algo == "ppo":
        exp = load_config(ROOT / "configs" / f"{args.env}_ppo.yaml", common)
    else:
        extra = [f"diffusion.denoising_steps={k}", f"init_from={pretrained[int(k)]['checkpoint']}"]
        if algo == "dppo":
            extra.append(f"diffusion.finetune_steps={max(int(k) // 2, 1)}")
        exp = load_config(ROOT / "configs" / f"{args.env}_finetune_{algo}.yaml", extra + common)
    curve = {"env_steps": [], "wall_s": [], "return": [], "eval_return": []}

    def record(state, metrics):
        curve["env_steps"].append(state.env_steps)
        curve["wall_s"].append(state.wall_s)
        curve["return"].append(metrics.get("return_mean", float("nan")))
        curve["eval_return"].append(metrics.get("eval_return_mean", float("nan")))

    summary = train(exp, on_iteration=record)
    return {"variant": variant, "seed": seed, "curve": curve, "mlflow_run_id": summary["mlflow_run_id"]}


def eval_at(run: dict, steps: float) -> float:
    """The last evaluation at or before ``steps`` env steps."""
    c = run["curve"]
    vals = [r for s, r in zip(c["env_steps"], c["eval_return"]) if s <= steps * 1.0001 and not np.isnan(r)]
    return float(vals[-1]) if vals else float("nan")


def summarise(runs, variants, budgets, pretrained) -> str:
    header = ["variant", "seeds"] + [f"eval return @ {b:,}" for b in budgets] + ["wall s (mean)"]
    rows = []
    for k, pre in sorted(pretrained.items()):
        ev = pre["eval"] or {}
        rows.append([f"pre-trained K={k} (no fine-tuning)", "-",
                     *[f"{ev.get('return_mean', float('nan')):.1f} ± {ev.get('return_std', float('nan')):.1f}"] * len(budgets),
                     f"{pre['wall_s']:.0f} (BC)"])
    for v in variants:
        vr = [r for r in runs if r["variant"] == v]
        if not vr:
            continue
        cells = []
        for b in budgets:
            vals = np.array([eval_at(r, b) for r in vr])
            cells.append(f"{np.nanmean(vals):.1f} ± {np.nanstd(vals):.1f}")
        wall = np.mean([r["curve"]["wall_s"][-1] for r in vr])
        rows.append([v, len(vr), *cells, f"{wall:.0f}"])
    return markdown_table(header, rows)


def plot(runs, variants, pretrained, env_id: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in variants:
        vr = [r for r in runs if r["variant"] == v]
        if not vr:
            continue
        n = min(len(r["curve"]["env_steps"]) for r in vr)
        evals = np.array([r["curve"]["eval_return"][:n] for r in vr], dtype=float)
        keep = ~np.isnan(evals).any(axis=0)
        for ax, key in zip(axes, ("env_steps", "wall_s")):
            x = np.mean([r["curve"][key][:n] for r in vr], axis=0)[keep]
            line = ax.plot(x, evals[:, keep].mean(0), marker=".", label=v)[0]
            ax.fill_between(x, evals[:, keep].min(0), evals[:, keep].max(0), alpha=0.15, color=line.get_color())
    for k, pre in pretrained.items():
        if pre["eval"]:
            for ax in axes:
                ax.axhline(pre["eval"]["return_mean"], ls="--", lw=1, color="grey")
            axes[0].annotate(f"pre-trained K={k}", (0, pre["eval"]["return_mean"]), fontsize=8, color="grey")
    axes[0].set_xlabel("env steps")
    axes[1].set_xlabel("wall-clock seconds (training + evaluation)")
    for ax in axes:
        ax.set_ylabel("evaluation return (deterministic)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{env_id}: fine-tuning from medium demos (mean, band = min..max over seeds)")
    IMAGES.mkdir(parents=True, exist_ok=True)
    out = IMAGES / f"finetune_{env_id}.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", choices=sorted(ENVS), default="hopper")
    p.add_argument("--steps", type=int, default=100_000, help="env-step budget of every run")
    p.add_argument("--budgets", type=int, nargs="*", help="table columns (default: steps/4, steps/2, steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["ncdpo:10", "dppo:10", "ppo"])
    p.add_argument("--eval-every", type=int, default=1, help="iterations between evaluations")
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--set", action="append", default=[], help="extra override for every training run")
    p.add_argument("--pretrain-set", action="append", default=[], help="extra override for pre-training")
    p.add_argument("--section", default=None, help="docs/benchmarks.md section name (default: per env)")
    p.add_argument("--fresh", action="store_true", help="discard saved run results for this env")
    args = p.parse_args()
    args.env_id = ENVS[args.env]
    budgets = args.budgets or [args.steps // 4, args.steps // 2, args.steps]

    results_file = ROOT / "benchmarks" / "results" / f"finetune_{args.env_id}.json"
    results_file.parent.mkdir(parents=True, exist_ok=True)
    saved = [] if args.fresh or not results_file.exists() else json.loads(results_file.read_text())
    key = {"steps": args.steps, "set": args.set, "eval_every": args.eval_every}
    runs = [r for r in saved if all(r.get(k) == v for k, v in key.items())]

    dataset = ensure_dataset(args)
    ks = sorted({int(v.split(":")[1]) for v in args.variants if ":" in v})
    pretrained = {k: ensure_pretrained(args, k, dataset) for k in ks}
    for k, pre in pretrained.items():
        print(f"[bench] pre-trained K={k}: {pre['eval']}", flush=True)
    for seed in args.seeds:
        for variant in args.variants:
            if any(r["variant"] == variant and r["seed"] == seed for r in runs):
                print(f"[bench] {variant} seed {seed}: saved result reused", flush=True)
                continue
            print(f"[bench] {variant} seed {seed}: {args.steps:,} env steps", flush=True)
            runs.append(run_one(args, variant, seed, pretrained) | key)
            others = [r for r in saved if not all(r.get(k) == v for k, v in key.items())]
            results_file.write_text(json.dumps(others + runs))
    runs = [r for r in runs if r["variant"] in args.variants and r["seed"] in args.seeds]
    table = summarise(runs, args.variants, budgets, pretrained)
    image = plot(runs, args.variants, pretrained, args.env_id)
    print(table)
    body = (
        f"Dataset: `data/{args.env_id}/medium` (from `ncdpo collect configs/{args.env}_collect.yaml`). "
        f"Evaluation return = mean of {args.eval_episodes} deterministic episodes, the last evaluation at or "
        f"before each budget, then mean ± std over seeds {args.seeds}. ncdpo:K / dppo:K fine-tune the K-step "
        f"pre-trained policy (`configs/{args.env}_finetune_*.yaml`); ppo is RLlib's MLP PPO from scratch "
        f"(`configs/{args.env}_ppo.yaml`). Wall-clock includes the periodic evaluations.\n\n{table}\n\n"
        f"![fine-tuning curves]({image.relative_to(ROOT / 'docs')})\n"
    )
    name = args.section or f"finetune:{args.env_id}"
    write_section(name, f"Fine-tuning from demonstrations: {args.env_id}", body)


if __name__ == "__main__":
    main()
