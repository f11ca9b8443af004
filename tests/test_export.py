"""``ncdpo export`` and ``load_policy``: the exported file computes the RLlib module's deterministic
action (RLlib's own observation filter, inference forward, action distribution and unsquashing as
the reference), runs with torch alone or onnxruntime, and fails cleanly on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ncdpo_rllib import load_policy
from ncdpo_rllib.policy_file import PolicyFileError
from tests.conftest import TINY, last_json, run_cli

PINNED = Path(__file__).parent.parent / "benchmarks" / "results" / "pretrained"


def reference_actions(checkpoint, obs: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(env actions, the chain noise they used) for a batch of observations, through RLlib's pieces:
    the run's MeanStdFilter (RLlib's Filter class with the checkpoint's statistics), the module's
    inference forward, its deterministic action distribution, and ``unsquash_action``."""
    from ray.rllib.core.columns import Columns
    from ray.rllib.utils.filter import MeanStdFilter, RunningStat
    from ray.rllib.utils.spaces.space_utils import unsquash_action

    from ncdpo_rllib.experiment.export import policy_runner

    runner, exp, _ = policy_runner(str(checkpoint))
    try:
        state = runner.get_state(components="env_to_module_connector")["env_to_module_connector"]
        x = obs.reshape(len(obs), -1).astype(np.float32)
        if "MeanStdFilter" in state:
            s = state["MeanStdFilter"][None]
            f = MeanStdFilter(tuple(s["shape"]), demean=s["de_mean_to_zero"], destd=s["de_std_to_one"],
                              clip=s["clip_by_value"])
            f.running_stats = RunningStat.from_state(s["running_stats"][0])
            x = f(x, update=False)
        module = runner.module
        torch.manual_seed(seed)
        out = module.forward_inference({Columns.OBS: torch.as_tensor(x)})
        dist = module.get_inference_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
        actions = dist.to_deterministic().sample().numpy()
        torch.manual_seed(seed)
        noise = module.actor.sample_noise(len(obs)).numpy()
        space = runner.env.single_action_space
        if not module.discrete and runner.config.normalize_actions:
            actions = np.stack([unsquash_action(a, space) for a in actions])
        if exp.env.action_chunk > 1:
            actions = actions.reshape(len(obs), exp.env.action_chunk, -1)
        return actions, noise
    finally:
        runner.stop()


def observations(checkpoint, n: int = 5) -> np.ndarray:
    from ncdpo_rllib.experiment.export import policy_runner

    runner, _, _ = policy_runner(str(checkpoint))
    try:
        space = runner.env.single_observation_space
        space.seed(0)
        return np.stack([space.sample() for _ in range(n)]).astype(np.float32)
    finally:
        runner.stop()


def export_both(checkpoint, tmp_path, name: str) -> dict:
    """Both formats, in-process (the CLI's path is tested below)."""
    from ncdpo_rllib.experiment.export import export

    files = {}
    for fmt, suffix in (("torchscript", ".pt"), ("onnx", ".onnx")):
        out = tmp_path / f"{name}{suffix}"
        assert export(str(checkpoint), fmt, str(out))["file"] == str(out) and out.is_file()
        files[fmt] = out
    import onnx

    onnx.checker.check_model(onnx.load(str(files["onnx"])))
    return files


def check_same_actions(checkpoint, files: dict, atol: float) -> None:
    obs = observations(checkpoint)
    expected, noise = reference_actions(checkpoint, obs)
    for fmt, path in files.items():
        policy = load_policy(path)
        got = policy(obs, noise=noise)
        assert got.shape == expected.shape, (fmt, got.shape, expected.shape)
        np.testing.assert_allclose(got, expected, atol=atol, err_msg=fmt)
        one = policy(obs[0], noise=noise[0])  # a single observation: no batch axis in or out
        np.testing.assert_allclose(one, expected[0], atol=atol, err_msg=fmt)


