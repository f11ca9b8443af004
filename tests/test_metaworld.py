"""Meta-World tasks through the project's env factory: build, step, success, goal variants,
and the success rate in training metrics, MLflow and ``ncdpo evaluate``."""


import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from ncdpo_rllib.experiment.config import parse_config
from ncdpo_rllib.errors import ConfigError
from ncdpo_rllib.experiment.build import check_experiment
from ncdpo_rllib.tasks.envs import make_env
from ncdpo_rllib.tasks.metaworld import scripted_policy
from tests.conftest import ShippedPipeline, last_json, run_cli


def test_env_builds_steps_and_the_scripted_expert_succeeds():
    env = make_env({"kind": "metaworld", "id": "reach-v3", "goal": "random"})
    assert env.observation_space.shape == (39,) and env.action_space.shape == (4,)
    expert = scripted_policy("reach-v3")
    successes, goals = [], []
    for episode in range(5):
        obs, _ = env.reset(seed=episode)
        assert obs.dtype == np.float32 and env.observation_space.contains(obs)
        goals.append(obs[-3:].copy())
        success, steps = 0.0, 0
        while True:
            obs, _, terminated, truncated, info = env.step(expert.get_action(obs))
            success, steps = max(success, info["success"]), steps + 1
            if terminated or truncated:
                break
        assert steps == 500  # Meta-World's max_path_length; no termination on success
        successes.append(success)
    assert np.mean(successes) >= 0.8, successes
    assert len({tuple(np.round(g, 4)) for g in goals}) > 1  # goal: random varies the goal


def test_fixed_goal_keeps_the_same_goal_and_actions_chunked_keep_the_success_flag():
    env = make_env({"kind": "metaworld", "id": "reach-v3", "goal": "fixed"})
    goals = {tuple(np.round(env.reset(seed=s)[0][-3:], 4)) for s in range(3)}
    assert len(goals) == 1
    chunked = make_env({"kind": "metaworld", "id": "reach-v3", "goal": "fixed", "action_chunk": 4})
    base = make_env({"kind": "metaworld", "id": "reach-v3", "goal": "fixed"})
    expert = scripted_policy("reach-v3")
    obs, _ = base.reset(seed=0)
    chunked.reset(seed=0)
    flags = []
    for _ in range(25):  # the same 4 expert actions through both envs, chunk by chunk
        actions = []
        for _ in range(4):
            action = expert.get_action(obs)
            obs, _, _, _, info = base.step(action)
            actions.append(action)
            flags.append(info["success"])
        _, _, _, _, chunk_info = chunked.step(np.concatenate(actions))
        assert chunk_info["success"] == max(flags[-4:])  # any step of the chunk
    assert max(flags) == 1.0


def test_bad_task_names_and_keys():
    with pytest.raises(ConfigError, match="'pick-place-v9' is not a Meta-World task; did you mean pick-place-v3"):
        check_experiment(parse_config({"env": {"kind": "metaworld", "id": "pick-place-v9"}}))
    with pytest.raises(ConfigError, match="goal is for kind: metaworld"):
        parse_config({"env": {"id": "Pendulum-v1", "goal": "fixed"}})


