"""The experiment config: parsing, one-line errors, and its mapping onto RLlib's config."""

from pathlib import Path

import gymnasium as gym
import pytest

from ncdpo_rllib.experiment.build import build_algo_config
from ncdpo_rllib.experiment.config import ExperimentConfig, ResourcesConfig, load_config, parse_config
from ncdpo_rllib.errors import ConfigError
from ncdpo_rllib.rl import DiffusionPolicyModule, NCDPOConfig, NCDPOTorchLearner
from ncdpo_rllib.tasks.config import EnvConfig
from ncdpo_rllib.tasks.envs import check_env

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_minimal_file_gets_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("env: {id: Pendulum-v1}\n")
    exp = load_config(f)
    assert exp == ExperimentConfig()
    assert exp.algorithm == "ncdpo" and exp.diffusion.prediction == "x0"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    load_config(path)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"algoritm": "ncdpo"}, "unknown key 'algoritm' (did you mean 'algorithm'?)"),
        ({"diffusion": {"denoising_step": 5}}, "unknown key 'diffusion.denoising_step' (did you mean 'denoising_steps'?)"),
        ({"seed": "zero"}, "seed: expected integer, got 'zero'"),
        ({"seed": True}, "seed: expected integer"),
        ({"ppo": {"lr": "fast"}}, "ppo.lr: expected number"),
        ({"algorithm": "sac"}, "algorithm: 'sac' is not allowed; choose one of 'ncdpo' | 'dppo' | 'ppo'"),
        ({"diffusion": {"prediction": "v"}}, "choose one of 'x0' | 'epsilon'"),
        ({"diffusion": {"hidden": [64, "x"]}}, "diffusion.hidden[1]: expected integer"),
        ({"env": "Pendulum-v1"}, "env: expected a mapping"),
        ({"diffusion": {"denoising_steps": 0}}, "denoising_steps must be >= 1"),
        ({"stop": {"env_steps": None}}, "stop: set env_steps or iterations"),
        ({"ppo": {"minibatch_size": 8000}}, "minibatch_size must be <= ppo.train_batch_size"),
        ({"resources": {"envs_per_runner": 0}}, "resources.envs_per_runner must be >= 1"),
        ({"checkpoint": {"keep": 0}}, "keep >= 1"),
        ({"diffusion": {"init_std": 20.0}}, "init_std <= 7"),
        ({"diffusion": {"frozen_base": True}}, "frozen_base needs finetune_steps"),
        ({"ppo": {"clip_param_base": 0.001}}, "ppo.clip_param_base anneals DPPO's clip"),
        ({"algorithm": "ppo", "ppo": {"logp_reduction": "mean", "reward_scale_running": True}},
         "ppo.logp_reduction, ppo.reward_scale_running: for algorithm: ncdpo or dppo"),
        ({"ppo": {"logp_reduction": "max"}}, "choose one of 'sum' | 'mean'"),
    ],
)
def test_bad_config_is_a_one_line_error_naming_the_key(data, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_parse_values_as_yaml():
    exp = parse_config({}, ["diffusion.denoising_steps=10", "stop.iterations=3", "stop.env_steps=null",
                            "diffusion.hidden=[64, 64]", "ppo.lr=1e-4", "tracking.enabled=false"])
    assert exp.diffusion.denoising_steps == 10 and exp.diffusion.hidden == [64, 64]
    assert exp.stop.iterations == 3 and exp.stop.env_steps is None
    assert exp.ppo.lr == pytest.approx(1e-4) and exp.tracking.enabled is False
    with pytest.raises(ConfigError, match="unknown key 'diffusion.steps'"):
        parse_config({}, ["diffusion.steps=3"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_config({}, ["diffusion.steps"])


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("env: {id: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


class DictObsEnv(gym.Env):
    observation_space = gym.spaces.Dict({"pos": gym.spaces.Box(-1, 1, (2,))})
    action_space = gym.spaces.Box(-1, 1, (1,))


gym.register("DictObsTest-v0", entry_point=DictObsEnv)


class MultiDiscreteActEnv(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (2,))
    action_space = gym.spaces.MultiDiscrete([2, 3])


gym.register("MultiDiscreteTest-v0", entry_point=MultiDiscreteActEnv)


def test_env_checks():
    with pytest.raises(ConfigError, match="not a registered Gymnasium env; did you mean Pendulum-v1"):
        check_env(EnvConfig(id="Pendulum-v0", kwargs={}), for_diffusion=True)
    with pytest.raises(ConfigError, match="needs a 1-D Box .continuous. or a Discrete action space"):
        check_env(EnvConfig(id="MultiDiscreteTest-v0", kwargs={}), for_diffusion=True)
    _, act = check_env(EnvConfig(id="CartPole-v1", kwargs={}), for_diffusion=True)  # the logit-diffusion head
    assert isinstance(act, gym.spaces.Discrete)
    with pytest.raises(ConfigError, match="observation space Dict"):
        check_env(EnvConfig(id="DictObsTest-v0", kwargs={}), for_diffusion=True)
    with pytest.raises(ConfigError, match="kwargs"):
        check_env(EnvConfig(id="Pendulum-v1", kwargs={"gravity_typo": 1.0}), for_diffusion=True)
    obs, act = check_env(EnvConfig(id="Pendulum-v1", kwargs={"g": 9.0}), for_diffusion=True)
    assert act.shape == (1,) and obs.shape == (3,)


def test_mapping_onto_rllib():
    exp = parse_config({"seed": 7, "diffusion": {"denoising_steps": 8}, "ppo": {"gae_lambda": 0.9, "lr": 1e-4,
                        "critic_lr": 5e-4, "target_kl": 0.05}, "resources": {"env_runners": 2, "envs_per_runner": 4}})
    cfg = build_algo_config(exp)
    assert isinstance(cfg, NCDPOConfig)
    assert cfg.lambda_ == 0.9 and cfg.lr == 1e-4 and cfg.critic_lr == 5e-4 and cfg.target_kl == 0.05
    assert cfg.num_env_runners == 2 and cfg.num_envs_per_env_runner == 4 and cfg.seed == 7
    assert cfg.sample_timeout_s == 600.0  # RLlib's 60 s drops whole rounds of slow (pixel) sampling
    assert build_algo_config(parse_config({"resources": {"sample_timeout_s": None}})).sample_timeout_s is None
    with pytest.raises(ConfigError, match="sample_timeout_s must be > 0"):
        parse_config({"resources": {"sample_timeout_s": 0}})
    assert cfg.use_kl_loss is False
    spec = cfg.get_default_rl_module_spec()
    assert spec.module_class is DiffusionPolicyModule and spec.model_config["diffusion"]["denoising_steps"] == 8
    assert cfg.get_default_learner_class() is NCDPOTorchLearner
    assert cfg._env_to_module_connector is not None  # MeanStdFilter by default
    ppo = build_algo_config(parse_config({"algorithm": "ppo", "env": {"normalize_observations": False}}))
    assert not isinstance(ppo, NCDPOConfig) and ppo._env_to_module_connector is None


@pytest.mark.parametrize("algorithm", ["ncdpo", "ppo"])
def test_lr_anneal_decays_each_learning_rate_linearly_over_the_env_step_budget(algorithm):
    """RLlib's lr schedule, in its timesteps (one per action chunk): a real learner's optimizers
    run at lr x (1 - t / T) after an update at lifetime step t."""
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    from tests.conftest import runner_and_learner

    with pytest.raises(ConfigError, match="set stop.env_steps"):
        parse_config({"ppo": {"lr_anneal": True}, "stop": {"env_steps": None, "iterations": 3}})
    exp = parse_config({"algorithm": algorithm, "env": {"action_chunk": 2}, "stop": {"env_steps": 4000},
                        "ppo": {"lr": 1e-4, "critic_lr": 1e-3, "lr_anneal": True},
                        "diffusion": {"denoising_steps": 2, "hidden": [16]}, "resources": {"env_runners": 0}})
    cfg = build_algo_config(exp)
    assert cfg.lr == [[0, 1e-4], [2000, 0.0]]  # 4000 env steps = 2000 chunks
    if algorithm == "ncdpo":
        assert cfg.critic_lr == [[0, 1e-3], [2000, 0.0]]
    _, _, learner = runner_and_learner(cfg)
    learner.after_gradient_based_update(timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: 500})
    lrs = {name: opt.param_groups[0]["lr"] for name, opt in learner.get_optimizers_for_module("default_policy")}
    expected = {"actor": 0.75e-4, "critic": 0.75e-3} if algorithm == "ncdpo" else {"default_optimizer": 0.75e-4}
    assert lrs == pytest.approx(expected)


def test_configuration_reference_is_current():
    """docs/configuration.md is generated from the dataclasses; regenerate it when they change."""
    from ncdpo_rllib.experiment.docgen import render

    committed = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert committed == render(), "run: python -m ncdpo_rllib.experiment.docgen > docs/configuration.md"


def test_shipped_configs_parse_and_pretrain_finetune_pairs_match():
    from ncdpo_rllib.experiment.config import load_config
    from ncdpo_rllib.experiment.pretrained import check_compatible

    root = Path(__file__).resolve().parent.parent / "configs"
    configs = {p.stem: load_config(p) for p in sorted(root.glob("*.yaml"))}
    assert len(configs) >= 10
    for env in ("hopper", "walker2d", "halfcheetah"):
        pre = configs[f"{env}_pretrain"]
        assert configs[f"{env}_collect"].algorithm == "ppo"
        for algo in ("ncdpo", "dppo"):
            ft = configs[f"{env}_finetune_{algo}"]
            assert ft.algorithm == algo and ft.init_from
            check_compatible(pre, ft, "test")  # raises on an architecture mismatch


def test_include_composes_files_and_later_files_win(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 1\nppo: {lr: 0.001, num_epochs: 3}\ndiffusion: {denoising_steps: 4}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "task.yaml").write_text("include: ../base.yaml\nppo: {lr: 0.002}\n")
    (tmp_path / "recipe.yaml").write_text("ppo: {num_epochs: 7}\n")
    exp = load_config(tmp_path / "sub" / "task.yaml")
    assert (exp.seed, exp.ppo.lr, exp.ppo.num_epochs, exp.diffusion.denoising_steps) == (1, 0.002, 3, 4)
    both = load_config([tmp_path / "sub" / "task.yaml", tmp_path / "recipe.yaml"], ["seed=5"])
    assert (both.seed, both.ppo.lr, both.ppo.num_epochs) == (5, 0.002, 7)
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("include: {x: 1}\n")
    with pytest.raises(ConfigError, match="include must be a file path or a list"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("include: missing.yaml\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "d.yaml")


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parent.parent / "configs" / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_recipes_compose_with_the_metaworld_tasks_and_pass_rllib_validation(recipe):
    root = Path(__file__).resolve().parent.parent / "configs"
    for task in ("button_press", "reach", "drawer_open", "door_open", "pick_place"):
        exp = load_config([root / f"metaworld_{task}.yaml", recipe])
        assert exp.env.kind == "metaworld"
        build_algo_config(exp).validate()


def test_algorithm_defaults_have_one_source():
    """NCDPOConfig, DPPOConfig and the experiment file's ppo section show the same defaults:
    ncdpo_rllib.rl.defaults; the module's diffusion settings sit under one model_config key."""
    from dataclasses import fields

    from ncdpo_rllib.diffusion import DiffusionConfig
    from ncdpo_rllib.experiment.config import PPOSection
    from ncdpo_rllib.rl import DPPOConfig
    from ncdpo_rllib.rl.defaults import DEFAULTS, DPPO_ONLY
    from ncdpo_rllib.rl.module import diffusion_config_from_model_config

    rl, dppo, section = NCDPOConfig(), DPPOConfig(), PPOSection()
    schema_name = {"lambda_": "gae_lambda", "train_batch_size_per_learner": "train_batch_size"}
    for f in fields(DEFAULTS):
        expected = getattr(DEFAULTS, f.name)
        expected = list(expected) if isinstance(expected, tuple) else expected
        owner = dppo if f.name in DPPO_ONLY else rl
        got = getattr(owner, f.name)
        assert (list(got) if isinstance(got, tuple) else got) == expected, f.name
        assert getattr(section, schema_name.get(f.name, f.name)) == expected, f.name
    spec = rl.diffusion(denoising_steps=7).get_default_rl_module_spec()
    assert spec.model_config["diffusion"]["denoising_steps"] == 7 and "denoising_steps" not in spec.model_config
    nested = diffusion_config_from_model_config(spec.model_config)
    # a module saved before the nesting kept the fields at the top level: still read
    legacy = diffusion_config_from_model_config({**spec.model_config.pop("diffusion"), "critic_hidden": [8]})
    assert nested == legacy == DiffusionConfig(denoising_steps=7)


def test_saved_configs_from_before_policies_auto_still_load():
    """Resolved configs saved while ``multi_agent.policies`` defaulted to ``shared`` carry the whole
    section for every env: the pinned pre-trained policies and every checkpoint of that time."""
    from ncdpo_rllib.experiment.pretrained import load_pretrained_meta
    from ncdpo_rllib.tasks.config import MultiAgentConfig

    pinned = Path(__file__).parent.parent / "benchmarks" / "results" / "pretrained" / "locomotion-hopper-k10"
    assert "policies: shared" in (pinned / "experiment.yaml").read_text()
    _, exp, _ = load_pretrained_meta(str(pinned))
    assert exp.multi_agent == MultiAgentConfig()
    with pytest.raises(ConfigError, match="the multi_agent section is for env.kind: pettingzoo"):
        parse_config({"multi_agent": {"policies": "independent"}})


def test_the_cpus_a_layout_needs_and_the_words_that_say_so_agree():
    cases = [(ResourcesConfig(env_runners=2, cpus_per_runner=2, learners=1), 5, "2 env runner(s) x 2 + 1 learner(s) x 1"),
             (ResourcesConfig(env_runners=3, learners=2, gpus_per_learner=1), 3, "3 env runner(s) x 1"),  # GPU learners
             (ResourcesConfig(env_runners=0), 0, "0 env runner(s) x 1")]
    for r, cpus, words in cases:
        assert (r.cpus_needed, r.cpus_needed_in_words) == (cpus, words)
