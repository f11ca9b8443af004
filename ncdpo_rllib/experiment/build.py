"""Map the typed ExperimentConfig onto an RLlib AlgorithmConfig (NCDPO, DPPO or MLP+PPO)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import operator
import os
from typing import Optional

import gymnasium as gym
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.algorithms.appo import APPOConfig
from ray.rllib.algorithms.ppo import PPOConfig

from ncdpo_rllib.errors import ConfigError, one_line
from ncdpo_rllib.rl import DPPOConfig, NCDPOAPPOConfig, NCDPOConfig, mean_std_filter_connector
from ncdpo_rllib.rl.callbacks import ChunkedEnvStepsCallback, EpisodeReturnCallback
from ncdpo_rllib.tasks.envs import check_env, env_context, make_base_env, register

from .config import ExperimentConfig


@contextlib.contextmanager
def rllib_validation():
    """RLlib's own config validation (a ValueError from validate() or a module's setup()) as a
    one-line ConfigError; RLlib's start-up banners ("running on the new API stack") stay quiet
    (RLlib resets its logger's level when first imported, so the CLI's setting may be gone)."""
    logging.getLogger("ray.rllib").setLevel(logging.ERROR)
    try:
        yield
    except ValueError as e:
        raise ConfigError(f"RLlib rejected the configuration: {one_line(e)}") from None


def check_experiment(exp: ExperimentConfig):
    """Before anything runs or is written: the env, built once on the driver (``tasks.envs.check_env``),
    what the algorithm needs of its spaces, and RLlib's validation of the mapped config. Returns
    ``check_env``'s spaces."""
    spaces = check_env(exp.env, exp.multi_agent, for_diffusion=exp.diffusion_policy)
    if exp.algorithm == "dppo" and not isinstance(spaces[1], gym.spaces.Box):
        raise ConfigError(f"algorithm: dppo needs a Box action space; {exp.env.id} has {spaces[1]} "
                          "(use algorithm: ncdpo, whose logit-diffusion head handles Discrete)")
    if exp.eval.video_every and exp.env.kind == "gymnasium":
        make_base_env(exp.env, render=True).close()  # an env that cannot render fails here, in one line
    with rllib_validation():
        build_algo_config(exp).validate()
    return spaces


PPO_ARGS = {"lr": "lr", "gamma": "gamma", "gae_lambda": "lambda_", "clip_param": "clip_param",
            "vf_clip_param": "vf_clip_param", "vf_loss_coeff": "vf_loss_coeff", "entropy_coeff": "entropy_coeff",
            "num_epochs": "num_epochs", "minibatch_size": "minibatch_size",
            "train_batch_size": "train_batch_size_per_learner"}
"""ppo section key -> RLlib's ``AlgorithmConfig.training()`` argument, for every algorithm."""
DIFFUSION_ONLY = {k: k for k in ("critic_lr", "actor_grad_clip", "critic_grad_clip", "target_kl", "critic_warmup_iters",
                                 "kl_to_reference", "logp_reduction", "logp_clamp", "advantage_normalization",
                                 "advantage_clip_quantiles", "reward_scale_running")}
"""... the ones NCDPOConfig (and DPPOConfig) add."""
DPPO_ONLY = {k: k for k in ("gamma_denoise", "clip_param_base", "clip_param_rate")}
"""... the ones DPPOConfig adds."""
APPO_ARGS = {"circular_buffer_iterations_per_batch": "appo.batch_reuse",
             "target_network_update_freq": "appo.target_update_freq",
             "vtrace_clip_rho_threshold": "appo.vtrace_clip_rho",
             "vtrace_clip_pg_rho_threshold": "appo.vtrace_clip_pg_rho",
             "circular_buffer_num_batches": "resources.learner_queue_batches",
             "broadcast_interval": "resources.broadcast_interval",
             "timeout_s_sampler_manager": "resources.sampler_wait_s"}
"""RLlib's APPOConfig.training() argument -> experiment key, for ncdpo-appo and appo (and
``appo.rollout_fragment_length``, an env_runners() argument)."""
SYNC_ONLY = ("vf_clip_param", "gae_lambda")
"""ppo section keys APPO has no use for (its value loss has no clip; V-trace replaces GAE)."""


