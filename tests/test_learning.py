"""Learning, with fixed seeds: short real runs through the real training runner.

InvertedPendulum-v5 is the quick task: a random policy scores ~5, PPO reaches hundreds
within 30k env steps. 'Late return' = mean of the last 5 iterations' mean episode return.
"""

import numpy as np
import pytest

from ncdpo_rllib.experiment.config import parse_config
from ncdpo_rllib.experiment.train import train

pytestmark = pytest.mark.slow

RANDOM_POLICY_RETURN = 5.0  # InvertedPendulum-v5 with a uniform random policy: ~5 steps upright


def run(tmp_path, **overrides) -> list[float]:
    data = {
        "env": {"id": "InvertedPendulum-v5"},
        "seed": 0,
        "stop": {"env_steps": 30_000},
        "ppo": {"train_batch_size": 2000},
        "resources": {"env_runners": 0},
        "tracking": {"enabled": False},
        "checkpoint": {"dir": str(tmp_path), "every": 0},
    }
    for key, value in overrides.items():
        data.setdefault(key, {})
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    returns = []
    train(parse_config(data), log=lambda msg: None,
          on_iteration=lambda state, m: returns.append(m.get("return_mean", np.nan)))
    return returns


def late(returns: list[float]) -> float:
    return float(np.nanmean(returns[-5:]))


def test_ncdpo_learns_inverted_pendulum(tmp_path):
    returns = run(tmp_path, diffusion={"denoising_steps": 5})
    assert returns[0] < 4 * RANDOM_POLICY_RETURN
    assert late(returns) > 20 * RANDOM_POLICY_RETURN, returns


def test_async_ncdpo_learns_inverted_pendulum(tmp_path):
    """algorithm: ncdpo-appo (RLlib's APPO: V-trace, the learner in its own thread) on the same budget."""
    returns = run(tmp_path, algorithm="ncdpo-appo", diffusion={"denoising_steps": 5})
    assert returns[0] < 4 * RANDOM_POLICY_RETURN
    assert late(returns) > 20 * RANDOM_POLICY_RETURN, returns


def test_k1_ncdpo_and_mlp_ppo_learn_alike(tmp_path):
    """Tolerance: both reach >= 20x the random policy's return, within a factor of 3 of each other."""
    ncdpo = late(run(tmp_path, diffusion={"denoising_steps": 1}))
    ppo = late(run(tmp_path, algorithm="ppo"))
    assert ncdpo > 20 * RANDOM_POLICY_RETURN and ppo > 20 * RANDOM_POLICY_RETURN, (ncdpo, ppo)
    assert 1 / 3 < ncdpo / ppo < 3, (ncdpo, ppo)
