"""Pixel observations: the camera wrapper, the image encoders inside the diffusion module
and the critic, the RLlib link (EnvRunner -> batch with stored noise -> Learner) with
images, the pipeline collect -> pretrain -> fine-tune from pixels, and bad input."""

from pathlib import Path

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

from ncdpo_rllib.experiment.build import build_algo_config
from ncdpo_rllib.experiment.config import parse_config
from ncdpo_rllib.errors import ConfigError
from ncdpo_rllib.experiment.pretrain import module_spec
from ncdpo_rllib.rl import NOISE, DiffusionPolicyModule
from ncdpo_rllib.rl.encoders import ObservationEncoder, random_shift
from ncdpo_rllib.tasks.envs import make_env
from tests.conftest import last_json, run_cli
from tests.test_rllib_links import RecordingModule

SIZE = 40  # the smallest the CNN takes is 36; small frames keep the tests fast
PIXELS = SIZE * SIZE * 3
STATE = 39  # Meta-World's state vector


def pixel_exp(observation="pixels", encoder="cnn", **env):
    return parse_config({
        "env": {"kind": "metaworld", "id": "reach-v3", "observation": observation, "image_size": SIZE,
                "max_episode_steps": 20, "action_chunk": 2, **env},
        "encoder": {"type": encoder, "feature_dim": 16},
        "diffusion": {"denoising_steps": 3, "hidden": [32, 32]},
        "ppo": {"train_batch_size": 40, "minibatch_size": 20, "num_epochs": 1, "critic_hidden": [32]},
        "resources": {"env_runners": 0, "envs_per_runner": 2},
    })


def test_random_shift_moves_whole_images_by_at_most_pad_pixels():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    assert torch.equal(random_shift(images, 0), images)
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    for b in range(2):  # each sample is one crop of its padded image
        crops = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(padded[b, :, dy:dy + 8, dx:dx + 8], shifted[b])]
        assert crops


def test_encoder_splits_state_and_stacked_frames():
    frames, state_dim = 2, 5
    state = torch.randn(1, frames, state_dim)
    images = torch.randint(0, 256, (1, frames, SIZE, SIZE, 3)).float()
    obs = torch.cat([state, images.reshape(1, frames, -1)], dim=-1).reshape(1, -1)
    enc = ObservationEncoder(obs.shape[1], image_size=SIZE, frames=frames, use_state=True, feature_dim=8)
    got_state, got_images = enc.split(obs)
    assert torch.equal(got_state, state.reshape(1, -1))
    assert torch.allclose(got_images[0, 3:6], images[0, 1].permute(2, 0, 1) / 255)  # frame 2, channels first
    assert enc(obs).shape == (1, 8 + frames * state_dim) and enc.out_dim == 8 + frames * state_dim
    with pytest.raises(ValueError, match="does not hold"):
        ObservationEncoder(100, image_size=SIZE, frames=1, use_state=False)


def test_encoder_stacks_every_camera_of_every_frame_as_channels():
    frames, cameras, state_dim = 2, 2, 3
    state = torch.randn(1, frames, state_dim)
    images = torch.randint(0, 256, (1, frames, cameras, SIZE, SIZE, 3)).float()
    obs = torch.cat([state, images.reshape(1, frames, -1)], dim=-1).reshape(1, -1)
    enc = ObservationEncoder(obs.shape[1], image_size=SIZE, frames=frames, cameras=cameras, use_state=True,
                             feature_dim=8)
    got_state, got_images = enc.split(obs)
    assert enc.state_dim == state_dim and torch.equal(got_state, state.reshape(1, -1))
    assert got_images.shape == (1, frames * cameras * 3, SIZE, SIZE)
    for f in range(frames):
        for c in range(cameras):
            first = 3 * (cameras * f + c)  # frame-major, then camera, then RGB
            assert torch.allclose(got_images[0, first:first + 3], images[0, f, c].permute(2, 0, 1) / 255)
    assert enc(obs).shape == (1, 8 + frames * state_dim)


