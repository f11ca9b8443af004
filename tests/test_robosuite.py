"""robosuite tasks (robomimic's family) through the project's env factory: build, step, success,
the scripted Lift, Can and Square experts, pixels, config errors, and collect -> pretrain -> fine-tune."""

from pathlib import Path

import numpy as np
import pytest

from ncdpo_rllib.errors import ConfigError, DatasetError
from ncdpo_rllib.experiment.build import check_experiment
from ncdpo_rllib.experiment.config import parse_config
from ncdpo_rllib.tasks.envs import make_env, scripted_expert
from ncdpo_rllib.tasks.config import EnvConfig
from tests.conftest import ShippedPipeline, run_cli

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
    # and repeat with it: the placement (x, y); the height the cube settles at after a reset
    # without a hard reset varies by ~1 mm from run to run
    assert np.allclose(again.reset(seed=3)[0][9:11], cubes[3][:2], atol=1e-5)
    again.close()


def test_the_scripted_can_expert_drops_the_can_in_its_bin():
    env, expert, source = scripted_expert(EnvConfig(kind="robosuite", id="PickPlaceCan", max_episode_steps=160))
    assert "PickPlaceCan" in source
    successes = []
    for episode in range(3):
        obs, _ = env.reset(seed=episode)
        success = False
        for _ in range(160):
            obs, reward, terminated, truncated, info = env.step(expert(obs))
            success = success or info["success"]
        successes.append(success and info["success"])  # in the bin, and still there at the end
    env.close()
    assert sum(successes) >= 2, successes


def test_the_scripted_square_expert_puts_the_nut_on_its_peg():
    env, expert, source = scripted_expert(EnvConfig(kind="robosuite", id="NutAssemblySquare", max_episode_steps=400))
    assert "NutAssemblySquare" in source
    successes, headings = [], []
    for episode in range(3):
        obs, _ = env.reset(seed=episode)
        headings.append(env.unwrapped.raw_observation["SquareNut_quat"].copy())
        since = None  # steps since the nut first counted as on its peg
        for _ in range(400):
            obs, reward, terminated, truncated, info = env.step(expert(obs))
            since = since + 1 if since is not None else (0 if info["success"] else None)
            if since == 20:  # the gripper has let go and risen clear: done
                break
        successes.append(since == 20 and info["success"])  # on the peg, let go, and still there
    env.close()
    assert len({tuple(np.round(h, 3)) for h in headings}) == 3  # the nut's heading is random
    assert sum(successes) >= 2, successes


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


def test_extra_cameras_append_their_images_in_order():
    env = make_env({**LIFT, "observation": "pixels", "image_size": 32, "extra_cameras": ["robot0_eye_in_hand"]})
    obs, _ = env.reset(seed=0)
    side = 32 * 32 * 3
    assert obs.shape == (19 + 2 * side,) and env.observation_space.shape == obs.shape
    agentview, wrist = obs[19:19 + side], obs[19 + side:]
    wrapper = env  # the same frames again, straight from the wrapper's renderers
    while not hasattr(wrapper, "render_frames"):
        wrapper = wrapper.env
    frames = wrapper.render_frames()
    assert np.array_equal(agentview, frames[0].reshape(-1)) and np.array_equal(wrist, frames[1].reshape(-1))
    assert np.abs(agentview - wrist).mean() > 10  # two different views
    env.close()
    with pytest.raises(ConfigError, match="env.extra_cameras 'wrist' is not a camera of this task"):
        check_experiment(parse_config({"env": {**LIFT, "observation": "pixels", "extra_cameras": ["wrist"]}}))
    with pytest.raises(ConfigError, match="extra_cameras are for observation: pixels"):
        parse_config({"env": {**LIFT, "extra_cameras": ["robot0_eye_in_hand"]}})
    with pytest.raises(ConfigError, match="name a camera twice"):
        parse_config({"env": {**LIFT, "observation": "pixels", "extra_cameras": ["agentview"]}})


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
    pipeline = ShippedPipeline(tmp_path, "robosuite_lift.yaml", [
        "collect.steps_per_level=300", "pretrain.gradient_steps=100", "pretrain.eval_episodes=2",
        "diffusion.hidden=[64, 64]", "resources.env_runners=0", "env.max_episode_steps=60"])
    data = pipeline.stage("collect")["datasets"]["scripted"]
    assert data["episodes"] == 5 and data["steps"] == 300 and 0.0 <= data["success_rate"] <= 1.0
    # the robomimic-layout copy the collector wrote imports to the same episodes
    from ncdpo_rllib.data import load_dataset

    imported = run_cli(["dataset", "import", data["robomimic_file"], "imported", "--format", "robomimic",
                        "--env-id", "Lift"], tmp_path)
    assert imported.returncode == 0, imported.stderr[-3000:]
    ours, theirs = load_dataset(data["path"]), load_dataset(tmp_path / "imported")
    assert len(ours.episodes) == len(theirs.episodes) == 5
    for a, b in zip(ours.episodes, theirs.episodes):
        assert np.array_equal(a.observations, b.observations) and np.array_equal(a.actions, b.actions)
        assert np.array_equal(a.rewards, b.rewards) and (a.terminated, a.truncated) == (b.terminated, b.truncated)
    # pre-training reads the robomimic file directly (the dataset directory is Meta-World's test's path)
    pretrained = pipeline.stage("pretrain", f"pretrain.dataset={data['robomimic_file']}")
    assert 0.0 <= pretrained["eval"]["success_rate"] <= 1.0
    pipeline.finetune(pretrained["checkpoint"], "ppo.train_batch_size=60", "ppo.minibatch_size=30",
                      "eval.episodes=2")