def test_training_and_evaluate_report_the_success_rate(tmp_path):
    (tmp_path / "mw.yaml").write_text(
        "env: {kind: metaworld, id: reach-v3, goal: fixed}\n"
        "stop: {iterations: 2, env_steps: null}\n"
        "diffusion: {denoising_steps: 3, hidden: [32, 32]}\n"
        "ppo: {train_batch_size: 1000, minibatch_size: 500, num_epochs: 1, critic_hidden: [32]}\n"
        "resources: {env_runners: 0, envs_per_runner: 2}\n"
    )
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    proc = run_cli(["train", "mw.yaml", "--json"], tmp_path, {"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = last_json(proc.stdout)
    client = MlflowClient(uri)
    history = client.get_metric_history(summary["mlflow_run_id"], "success_rate")
    assert [m.step for m in history] == [1000, 2000] and all(0.0 <= m.value <= 1.0 for m in history)
    ev = run_cli(["evaluate", summary["checkpoint"], "--episodes", "2", "--json"], tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = last_json(ev.stdout)
    assert 0.0 <= result["success_rate"] <= 1.0 and "success rate" in ev.stderr
    assert "eval/success_rate" in client.get_run(result["mlflow_run_id"]).data.metrics


def test_scripted_demonstrations_and_their_degraded_version():
    from ncdpo_rllib.experiment.collect import scripted_episodes

    def success_rate(**collect):
        exp = parse_config({"env": {"kind": "metaworld", "id": "reach-v3"},
                            "collect": {"scripted": True, "steps_per_level": 2500, **collect}})
        episodes, successes, _, _ = scripted_episodes(exp, np.random.default_rng(0), log=lambda m: None)
        assert len(episodes) == 5 and all(len(ep) == 500 and ep.observations.shape == (501, 39) for ep in episodes)
        assert all(np.abs(ep.actions).max() <= 1.0 for ep in episodes)
        return np.mean(successes)

    assert success_rate() == 1.0
    assert success_rate(failed_fraction=1.0, action_noise=0.3) <= 0.6


@pytest.mark.slow
def test_collect_pretrain_finetune_end_to_end(tmp_path):
    """Scripted demos -> behaviour cloning -> NCDPO fine-tuning, tiny budgets, through the CLI."""
    pipeline = ShippedPipeline(tmp_path, "metaworld_reach.yaml", [
        "collect.steps_per_level=500", "pretrain.gradient_steps=200", "pretrain.eval_episodes=2",
        "diffusion.hidden=[64, 64]", "resources.env_runners=0"])
    data = pipeline.stage("collect")["datasets"]["scripted"]
    assert data["episodes"] == 5 and 0.0 <= data["success_rate"] <= 1.0
    pretrained = pipeline.stage("pretrain")
    assert 0.0 <= pretrained["eval"]["success_rate"] <= 1.0
    pipeline.finetune(pretrained["checkpoint"], "ppo.train_batch_size=200", "ppo.minibatch_size=100")


def test_evaluation_metrics_only_on_iterations_that_evaluated():
    """RLlib repeats the last evaluation in the next iteration's result; the metrics must not."""
    from ncdpo_rllib.experiment.metrics import iteration_metrics

    evaluation = {"evaluation": {"env_runners": {"iter_return_mean": -900.0, "iter_success_rate": 0.5}}}
    on = iteration_metrics({"training_iteration": 4, **evaluation}, eval_every=2)
    stale = iteration_metrics({"training_iteration": 5, **evaluation}, eval_every=2)
    assert on["eval_return_mean"] == -900.0 and on["eval_success_rate"] == 0.5
    assert "eval_return_mean" not in stale and "eval_success_rate" not in stale
    assert "eval_return_mean" not in iteration_metrics({"training_iteration": 4, **evaluation}, eval_every=0)


def test_sampled_env_steps_counts_base_env_steps_and_survives_a_nan_count():
    """The chunk callback's count first; RLlib's policy steps x Ta when that count is NaN (RLlib's
    value for a sum no EnvRunner logged to in the iteration) or absent; 0 when neither is usable."""
    from ncdpo_rllib.experiment.metrics import sampled_env_steps
    from ncdpo_rllib.rl.callbacks import BASE_ENV_STEPS

    assert sampled_env_steps({"env_runners": {BASE_ENV_STEPS: 7896.0, "num_env_steps_sampled": 2000}}, 4) == 7896
    assert sampled_env_steps({"env_runners": {BASE_ENV_STEPS: float("nan"), "num_env_steps_sampled": 2000}}, 4) == 8000
    assert sampled_env_steps({"env_runners": {"num_env_steps_sampled": 256}}) == 256
    assert sampled_env_steps({"env_runners": {"num_env_steps_sampled": float("nan")}}, 4) == 0
