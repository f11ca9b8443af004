"""Multi-agent NCDPO on PettingZoo: env loading, policy mapping, the discrete head per module,
the centralised critic, per-agent metrics, and every shipped config through ``ncdpo train``.

Real MultiAgentEnvRunner and NCDPOTorchLearner in-process, real mpe2 / SISL envs.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.multi_agent_env_runner import MultiAgentEnvRunner

from ncdpo_rllib.experiment.build import build_algo_config
from ncdpo_rllib.experiment.collect import collect
from ncdpo_rllib.experiment.pretrain import pretrain
from ncdpo_rllib.experiment.build import check_experiment
from ncdpo_rllib.experiment.config import load_config, parse_config
from ncdpo_rllib.errors import ConfigError
from ncdpo_rllib.rl import NOISE, DiffusionPolicyModule
from ncdpo_rllib.tasks.multiagent import check_pettingzoo_env, policy_mapping
from tests.conftest import last_json, learner_stats, run_cli

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

SPEAKER_LISTENER = {
    "env": {"kind": "pettingzoo", "id": "mpe2.simple_speaker_listener_v4",
            "kwargs": {"max_cycles": 25, "continuous_actions": False}, "normalize_observations": False},
    "multi_agent": {"policies": "independent", "central_critic": True},
    "diffusion": {"denoising_steps": 4, "hidden": [32, 32]},
    "ppo": {"train_batch_size": 200, "minibatch_size": 100, "num_epochs": 1, "critic_hidden": [32]},
    "resources": {"env_runners": 0, "envs_per_runner": 1},
}


class RecordingModule(DiffusionPolicyModule):
    """The real module; keeps what each module's first train forward saw (keyed by n actions)."""

    first_train_call: dict = {}

    def _forward_train(self, batch, **kwargs):
        out = super()._forward_train(batch, **kwargs)
        key = int(self.action_space.n)
        if key not in RecordingModule.first_train_call:
            dist = self.get_train_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
            RecordingModule.first_train_call[key] = {
                "noise_shape": tuple(batch[NOISE].shape),
                "batch_size": batch[Columns.OBS].shape[0],
                "ratio": torch.exp(dist.logp(batch[Columns.ACTIONS]) - batch[Columns.ACTION_LOGP]).detach(),
                "mask": batch[Columns.LOSS_MASK].clone(),
            }
        return out


def make_runner_and_learner(config: dict, module_class=None):
    cfg = build_algo_config(parse_config(config))
    if module_class is not None:
        specs = cfg._rl_module_spec.rl_module_specs
        cfg.rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs={
            mid: RLModuleSpec(module_class=module_class, model_config=spec.model_config) for mid, spec in specs.items()
        }))
    cfg.debugging(seed=0)
    runner = MultiAgentEnvRunner(config=cfg)
    learner = cfg.build_learner(env=runner.env, spaces=runner.get_spaces())
    runner.module.set_state(learner.module.get_state())
    return runner, learner


def test_each_module_gets_its_stored_noise_and_a_first_ratio_of_one():
    """speaker (Discrete(3)) and listener (Discrete(5)) are two modules: each module's train
    batch carries its own (B, S, n) noise column, and the first minibatch's ratio is 1."""
    RecordingModule.first_train_call = {}
    runner, learner = make_runner_and_learner(SPEAKER_LISTENER, RecordingModule)
    episodes = runner.sample(num_timesteps=200, random_actions=False)
    results = learner.update(episodes=episodes, num_epochs=1, minibatch_size=100, shuffle_batch_per_epoch=True)
    seen = RecordingModule.first_train_call
    assert set(seen) == {3, 5}
    for n, call in seen.items():
        assert call["noise_shape"] == (call["batch_size"], 4, n)
        ratio = call["ratio"][call["mask"]]
        assert ratio.numel() > 0 and (ratio - 1).abs().max() < 1e-4
    for module_id in ("speaker_0", "listener_0"):
        stats = learner_stats(results, module_id)
        assert stats["grad_norm_step_first"] > 0, module_id  # gradients reach the first denoising step


