"""The asynchronous path (algorithm: ncdpo-appo / appo, RLlib's APPO): the exactness of the
importance weights on the stored noise, the target network, the config mapping and its errors,
and a real run through the CLI (resume, MLflow, evaluate). A killed runner: tests/test_fault_tolerance.py;
learning: tests/test_learning.py; multi-agent: tests/test_multiagent.py."""

import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.training_data import TrainingData
from ray.rllib.core.learner.utils import update_target_network

from ncdpo_rllib.errors import ConfigError
from ncdpo_rllib.experiment.build import build_algo_config, check_experiment
from ncdpo_rllib.experiment.config import parse_config
from ncdpo_rllib.rl import NOISE, DiffusionAPPOModule, NCDPOAPPOConfig
from ncdpo_rllib.rl.appo import TARGET_ACTOR, TRAINED_ROWS
from tests.conftest import TINY, last_json, learner_stats, run_cli, runner_and_learner

MODULE = "default_policy"


@pytest.fixture(scope="module")
def local_ray():
    """APPO's learner thread hands its weights to Ray's object store after an update."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def make_pair(**training):
    cfg = (
        NCDPOAPPOConfig()
        .environment("Pendulum-v1")
        .env_runners(num_env_runners=0, num_envs_per_env_runner=2, rollout_fragment_length=32)
        # One loss evaluation per update (one epoch, the whole batch): its diagnostics are those of
        # the weights the test set.
        .training(**{"train_batch_size_per_learner": 128, "minibatch_size": None, "num_epochs": 1, **training})
        .diffusion(denoising_steps=3, hidden=[32, 32])
        .debugging(seed=0)
    )
    return runner_and_learner(cfg)


def episode_rows(episodes):
    """Observations, stored noise, actions and behaviour log-probs of every step sampled, stacked."""
    cols = {"obs": [], "noise": [], "actions": [], "logp": []}
    for ep in episodes:
        n = len(ep)
        cols["obs"].append(np.asarray(ep.get_observations(slice(0, n))))
        cols["noise"].append(np.asarray(ep.get_extra_model_outputs(NOISE)))
        cols["actions"].append(np.asarray(ep.get_actions()))
        cols["logp"].append(np.asarray(ep.get_extra_model_outputs(Columns.ACTION_LOGP)))
    return {k: torch.as_tensor(np.concatenate(v), dtype=torch.float32) for k, v in cols.items()}


def gaussian_logp_by_hand(actions, mean, log_std) -> torch.Tensor:
    """log N(a; mean, exp(log_std)^2), summed over action dims, from the density's formula."""
    var = torch.exp(2 * log_std)
    return (-(actions - mean) ** 2 / (2 * var) - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)


def hand_logp(module, rows, actor) -> torch.Tensor:
    with torch.no_grad():
        cond = ((rows["obs"] - module.obs_shift) / module.obs_scale)[:, : module.actor_obs_dim]
        mean, log_std = actor(cond, rows["noise"])
    return gaussian_logp_by_hand(rows["actions"], mean, log_std)


def test_with_the_runners_weights_the_learner_and_target_log_probs_equal_the_behaviour_ones():
    """The exactness claim: on the stored noise, the learner's policy and its target network score
    the runner's actions with the runner's own log-prob (ratio 1, importance weight 1)."""
    _, runner, learner = make_pair()
    rows = episode_rows(runner.sample(num_timesteps=128, random_actions=False))
    module = learner.module[MODULE].unwrapped()
    batch = {Columns.OBS: rows["obs"], NOISE: rows["noise"]}
    with torch.no_grad():
        inputs = {"train": module.forward_train(batch)[Columns.ACTION_DIST_INPUTS],
                  "target": module.forward_target(batch)["target_network_action_dist_inputs"]}
    for name, dist_inputs in inputs.items():
        logp = module.get_train_action_dist_cls().from_logits(dist_inputs).logp(rows["actions"])
        assert (logp - rows["logp"]).abs().max() < 1e-4, name
    assert (hand_logp(module, rows, module.actor) - rows["logp"]).abs().max() < 1e-4
    learner.shutdown()