def test_camera_frames_are_appended_to_the_state():
    env = make_env(pixel_exp().env)
    try:
        assert env.observation_space.shape == (STATE + PIXELS,)
        obs, _ = env.reset(seed=0)
        assert obs.dtype == np.float32 and obs.shape == (STATE + PIXELS,)
        frame = obs[STATE:]
        assert 0 <= frame.min() and frame.max() <= 255 and frame.std() > 10  # a real image, not a blank
        for _ in range(5):
            obs, *_ = env.step(np.ones(env.action_space.shape, np.float32))
        assert np.abs(obs[STATE:] - frame).mean() > 0.1  # the arm moved in the picture
    finally:
        env.close()
    # With an observation history the frames are rendered per env step, below the chunking.
    stacked = make_env(pixel_exp(obs_history=2).env)
    try:
        assert stacked.observation_space.shape == (2 * (STATE + PIXELS),)
        assert stacked.reset(seed=0)[0].shape == (2 * (STATE + PIXELS),)
    finally:
        stacked.close()


@pytest.mark.parametrize("encoder", ["cnn", "vit"])
@pytest.mark.parametrize("observation", ["pixels", "pixels_state"])
def test_module_builds_for_images_and_gradients_reach_the_encoder(encoder, observation):
    module = module_spec(pixel_exp(observation, encoder)).build()
    assert isinstance(module, DiffusionPolicyModule) and len(module.encoders) == 2
    obs = torch.cat([torch.randn(6, STATE), torch.randint(0, 256, (6, PIXELS)).float()], dim=1)
    out = module.forward_exploration({Columns.OBS: obs})
    assert out[NOISE].shape == (6, 4, 8)  # (B, K+1, Ta x action dims)
    train = module.forward_train({Columns.OBS: obs, NOISE: out[NOISE]})
    # The same stored noise reproduces the rollout's distribution: the first PPO ratio is 1.
    assert torch.allclose(train[Columns.ACTION_DIST_INPUTS], out[Columns.ACTION_DIST_INPUTS], atol=1e-5)
    # The action mean depends on the image only through the chain: backprop reaches every
    # encoder weight through all denoising steps.
    train[Columns.ACTION_DIST_INPUTS][:, :8].pow(2).sum().backward()
    for name, p in module.actor.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    module.compute_values({Columns.OBS: obs}).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.critic[0].parameters())
    # Changing only the image changes the action mean (pixels) / not the state entries alone.
    other = obs.clone()
    other[:, STATE:] = torch.randint(0, 256, (6, PIXELS)).float()
    moved = module.forward_train({Columns.OBS: other, NOISE: out[NOISE]})[Columns.ACTION_DIST_INPUTS]
    assert (moved - train[Columns.ACTION_DIST_INPUTS]).abs().max() > 1e-6
    if observation == "pixels":
        state_only = obs.clone()
        state_only[:, :STATE] += 1.0
        same = module.forward_train({Columns.OBS: state_only, NOISE: out[NOISE]})[Columns.ACTION_DIST_INPUTS]
        assert torch.allclose(same, train[Columns.ACTION_DIST_INPUTS], atol=1e-6)


def test_normaliser_leaves_pixels_alone():
    module = module_spec(pixel_exp("pixels_state")).build()
    dim = STATE + PIXELS
    module.set_obs_normalizer(np.full(dim, 3.0), np.full(dim, 2.0))
    assert torch.all(module.obs_shift[:STATE] == 3.0) and torch.all(module.obs_scale[:STATE] == 2.0)
    assert torch.all(module.obs_shift[STATE:] == 0.0) and torch.all(module.obs_scale[STATE:] == 1.0)


