"""Evaluate a checkpoint: restore its EnvRunner (module weights AND observation filter
statistics) and run full episodes with the deterministic policy (``explore=False``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ray.rllib.core import DEFAULT_MODULE_ID

from .build import build_algo_config
from .checkpoints import load_checkpoint_meta, restore_failed
from .errors import CheckpointError


MODULE_DIR = Path("learner_group") / "learner" / "rl_module" / DEFAULT_MODULE_ID


def load_env_runner(ckpt: Path, exp, *, seed: int, record_dir=None, num_envs: int = 1):
    """A local SingleAgentEnvRunner with the checkpoint's connector state (observation
    filter) and the trained module weights.

    RLlib's ``env_runner`` component holds the connector states, but not the module when
    the run sampled with remote EnvRunners (the driver's runner then has none); the
    trained weights are the learner's, under learner_group/learner/rl_module/.
    """
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    cfg = build_algo_config(exp, record_dir=record_dir)
    cfg.env_runners(num_env_runners=0, num_envs_per_env_runner=num_envs)
    cfg.debugging(seed=seed)
    runner = SingleAgentEnvRunner(config=cfg)
    for part in (ckpt / "env_runner", ckpt / MODULE_DIR):
        if not part.is_dir():
            raise CheckpointError(f"checkpoint {str(ckpt)!r} is incomplete: {part.relative_to(ckpt)}/ missing")
    try:
        runner.restore_from_path(str((ckpt / "env_runner").resolve()))
        runner.module.restore_from_path(str((ckpt / MODULE_DIR).resolve()))
    except Exception as e:  # RLlib raises assorted errors on a damaged checkpoint
        raise restore_failed(ckpt, e) from None
    return runner


def evaluate_pretrained(checkpoint: str, *, episodes: int, seed: int) -> dict:
    from .pretrain import evaluate_module
    from .pretrained import load_module_state, load_pretrained_meta
    from .train import check_env

    ckpt, exp, _ = load_pretrained_meta(checkpoint)
    check_env(exp)
    returns = evaluate_module(exp, load_module_state(ckpt), episodes, seed=seed)
    return _summary(exp, ckpt, returns, trained_env_steps=0)


def _summary(exp, ckpt, returns: np.ndarray, trained_env_steps: int) -> dict:
    return {
        "env": exp.env.id,
        "algorithm": exp.algorithm,
        "checkpoint": str(ckpt),
        "episodes": int(len(returns)),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "return_min": float(returns.min()),
        "return_max": float(returns.max()),
        "trained_env_steps": trained_env_steps,
    }


def evaluate(checkpoint: str, *, episodes: int = 10, seed: int = 12345) -> dict:
    """A training checkpoint (or run dir), or a pre-trained one (``ncdpo pretrain`` output)."""
    from .pretrained import is_pretrained
    from .train import check_env

    if episodes < 1:
        raise CheckpointError("--episodes must be >= 1")
    if is_pretrained(checkpoint):
        return evaluate_pretrained(checkpoint, episodes=episodes, seed=seed)
    ckpt, exp, state = load_checkpoint_meta(checkpoint)
    check_env(exp)
    runner = load_env_runner(ckpt, exp, seed=seed)
    done = runner.sample(num_episodes=episodes, explore=False, random_actions=False)
    returns = np.array([ep.get_return() for ep in done if ep.is_done][:episodes], dtype=float)
    runner.stop()
    return _summary(exp, ckpt, returns, trained_env_steps=state.env_steps)