def test_central_critic_sees_every_agents_observation():
    runner, learner = make_runner_and_learner(SPEAKER_LISTENER)
    episodes = runner.sample(num_timesteps=60, random_actions=False)
    # Sorted agent order: listener_0 (11), speaker_0 (3); global state = 14 entries + 2 alive bits.
    for ep in episodes:
        listener = np.asarray(ep.agent_episodes["listener_0"].get_observations(slice(0, None)))
        speaker = np.asarray(ep.agent_episodes["speaker_0"].get_observations(slice(0, None)))
        assert listener.shape[1] == 11 + 16 and speaker.shape[1] == 3 + 16
        np.testing.assert_array_equal(listener[:, 11:], speaker[:, 3:])  # the same global state
        np.testing.assert_array_equal(listener[:, :11], listener[:, 11:22])  # own obs in its slot
        np.testing.assert_array_equal(speaker[:, :3], speaker[:, 14:17])  # ... and the speaker's
        assert (listener[:, -2:] == 1).all()  # both alive
    # The listener's value changes when only the speaker's observation changes; its actor does not.
    module = learner.module["listener_0"]
    obs = torch.as_tensor(listener[:8], dtype=torch.float32)
    other = obs.clone()
    other[:, 22:25] += 1.0  # the speaker's slot of the global state
    with torch.no_grad():
        assert not torch.allclose(module.compute_values({Columns.OBS: obs}), module.compute_values({Columns.OBS: other}))
        noise = module.actor.sample_noise(8)
        assert torch.equal(module.actor(module._cond({Columns.OBS: obs}), noise),
                           module.actor(module._cond({Columns.OBS: other}), noise))


def test_an_agent_that_leaves_early_is_zeros_with_alive_bit_zero():
    """tests/pz_leaving.py: b leaves after 2 steps; a's global state then has zeros in b's
    slot and b's alive bit is 0, while RLlib keeps a's episode going."""
    config = {**SPEAKER_LISTENER, "env": {"kind": "pettingzoo", "id": "tests.pz_leaving", "normalize_observations": False},
              "multi_agent": {"policies": "shared", "central_critic": True}}
    runner, _ = make_runner_and_learner(config)
    episodes = runner.sample(num_episodes=1, random_actions=False)
    ep = episodes[0]
    a = np.asarray(ep.agent_episodes["a"].get_observations(slice(0, None)))
    b = np.asarray(ep.agent_episodes["b"].get_observations(slice(0, None)))
    assert len(a) == 6 and len(b) == 3  # a: reset + 5 steps; b: reset + 2 steps
    # a's rows: [own (2), a (2), b (2), alive a, alive b]
    np.testing.assert_array_equal(a[:3, 4:6], b[:, :2])  # while b is there: its observation
    np.testing.assert_array_equal(a[3:, 4:6], 0.0)  # after it left: zeros ...
    np.testing.assert_array_equal(a[:, 6:], [[1, 1]] * 3 + [[1, 0]] * 3)  # ... and alive bit 0


def test_auto_policies_share_where_spaces_match_and_split_where_they_differ():
    """The default (``policies: auto``): simple_spread's identical agents share one policy;
    speaker/listener and tag's predators/prey get one policy per kind of agent."""
    from ncdpo_rllib.tasks.multiagent import describe_mapping

    assert parse_config({"env": {"kind": "pettingzoo", "id": "mpe2.simple_spread_v3"}}).multi_agent.policies == "auto"
    spread = policy_mapping("auto", {}, check_pettingzoo_env("mpe2.simple_spread_v3", {}, diffusion=True))
    assert spread == {"agent_0": "shared", "agent_1": "shared", "agent_2": "shared"}
    speaker = policy_mapping("auto", {}, check_pettingzoo_env("mpe2.simple_speaker_listener_v4", {}, diffusion=True))
    assert speaker == {"speaker_0": "speaker", "listener_0": "listener"}
    tag = policy_mapping("auto", {}, check_pettingzoo_env("mpe2.simple_tag_v3", {}, diffusion=True))
    assert tag == {"adversary_0": "adversary", "adversary_1": "adversary", "adversary_2": "adversary",
                   "agent_0": "agent"}
    assert describe_mapping(tag) == "adversary <- adversary_0, adversary_1, adversary_2; agent <- agent_0"


