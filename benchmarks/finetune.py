"""Fine-tuning from demonstrations on MuJoCo locomotion: pre-trained policy, then NCDPO vs DPPO vs MLP-PPO.

    python benchmarks/finetune.py --envs hopper walker2d halfcheetah --steps 1000000 --seeds 0 1 2

Pipeline per env (each stage reused when its output exists, so an interrupted benchmark resumes):
1. the ``medium`` dataset: ``ncdpo collect configs/<env>_collect.yaml`` when data/<id>/medium
   is missing (trains the PPO expert: the long part);
2. behaviour cloning with ``configs/<env>_pretrain.yaml``, evaluated, pinned in
   benchmarks/results/pretrained/locomotion-<env>-k<K>/ (later seeds and sessions start from it);
3. per variant and seed, a real ``ncdpo train`` run. ``ncdpo`` / ``dppo`` fine-tune the pre-trained
   policy with ``configs/<env>_finetune_<algo>.yaml`` (the task, the shared locomotion settings and
   the algorithm's frozen recipe from configs/recipes/); ``ncdpo:K`` / ``dppo:K`` at K denoising
   steps instead of the file's; ``ppo`` trains RLlib's MLP PPO from scratch (``configs/tasks/locomotion_ppo.yaml``, the experts'
   settings, then ``configs/<env>_ppo.yaml``).
   Every run evaluates the deterministic policy every ``eval.every`` iterations.

Results (curves per run, keyed by the variant's resolved config so that a changed recipe reruns)
go to benchmarks/results/locomotion.json; the table, the aggregate over envs (rliable IQM of
D4RL-normalised returns, probability of improvement) and PNGs of evaluation return vs env steps
and vs wall-clock go into docs/benchmarks.md.

Several processes may share the results file and the pinned checkpoints (they take turns under a
lock): on a machine with more cores, one process per seed, then once more with every seed to write
the report from the saved runs (wall-clock columns then say the runs shared the machine):

    for s in 0 1 2; do python benchmarks/finetune.py --seeds $s & done; wait
    python benchmarks/finetune.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    IMAGES, ROOT, markdown_table, pinned_pretrained, plot_runs, run_cells, save_figure, train_with_curve, write_section)
from ncdpo_rllib.experiment.config import load_config  # noqa: E402
from ncdpo_rllib.experiment.loader import read_config_data  # noqa: E402

ENVS = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5"}
D4RL_RANGE = {"hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3), "halfcheetah": (-280.178953, 12135.0)}
"""D4RL's reference (random, expert) returns of the -v2 tasks, the usual normaliser: 100 x (R - random) /
(expert - random). The -v5 tasks have the same dynamics and reward terms."""
RESULTS = ROOT / "benchmarks" / "results" / "locomotion.json"
LEARNER = "learner/default_policy/"
CURVE_METRICS = {"return": "return_mean", "eval_return": "eval_return_mean",
                 **{key: f"{LEARNER}{key}" for key in ("approx_kl", "kl_stop_fraction", "clip_fraction")}}


def variant_files(env: str, variant: str) -> list[Path]:
    algo = variant.partition(":")[0]
    if algo == "ppo":  # the locomotion PPO settings (the experts' too), whatever the env's file sets
        return [ROOT / "configs" / "tasks" / "locomotion_ppo.yaml", ROOT / "configs" / f"{env}_ppo.yaml"]
    return [ROOT / "configs" / f"{env}_finetune_{algo}.yaml"]


def variant_k(env: str, variant: str) -> int | None:
    """The variant's denoising steps (None for MLP PPO)."""
    algo, _, k = variant.partition(":")
    if algo == "ppo":
        return None
    return int(k) if k else load_config(variant_files(env, variant)).diffusion.denoising_steps


def ensure_pretrained(env: str, k: int, eval_episodes: int) -> dict:
    """The K-step pre-trained checkpoint (collected and pre-trained once, then pinned) and its evaluation."""

    def make() -> Path:
        from ncdpo_rllib.experiment.collect import collect
        from ncdpo_rllib.experiment.pretrain import pretrain

        env_id = ENVS[env]
        dataset = ROOT / "data" / env_id / "medium"
        if not dataset.is_dir():
            print(f"[bench] {dataset} missing: running ncdpo collect configs/{env}_collect.yaml", flush=True)
            collect(load_config(ROOT / "configs" / f"{env}_collect.yaml", [f"collect.out={ROOT / 'data'}"]))
        run_dir = ROOT / "runs" / "bench" / f"finetune-{env_id}" / f"pretrain-k{k}"
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[bench] pre-training {env} K={k} on {dataset}", flush=True)
        pretrain(load_config(ROOT / "configs" / f"{env}_pretrain.yaml", [
            f"diffusion.denoising_steps={k}", f"pretrain.dataset={dataset}", f"checkpoint.dir={run_dir.parent}",
            f"tracking.run_name={run_dir.name}", f"tracking.experiment=bench-finetune-{env_id}",
            f"pretrain.eval_episodes={eval_episodes}"]))
        return run_dir / "pretrained"

    pinned = pinned_pretrained(f"locomotion-{env}-k{k}", make)
    meta = json.loads((pinned / "pretrain.json").read_text())
    return {"checkpoint": str(pinned), "eval": meta.get("eval"), "wall_s": meta.get("wall_s")}


