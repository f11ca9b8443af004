"""Throughput and learner memory: NCDPO at K = 1, 5, 10, 20 vs RLlib's MLP PPO.

    python benchmarks/throughput.py --env Pendulum-v1 --ks 1 5 10 20

- rollout env steps/s: one in-process EnvRunner with 8 vector envs, exploration forward
  (K denoiser calls per env step for NCDPO), after a warm-up;
- learner samples/s: one update epoch over a 4000-step batch, minibatches of 128;
- learner memory: bytes of the tensors autograd keeps for the backward pass, per minibatch
  (what backprop through K steps costs, device-independent; measured with
  torch.autograd.graph.saved_tensors_hooks), with and without gradient checkpointing.
Each configuration runs in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import markdown_table, write_section  # noqa: E402

BATCH, MINIBATCH = 4000, 128


def measure(env_id: str, algorithm: str, k: int, checkpointing: bool) -> dict:
    """Runs in a child process: build runner + learner, time sampling and one update epoch."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from ncdpo_rllib.rl import NCDPOConfig, mean_std_filter_connector

    torch.set_num_threads(1)
    if algorithm == "ppo":
        cfg = PPOConfig().training(use_kl_loss=False)
    else:
        cfg = NCDPOConfig().diffusion(denoising_steps=k, grad_checkpointing=checkpointing)
    cfg.environment(env_id).env_runners(
        num_env_runners=0, num_envs_per_env_runner=8, env_to_module_connector=mean_std_filter_connector
    ).training(train_batch_size_per_learner=BATCH, minibatch_size=MINIBATCH, num_epochs=1).debugging(seed=0)
    runner = SingleAgentEnvRunner(config=cfg)
    learner = cfg.build_learner(env=runner.env)
    runner.module.set_state(learner.module["default_policy"].get_state())
    runner.sample(num_timesteps=800)  # warm-up
    t0 = time.perf_counter()
    episodes = runner.sample(num_timesteps=BATCH)
    sample_s = time.perf_counter() - t0
    steps = sum(len(e) for e in episodes)
    learner.update(episodes=runner.sample(num_timesteps=800), num_epochs=1, minibatch_size=MINIBATCH)  # warm-up
    t0 = time.perf_counter()
    learner.update(episodes=episodes, num_epochs=1, minibatch_size=MINIBATCH)
    update_s = time.perf_counter() - t0
    saved = {"bytes": 0}

    def pack(t):
        saved["bytes"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        learner.update(episodes=episodes, num_epochs=1, minibatch_size=MINIBATCH)
    minibatches = -(-steps // MINIBATCH)
    return {
        "env_steps_per_s": steps / sample_s,
        "learner_samples_per_s": steps / update_s,
        "saved_mb_per_minibatch": saved["bytes"] / minibatches / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="Pendulum-v1")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20])
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        env_id, algorithm, k, ckpt = args.child
        print(json.dumps(measure(env_id, algorithm, int(k), ckpt == "1")))
        return

    configs = [("ppo", 0, False)] + [("ncdpo", k, c) for k in args.ks for c in (False, True)]
    rows = []
    for algorithm, k, ckpt in configs:
        out = subprocess.run(
            [sys.executable, __file__, "--child", args.env, algorithm, str(k), "1" if ckpt else "0"],
            capture_output=True, text=True, check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        name = "MLP PPO" if algorithm == "ppo" else f"NCDPO K={k}"
        rows.append([name, "-" if algorithm == "ppo" else ("on" if ckpt else "off"),
                     f"{r['env_steps_per_s']:,.0f}", f"{r['learner_samples_per_s']:,.0f}", f"{r['saved_mb_per_minibatch']:.2f}"])
        print(rows[-1], flush=True)
    table = markdown_table(
        ["policy", "grad checkpointing", "rollout env steps/s (1 runner x 8 envs)",
         "learner samples/s (minibatch 128)", "saved for backward (MB / minibatch)"], rows)
    print(table)
    body = (
        f"{args.env}; one in-process EnvRunner, 8 vector envs, exploration forward; learner: one "
        f"epoch over a {BATCH}-step batch in minibatches of {MINIBATCH}, torch on 1 thread. 'Saved for "
        "backward' sums the tensors autograd keeps between forward and backward in one minibatch "
        "(the memory that backprop through the K-step chain costs; the MLP PPO row is the "
        "baseline).\n\n" + table
    )
    write_section(f"throughput:{args.env}", f"Throughput and learner memory vs K: {args.env}", body)


if __name__ == "__main__":
    main()
