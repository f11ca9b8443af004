"""The Python API as documented in the README, on a real local Ray cluster."""

import numpy as np
import pytest
import ray

from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from ncdpo_rllib.rl import NCDPOConfig
from ncdpo_rllib.rl.callbacks import episode_return_and_length


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
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


def test_remote_runner_and_remote_learner_checkpoint_carries_filter_state(local_ray, tmp_path):
    """1 remote EnvRunner + 1 remote Learner actor: training runs, and the checkpoint's
    env_runner state holds the observation filter statistics gathered on the remote runner
    (what `ncdpo evaluate` restores)."""
    import pickle
    from pathlib import Path

    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from ncdpo_rllib.experiment.build import build_algo_config
    from ncdpo_rllib.experiment.evaluate import MODULE_DIR, load_env_runner
    from ncdpo_rllib.experiment.config import parse_config
    from ncdpo_rllib.experiment.train import train

    exp = parse_config({
        "stop": {"iterations": 2, "env_steps": None},
        "diffusion": {"denoising_steps": 3, "hidden": [32]},
        "ppo": {"train_batch_size": 400, "minibatch_size": 200, "num_epochs": 1},
        "resources": {"env_runners": 1, "envs_per_runner": 2, "learners": 1},
        "tracking": {"enabled": False},
        "checkpoint": {"dir": str(tmp_path)},
    })
    seen = []
    summary = train(exp, log=lambda m: None, on_iteration=lambda s, m: seen.append(m))
    assert summary["env_steps"] >= 800 and "learner/default_policy/ratio_mean" in seen[-1]
    fresh = SingleAgentEnvRunner(config=build_algo_config(exp).env_runners(num_env_runners=0))
    assert fresh.get_state()["env_to_module_connector"]["MeanStdFilter"][None]["running_stats"][0]["num_pushes"] == 0
    ckpt = Path(summary["checkpoint"])
    runner = load_env_runner(ckpt, exp, seed=0)  # what `ncdpo evaluate` runs
    stats = runner.get_state()["env_to_module_connector"]["MeanStdFilter"][None]["running_stats"][0]
    assert stats["num_pushes"] >= 800
    # ... and the trained weights, not a fresh initialisation.
    with open(ckpt / MODULE_DIR / "module_state.pkl", "rb") as f:
        trained = pickle.load(f)
    restored = runner.module.get_state()
    assert trained.keys() == restored.keys()
    for key, value in trained.items():
        assert np.allclose(np.asarray(value), np.asarray(restored[key])), key
    init = fresh.module.get_state()
    assert any(not np.allclose(np.asarray(trained[k]), np.asarray(init[k])) for k in trained if "denoiser" in k)


def _hand_built_ncdpo_with_local_evaluation():
    """NCDPOConfig as a user of the Python API writes it, without build_algo_config's callbacks."""
    from ncdpo_rllib.rl import NCDPOConfig, mean_std_filter_connector
    from ncdpo_rllib.tasks.envs import register

    return (NCDPOConfig().environment(register(), env_config={"id": "Pendulum-v1", "max_episode_steps": 50})
            .env_runners(num_env_runners=1, num_envs_per_env_runner=1, env_to_module_connector=mean_std_filter_connector)
            .training(train_batch_size_per_learner=200, minibatch_size=100, num_epochs=1)
            .evaluation(evaluation_interval=1, evaluation_duration=1, evaluation_duration_unit="episodes",
                        evaluation_num_env_runners=0))


@pytest.mark.parametrize("built", ["ppo by build_algo_config", "NCDPOConfig by hand"])
def test_evaluation_normalises_observations_with_the_training_statistics(local_ray, built):
    """RLlib copies the MeanStdFilter's statistics to remote evaluation EnvRunners only; ours is
    local, and evaluated on statistics of its own evaluation episodes until the callback copied
    the training ones (NCDPOConfig's default callback, also without build_algo_config). RLlib
    merges the remote runners' statistics into the driver's one iteration late, so an evaluation
    sees the previous iteration's counts plus its own episode."""
    from ncdpo_rllib.experiment.build import build_algo_config
    from ncdpo_rllib.experiment.config import parse_config

    if built == "NCDPOConfig by hand":
        config = _hand_built_ncdpo_with_local_evaluation()
    else:
        config = build_algo_config(parse_config({
            "algorithm": "ppo", "env": {"id": "Pendulum-v1", "max_episode_steps": 50}, "eval": {"every": 1, "episodes": 1},
            "ppo": {"train_batch_size": 200, "minibatch_size": 100, "num_epochs": 1},
            "resources": {"env_runners": 1, "envs_per_runner": 2}}))
    algo = config.build_algo()

    def pushes(runner) -> tuple[int, int]:
        stats = runner.get_state(components="env_to_module_connector")["env_to_module_connector"]
        stats = stats["MeanStdFilter"][None]["running_stats"][0]
        return stats["num_pushes"], stats["num_pushes_delta"]

    try:
        trained = []
        for _ in range(3):
            algo.train()
            trained.append(pushes(algo.env_runner)[0])
        evaluated, own = pushes(algo.eval_env_runner)
        # one env: a vector of envs would report the episodes that finished first, the short ones
        eval_envs = algo.eval_env_runner.num_envs
        train_envs = algo.env_runner_group.foreach_env_runner(lambda r: r.num_envs, local_env_runner=False)
    finally:
        algo.stop()
    if built != "NCDPOConfig by hand":  # build_algo_config's evaluation: one env, whatever training uses
        assert (eval_envs, train_envs) == (1, [2])
    assert own == 51 and trained[1] > 400  # one 50-step episode (51 observations); 2 x 200 steps trained
    assert evaluated - own == trained[1], (evaluated, own, trained)  # not 3 x 51: the training statistics


def _reseed(learner=None):
    import random

    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def test_remote_learner_updates_exactly_like_the_local_one(local_ray):
    """Same layout question as 'two runners and a learner process vs local mode': for the same
    episodes and initial weights, a remote Learner actor's update equals the driver's local one.

    Whole runs are not compared bit for bit: RLlib seeds each EnvRunner with seed + its worker
    index, so 2 remote runners and 1 local runner step differently seeded envs (documented in
    docs/architecture.md)."""
    import copy

    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    base = (
        NCDPOConfig()
        .environment("Pendulum-v1")
        .env_runners(num_env_runners=0, num_envs_per_env_runner=2)
        .training(train_batch_size_per_learner=400, minibatch_size=100, num_epochs=2)
        .diffusion(denoising_steps=3, hidden=[32])
        .debugging(seed=0)
    )
    runner = SingleAgentEnvRunner(config=base)
    episodes = runner.sample(num_timesteps=400)
    states = []
    for num_learners in (0, 1):
        cfg = base.copy(copy_frozen=False).learners(num_learners=num_learners)
        group = cfg.build_learner_group(env=runner.env)
        group.set_weights({"default_policy": runner.module.get_state()})
        group.foreach_learner(_reseed)  # the same minibatch shuffling in both processes
        # A copy each: RLlib's learner connectors extend the episodes in place.
        group.update(episodes=copy.deepcopy(episodes), num_epochs=2, minibatch_size=100)
        states.append(group.get_weights()["default_policy"])
        group.shutdown()
    local, remote = states
    assert local.keys() == remote.keys()
    for key in local:
        np.testing.assert_allclose(np.asarray(local[key]), np.asarray(remote[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    assert any(not np.allclose(np.asarray(local[k]), np.asarray(v)) for k, v in runner.module.get_state().items()
               if "denoiser" in k)  # the update did change the weights
