"""The typed experiment configuration: one YAML file, validated once, here, at the edge.

Every key, its type and default is declared below (the env, encoder and multi-agent sections in
``ncdpo_rllib.tasks.config``, the diffusion one in ``ncdpo_rllib.diffusion.config``);
``docs/configuration.md`` documents them. ``loader.py`` reads the YAML onto these dataclasses:
unknown keys and wrong types raise ``ConfigError`` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ncdpo_rllib.diffusion import DiffusionConfig
from ncdpo_rllib.rl.defaults import APPO_DEFAULTS, DEFAULTS
from ncdpo_rllib.errors import ConfigError
from ncdpo_rllib.tasks.config import EncoderConfig, EnvConfig, MultiAgentConfig

from .loader import apply_overrides, build_dataclass, deep_merge, read_config_data


@dataclass
class StopConfig:
    """Training stops when any criterion that is set (not null) is reached."""

    env_steps: Optional[int] = 200_000
    """Stop after this many env steps (checked after each iteration; null = no limit)."""
    iterations: Optional[int] = None
    """Stop after this many training iterations (null = no limit)."""

    def __post_init__(self):
        if self.env_steps is None and self.iterations is None:
            raise ValueError("stop: set env_steps or iterations")
        for name in ("env_steps", "iterations"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"stop.{name} must be >= 1")


@dataclass
class PPOSection:
    """PPO hyperparameters, shared by NCDPO and the MLP PPO baseline (one key apart)."""

    lr: float = DEFAULTS.lr
    """Actor learning rate (the only one for algorithm: ppo)."""
    critic_lr: Optional[float] = DEFAULTS.critic_lr
    """Critic learning rate (ncdpo only; null = lr)."""
    lr_anneal: bool = False
    """Decay every learning rate linearly from its value to 0 over ``stop.env_steps`` (CleanRL's
    ``anneal_lr``; RLlib's lr schedule, so it resumes with the run). Needs ``stop.env_steps``."""
    gamma: float = DEFAULTS.gamma
    """Discount factor."""
    gae_lambda: float = DEFAULTS.lambda_
    """GAE lambda (RLlib's ``lambda_``)."""
    clip_param: float = DEFAULTS.clip_param
    """PPO ratio clip epsilon."""
    vf_clip_param: Optional[float] = DEFAULTS.vf_clip_param
    """Clip of the squared value error (RLlib's convention); null: no clip. RLlib's default 10
    zeroes the critic's gradient wherever a value error exceeds 3.2, i.e. on most tasks' returns."""
    vf_loss_coeff: float = 1.0
    """Weight of the value loss (ncdpo: the critic has its own optimizer, so mostly a scale)."""
    entropy_coeff: float = DEFAULTS.entropy_coeff
    """Entropy bonus of the final-step Gaussian (state-independent for ncdpo)."""
    num_epochs: int = DEFAULTS.num_epochs
    """Passes over each batch."""
    minibatch_size: int = DEFAULTS.minibatch_size
    """Rows per gradient step (ncdpo-appo, appo: a multiple of ``appo.rollout_fragment_length``)."""
    train_batch_size: int = DEFAULTS.train_batch_size_per_learner
    """Env steps per learner update: sampled per training iteration (ncdpo, dppo, ppo); the
    learner's batch while the runners go on sampling (ncdpo-appo, appo)."""
    actor_grad_clip: Optional[float] = DEFAULTS.actor_grad_clip
    """Global-norm clip of the actor's gradient (ncdpo)."""
    critic_grad_clip: Optional[float] = DEFAULTS.critic_grad_clip
    """Global-norm clip of the critic's gradient (ncdpo)."""
    grad_clip: Optional[float] = 0.5
    """Global-norm clip of the single optimizer (algorithm: ppo)."""
    target_kl: Optional[float] = DEFAULTS.target_kl
    """Stop an iteration's epochs once a minibatch's approx KL exceeds 1.5 x this (ncdpo)."""
    critic_hidden: list[int] = field(default_factory=lambda: list(DEFAULTS.critic_hidden))
    """Critic MLP layer sizes (ncdpo, dppo; the ppo baseline keeps RLlib's default module)."""
    critic_warmup_iters: int = DEFAULTS.critic_warmup_iters
    """Iterations at the start that train only the critic (the actor stays as initialised,
    e.g. pre-trained) (ncdpo, dppo)."""
    kl_to_reference: float = DEFAULTS.kl_to_reference
    """Weight of KL(pi_theta || pi_ref) between the noise-conditioned Gaussians of the policy
    and the initial (e.g. pre-trained) one, same stored noise and current std (ncdpo)."""
    gamma_denoise: float = DEFAULTS.gamma_denoise
    """DPPO: advantage discount per denoising step, gamma_denoise^(S-1-i) (dppo)."""
    clip_param_base: Optional[float] = DEFAULTS.clip_param_base
    """DPPO: the clip at the earliest fine-tuned denoising step; clip_param at the last, exponential
    in between (the reference's clip_ploss_coef_base: 0.001 Robomimic, = clip Gym); null = clip_param
    throughout (dppo)."""
    clip_param_rate: float = DEFAULTS.clip_param_rate
    """DPPO: rate of that exponential (the reference's clip_ploss_coef_rate) (dppo)."""
    logp_reduction: Literal["sum", "mean"] = DEFAULTS.logp_reduction
    """How an action's log-prob is formed from its per-element ones: sum = the likelihood of the
    whole action chunk; mean = averaged over chunk x action dims, so the log-ratio and approx KL
    are per action dimension (DPPO's reference) (ncdpo, dppo)."""
    logp_clamp: Optional[list[float]] = DEFAULTS.logp_clamp
    """Clamp each element's log-prob to [low, high] before the reduction (DPPO's reference:
    [-5, 2]); null = no clamp (ncdpo, dppo)."""
    advantage_normalization: Literal["batch", "minibatch"] = DEFAULTS.advantage_normalization
    """batch = RLlib's GAE standardises the advantages over the iteration's batch; minibatch =
    standardised again per minibatch, as DPPO's reference does (ncdpo, dppo)."""
    advantage_clip_quantiles: Optional[list[float]] = DEFAULTS.advantage_clip_quantiles
    """Clip each minibatch's advantages to their [low, high] quantiles (after the
    standardisation), e.g. [0.05, 0.95]; null = no clip (DPPO's shipped configs: none) (ncdpo, dppo)."""
    reward_scale_running: bool = DEFAULTS.reward_scale_running
    """Divide rewards by the running std of the discounted return before GAE, clipped to +-10
    (the reference's reward_scale_running); reported returns stay unscaled (ncdpo, dppo)."""

    def __post_init__(self):
        if self.minibatch_size > self.train_batch_size:
            raise ValueError("ppo.minibatch_size must be <= ppo.train_batch_size")
        for name in ("lr", "gamma", "num_epochs", "minibatch_size", "train_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ppo.{name} must be > 0")


SYNCHRONOUS = {"ncdpo-appo": "ncdpo", "appo": "ppo"}
"""Each asynchronous algorithm's synchronous twin."""


@dataclass
class APPOSection:
    """The asynchronous path's own settings (algorithm: ncdpo-appo, appo; RLlib's APPO). The
    learner-side ones that trade staleness for throughput are in ``resources``."""

    rollout_fragment_length: int = APPO_DEFAULTS["rollout_fragment_length"]
    """Env steps each vector env takes per EnvRunner ``sample()`` call: the unit the runners send
    and V-trace's time axis (a runner sends this x ``resources.envs_per_runner`` steps at once)."""
    batch_reuse: int = APPO_DEFAULTS["circular_buffer_iterations_per_batch"]
    """Times the learner may train on one batch from its queue (APPO's circular buffer): more
    updates per sample, each on older data (V-trace corrects for it)."""
    target_update_freq: int = APPO_DEFAULTS["target_network_update_freq"]
    """Refresh the target policy (the pi_old of the clipped surrogate) from the learner's every this
    many x ``resources.learner_queue_batches`` x ``batch_reuse`` x ``ppo.train_batch_size`` trained
    steps (RLlib's ``target_network_update_freq``)."""
    vtrace_clip_rho: float = 1.0
    """V-trace's rho-bar: the importance weights' clip in the value targets."""
    vtrace_clip_pg_rho: float = 1.0
    """V-trace's clip of the importance weights in the policy-gradient advantages."""

    def __post_init__(self):
        for name in ("rollout_fragment_length", "batch_reuse", "target_update_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"appo.{name} must be >= 1")
        for name in ("vtrace_clip_rho", "vtrace_clip_pg_rho"):
            if getattr(self, name) <= 0:
                raise ValueError(f"appo.{name} must be > 0")


@dataclass
class ResourcesConfig:
    """Where rollouts and updates run (RLlib's env_runners / learners settings)."""

    env_runners: int = 1
    """Remote EnvRunner actors (0 = sample in the driver process)."""
    envs_per_runner: int = 8
    """Vectorised envs per EnvRunner."""
    cpus_per_runner: int = 1
    """CPUs reserved per EnvRunner actor."""
    learners: int = 0
    """Remote Learner actors (0 = one local learner in the driver)."""
    gpus_per_learner: float = 0
    """GPUs per learner (0 = CPU). When the Ray cluster has fewer GPUs than asked, training
    falls back to CPU learners and says so."""
    restart_failed_env_runners: bool = True
    """RLlib's fault tolerance: a crashed EnvRunner actor is replaced and training goes on
    (restarts are logged as ``env_runner_restarts``)."""
    max_env_runner_restarts: int = 1000
    """Give up (fail the run) after this many EnvRunner restarts."""
    learner_queue_batches: int = APPO_DEFAULTS["circular_buffer_num_batches"]
    """ncdpo-appo, appo: batches the learner thread's buffer holds (APPO's circular buffer; when full,
    the oldest is dropped). It fills only when the driver hands the learner batches faster than the
    learner answers, i.e. with ``broadcast_interval`` > 1: at 1, each update call waits for its own
    batch to be trained, so the buffer holds one batch and ``learner_requests_in_flight`` is the queue."""
    learner_requests_in_flight: int = APPO_DEFAULTS["max_requests_in_flight_per_learner"]
    """ncdpo-appo, appo with remote learners (``learners`` >= 1): batches sent to a learner and not
    yet answered. When all are outstanding, the driver drops the next batches (their env steps show
    as ``env_steps_dropped``): more keeps the learner fed from a queue, each batch staler when it is
    trained; fewer trains fresher data and drops more of it when the learner is the slower side."""
    broadcast_interval: int = APPO_DEFAULTS["broadcast_interval"]
    """ncdpo-appo, appo: learner updates between two weight pushes to the EnvRunners (1 = after
    every update: fresher weights, more traffic; the lag shows as
    ``learner/<policy>/diff_num_grad_updates_vs_sampler_policy``). RLlib's learner answers the
    driver only at a push: at 1 every update call waits for its batch to be trained (with a local
    learner, ``learners: 0``, the driver itself waits, and the runners sample one request ahead)."""
    sampler_wait_s: float = APPO_DEFAULTS["timeout_s_sampler_manager"]
    """ncdpo-appo, appo: how long the driver waits for a runner's batch before it checks the learner
    again (RLlib's ``timeout_s_sampler_manager``). RLlib's 0 polls in a loop that keeps a whole core
    busy in the driver, taken from the runners and the learner on a small machine (measured here: the
    driver used 258 CPU-s in a 386 s run at 0, 2.6 CPU-s at 0.1; docs/benchmarks.md)."""
    sample_timeout_s: Optional[float] = 600.0
    """How long one round of remote EnvRunner sampling may take before RLlib drops it and the
    iteration trains on what arrived (RLlib's default, 60 s, is too short for rendered pixels on a
    few loaded cores: whole iterations then sample nothing); null = wait for ever."""

    @property
    def cpus_needed(self) -> int:
        """CPUs the Ray cluster must have for this layout: each remote EnvRunner holds
        ``cpus_per_runner``, each remote CPU learner one (RLlib's reservation); the driver, with its
        local runner or learner, holds none."""
        return self.env_runners * self.cpus_per_runner + self._cpu_learners

    @property
    def cpus_needed_in_words(self) -> str:
        """``cpus_needed``'s terms, for messages: "2 env runner(s) x 1 + 1 learner(s) x 1"."""
        learners = f" + {self._cpu_learners} learner(s) x 1" if self._cpu_learners else ""
        return f"{self.env_runners} env runner(s) x {self.cpus_per_runner}{learners}"

    @property
    def _cpu_learners(self) -> int:
        return 0 if self.gpus_per_learner else self.learners

    def __post_init__(self):
        if min(self.env_runners, self.learners, self.gpus_per_learner) < 0:
            raise ValueError("resources: env_runners, learners and gpus_per_learner must be >= 0")
        if self.sample_timeout_s is not None and self.sample_timeout_s <= 0:
            raise ValueError("resources.sample_timeout_s must be > 0 (or null: no timeout)")
        for name in ("envs_per_runner", "cpus_per_runner", "learner_queue_batches", "learner_requests_in_flight",
                     "broadcast_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"resources.{name} must be >= 1")
        if self.sampler_wait_s < 0:
            raise ValueError("resources.sampler_wait_s must be >= 0")


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    enabled: bool = True
    """false = no MLflow run at all."""
    experiment: str = "default"
    """MLflow experiment name."""
    uri: Optional[str] = None
    """MLflow tracking URI; null = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd."""
    run_name: Optional[str] = None
    """MLflow run name and run directory name; null = <algorithm>-<env>-s<seed>-<time>."""
    flush_timeout_s: float = 60.0
    """At the end of a run, how long to wait for an unreachable tracking store (metrics are buffered
    while it is away) before writing what is unsent to <run dir>/unlogged-<run id>.jsonl for `ncdpo replay`."""

    def __post_init__(self):
        if not self.flush_timeout_s >= 0:
            raise ValueError("tracking: flush_timeout_s must be >= 0")


@dataclass
class CheckpointConfig:
    """Checkpoints (RLlib's, plus the resolved config and run state)."""

    dir: str = "runs"
    """Each run writes runs/<run name>/ (checkpoints, the resolved config)."""
    every: int = 10
    """Checkpoint every N iterations (0 = only at the end). Iteration metrics reach MLflow
    when a checkpoint covers them (so a killed and resumed run logs no step twice); the
    progress line is live."""
    keep: int = 3
    """Periodic checkpoints kept (the final one is always kept)."""

    def __post_init__(self):
        if self.every < 0 or self.keep < 1:
            raise ValueError("checkpoint: every must be >= 0 and keep >= 1")


@dataclass
class EvalConfig:
    """Periodic evaluation during training (RLlib's evaluation workers, ``explore=False``)."""

    every: int = 0
    """Evaluate every N iterations (0 = never; ``ncdpo evaluate`` works on any checkpoint)."""
    episodes: int = 10
    """Episodes per evaluation."""
    explore: bool = False
    """Evaluate the stochastic policy (``explore=True``: what PPO optimises; for NCDPO the final
    Gaussian's noise too) instead of the deterministic one. NCDPO's deterministic action can be
    far worse than its stochastic policy (Hopper, docs/benchmarks.md "locomotion")."""
    video_every: int = 0
    """Record the first episode of every Nth evaluation as MP4 (``<run dir>/videos/eval-<env steps>.mp4``,
    logged to the training run); 0 = never. Gymnasium envs that render rgb_array, and Meta-World."""

    def __post_init__(self):
        if self.every < 0 or self.episodes < 1 or self.video_every < 0:
            raise ValueError("eval: every and video_every must be >= 0 and episodes >= 1")
        if self.video_every and not self.every:
            raise ValueError("eval.video_every records evaluations: set eval.every too")


@dataclass
class PretrainConfig:
    """``ncdpo pretrain``: DDPM behaviour cloning of the diffusion module on a dataset."""

    dataset: Optional[str] = None
    """Path of a dataset directory (``ncdpo collect`` / ``ncdpo dataset import`` write them), or, for
    a robosuite task, a robomimic HDF5 file (read with ``env.obs_keys``, plus ``<camera>_image``
    with pixels)."""
    gradient_steps: int = 20_000
    """Optimizer steps."""
    batch_size: int = 256
    """(observation window, action chunk) pairs per step."""
    lr: float = 1e-3
    """AdamW learning rate (cosine decay to 0 over gradient_steps after 1% warm-up)."""
    weight_decay: float = 1e-6
    """AdamW weight decay."""
    ema_decay: float = 0.995
    """EMA of the denoiser weights; the EMA weights are what gets saved and evaluated."""
    val_fraction: float = 0.05
    """Fraction of episodes held out for the validation loss (at least one episode)."""
    log_every: int = 500
    """Gradient steps between validation-loss evaluations / log lines."""
    eval_episodes: int = 10
    """Env episodes to evaluate the final pre-trained policy (0 = skip)."""

    def __post_init__(self):
        if min(self.gradient_steps, self.batch_size, self.log_every) < 1 or self.lr <= 0:
            raise ValueError("pretrain: gradient_steps, batch_size, log_every and lr must be > 0")
        if not 0 < self.val_fraction < 1 or not 0 <= self.ema_decay < 1 or self.eval_episodes < 0:
            raise ValueError("pretrain: val_fraction in (0, 1), ema_decay in [0, 1), eval_episodes >= 0")


@dataclass
class CollectConfig:
    """``ncdpo collect``: train an MLP-PPO expert (this file's ppo/stop/resources), record datasets."""

    out: str = "data"
    """Datasets are written to <out>/<env id>/<level>/."""
    expert_checkpoint: Optional[str] = None
    """An existing algorithm: ppo run or checkpoint to take as the expert instead of training
    one (medium-replay then needs the run's recorded rollouts and is skipped if absent)."""
    checkpoint_every: int = 5
    """Expert training: checkpoint every N iterations (the medium policy is one of them)."""
    levels: list[str] = field(default_factory=lambda: ["expert", "medium", "medium-replay", "medium-expert"])
    """Datasets to write: expert, medium, medium-replay, medium-expert (D4RL's levels)."""
    medium_fraction: float = 0.333
    """The medium policy is the checkpoint whose evaluation return is closest to this
    fraction of the expert's."""
    steps_per_level: int = 100_000
    """Env steps recorded per level (whole episodes; D4RL used 1M)."""
    eval_episodes: int = 5
    """Episodes to rate each checkpoint (deterministic policy)."""
    stochastic: bool = False
    """Record with the stochastic policy (explore=True), as D4RL did with SAC. Off by default:
    a PPO expert's sampled actions are far worse than its mean (Hopper: 238 vs 3080)."""
    scripted: bool = False
    """env.kind metaworld or robosuite: record the task's scripted expert (no PPO training) into
    one dataset, <out>/<task>/scripted; ``steps_per_level`` env steps of whole episodes.
    robosuite has scripted experts for Lift, PickPlaceCan and NutAssemblySquare."""
    action_noise: float = 0.0
    """scripted: std of Gaussian noise added to the expert's actions (clipped to [-1, 1])."""
    failed_fraction: float = 0.0
    """scripted: share of episodes in which the expert gives up within its first 25 steps and
    uniform random actions follow (they mostly fail): an imperfect dataset to fine-tune from."""

    def __post_init__(self):
        allowed = {"expert", "medium", "medium-replay", "medium-expert"}
        bad = [lv for lv in self.levels if lv not in allowed]
        if bad or not self.levels:
            raise ValueError(f"collect.levels: {bad or 'empty'}; choose from {sorted(allowed)}")
        if not 0 < self.medium_fraction < 1:
            raise ValueError("collect.medium_fraction must be in (0, 1)")
        if self.action_noise < 0 or not 0 <= self.failed_fraction <= 1:
            raise ValueError("collect: action_noise must be >= 0 and failed_fraction in [0, 1]")
        if min(self.checkpoint_every, self.steps_per_level, self.eval_episodes) < 1:
            raise ValueError("collect: checkpoint_every, steps_per_level and eval_episodes must be >= 1")


@dataclass
class ExperimentConfig:
    """One experiment: a YAML file maps onto this, section by section."""

    algorithm: Literal["ncdpo", "dppo", "ppo", "ncdpo-appo", "appo"] = "ncdpo"
    """ncdpo = the diffusion policy, PPO through the whole chain; dppo = the same module with
    DPPO's per-denoising-step likelihoods; ppo = RLlib's PPO with its default MLP module;
    ncdpo-appo, appo = the same as ncdpo and ppo on RLlib's asynchronous APPO (runners never wait
    for the learner; V-trace corrects for their stale weights; the ``appo`` section)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    multi_agent: MultiAgentConfig = field(default_factory=MultiAgentConfig)
    seed: int = 0
    """Seeds envs, torch and the rollout noise (RLlib's ``debugging(seed=...)``)."""
    stop: StopConfig = field(default_factory=StopConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    ppo: PPOSection = field(default_factory=PPOSection)
    appo: APPOSection = field(default_factory=APPOSection)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init_from: Optional[str] = None
    """A pre-trained checkpoint (``ncdpo pretrain`` output) to start the diffusion policy from
    (ncdpo, dppo). Its env, chunking and diffusion architecture must match this file's."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)

    @property
    def diffusion_policy(self) -> bool:
        """Whether the policy is the diffusion policy (ncdpo, dppo, ncdpo-appo), not RLlib's MLP."""
        return self.algorithm not in ("ppo", "appo")

    @property
    def asynchronous(self) -> bool:
        """Whether it trains on RLlib's asynchronous APPO path (ncdpo-appo, appo)."""
        return self.algorithm in ("ncdpo-appo", "appo")

    def __post_init__(self):
        if self.init_from is not None and not self.diffusion_policy:
            raise ValueError("init_from is for the diffusion policy (algorithm: ncdpo, dppo or ncdpo-appo)")
        if self.ppo.kl_to_reference and not self.diffusion_policy:  # dppo, ncdpo-appo: their validate() refuses it
            raise ValueError("ppo.kl_to_reference is implemented for algorithm: ncdpo only")
        if self.asynchronous and self.ppo.vf_clip_param is not None:
            raise ValueError("ppo.vf_clip_param: APPO's value loss has no clip; set it to null for "
                             f"algorithm: {self.algorithm}")
        if self.appo != APPOSection() and not self.asynchronous:
            raise ValueError("the appo section is for algorithm: ncdpo-appo or appo; remove it, or change the algorithm")
        if self.ppo.lr_anneal and self.stop.env_steps is None:
            raise ValueError("ppo.lr_anneal decays the learning rates over stop.env_steps: set stop.env_steps")
        if self.ppo.clip_param_base is not None and self.algorithm != "dppo":
            raise ValueError("ppo.clip_param_base anneals DPPO's clip over denoising steps: it is for algorithm: dppo")
        diffusion_only = {"logp_reduction": self.ppo.logp_reduction != "sum", "logp_clamp": self.ppo.logp_clamp,
                          "advantage_normalization": self.ppo.advantage_normalization != "batch",
                          "advantage_clip_quantiles": self.ppo.advantage_clip_quantiles,
                          "reward_scale_running": self.ppo.reward_scale_running}
        used = [f"ppo.{k}" for k, v in diffusion_only.items() if v]
        if used and not self.diffusion_policy:
            raise ValueError(f"{', '.join(used)}: for algorithm: ncdpo or dppo (the MLP baseline is RLlib's own "
                             f"{self.algorithm.upper()})")
        if self.env.pixels and self.encoder.shift_in_finetune and self.ppo.kl_to_reference:
            raise ValueError("encoder.shift_in_finetune with ppo.kl_to_reference: the reference policy would see "
                             "other shifts than the policy; turn one of them off")
        if self.env.pixels and not self.diffusion_policy:
            raise ValueError("env.observation: pixels needs the diffusion policy's image encoder: use algorithm: "
                             "ncdpo, dppo or ncdpo-appo (the MLP baselines are state-only)")
        if self.encoder != EncoderConfig() and not self.env.pixels:
            raise ValueError("the encoder section is for env.observation: pixels or pixels_state; remove it for state")
        if self.env.pixels and self.encoder.type == "cnn" and self.env.image_size < 36:
            raise ValueError("encoder.type: cnn needs env.image_size >= 36 (its strided convolutions shrink the image 9x)")
        if self.env.pixels and self.encoder.type == "vit" and self.env.image_size % 8:
            raise ValueError("encoder.type: vit cuts the image into 8 x 8 patches: env.image_size must be a multiple of 8")
        if self.env.kind == "pettingzoo":
            single_only = {"env.action_chunk": self.env.action_chunk != 1, "env.obs_history": self.env.obs_history != 1,
                           "env.max_episode_steps": self.env.max_episode_steps is not None,
                           "init_from": self.init_from is not None, "eval.every": bool(self.eval.every),
                           "ppo.kl_to_reference": bool(self.ppo.kl_to_reference)}
            for key, is_set in single_only.items():
                if is_set:
                    raise ValueError(f"{key} is for single-agent envs (env.kind: gymnasium); unset it for PettingZoo")
            if self.algorithm == "dppo":
                raise ValueError("algorithm: dppo is single-agent here; use ncdpo or ppo with env.kind: pettingzoo")
            if self.asynchronous and self.multi_agent.central_critic:
                raise ValueError("multi_agent.central_critic is MAPPO's critic, on the synchronous path: use algorithm: "
                                 f"{SYNCHRONOUS[self.algorithm]}, or turn it off")
        elif self.multi_agent == MultiAgentConfig(policies="shared"):
            # The default before "auto": resolved configs saved then (checkpoints, pre-trained policies)
            # carry it for every env; for a Gymnasium env it means "no multi_agent section".
            self.multi_agent = MultiAgentConfig()
        elif self.multi_agent != MultiAgentConfig():
            raise ValueError("the multi_agent section is for env.kind: pettingzoo; remove it for a Gymnasium env")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_config(data: Any, overrides: Optional[list[str]] = None) -> ExperimentConfig:
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of keys, got {type(data).__name__}")
    data = apply_overrides(dict(data), overrides or [])
    return build_dataclass(ExperimentConfig, data)


def load_config(path: Union[str, Path, list, None], overrides: Optional[list[str]] = None) -> ExperimentConfig:
    """Read and validate a YAML experiment file (None: all defaults; a list: the files merged in
    order, later ones on top, as ``include:`` does)."""
    paths = [] if path is None else list(path) if isinstance(path, (list, tuple)) else [path]
    data: dict = {}
    for p in paths:
        data = deep_merge(data, read_config_data(p))
    return parse_config(data, overrides)