def test_image_batch_flows_from_env_runner_to_learner_with_the_stored_noise():
    RecordingModule.first_train_call = None
    cfg = build_algo_config(pixel_exp("pixels_state"))
    spec = cfg.get_default_rl_module_spec()
    cfg.rl_module(rl_module_spec=RLModuleSpec(module_class=RecordingModule, model_config=spec.model_config))
    runner = SingleAgentEnvRunner(config=cfg)
    try:
        learner = cfg.build_learner(env=runner.env)
        runner.module.set_state(learner.module["default_policy"].get_state())
        before = {k: v.detach().clone() for k, v in learner.module["default_policy"].state_dict().items()}
        episodes = runner.sample(num_timesteps=40, random_actions=False)
        learner.update(episodes=episodes, num_epochs=1, minibatch_size=20, shuffle_batch_per_epoch=True)
    finally:
        runner.stop()
    seen = RecordingModule.first_train_call
    assert seen["obs_shape"][1] == STATE + PIXELS and seen["noise_shape"][1:] == (4, 8)
    ratio = seen["ratio"][seen["mask"]]
    assert ratio.numel() > 0 and (ratio - 1).abs().max() < 1e-4
    after = learner.module["default_policy"].state_dict()
    for prefix in ("actor.encoder.trunk.convs.0.weight", "critic.0.trunk.convs.0.weight"):
        assert not torch.equal(before[prefix], after[prefix]), f"{prefix} was not updated"


def test_pixel_config_errors():
    cases = {
        "is implemented for kind: metaworld": {"env": {"id": "Pendulum-v1", "observation": "pixels"}},
        "use algorithm: ncdpo, dppo or ncdpo-appo": {"algorithm": "ppo", "env": {"kind": "metaworld", "id": "reach-v3",
                                                                     "observation": "pixels"}},
        "encoder section is for": {"encoder": {"type": "vit"}},
        "multiple of 8": {"env": {"kind": "metaworld", "id": "reach-v3", "observation": "pixels",
                                  "image_size": 60}, "encoder": {"type": "vit"}},
        "needs env.image_size >= 36": {"env": {"kind": "metaworld", "id": "reach-v3", "observation": "pixels",
                                               "image_size": 32}},
        "image_size and camera are for observation: pixels": {"env": {"kind": "metaworld", "id": "reach-v3",
                                                                      "camera": "topview"}},
        "max_episode_steps is set twice": {"env": {"id": "Pendulum-v1", "max_episode_steps": 50,
                                                   "kwargs": {"max_episode_steps": 60}}},
        "the reference policy would see other shifts": {
            "env": {"kind": "metaworld", "id": "reach-v3", "observation": "pixels"},
            "encoder": {"shift_in_finetune": True}, "ppo": {"kl_to_reference": 0.1}},
        "env.max_episode_steps is for single-agent envs": {
            "env": {"kind": "pettingzoo", "id": "mpe2.simple_spread_v3", "max_episode_steps": 10}},
    }
    for message, data in cases.items():
        with pytest.raises(ConfigError, match=message):
            parse_config(data)
    with pytest.raises(ConfigError, match="is not a camera of this task; choose one of"):
        make_env(pixel_exp(camera="nope").env)


def test_rendering_unavailable_names_the_mujoco_gl_backend(tmp_path):
    """No OSMesa here: MUJOCO_GL=osmesa must fail with the fix, in one line, before any run starts."""
    (tmp_path / "pix.yaml").write_text(
        "env: {kind: metaworld, id: reach-v3, observation: pixels}\nstop: {iterations: 1, env_steps: null}\n")
    if Path("/usr/lib/x86_64-linux-gnu/libOSMesa.so.8").exists():
        pytest.skip("OSMesa is installed here")
    res = run_cli(["train", "pix.yaml"], tmp_path, {"MUJOCO_GL": "osmesa"})
    assert res.returncode == 2, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "MUJOCO_GL=osmesa" in err[0] and "MUJOCO_GL=egl" in err[0], err
    assert "Traceback" not in res.stderr and not (tmp_path / "runs").exists()


PIPELINE = """\
algorithm: ncdpo
env: {kind: metaworld, id: reach-v3, max_episode_steps: 25, action_chunk: 4, observation: pixels,
      image_size: 40}
encoder: {feature_dim: 16}
stop: {iterations: 1, env_steps: null}
diffusion: {denoising_steps: 3, hidden: [32, 32], init_std: 0.1}
ppo: {train_batch_size: 40, minibatch_size: 20, num_epochs: 1, critic_hidden: [32]}
resources: {env_runners: 0, envs_per_runner: 2}
collect: {scripted: true, steps_per_level: 100, action_noise: 0.3}
pretrain: {dataset: data/reach-v3/scripted-pixels40, gradient_steps: 20, eval_episodes: 2, log_every: 10}
"""