@pytest.mark.slow
def test_two_cameras_collect_pretrain_finetune(tmp_path):
    """agentview + the wrist camera from pixels: the collected dataset (images uint8 on disk) and its
    robomimic copy hold both views, behaviour cloning and one fine-tuning iteration run on them."""
    import h5py

    pipeline = ShippedPipeline(tmp_path, "robosuite_lift_pixels.yaml", [
        "env.extra_cameras=[robot0_eye_in_hand]", "env.image_size=40", "env.max_episode_steps=20",
        "collect.steps_per_level=40", "pretrain.gradient_steps=20", "pretrain.eval_episodes=0",
        "diffusion.hidden=[32, 32]", "encoder.feature_dim=16", "resources.env_runners=0",
        "pretrain.dataset=data/Lift/scripted-pixels40-robot0_eye_in_hand"])
    data = pipeline.stage("collect")["datasets"]["scripted-pixels40-robot0_eye_in_hand"]
    assert data["episodes"] == 2
    with h5py.File(Path(data["path"]) / "data" / "main_data.hdf5") as f:
        assert f["episode_0/observations/image"].shape == (21, 2, 40, 40, 3)
        assert f["episode_0/observations/image"].dtype == np.uint8
    with h5py.File(data["robomimic_file"]) as f:
        assert {"agentview_image", "robot0_eye_in_hand_image"} <= set(f["data/demo_0/obs"])
    pretrained = pipeline.stage("pretrain")
    pipeline.finetune(pretrained["checkpoint"], "ppo.train_batch_size=10", "ppo.minibatch_size=5", "eval.every=0")
    # a config with one camera does not take the two-camera checkpoint
    one = run_cli(["train", pipeline.file.name, "--set", f"init_from={pretrained['checkpoint']}"], tmp_path,
                  pipeline.env)
    assert one.returncode != 0 and "env.extra_cameras" in one.stderr, one.stderr[-2000:]


def _robomimic_file(path, demos=((5, True), (3, False)), drop=None, short=None, env_args=True, masks=True):
    """A small robomimic-layout file built here, independently of the project's writer: demo i has
    n steps of robot0_eef_pos (3), object (2), agentview_image and robot0_eye_in_hand_image (4x4x3
    uint8, the wrist one 255 - agentview's), 7-D actions."""
    import json

    import h5py

    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        if env_args:
            data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {"robots": ["Panda"]}})
        for i, (n, done) in enumerate(demos):
            g = data.create_group(f"demo_{i}")
            g["actions"] = np.full((n, 7), i + 0.5, np.float32)
            g["rewards"] = np.arange(n, dtype=np.float64)
            g["dones"] = np.array([0] * (n - 1) + [int(done)])
            for group, offset in (("obs", 0), ("next_obs", 1)):
                steps = np.arange(n)[:, None] + offset + 100 * i
                g[f"{group}/robot0_eef_pos"] = np.repeat(steps, 3, axis=1).astype(np.float64)
                g[f"{group}/object"] = np.repeat(-steps, 2, axis=1).astype(np.float64)
                g[f"{group}/agentview_image"] = np.broadcast_to((steps % 256)[:, :, None, None], (n, 4, 4, 3)).astype(np.uint8)
                g[f"{group}/robot0_eye_in_hand_image"] = 255 - g[f"{group}/agentview_image"][()]
            if drop:
                del g[drop]
            if short:
                value = g[short][()][:-1]
                del g[short]
                g[short] = value
        if masks:
            f["mask/train"] = np.array([b"demo_0"])
            f["mask/valid"] = np.array([b"demo_1"])


