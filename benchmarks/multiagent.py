"""Multi-agent: NCDPO vs MLP+MAPPO on PettingZoo MPE simple_spread, and multi-agent sampling cost.

    python benchmarks/multiagent.py --steps 150000 --seeds 0 1 2 \
        --configs configs/spread_ncdpo.yaml configs/spread_continuous_ncdpo.yaml \
        --variants ncdpo ppo ncdpo-local ppo-local

Variants: ``ncdpo`` / ``ppo`` = the config as it is (shared policy, centralised critic) with
algorithm ncdpo / ppo (MLP+MAPPO: RLlib's PPO, same PPO knobs); ``-local`` = the same with
``multi_agent.central_critic: false``. ``--local-on`` limits the ``-local`` variants to the
configs named (the critic comparison is run on the discrete task only by default).

Every run goes through ``ncdpo train``'s code path and MLflow (experiment ``bench-multiagent``);
curves are saved to ``benchmarks/results/multiagent.json`` as runs finish (resumable,
``--fresh`` discards). Then the sampling throughput of RLlib's MultiAgentEnvRunner with the
diffusion module (MPE with 1/2/3 agents) against the SingleAgentEnvRunner (Pendulum-v1).
Writes tables and a learning-curve PNG into docs/benchmarks.md. One training at a time.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, late_return, markdown_table, plot_runs, run_cells, save_figure, train_with_curve, write_section  # noqa: E402
from ncdpo_rllib.experiment.config import load_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "multiagent.json"
FRACTIONS = (1 / 3, 2 / 3, 1.0)


def overrides(variant: str) -> list[str]:
    algo, _, local = variant.partition("-")
    if algo not in ("ncdpo", "ppo") or local not in ("", "local"):
        raise SystemExit(f"unknown variant {variant!r}: ncdpo, ppo, ncdpo-local or ppo-local")
    return [f"algorithm={algo}"] + (["multi_agent.central_critic=false"] if local else [])


def task_name(config: str) -> str:
    return Path(config).stem.replace("_ncdpo", "")


def run_one(args, config: str, variant: str, seed: int) -> dict:
    run_name = f"{task_name(config)}-{variant}-s{seed}"
    run_root = ROOT / "runs" / "bench" / "multiagent"
    shutil.rmtree(run_root / run_name, ignore_errors=True)
    exp = load_config(config, [
        *overrides(variant), f"seed={seed}", f"stop.env_steps={args.steps}", "stop.iterations=null",
        "tracking.experiment=bench-multiagent", f"tracking.run_name={run_name}", "checkpoint.every=0",
        f"checkpoint.dir={run_root}",
    ])
    summary, curve = train_with_curve(exp)
    return {"config": config, "variant": variant, "seed": seed, "steps": args.steps, "curve": curve,
            "mlflow_run_id": summary["mlflow_run_id"]}


def summarise(runs: list[dict], steps: int) -> str:
    header = ["task", "variant", "seeds"] + [f"team return @ {int(f * steps):,}" for f in FRACTIONS] + [
        "first 3 iters", "wall s (mean)"]
    rows = []
    for config in dict.fromkeys(r["config"] for r in runs):
        for variant in dict.fromkeys(r["variant"] for r in runs if r["config"] == config):
            vr = [r for r in runs if r["config"] == config and r["variant"] == variant]
            cells = []
            for f in FRACTIONS:
                vals = np.array([late_return(r, f * steps) for r in vr])
                cells.append(f"{np.nanmean(vals):.1f} ± {np.nanstd(vals):.1f}")
            start = np.nanmean([np.nanmean(r["curve"]["return"][:3]) for r in vr])
            wall = np.mean([r["curve"]["wall_s"][-1] for r in vr])
            rows.append([task_name(config), variant, len(vr), *cells, f"{start:.1f}", f"{wall:.0f}"])
    return markdown_table(header, rows)


def plot(runs: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in runs))
    fig, axes = plt.subplots(len(configs), 2, figsize=(11, 3.8 * len(configs)), squeeze=False)
    for row, config in zip(axes, configs):
        for variant in dict.fromkeys(r["variant"] for r in runs if r["config"] == config):
            vr = [r for r in runs if r["config"] == config and r["variant"] == variant]
            plot_runs(row, vr, "return", variant)
        row[0].set_xlabel("env steps")
        row[1].set_xlabel("wall-clock seconds")
        for ax in row:
            ax.set_ylabel(f"{task_name(config)}: team return")
            ax.grid(alpha=0.3)
        row[0].legend()
    fig.suptitle("MPE simple_spread: NCDPO vs MLP+MAPPO (mean; band = min..max over seeds)")
    return save_figure(fig, "multiagent_spread")


def sampling_throughput(num_steps: int = 4000) -> str:
    """Env steps/s and agent steps/s of one local EnvRunner (8 envs), NCDPO K=5 module."""
    from ray.rllib.env.multi_agent_env_runner import MultiAgentEnvRunner
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from ncdpo_rllib.experiment.build import build_algo_config
    from ncdpo_rllib.experiment.config import parse_config

    base = {"diffusion": {"denoising_steps": 5, "hidden": [128, 128]}, "ppo": {"critic_hidden": [128, 128]},
            "resources": {"env_runners": 0, "envs_per_runner": 8}}
    cases = [("Pendulum-v1 (single-agent runner)", {"env": {"id": "Pendulum-v1"}})]
    for n in (1, 2, 3):
        env = {"kind": "pettingzoo", "id": "mpe2.simple_spread_v3",
               "kwargs": {"N": n, "max_cycles": 25, "continuous_actions": False}}
        cases.append((f"simple_spread N={n} (multi-agent runner, central critic)",
                      {"env": env, "multi_agent": {"central_critic": True}}))
    rows = []
    for label, extra in cases:
        exp = parse_config({**base, **extra})
        cfg = build_algo_config(exp)
        runner = (MultiAgentEnvRunner if exp.env.kind == "pettingzoo" else SingleAgentEnvRunner)(config=cfg)
        runner.sample(num_timesteps=500)  # warm-up
        t0 = time.perf_counter()
        episodes = runner.sample(num_timesteps=num_steps)
        dt = time.perf_counter() - t0
        env_steps = sum(len(ep) for ep in episodes)
        agent_steps = sum(ep.agent_steps() for ep in episodes) if exp.env.kind == "pettingzoo" else env_steps
        rows.append([label, f"{env_steps / dt:,.0f}", f"{agent_steps / dt:,.0f}"])
        runner.stop()
        print(f"[bench] sampling {label}: {env_steps / dt:,.0f} env steps/s", flush=True)
    return markdown_table(["sampling", "env steps/s", "agent steps/s"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["configs/spread_ncdpo.yaml", "configs/spread_continuous_ncdpo.yaml"])
    p.add_argument("--variants", nargs="+", default=["ncdpo", "ppo", "ncdpo-local", "ppo-local"])
    p.add_argument("--local-on", nargs="*", default=["configs/spread_ncdpo.yaml"],
                   help="configs on which the -local (no centralised critic) variants run")
    p.add_argument("--steps", type=int, default=150_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--fresh", action="store_true", help="discard saved results")
    args = p.parse_args()

    cells = ((f"{config} {variant} seed {seed} ({args.steps:,} env steps)",
              {"config": config, "variant": variant, "seed": seed, "steps": args.steps},
              functools.partial(run_one, args, config, variant, seed))
             for seed in args.seeds for config in args.configs for variant in args.variants
             if not variant.endswith("-local") or config in args.local_on)
    runs = run_cells(RESULTS, cells, fresh=args.fresh)
    table = summarise(runs, args.steps)
    image = plot(runs)
    print(table)
    body = (
        "Team return = RLlib's multi-agent episode return (the sum over agents) of the episodes that "
        "ended in an iteration; each cell is the mean of the last 3 iterations up to that env-step count, "
        f"then mean ± std over seeds {args.seeds}. 'first 3 iters': the same at the start. "
        "ncdpo / ppo: shared policy with the centralised critic (ppo = MLP+MAPPO, RLlib's PPO "
        "with the same PPO knobs); -local: the same without the centralised critic.\n\n"
        f"{table}\n\n![learning curves]({image.relative_to(ROOT / 'docs')})\n"
    )
    if not args.skip_throughput:
        body += "\n### Sampling throughput: multi-agent vs single-agent\n\n" + sampling_throughput() + "\n"
    write_section("multiagent:spread", "Multi-agent: NCDPO vs MLP+MAPPO on MPE simple_spread", body)


if __name__ == "__main__":
    main()