@pytest.mark.slow
def test_pixels_collect_pretrain_finetune_end_to_end(tmp_path):
    """Scripted demos with camera frames -> behaviour cloning of the CNN + chain -> NCDPO, via the CLI;
    then the image-size checks against the dataset and the checkpoint."""
    (tmp_path / "pix.yaml").write_text(PIPELINE)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"}
    collected = run_cli(["collect", "pix.yaml", "--json"], tmp_path, env)
    assert collected.returncode == 0, collected.stderr[-3000:]
    data = last_json(collected.stdout)["datasets"]["scripted-pixels40"]
    assert data["episodes"] == 4 and data["steps"] == 100
    pre = run_cli(["pretrain", "pix.yaml", "--json"], tmp_path, env)
    assert pre.returncode == 0, pre.stderr[-3000:]
    pretrained = last_json(pre.stdout)
    assert pretrained["val_loss_last"] < pretrained["val_loss_first"]
    assert 0.0 <= pretrained["eval"]["success_rate"] <= 1.0
    ckpt = pretrained["checkpoint"]
    ft = run_cli(["train", "pix.yaml", "--set", f"init_from={ckpt}", "--json"], tmp_path, env)
    assert ft.returncode == 0, ft.stderr[-3000:]
    summary = last_json(ft.stdout)
    assert summary["env_steps"] > 0
    ev = run_cli(["evaluate", summary["checkpoint"], "--episodes", "2", "--json"], tmp_path, env)
    assert ev.returncode == 0 and 0.0 <= last_json(ev.stdout)["success_rate"] <= 1.0, ev.stderr[-3000:]
    # Bad input: a checkpoint or dataset of another image size, one line each, nothing written.
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    bad = run_cli(["train", "pix.yaml", "--set", f"init_from={ckpt}", "--set", "env.image_size=48"], tmp_path, env)
    assert bad.returncode == 2 and "env.image_size: 40 there, 48 here" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    bad = run_cli(["pretrain", "pix.yaml", "--set", "env.image_size=48"], tmp_path, env)
    assert bad.returncode == 2 and "record the dataset with the same image_size" in bad.stderr, bad.stderr
    bad = run_cli(["pretrain", "pix.yaml", "--set", "env.camera=corner3"], tmp_path, env)
    assert bad.returncode == 2 and "rendered from camera(s) corner2, the config's env.camera and env.extra_cameras are corner3" in bad.stderr, bad.stderr
    bad = run_cli(["train", "pix.yaml", "--set", f"init_from={ckpt}", "--set", "env.camera=corner3"], tmp_path, env)
    assert bad.returncode == 2 and "env.camera: 'corner2' there, 'corner3' here" in bad.stderr, bad.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs


@pytest.mark.parametrize("algorithm", ["ncdpo", "dppo"])
def test_shift_in_finetune_shifts_the_update_forwards_only(algorithm):
    exp = pixel_exp()
    exp = parse_config({**exp.to_dict(), "algorithm": algorithm,
                        "encoder": {**exp.to_dict()["encoder"], "shift_in_finetune": True}})
    module = module_spec(exp).build()
    assert module.shift_in_update
    torch.manual_seed(0)
    obs = torch.cat([torch.randn(8, STATE), torch.randint(0, 256, (8, PIXELS)).float()], dim=1)
    out = module.forward_exploration({Columns.OBS: obs})
    batch = {Columns.OBS: obs, **{k: v for k, v in out.items() if k not in (Columns.OBS,)}}
    train = module.forward_train(batch)[Columns.ACTION_DIST_INPUTS]
    # (the untrained denoiser's outputs are ~1e-4: unshifted, the two are equal)
    assert (train - out[Columns.ACTION_DIST_INPUTS]).abs().max() > 1e-6  # shifted frames in the update
    values = module.values_for_update(batch)
    assert not torch.allclose(values, module.compute_values(batch))  # GAE's pass is unshifted
    assert not any(enc.shifting for enc in module.encoders)  # switched off again
