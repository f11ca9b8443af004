"""Throughput and learner memory: NCDPO (and DPPO) at K = 1, 5, 10, 20 vs RLlib's MLP PPO.

    python benchmarks/throughput.py --env Pendulum-v1 --ks 1 5 10 20
    python benchmarks/throughput.py --env Hopper-v5 --ks 5 10 20 --algorithms ncdpo dppo \
        --hidden 256 256 --action-chunk 4       # the fine-tuning configs' architecture

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

from benchmarks.common import learner_cost, markdown_table, write_section  # noqa: E402

BATCH, MINIBATCH = 4000, 128


def measure(env_id: str, algorithm: str, k: int, checkpointing: bool, hidden=None, chunk: int = 1) -> dict:
    """Runs in a child process: build runner + learner, time sampling and one update epoch."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from ncdpo_rllib.rl import DPPOConfig, NCDPOConfig, mean_std_filter_connector
    from ncdpo_rllib.tasks.envs import register

    torch.set_num_threads(1)
    if algorithm == "ppo":
        cfg = PPOConfig().training(use_kl_loss=False)
    else:
        cfg = (NCDPOConfig() if algorithm == "ncdpo" else DPPOConfig()).diffusion(
            denoising_steps=k, grad_checkpointing=checkpointing, **({"hidden": hidden} if hidden else {})
        )
    env_config = {"id": env_id, "action_chunk": chunk}
    cfg.environment(register(), env_config=env_config).env_runners(
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
    update_s, saved_bytes = learner_cost(learner, episodes, MINIBATCH, runner.sample(num_timesteps=800))
    minibatches = -(-steps // MINIBATCH)
    return {
        "env_steps_per_s": steps * chunk / sample_s,  # base-env steps (a chunk executes Ta of them)
        "learner_samples_per_s": steps / update_s,
        "ms_per_minibatch": 1000 * update_s / minibatches,
        "saved_mb_per_minibatch": saved_bytes / minibatches / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="Pendulum-v1")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20])
    p.add_argument("--algorithms", nargs="+", default=["ncdpo"], choices=["ncdpo", "dppo"])
    p.add_argument("--hidden", type=int, nargs="+", help="denoiser MLP sizes (default: the library's)")
    p.add_argument("--action-chunk", type=int, default=1, help="Ta (the policy's action is Ta x D)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return

    configs = [("ppo", 0, False)] + [
        (a, k, c) for a in args.algorithms for k in args.ks for c in ((False, True) if a == "ncdpo" else (False,))
    ]
    rows = []
    for algorithm, k, ckpt in configs:
        spec = {"env_id": args.env, "algorithm": algorithm, "k": k, "checkpointing": ckpt,
                "hidden": args.hidden, "chunk": args.action_chunk}
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        name = "MLP PPO" if algorithm == "ppo" else f"{algorithm.upper()} K={k}"
        rows.append([name, "-" if algorithm != "ncdpo" else ("on" if ckpt else "off"),
                     f"{r['env_steps_per_s']:,.0f}", f"{r['learner_samples_per_s']:,.0f}",
                     f"{r['ms_per_minibatch']:.1f}", f"{r['saved_mb_per_minibatch']:.2f}"])
        print(rows[-1], flush=True)
    table = markdown_table(
        ["policy", "grad checkpointing", "rollout env steps/s (1 runner x 8 envs)",
         f"learner samples/s (minibatch {MINIBATCH})", "ms / minibatch", "saved for backward (MB / minibatch)"], rows)
    print(table)
    arch = (f"denoiser {args.hidden or 'default [128, 128]'}, action chunk Ta={args.action_chunk}; "
            if args.hidden or args.action_chunk > 1 else "")
    body = (
        f"{args.env}; {arch}one in-process EnvRunner, 8 vector envs, exploration forward; learner: one "
        f"epoch over a {BATCH}-step batch in minibatches of {MINIBATCH}, torch on 1 thread. 'Saved for "
        "backward' sums the tensors autograd keeps between forward and backward in one minibatch "
        "(the memory that backprop through the K-step chain costs, device-independent; the MLP PPO "
        "row is the baseline). DPPO scores the stored chain in one batched denoiser call (no "
        "backprop through the chain), so its memory does not grow with the chain's depth the same "
        "way.\n\n" + table
    )
    suffix = f":{args.env}" + (":finetune-arch" if arch else "")
    write_section(f"throughput{suffix}", f"Throughput and learner memory vs K: {args.env}"
                  + (" (fine-tuning architecture)" if arch else ""), body)


if __name__ == "__main__":
    main()