def _training_args(ppo, names: dict[str, str]) -> dict:
    """``training()`` keyword arguments from the ppo section (YAML lists as the tuples RLlib keeps)."""
    return {rl: tuple(v) if isinstance(v := getattr(ppo, key), list) else v for key, rl in names.items()}


def lr_schedules(exp: ExperimentConfig) -> dict:
    """``ppo.lr_anneal``: RLlib lr schedules [[0, lr], [T, 0]] for each learning rate set, T = stop.env_steps
    in RLlib's timesteps (which count policy steps: one per action chunk). A critic without its own
    rate runs on ``lr``, schedule included (the learner's fallback)."""
    horizon = max(1, exp.stop.env_steps // exp.env.action_chunk)
    rates = {"lr": exp.ppo.lr}
    if exp.diffusion_policy and exp.ppo.critic_lr is not None:
        rates["critic_lr"] = exp.ppo.critic_lr
    return {name: [[0, lr], [horizon, 0.0]] for name, lr in rates.items()}


def pixel_model_config(exp: ExperimentConfig) -> Optional[dict]:
    """The module's model_config["pixels"] (None for state observations)."""
    if not exp.env.pixels:
        return None
    return {"image_size": exp.env.image_size, "frames": exp.env.obs_history, "cameras": len(exp.env.cameras),
            "use_state": exp.env.observation == "pixels_state", **dataclasses.asdict(exp.encoder)}


def build_algo_config(
    exp: ExperimentConfig, *, record_dir: Optional[str] = None, pretrained: Optional[bool] = None,
    video: Optional[dict] = None, eval_video_dir: Optional[str] = None
) -> AlgorithmConfig:
    """``pretrained``: the module brings its own observation normaliser, so RLlib's
    MeanStdFilter is left out (default: whether ``exp.init_from`` is set)."""
    p, r = exp.ppo, exp.resources
    pretrained = exp.init_from is not None if pretrained is None else pretrained
    use_filter = exp.env.normalize_observations and not pretrained and not exp.env.pixels
    if exp.diffusion_policy:
        cfg = {"ncdpo": NCDPOConfig, "ncdpo-appo": NCDPOAPPOConfig,
               "dppo": lambda: DPPOConfig().training(**_training_args(p, DPPO_ONLY))}[exp.algorithm]()
        cfg.diffusion(exp.diffusion, critic_hidden=p.critic_hidden, pixels=pixel_model_config(exp))
        cfg.training(**_training_args(p, DIFFUSION_ONLY))
    else:  # the MLP baselines: RLlib's PPO / APPO with its default MLP module, same knobs.
        cfg = (APPOConfig() if exp.asynchronous else PPOConfig()).training(grad_clip=p.grad_clip, use_kl_loss=False)
    if exp.asynchronous:
        cfg.training(**{rl: operator.attrgetter(key)(exp) for rl, key in APPO_ARGS.items()})
        # An iteration (progress line, eval.every, checkpoint.every, stop.iterations) ends once a
        # train batch's worth of env steps was sampled, as on the synchronous path (RLlib's APPO: 10 s).
        cfg.reporting(min_time_s_per_iteration=None, min_sample_timesteps_per_iteration=p.train_batch_size)
    cfg.environment(env=register(), env_config=env_context(exp.env, record_dir, video))
    connector = mean_std_filter_connector if use_filter else None
    if exp.env.kind == "pettingzoo":
        connector = _multi_agent(cfg, exp, use_filter)
    cfg.env_runners(
        num_env_runners=r.env_runners,
        num_envs_per_env_runner=r.envs_per_runner,
        num_cpus_per_env_runner=r.cpus_per_runner,
        sample_timeout_s=r.sample_timeout_s,
        **({"rollout_fragment_length": exp.appo.rollout_fragment_length} if exp.asynchronous else {}),
        env_to_module_connector=connector,
    )
    cfg.learners(num_learners=r.learners, num_gpus_per_learner=r.gpus_per_learner,
                 **({"max_requests_in_flight_per_learner": r.learner_requests_in_flight} if exp.asynchronous else {}))
    cfg.fault_tolerance(
        restart_failed_env_runners=r.restart_failed_env_runners,
        max_num_env_runner_restarts=r.max_env_runner_restarts,
    )
    cfg.training(**_training_args(p, {k: v for k, v in PPO_ARGS.items() if not (exp.asynchronous and k in SYNC_ONLY)}))
    if p.lr_anneal:
        cfg.training(**lr_schedules(exp))
    if exp.eval.every:
        cfg.evaluation(
            evaluation_interval=exp.eval.every,
            evaluation_duration=exp.eval.episodes,
            evaluation_duration_unit="episodes",
            evaluation_num_env_runners=0,
            # One env: with a vector of N, RLlib keeps the first `episodes` to finish, i.e. the shortest.
            # Measured on a Hopper checkpoint with an early-fall mode: 275 with 8 envs vs 1079 with 1.
            evaluation_config={"explore": exp.eval.explore, "num_envs_per_env_runner": 1, **({"env_config": env_context(
                exp.env, video={"dir": eval_video_dir, "episodes": 0, "every": exp.eval.video_every,
                                "prefix": "eval"})} if exp.eval.video_every and eval_video_dir else {})},
        )
    cfg.callbacks(ChunkedEnvStepsCallback if exp.env.action_chunk > 1 else EpisodeReturnCallback)
    cfg.debugging(seed=exp.seed, log_level="ERROR")
    return cfg


def multi_agent_connectors(env=None, spaces=None, device=None, *, central_critic: bool, normalize: bool) -> list:
    """Env-to-module pieces for PettingZoo envs: [own, global] observations, then MeanStdFilter."""
    from ncdpo_rllib.rl.central_critic import CentralCriticObservations
    from ncdpo_rllib.rl.config import PerAgentMeanStdFilter

    pieces = [CentralCriticObservations()] if central_critic else []
    return pieces + ([PerAgentMeanStdFilter()] if normalize else [])


def _multi_agent(cfg: AlgorithmConfig, exp: ExperimentConfig, normalize: bool):
    """Policies, mapping and one RLModuleSpec per policy; returns the connector factory."""
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from ncdpo_rllib.rl.central_critic import MLPCentralCriticModule
    from ncdpo_rllib.tasks.multiagent import check_pettingzoo_env, policy_mapping

    ma = exp.multi_agent
    spaces = check_pettingzoo_env(exp.env.id, exp.env.kwargs, diffusion=exp.diffusion_policy)
    mapping = policy_mapping(ma.policies, ma.groups, spaces)
    cfg.multi_agent(
        policies=set(mapping.values()),
        policy_mapping_fn=lambda agent_id, episode, **kw: mapping[agent_id],
    )
    diffusion_spec = cfg.get_default_rl_module_spec() if exp.diffusion_policy else None
    specs = {}
    for agent, pid in mapping.items():
        if pid in specs:
            continue
        extra = {"actor_obs_dim": int(spaces.observation[agent].shape[0])} if ma.central_critic else {}
        if diffusion_spec is None:
            specs[pid] = (RLModuleSpec(module_class=MLPCentralCriticModule,
                                       model_config={**extra, "critic_hidden": list(exp.ppo.critic_hidden)})
                          if ma.central_critic else RLModuleSpec())
        else:
            specs[pid] = RLModuleSpec(module_class=diffusion_spec.module_class,
                                      model_config={**diffusion_spec.model_config, **extra})
    cfg.rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs=specs))
    if not (ma.central_critic or normalize):
        return None
    return functools.partial(multi_agent_connectors, central_critic=ma.central_critic, normalize=normalize)


def init_ray() -> None:
    """Connect to $RAY_ADDRESS if set (e.g. under `ray job submit`), else start local Ray."""
    import ray
    import ray.rllib  # noqa: F401  (configures the ray.rllib logger, which we then quiet)

    # Our progress line is the output; RLlib's start-up banners ("running on the new API
    # stack", deprecation notes) are noise for `ncdpo train`. Errors still show.
    logging.getLogger("ray.rllib").setLevel(logging.ERROR)
    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        # "local" when RAY_ADDRESS is unset: ray.init() would otherwise join any Ray instance it finds
        # on this machine (/tmp/ray/ray_current_cluster), e.g. someone else's `ray start --head`.
        ray.init(address=None if os.environ.get("RAY_ADDRESS") else "local", include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