def test_with_a_known_weight_lag_the_importance_weights_equal_those_computed_by_hand(local_ray):
    """The runner samples with weights W0; the learner's policy and target then move to W1 (a
    known perturbation: the lag). APPO's importance weights mu / pi_target (``mean_IS``, clipped to
    [0, 2]) and the learner's ratio pi / mu (``ratio_mean``) equal the Gaussian densities' ratios
    computed by hand from W1's chain on the stored noise."""
    _, runner, learner = make_pair()
    episodes = runner.sample(num_timesteps=128, random_actions=False)
    rows = episode_rows(episodes)
    module = learner.module[MODULE].unwrapped()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.actor.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    for main, target in module.get_target_network_pairs():
        update_target_network(main_net=main, target_net=target, tau=1.0)
    pi = hand_logp(module, rows, module.actor)
    assert (pi - rows["logp"]).abs().max() > 1e-2  # the lag is visible in the log-probs

    results = learner.update(TrainingData(episodes=episodes), timesteps={})
    stats = learner_stats(results, MODULE)
    expected_is = torch.exp(rows["logp"] - pi).clamp(0.0, 2.0).mean()
    expected_ratio = torch.exp(pi - rows["logp"]).mean()
    assert stats["mean_IS"] == pytest.approx(float(expected_is), rel=1e-4)
    assert stats["ratio_mean"] == pytest.approx(float(expected_ratio), rel=1e-4)
    learner.shutdown()


def test_the_target_network_stays_on_the_learner_and_a_state_without_it_fills_it_from_the_actor():
    _, runner, learner = make_pair()
    module = learner.module[MODULE].unwrapped()
    assert isinstance(module, DiffusionAPPOModule) and not hasattr(runner.module, TARGET_ACTOR)
    full = module.get_state()
    assert any(k.startswith(f"{TARGET_ACTOR}.") for k in full)
    assert not any(k.startswith(f"{TARGET_ACTOR}.") for k in module.get_state(inference_only=True))
    # A state without the copy (a synchronous NCDPO checkpoint, a pre-trained policy): the target
    # network starts as the actor it carries.
    actor_only = {k: v + 1.0 if k.startswith("actor.") else v for k, v in full.items()
                  if not k.startswith(f"{TARGET_ACTOR}.")}
    module.set_state(actor_only)
    after = module.get_state()
    for key, value in after.items():
        if key.startswith(f"{TARGET_ACTOR}."):
            np.testing.assert_array_equal(value, after["actor." + key[len(TARGET_ACTOR) + 1:]])
    learner.shutdown()


def test_the_async_keys_reach_rllibs_appo_config():
    exp = parse_config({"algorithm": "ncdpo-appo", "env": {"id": "Pendulum-v1"},
                        "appo": {"rollout_fragment_length": 32, "batch_reuse": 3, "target_update_freq": 4,
                                 "vtrace_clip_rho": 2.0, "vtrace_clip_pg_rho": 1.5},
                        "resources": {"learner_queue_batches": 5, "broadcast_interval": 2,
                                      "learner_requests_in_flight": 1, "sampler_wait_s": 0.5},
                        "ppo": {"lr": 1e-4, "critic_lr": 2e-3, "minibatch_size": 64, "vf_clip_param": None}})
    cfg = build_algo_config(exp)
    assert isinstance(cfg, NCDPOAPPOConfig)
    assert cfg.get_default_rl_module_spec().module_class is DiffusionAPPOModule
    assert (cfg.rollout_fragment_length, cfg.circular_buffer_iterations_per_batch, cfg.target_network_update_freq,
            cfg.vtrace_clip_rho_threshold, cfg.vtrace_clip_pg_rho_threshold, cfg.circular_buffer_num_batches,
            cfg.broadcast_interval, cfg.max_requests_in_flight_per_learner,
            cfg.timeout_s_sampler_manager) == (32, 3, 4, 2.0, 1.5, 5, 2, 1, 0.5)
    assert (cfg.lr, cfg.critic_lr, cfg.minibatch_size, cfg.num_epochs) == (1e-4, 2e-3, 64, 10)
    cfg.validate()
    mlp = build_algo_config(parse_config({"algorithm": "appo", "env": {"id": "Pendulum-v1"}}))
    assert type(mlp).__name__ == "APPOConfig" and mlp.circular_buffer_num_batches == 8
    assert mlp.timeout_s_sampler_manager == 0.1  # not RLlib's 0: the driver would spin a core
    mlp.validate()