def test_pettingzoo_env_and_mapping_errors():
    with pytest.raises(ConfigError, match="cannot import module 'mpe2.nope_v0'"):
        check_pettingzoo_env("mpe2.nope_v0", {}, diffusion=True)
    with pytest.raises(ConfigError, match="mpe2"):
        check_pettingzoo_env("pettingzoo.mpe.simple_spread_v3", {}, diffusion=True)
    with pytest.raises(ConfigError, match="without parallel_env.. or env..: not a PettingZoo env"):
        check_pettingzoo_env("json", {}, diffusion=True)
    with pytest.raises(ConfigError, match="agent 'a_0' has observation space Dict"):
        check_pettingzoo_env("tests.pz_fixtures", {}, diffusion=True)  # an AEC env, converted first
    with pytest.raises(ConfigError, match="turn-based AEC env"):
        check_pettingzoo_env("pettingzoo.classic.tictactoe_v3", {}, diffusion=True)
    with pytest.raises(ConfigError, match="kwargs"):
        check_pettingzoo_env("mpe2.simple_spread_v3", {"bogus": 1}, diffusion=True)
    spaces = check_pettingzoo_env("mpe2.simple_tag_v3", {}, diffusion=True)
    with pytest.raises(ConfigError, match="'prey_\\*' matches no agent"):
        policy_mapping("groups", {"adversaries": "adversary_*", "prey": "prey_*"}, spaces)
    with pytest.raises(ConfigError, match="agent\\(s\\) agent_0 match no pattern"):
        policy_mapping("groups", {"adversaries": "adversary_*"}, spaces)
    with pytest.raises(ConfigError, match="share policy 'shared' but their spaces differ"):
        policy_mapping("shared", {}, spaces)
    mapping = policy_mapping("groups", {"adversaries": "adversary_*", "prey": "agent_*"}, spaces)
    assert mapping == {"adversary_0": "adversaries", "adversary_1": "adversaries", "adversary_2": "adversaries",
                       "agent_0": "prey"}
    with pytest.raises(ConfigError, match="policies: groups needs groups"):
        parse_config({"env": {"kind": "pettingzoo", "id": "mpe2.simple_tag_v3"}, "multi_agent": {"policies": "groups"}})
    pz = {"kind": "pettingzoo", "id": "mpe2.simple_tag_v3"}
    with pytest.raises(ConfigError, match="dppo is single-agent"):
        parse_config({"algorithm": "dppo", "env": pz})
    with pytest.raises(ConfigError, match="ppo.kl_to_reference is for single-agent envs"):
        parse_config({"env": pz, "ppo": {"kl_to_reference": 0.1}})
    with pytest.raises(ConfigError, match="the multi_agent section is for env.kind: pettingzoo"):
        parse_config({"multi_agent": {"central_critic": True}})
    with pytest.raises(ConfigError, match="policy name 'a/b' may use letters"):
        parse_config({"env": pz, "multi_agent": {"policies": "groups", "groups": {"a/b": "adversary_*"}}})
    ma = parse_config({"algorithm": "ppo", "env": pz})
    with pytest.raises(ConfigError, match="collect records single-agent datasets"):
        collect(ma)
    with pytest.raises(ConfigError, match="pretrain clones single-agent datasets"):
        pretrain(parse_config({"env": pz, "pretrain": {"dataset": "nowhere"}}))
    with pytest.raises(ConfigError, match="dppo needs a Box action space"):
        check_experiment(parse_config({"algorithm": "dppo", "env": {"id": "CartPole-v1"}}))


TINY = ["--set", "stop.iterations=2", "--set", "stop.env_steps=null", "--set", "ppo.train_batch_size=200",
        "--set", "ppo.minibatch_size=100", "--set", "ppo.num_epochs=1", "--set", "resources.envs_per_runner=2",
        "--set", "diffusion.denoising_steps=3"]