def run_one(args, env: str, variant: str, seed: int, pretrained: dict | None) -> dict:
    env_id = ENVS[env]
    run_root = ROOT / "runs" / "bench" / f"finetune-{env_id}"
    run_name = f"{variant.replace(':', '-k')}-s{seed}"
    shutil.rmtree(run_root / run_name, ignore_errors=True)
    overrides = [f"seed={seed}", f"stop.env_steps={args.steps}", "stop.iterations=null",
                 f"eval.every={args.eval_every}", f"eval.episodes={args.eval_episodes}",
                 f"tracking.experiment=bench-finetune-{env_id}", f"tracking.run_name={run_name}",
                 "checkpoint.every=0", f"checkpoint.dir={run_root}", *args.set]
    if pretrained is not None:
        k = variant_k(env, variant)
        overrides = [f"diffusion.denoising_steps={k}", f"init_from={pretrained['checkpoint']}",
                     f"diffusion.finetune_steps={max(k // 2, 1)}" if variant.startswith("dppo") else None,
                     *overrides]
    exp = load_config(variant_files(env, variant), [o for o in overrides if o])
    summary, curve = train_with_curve(exp, CURVE_METRICS)
    return {"env": env, "variant": variant, "seed": seed, "curve": curve, "mlflow_run_id": summary["mlflow_run_id"]}


def eval_at(run: dict, steps: float, key: str = "eval_return") -> float:
    """The last evaluation (``key="return"``: training episode return) at or before ``steps`` env steps."""
    c = run["curve"]
    vals = [r for s, r in zip(c["env_steps"], c[key]) if s <= steps * 1.0001 and not np.isnan(r)]
    return float(vals[-1]) if vals else float("nan")


def normalised(env: str, value: float) -> float:
    low, high = D4RL_RANGE[env]
    return 100.0 * (value - low) / (high - low)


def summarise(args, runs, budgets, pretrained) -> str:
    header = (["env", "variant", "seeds"] + [f"eval return @ {b:,}" for b in budgets]
              + ["best eval", f"training return @ {budgets[-1]:,}", "KL-stopped", "wall s"])
    rows = []
    for env in args.envs:
        for k, pre in sorted(pretrained.get(env, {}).items()):
            ev = pre["eval"] or {}
            cell = f"{ev.get('return_mean', float('nan')):.0f} ± {ev.get('return_std', float('nan')):.0f}"
            rows.append([ENVS[env], f"pre-trained K={k}", "-", *[cell] * len(budgets), "-", "-", "-",
                         f"{pre['wall_s']:.0f} (BC)"])
        for v in args.variants:
            vr = [r for r in runs if r["env"] == env and r["variant"] == v]
            if not vr:
                continue
            cells = [f"{np.nanmean(x):.0f} ± {np.nanstd(x):.0f}" for x in ([eval_at(r, b) for r in vr] for b in budgets)]
            best = [np.nanmax(r["curve"]["eval_return"]) for r in vr]
            train = [eval_at(r, budgets[-1], "return") for r in vr]
            stops = [np.nanmean(r["curve"]["kl_stop_fraction"]) for r in vr]
            stop = "-" if np.isnan(stops).all() else f"{100 * np.nanmean(stops):.0f}%"
            wall = np.mean([r["curve"]["wall_s"][-1] for r in vr])
            rows.append([ENVS[env], v, len(vr), *cells, f"{np.mean(best):.0f} ± {np.std(best):.0f}",
                         f"{np.nanmean(train):.0f} ± {np.nanstd(train):.0f}", stop, f"{wall:.0f}"])
    return markdown_table(header, rows)


def aggregate_section(args, runs, pretrained) -> str:
    """rliable statistics over envs x seeds of the final D4RL-normalised evaluation return."""
    from ncdpo_rllib.experiment.aggregate import aggregate_markdown, aggregate_scores, plot_aggregate, score_matrix

    scores = {v: {env: [normalised(env, eval_at(r, args.steps)) for r in runs if r["env"] == env and r["variant"] == v]
                  for env in args.envs} for v in args.variants}
    scores = {v: by_env for v, by_env in scores.items() if all(by_env.values())}
    if all(pretrained.get(env) for env in args.envs):
        scores["pre-trained"] = {env: [normalised(env, next(iter(pretrained[env].values()))["eval"]["return_mean"])]
                                 for env in args.envs}
    if len(scores) < 2:
        return ""
    matrices = {name: score_matrix(by_env)[0] for name, by_env in scores.items()}
    agg = aggregate_scores(matrices)
    IMAGES.mkdir(parents=True, exist_ok=True)
    image = IMAGES / f"{args.section}-aggregate.png"
    plot_aggregate(agg, "normalised return", image)
    return (f"Aggregate over {', '.join(ENVS[e] for e in args.envs)} x seeds (final evaluation return, "
            f"D4RL-normalised: 100 x (R - random) / (expert - random) with D4RL's reference returns; "
            f"IQM and 95% stratified-bootstrap intervals, rliable; pre-trained: one behaviour-cloning run per env):\n\n"
            f"{aggregate_markdown(agg, 'normalised return')}\n\n![aggregate]({image.relative_to(ROOT / 'docs')})\n")


