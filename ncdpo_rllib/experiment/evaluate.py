"""Evaluate a checkpoint: restore its EnvRunner (module weights AND observation filter
statistics) and run full episodes with the deterministic policy (``explore=False``)."""

from __future__ import annotations

import numpy as np

from .build import build_algo_config
from .checkpoints import load_checkpoint_meta
from .errors import CheckpointError


def evaluate(checkpoint: str, *, episodes: int = 10, seed: int = 12345) -> dict:
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from .train import check_env

    if episodes < 1:
        raise CheckpointError("--episodes must be >= 1")
    ckpt, exp, state = load_checkpoint_meta(checkpoint)
    check_env(exp)
    cfg = build_algo_config(exp)
    cfg.env_runners(num_env_runners=0, num_envs_per_env_runner=1)
    cfg.debugging(seed=seed)
    runner = SingleAgentEnvRunner(config=cfg)
    runner_state = ckpt / "env_runner"
    if not runner_state.is_dir():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} is incomplete: env_runner/ missing")
    try:
        runner.restore_from_path(str(runner_state.resolve()))
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} could not be restored: {type(e).__name__}: {e}".splitlines()[0]) from None
    done = runner.sample(num_episodes=episodes, explore=False, random_actions=False)
    returns = np.array([ep.get_return() for ep in done if ep.is_done][:episodes], dtype=float)
    runner.stop()
    return {
        "env": exp.env.id,
        "algorithm": exp.algorithm,
        "checkpoint": str(ckpt),
        "episodes": int(len(returns)),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "return_min": float(returns.min()),
        "return_max": float(returns.max()),
        "trained_env_steps": state.env_steps,
    }
