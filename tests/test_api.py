"""The Python API as documented in the README, on a real local Ray cluster."""

import numpy as np
import pytest
import ray

from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from ncdpo_rllib.rl import NCDPOConfig
from ncdpo_rllib.rl.callbacks import episode_return_and_length


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def test_readme_python_api_one_iteration(local_ray):
    algo = NCDPOConfig().environment("Pendulum-v1").training(train_batch_size_per_learner=1000).build_algo()
    try:
        assert algo.config.num_env_runners == 1  # a remote EnvRunner actor samples
        result = algo.train()
    finally:
        algo.stop()
    learner = result["learners"]["default_policy"]
    assert result["env_runners"]["num_env_steps_sampled"] >= 1000
    assert abs(learner["ratio_mean"] - 1) < 0.05 and np.isfinite(learner["grad_norm_step_first"])


def test_episode_return_counts_each_step_once():
    """Chunks overlapping by one step (as Ray 2.60 keeps them for metrics) are not double counted."""
    obs = list(np.arange(11, dtype=np.float32)[:, None])
    first = SingleAgentEpisode(observations=obs[:8], actions=[0] * 7, rewards=[1.0] * 7,
                               len_lookback_buffer=0)  # steps 0..6, one step past the next chunk
    second = SingleAgentEpisode(observations=obs[6:], actions=[0] * 4, rewards=[2.0] * 4, t_started=6,
                                len_lookback_buffer=0)
    ret, length = episode_return_and_length([first, second])
    assert length == 10 and ret == pytest.approx(6 * 1.0 + 4 * 2.0)