@pytest.mark.slow
def test_trained_continuous_policy_with_filter_chunks_and_bounds_exports_exactly(tmp_path):
    """Pendulum (bounds +-2: unsquashed), a running MeanStdFilter, action chunks of 2."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    uri = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"}
    trained = run_cli(["train", tmp_path / "tiny.yaml", "--set", "env.action_chunk=2", "--json"], tmp_path, uri)
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = last_json(trained.stdout)["checkpoint"]
    files = export_both(tmp_path / ckpt, tmp_path, "pendulum")
    meta = load_policy(files["torchscript"]).metadata
    assert meta["env"] == "Pendulum-v1" and meta["action_chunk"] == 2 and meta["noise_shape"] == [4, 2]
    check_same_actions(tmp_path / ckpt, files, atol=1e-5)
    # the file alone drives the env: one action chunk inside the bounds
    import gymnasium as gym

    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=0)
    chunk = load_policy(files["onnx"])(obs, seed=0)
    assert chunk.shape == (2, 1) and np.all(np.abs(chunk) <= 2.0)
    for a in chunk:
        env.step(a)


@pytest.mark.slow
def test_discrete_policy_exports_its_argmax(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY.replace("Pendulum-v1", "CartPole-v1"))
    trained = run_cli(["train", tmp_path / "tiny.yaml", "--json"], tmp_path,
                      {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"})
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = tmp_path / last_json(trained.stdout)["checkpoint"]
    files = export_both(ckpt, tmp_path, "cartpole")
    check_same_actions(ckpt, files, atol=0)
    assert load_policy(files["torchscript"])(observations(ckpt)[0], seed=1).dtype == np.int64


def test_pretrained_pixel_policy_exports_its_image_encoder(tmp_path):
    """A pinned pre-trained Meta-World policy from 64x64 pixels (CNN encoder, no filter)."""
    ckpt = PINNED / "metaworld-reach-pixels"
    files = export_both(ckpt, tmp_path, "reach-pixels")
    assert load_policy(files["onnx"]).metadata["observation"] != "state"
    check_same_actions(ckpt, files, atol=1e-4)


def test_load_policy_needs_neither_ray_nor_rllib(tmp_path):
    files = export_both(PINNED / "locomotion-hopper-k10", tmp_path, "hopper")
    script = (
        "import sys, json, numpy as np\n"
        "sys.modules['ray'] = None  # importing ray now fails\n"
        "from ncdpo_rllib import load_policy\n"
        f"out = {{}}\n"
        f"for f in {[str(p) for p in files.values()]!r}:\n"
        "    p = load_policy(f)\n"
        "    out[f] = p(np.zeros(p.metadata['obs_shape'], np.float32), seed=0).tolist()\n"
        "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules if sys.modules[m] is not None)\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    actions = [np.array(a) for a in json.loads(proc.stdout.splitlines()[-1]).values()]
    assert actions[0].shape == (4, 3)  # Hopper: a chunk of Ta = 4 actions of 3 dims
    np.testing.assert_allclose(actions[0], actions[1], atol=1e-4)  # TorchScript and ONNX agree


def test_bad_export_arguments_are_one_line_errors_and_write_nothing(tmp_path):
    ckpt = PINNED / "locomotion-hopper-k10"
    from ncdpo_rllib.errors import ConfigError
    from ncdpo_rllib.experiment.export import export

    done = run_cli(["export", ckpt, "--out", tmp_path / "p.pt", "--json"], tmp_path)
    assert done.returncode == 0 and last_json(done.stdout)["file"] == str(tmp_path / "p.pt"), done.stderr[-3000:]
    wrong = run_cli(["export", ckpt, "--format", "onnx", "--out", tmp_path / "p2.pt"], tmp_path)
    assert wrong.returncode == 2 and "an onnx file ends in .onnx" in wrong.stderr and "Traceback" not in wrong.stderr
    with pytest.raises(ConfigError, match="does not exist"):
        export(str(ckpt), "torchscript", str(tmp_path / "nowhere" / "p.pt"))
    missing = run_cli(["export", tmp_path / "no-such-run", "--out", tmp_path / "q.pt"], tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and not (tmp_path / "q.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".pt", ".onnx") or ".tmp-" in p.name) == ["p.pt"]
    (tmp_path / "junk.pt").write_bytes(b"not a policy")
    with pytest.raises(PolicyFileError, match="junk.pt: not a TorchScript file"):
        load_policy(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="observation shape"):
        load_policy(tmp_path / "p.pt")(np.zeros(3))


@pytest.mark.slow
def test_multi_agent_export_writes_one_file_per_agent_with_its_own_filter(tmp_path):
    """simple_spread: one shared policy, a centralised critic (the actor reads its own observation, the
    first entries of [own, global state, alive bits]) and a MeanStdFilter per agent: each agent's
    file takes the agent's own observation and matches RLlib's filter + module on the full vector."""
    from ray.rllib.core.columns import Columns
    from ray.rllib.utils.filter import MeanStdFilter, RunningStat

    from ncdpo_rllib.experiment.export import export, policy_runner

    config = Path(__file__).parent.parent / "configs" / "spread_ncdpo.yaml"
    tiny = ["--set", "stop.iterations=1", "--set", "stop.env_steps=null", "--set", "ppo.train_batch_size=200",
            "--set", "ppo.minibatch_size=100", "--set", "ppo.num_epochs=1", "--set", "resources.envs_per_runner=2",
            "--set", "diffusion.denoising_steps=3"]
    trained = run_cli(["train", config, *tiny, "--json"], tmp_path,
                      {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"})
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = tmp_path / last_json(trained.stdout)["checkpoint"]
    summary = export(str(ckpt), "onnx", str(tmp_path / "spread.onnx"))
    assert summary["agents"] == {a: {"file": str(tmp_path / f"spread-{a}.onnx"), "policy": "shared"}
                                 for a in ("agent_0", "agent_1")}
    runner, _, _ = policy_runner(str(ckpt))
    try:
        state = runner.get_state(components="env_to_module_connector")["env_to_module_connector"]
        filters = next(v for k, v in state.items() if "MeanStdFilter" in k)
        module = runner.module["shared"]
        full_dim = module.observation_space.shape[0]
        rng = np.random.default_rng(0)
        for agent, entry in summary["agents"].items():
            policy = load_policy(entry["file"])
            own = rng.normal(size=(4, *policy.metadata["obs_shape"])).astype(np.float32)
            full = np.zeros((4, full_dim), np.float32)
            full[:, : own.shape[1]] = own
            s = filters[agent]
            f = MeanStdFilter(tuple(s["shape"]), demean=s["de_mean_to_zero"], destd=s["de_std_to_one"],
                              clip=s["clip_by_value"])
            f.running_stats = RunningStat.from_state(s["running_stats"][0])
            torch.manual_seed(3)
            out = module.forward_inference({Columns.OBS: torch.as_tensor(f(full, update=False))})
            expected = module.get_inference_action_dist_cls().from_logits(
                out[Columns.ACTION_DIST_INPUTS]).to_deterministic().sample().numpy()
            torch.manual_seed(3)
            noise = module.actor.sample_noise(4).numpy()
            np.testing.assert_array_equal(policy(own, noise=noise), expected, err_msg=agent)
            assert not np.allclose(f.running_stats.mean[: own.shape[1]], 0)  # the agent's own statistics were used
    finally:
        runner.stop()