def test_robomimic_import_keeps_observations_actions_and_episode_boundaries(tmp_path):
    from ncdpo_rllib.data import import_robomimic, load_dataset

    _robomimic_file(tmp_path / "demo.hdf5")
    ds = load_dataset(import_robomimic(tmp_path / "demo.hdf5", tmp_path / "lift", ["robot0_eef_pos", "object"]))
    assert ds.env_id == "Lift" and [len(ep) for ep in ds.episodes] == [5, 3]
    first, second = ds.episodes
    assert np.array_equal(first.observations[:, :3], np.repeat(np.arange(6)[:, None], 3, 1))  # 5 obs + next_obs[-1]
    assert np.array_equal(first.observations[:, 3:], -np.repeat(np.arange(6)[:, None], 2, 1))
    assert np.array_equal(second.observations[0], [100, 100, 100, -100, -100])
    assert np.all(first.actions == 0.5) and np.all(second.actions == 1.5) and list(first.rewards) == [0, 1, 2, 3, 4]
    assert first.terminated and not first.truncated and second.truncated and not second.terminated
    assert ds.metadata["imported_from"] == "robomimic" and ds.metadata["robomimic_env_args"]["env_name"] == "Lift"
    # a filter, and an image key last: the project's [state, image] pixel layout
    ds = load_dataset(import_robomimic(tmp_path / "demo.hdf5", tmp_path / "valid", ["object", "agentview_image"],
                                       filter_key="valid"))
    assert [len(ep) for ep in ds.episodes] == [3] and ds.obs_dim == 2 + 4 * 4 * 3
    assert np.all(ds.episodes[0].observations[1, 2:] == 101) and ds.metadata["camera"] == "agentview"
    assert ds.metadata["image_size"] == 4
    # two cameras: both images after the state, in the order given; stored uint8, read back exactly
    keys = ["object", "agentview_image", "robot0_eye_in_hand_image"]
    ds = load_dataset(import_robomimic(tmp_path / "demo.hdf5", tmp_path / "two", keys))
    assert ds.obs_dim == 2 + 2 * 48 and ds.metadata["cameras"] == ["agentview", "robot0_eye_in_hand"]
    second = ds.episodes[1].observations
    assert np.all(second[1, 2:50] == 101) and np.all(second[1, 50:] == 255 - 101)
    with pytest.raises(DatasetError, match="image keys go after the low-dim ones"):
        import_robomimic(tmp_path / "demo.hdf5", tmp_path / "bad", ["agentview_image", "object"])


@pytest.mark.parametrize("variant, needle", [
    ({"drop": "dones"}, "data/demo_0 has no 'dones'"),
    ({"drop": "obs/object"}, "data/demo_0/obs has no 'object'"),
    ({"short": "rewards"}, "data/demo_0: rewards has 4 steps, actions 5"),
    ({"short": "obs/robot0_eef_pos"}, "data/demo_0: obs/robot0_eef_pos has 4 steps, actions 5"),
    ({"env_args": False}, "'data' has no env_args attribute"),
    ({"masks": False, "filter": "train"}, "no mask/train; the file's filters: none"),
    ({"env_id": "PickPlaceCan"}, "recorded on Lift, not PickPlaceCan"),
])
def test_malformed_robomimic_files_are_one_line_errors_naming_file_and_key(tmp_path, variant, needle):
    variant = dict(variant)
    cli = ["dataset", "import", "demo.hdf5", "out", "--format", "robomimic", "--obs-keys", "robot0_eef_pos", "object"]
    if "filter" in variant:
        cli += ["--filter", variant.pop("filter")]
    if "env_id" in variant:
        cli += ["--env-id", variant.pop("env_id")]
    _robomimic_file(tmp_path / "demo.hdf5", **variant)
    proc = run_cli(cli, tmp_path)
    assert proc.returncode != 0 and needle in proc.stderr and "demo.hdf5" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing half-written