@pytest.mark.parametrize("config, extra", [
    ("spread_ncdpo.yaml", []),
    ("spread_ncdpo.yaml", ["--set", "algorithm=ppo"]),  # MLP+MAPPO, centralised critic
    ("spread_ncdpo.yaml", ["--set", "algorithm=ppo", "--set", "multi_agent.central_critic=false"]),
    ("spread_ncdpo.yaml", ["--set", "algorithm=ncdpo-appo", "--set", "multi_agent.central_critic=false",
                           "--set", "ppo.minibatch_size=128", "--set", "ppo.train_batch_size=256"]),  # async, shared
    ("spread_continuous_ncdpo.yaml", []),
    ("speaker_listener_ncdpo.yaml", []),
    ("tag_ncdpo.yaml", ["--set", "resources.env_runners=1"]),  # remote runner: per-agent filter merge, 16 vs 14 obs
    ("multiwalker_ncdpo.yaml", ["--set", "env.kwargs.max_cycles=50"]),
])
def test_each_multi_agent_config_trains_through_the_cli(tmp_path, config, extra):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    proc = run_cli(["train", CONFIGS / config, *TINY, *extra, "--json"], tmp_path, {"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "core_worker.cc" not in proc.stderr  # Ray's actor-restart note is filtered (remote runner configs)
    summary = last_json(proc.stdout)
    assert summary["iterations"] == 2
    run = MlflowClient(uri).get_run(summary["mlflow_run_id"])
    metrics = run.data.metrics
    exp = load_config(CONFIGS / config)
    spaces = check_pettingzoo_env(exp.env.id, exp.env.kwargs, diffusion=True)
    policies = set(policy_mapping(exp.multi_agent.policies, exp.multi_agent.groups, spaces).values())
    for policy in policies:  # per-policy learner diagnostics and returns
        assert f"learner/{policy}/policy_loss" in metrics, (policy, sorted(metrics))
        if "algorithm=ppo" not in extra:
            assert f"learner/{policy}/grad_norm_step_first" in metrics
    if "multiwalker" not in config:  # MPE episodes (25 steps) end within the budget
        assert any(k.startswith("agent_return_mean/") for k in metrics)
        assert {f"policy_return_mean/{p}" for p in policies} <= set(metrics)
    if config == "spread_ncdpo.yaml" and not extra:
        ev = run_cli(["evaluate", summary["checkpoint"], "--episodes", "2", "--video", "1", "--json"], tmp_path,
                     {"MLFLOW_TRACKING_URI": uri})
        assert ev.returncode == 0, ev.stderr[-3000:]
        evaluated = last_json(ev.stdout)
        import imageio.v3 as iio

        frames = iio.imread(evaluated["videos"][0])  # MPE renders: one frame per env step of the 25-cycle episode
        assert len(evaluated["videos"]) == 1 and frames.shape[0] == 25 and frames.std() > 0
        assert evaluated["episodes"] == 2 and set(evaluated["agent_return_mean"]) == {"agent_0", "agent_1"}
        assert "eval/agent_return_mean/agent_0" in MlflowClient(uri).get_run(evaluated["mlflow_run_id"]).data.metrics
        resumed = run_cli(["train", "--resume", summary["run_dir"], "--set", "stop.iterations=3", "--json"], tmp_path,
                          {"MLFLOW_TRACKING_URI": uri})
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert last_json(resumed.stdout)["iterations"] == 3
        changed = run_cli(["train", "--resume", summary["run_dir"], "--set", "multi_agent.policies=independent"],
                          tmp_path)
        assert changed.returncode == 2 and "changes multi_agent.policies" in changed.stderr
    if config == "speaker_listener_ncdpo.yaml":  # evaluate restores every policy's trained weights
        from ray.rllib.core.rl_module.rl_module import RLModule

        from ncdpo_rllib.experiment.checkpoints import load_checkpoint_meta
        from ncdpo_rllib.experiment.evaluate import RL_MODULE_DIR, load_env_runner

        ckpt, ckpt_exp, _ = load_checkpoint_meta(summary["checkpoint"])
        runner = load_env_runner(ckpt, ckpt_exp, seed=0)
        assert "policies (auto): speaker <- speaker_0; listener <- listener_0" in proc.stderr  # the start line
        for policy in ("speaker", "listener"):
            saved = RLModule.from_checkpoint(str(ckpt / RL_MODULE_DIR / policy)).get_state()
            restored = runner.module[policy].get_state()
            assert saved.keys() == restored.keys()
            assert all(np.allclose(np.asarray(saved[k]), np.asarray(restored[k])) for k in saved), policy
        runner.stop()


@pytest.mark.slow
def test_short_cooperative_run_improves_team_return(tmp_path):
    """simple_spread (N=2, discrete, shared policy, centralised critic), fixed seed: the team
    return of the last iterations beats the first ones."""
    proc = run_cli(["train", CONFIGS / "spread_ncdpo.yaml", "--set", "stop.env_steps=24000",
                    "--set", "tracking.enabled=false", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    returns = [float(line.split("| return")[1].split("|")[0]) for line in proc.stderr.splitlines()
               if line.startswith("iter ") and "n/a" not in line]
    assert len(returns) == 12
    first, last = np.mean(returns[:3]), np.mean(returns[-3:])
    assert last > first + 3.0, returns  # measured 2026-12-02: -40.9 -> -33.9 (at 40k: -> -31.2)