def plot(args, runs, pretrained) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(args.envs), figsize=(4.6 * len(args.envs), 7), squeeze=False)
    for col, env in enumerate(args.envs):
        for v in args.variants:
            vr = [r for r in runs if r["env"] == env and r["variant"] == v]
            if not vr:
                continue
            plot_runs((axes[0][col], axes[1][col]), vr, "eval_return", f"{v} ({len(vr)} seeds)")
        for k, pre in pretrained.get(env, {}).items():
            for row in range(2):
                axes[row][col].axhline(pre["eval"]["return_mean"], ls="--", lw=1, color="grey",
                                       label=f"pre-trained K={k}" if row == 0 else None)
        for row, xlabel in enumerate(("env steps", "wall-clock s (training + evaluation, mean over seeds)")):
            ax = axes[row][col]
            ax.set_title(ENVS[env], fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("evaluation return (deterministic)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Fine-tuning from medium demonstrations (mean, band = min..max over seeds)")
    return save_figure(fig, args.section)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", nargs="+", choices=sorted(ENVS), default=["hopper", "walker2d", "halfcheetah"])
    p.add_argument("--steps", type=int, default=1_000_000, help="env-step budget of every run")
    p.add_argument("--budgets", type=int, nargs="*", help="table columns (default: steps/4, steps/2, steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["ncdpo", "dppo", "ppo"],
                   help="ncdpo, dppo (K from the config file), ncdpo:K, dppo:K, ppo")
    p.add_argument("--eval-every", type=int, default=2, help="iterations between evaluations")
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--set", action="append", default=[], help="extra override for every training run")
    p.add_argument("--section", default="locomotion", help="docs/benchmarks.md section to (re)write")
    p.add_argument("--results", type=Path, default=RESULTS, help="run results JSON (resumable)")
    p.add_argument("--fresh", action="store_true", help="discard saved run results")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the section from the saved runs (a missing run is left out and said)")
    args = p.parse_args()
    budgets = args.budgets or [args.steps // 4, args.steps // 2, args.steps]

    @functools.cache
    def key(env: str, variant: str) -> dict:
        """What a saved run must match to be reused: the resolved files (includes read) and the settings."""
        config = {}
        for f in variant_files(env, variant):
            config |= read_config_data(f)
        return {"steps": args.steps, "set": args.set, "eval_every": args.eval_every,
                "eval_episodes": args.eval_episodes, "config": config}

    pretrained: dict[str, dict[int, dict]] = {}
    for env in args.envs:
        for k in sorted({variant_k(env, v) for v in args.variants} - {None}):
            pretrained.setdefault(env, {})[k] = ensure_pretrained(env, k, args.eval_episodes)
            print(f"[bench] {env} pre-trained K={k}: {pretrained[env][k]['eval']}", flush=True)

    def train_one(env: str, variant: str, seed: int) -> dict:
        k = variant_k(env, variant)
        return run_one(args, env, variant, seed, None if k is None else pretrained[env][k])

    cells = ((f"{env} {variant} seed {seed} ({args.steps:,} env steps)",
              {"env": env, "variant": variant, "seed": seed} | key(env, variant),
              functools.partial(train_one, env, variant, seed))
             for seed in args.seeds for env in args.envs for variant in args.variants)
    runs = run_cells(args.results, cells, fresh=args.fresh, report_only=args.report_only)
    table = summarise(args, runs, budgets, pretrained)
    print(table)
    agg = aggregate_section(args, runs, pretrained)
    print(agg)
    image = plot(args, runs, pretrained)
    body = (
        f"Datasets: `data/<env>/medium` (from `ncdpo collect configs/<env>_collect.yaml`). Evaluation return = mean "
        f"of {args.eval_episodes} deterministic episodes, the last evaluation at or before each budget, then mean ± std "
        f"over seeds {args.seeds}; best eval: the best evaluation of each run; training return: the mean return of the "
        f"(stochastic) training episodes of the last iteration at or before the budget; KL-stopped: the mean fraction of "
        f"epochs that `target_kl` stopped. ncdpo / dppo fine-tune the pinned pre-trained policy with "
        f"`configs/<env>_finetune_<algo>.yaml` (task + `configs/tasks/locomotion_finetune.yaml` + the frozen recipe "
        f"in `configs/recipes/`); ppo is RLlib's MLP PPO from scratch (`configs/tasks/locomotion_ppo.yaml`, then "
        f"`configs/<env>_ppo.yaml`). Wall-clock includes "
        f"the periodic evaluations.\n\n{table}\n\n{agg}\n\n![fine-tuning curves]({image.relative_to(ROOT / 'docs')})\n"
    )
    write_section(args.section, "Fine-tuning from demonstrations: MuJoCo locomotion (recipes)", body)


if __name__ == "__main__":
    main()
