"""robosuite tasks (robomimic's family) through the project's env factory: build, step, success,
the scripted Lift expert, pixels, config errors, and collect -> pretrain -> fine-tune."""

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from ncdpo_rllib.errors import ConfigError
from ncdpo_rllib.experiment.build import check_experiment
from ncdpo_rllib.experiment.config import parse_config
from ncdpo_rllib.tasks.envs import make_env, scripted_expert
from ncdpo_rllib.tasks.config import EnvConfig
from tests.conftest import last_json, run_cli

LIFT = {"kind": "robosuite", "id": "Lift", "max_episode_steps": 100}


def test_lift_builds_steps_and_the_scripted_expert_lifts_the_cube():
    env, expert, source = scripted_expert(EnvConfig(**LIFT))
    # robomimic's low-dim keys: eef pos (3), eef quat (4), gripper qpos (2), object-state (10)
    assert env.observation_space.shape == (19,) and env.action_space.shape == (7,)
    assert "Lift" in source
    successes, cubes = [], []
    for episode in range(5):
        obs, info = env.reset(seed=episode)
        assert obs.dtype == np.float32 and env.observation_space.contains(obs) and info["success"] is False
        cubes.append(obs[9:12].copy())  # object-state starts with the cube's position
        success, steps = False, 0
        while True:
            obs, reward, terminated, truncated, info = env.step(expert(obs))
            success, steps = success or info["success"], steps + 1
            assert not terminated  # robosuite tasks never terminate; the time limit truncates
            if truncated:
                break
        assert steps == 100 and reward > 0.9  # the shaped reward is 1 while the cube is up
        successes.append(success)
    env.close()
    assert np.mean(successes) >= 0.8, successes
    assert len({tuple(np.round(c, 3)) for c in cubes}) > 1  # placements vary with the seed
    again, *_ = scripted_expert(EnvConfig(**LIFT))
    # and repeat with it (to 1 mm: without a hard reset the solver's warm start differs a little)
    assert np.allclose(again.reset(seed=3)[0][9:12], cubes[3], atol=1e-3)
    again.close()


def test_obs_keys_select_and_order_the_observation_and_actions_chunk():
    env = make_env({**LIFT, "obs_keys": ["object", "robot0_eef_pos"], "action_chunk": 4})
    obs, _ = env.reset(seed=0)
    assert obs.shape == (13,) and env.action_space.shape == (28,)
    raw = env.unwrapped.raw_observation
    assert np.allclose(obs, np.concatenate([raw["object-state"], raw["robot0_eef_pos"]]))
    obs, *_ = env.step(np.zeros(28, np.float32))
    assert env.unwrapped.steps == 4
    env.close()


def test_pixels_are_the_agentview_camera_upright_after_the_state():
    env = make_env({**LIFT, "observation": "pixels", "image_size": 32})
    obs, _ = env.reset(seed=0)
    assert obs.shape == (19 + 32 * 32 * 3,)
    image = obs[19:].reshape(32, 32, 3)
    assert 0 <= image.min() and image.max() <= 255 and image.std() > 5
    # agentview looks at the robot across the table: the near table (bottom rows) is brighter
    # than the far wall behind the robot (top rows); upside down it would be the other way round.
    assert image[-8:].mean() > image[:8].mean()
    env.close()


def test_bad_tasks_keys_and_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="'Lfit' is not a single-arm robosuite task; did you mean Lift"):
        check_experiment(parse_config({"env": {"kind": "robosuite", "id": "Lfit"}}))
    with pytest.raises(ConfigError, match="env.obs_keys: 'cube_velocity' is not an observation of robosuite's Lift"):
        check_experiment(parse_config({"env": {**LIFT, "obs_keys": ["cube_velocity"]}}))
    with pytest.raises(ConfigError, match="env.robots 'Pandaa' is not a robosuite robot"):
        check_experiment(parse_config({"env": {**LIFT, "robots": "Pandaa"}}))
    with pytest.raises(ConfigError, match="env.kwargs may not set hard_reset"):
        check_experiment(parse_config({"env": {**LIFT, "kwargs": {"hard_reset": True}}}))
    with pytest.raises(ConfigError, match="robots and obs_keys are for kind: robosuite"):
        parse_config({"env": {"id": "Pendulum-v1", "obs_keys": ["x"]}})
    with pytest.raises(ConfigError, match="env.camera 'corner2' is not a camera of this task"):
        check_experiment(parse_config({"env": {**LIFT, "observation": "pixels", "camera": "corner2"}}))


@pytest.mark.slow
def test_collect_pretrain_finetune_end_to_end(tmp_path):
    """Scripted Lift demos -> behaviour cloning -> NCDPO fine-tuning, tiny budgets, through the CLI."""
    config = Path(__file__).resolve().parent.parent / "configs" / "robosuite_lift.yaml"
    (tmp_path / "lift.yaml").write_text(f"include: {config}\n")  # the shipped file, composed as a user would
    tiny = ["--set", "collect.steps_per_level=300", "--set", "pretrain.gradient_steps=100",
            "--set", "pretrain.eval_episodes=2", "--set", "diffusion.hidden=[64, 64]",
            "--set", "resources.env_runners=0", "--set", "env.max_episode_steps=60"]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"}
    collected = run_cli(["collect", "lift.yaml", *tiny, "--json"], tmp_path, env)
    assert collected.returncode == 0, collected.stderr[-3000:]
    data = last_json(collected.stdout)["datasets"]["scripted"]
    assert data["episodes"] == 5 and data["steps"] == 300 and 0.0 <= data["success_rate"] <= 1.0
    pre = run_cli(["pretrain", "lift.yaml", *tiny, "--json"], tmp_path, env)
    assert pre.returncode == 0, pre.stderr[-3000:]
    pretrained = last_json(pre.stdout)
    assert 0.0 <= pretrained["eval"]["success_rate"] <= 1.0
    ft = run_cli(["train", "lift.yaml", *tiny, "--set", f"init_from={pretrained['checkpoint']}",
                  "--set", "stop.iterations=1", "--set", "stop.env_steps=null", "--set", "ppo.train_batch_size=60",
                  "--set", "ppo.minibatch_size=30", "--set", "eval.episodes=2", "--json"], tmp_path, env)
    assert ft.returncode == 0, ft.stderr[-3000:]
    run = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(last_json(ft.stdout)["mlflow_run_id"])
    assert run.data.tags["stage"] == "finetune" and "success_rate" in run.data.metrics