@pytest.mark.parametrize("data, expected", [
    ({"algorithm": "ncdpo-appo", "ppo": {"target_kl": 0.01}}, "target_kl"),
    ({"algorithm": "ncdpo-appo", "ppo": {"logp_reduction": "mean"}}, "logp_reduction"),
    ({"algorithm": "ncdpo-appo", "ppo": {"minibatch_size": 100}}, "multiple of `rollout_fragment_length`"),
    ({"algorithm": "appo", "ppo": {"vf_clip_param": 10.0}}, "ppo.vf_clip_param: APPO's value loss has no clip"),
    ({"algorithm": "ncdpo", "appo": {"batch_reuse": 2}}, "the appo section is for algorithm: ncdpo-appo or appo"),
    ({"algorithm": "ncdpo-appo", "appo": {"rollout_fragment_length": 0}}, "appo.rollout_fragment_length must be >= 1"),
    ({"algorithm": "ncdpo-appo", "resources": {"broadcast_interval": 0}}, "resources.broadcast_interval must be >= 1"),
    ({"algorithm": "appo", "resources": {"learner_requests_in_flight": 0}},
     "resources.learner_requests_in_flight must be >= 1"),
    ({"algorithm": "appo", "resources": {"sampler_wait_s": -1}}, "resources.sampler_wait_s must be >= 0"),
    ({"algorithm": "appo", "env": {"kind": "pettingzoo", "id": "mpe2.simple_spread_v3"},
      "multi_agent": {"central_critic": True}}, "multi_agent.central_critic is MAPPO's critic"),
])
def test_what_the_async_path_does_not_have_is_a_one_line_error(data, expected):
    with pytest.raises(ConfigError) as err:
        check_experiment(parse_config({"env": {"id": "Pendulum-v1"}, **data}))
    assert expected in str(err.value) and "\n" not in str(err.value)


TINY_ASYNC = "algorithm: ncdpo-appo\n" + TINY


@pytest.mark.slow
def test_an_async_run_trains_resumes_logs_to_mlflow_and_evaluates_through_the_cli(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    env = {"MLFLOW_TRACKING_URI": uri}
    (tmp_path / "tiny.yaml").write_text(TINY_ASYNC)
    first = run_cli(["train", "tiny.yaml", "--set", "tracking.run_name=async", "--json"], tmp_path, env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "asynchronous: learner queue 8 batches" in first.stderr and "weight lag" in first.stderr
    assert "dropped       0" in first.stderr  # a local learner: RLlib drops nothing
    run_dir = tmp_path / "runs" / "async"
    resumed = run_cli(["train", "--resume", run_dir, "--set", "stop.iterations=3", "--json"], tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = last_json(resumed.stdout)
    assert summary["iterations"] == 3 and summary["env_steps"] == 3 * 256
    client = MlflowClient(uri)
    metrics = client.get_run(summary["mlflow_run_id"]).data.metrics
    for name in ("ratio_mean", "approx_kl", "mean_IS", "learner_queue_size", "grad_norm_step_first", TRAINED_ROWS,
                 "diff_num_grad_updates_vs_sampler_policy"):
        assert f"learner/{MODULE}/{name}" in metrics, (name, sorted(metrics))
    assert metrics["env_steps_dropped"] == 0
    assert metrics[f"learner/{MODULE}/{TRAINED_ROWS}"] >= 256  # the resumed process trained a batch at least
    steps = [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "iteration")]
    assert sorted(steps) == [256, 512, 768]  # resumed: no gap, no duplicate
    evaluated = run_cli(["evaluate", summary["checkpoint"], "--episodes", "2", "--json"], tmp_path, env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert last_json(evaluated.stdout)["algorithm"] == "ncdpo-appo"
