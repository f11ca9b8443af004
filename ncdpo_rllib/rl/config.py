"""``NCDPOConfig`` / ``NCDPO``: RLlib's PPO with the diffusion module, NCDPO's learner and defaults.

    from ncdpo_rllib.rl import NCDPOConfig
    algo = NCDPOConfig().environment("Pendulum-v1").build_algo()
    algo.train()

The defaults are ``ncdpo_rllib.rl.defaults.DEFAULTS`` (not RLlib's MLP ones).
"""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from typing import Optional

from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.algorithms.ppo import PPO, PPOConfig
from ray.rllib.connectors.env_to_module import MeanStdFilter
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from ncdpo_rllib.diffusion import DiffusionConfig

from .callbacks import EpisodeReturnCallback
from .defaults import DEFAULTS, DPPO_ONLY, AlgorithmDefaults
from .learner import NCDPOTorchLearner
from .module import DIFFUSION, DiffusionPolicyModule


def mean_std_filter_connector(env=None, spaces=None, device=None):
    """Env-to-module connector factory: running mean/std observation normalisation."""
    return MeanStdFilter()


class PerAgentMeanStdFilter(MeanStdFilter):
    """RLlib's multi-agent MeanStdFilter, with ``merge_states`` fixed for agents whose
    observations differ in shape: Ray 2.60 checks and rebuilds every agent's filter with the
    *first* agent's shape, so merging remote EnvRunners' states fails (AssertionError) on
    heterogeneous envs (speaker/listener, predator/prey). Same merge, per agent."""

    def __init__(self, **kwargs):
        super().__init__(multi_agent=True, **kwargs)

    def merge_states(self, states):
        import tree
        from ray.rllib.utils.filter import MeanStdFilter as _Filter, RunningStat

        if self._filters is None:
            self._init_new_filters()
        for state in states:
            for agent_id, agent_state in state.items():
                incoming = _Filter(agent_state["shape"], demean=agent_state["de_mean_to_zero"],
                                   destd=agent_state["de_std_to_one"], clip=agent_state["clip_by_value"])
                incoming.buffer = tree.unflatten_as(
                    agent_state["shape"], [RunningStat.from_state(s) for s in agent_state["running_stats"]]
                )
                self._filters[agent_id].apply_changes(incoming, with_buffer=False)
        return MeanStdFilter._get_state_from_filters(self._filters)


class DiffusionAlgorithmConfig:
    """What the diffusion policy's algorithm configs share, whatever RLlib config they extend
    (``NCDPOConfig``, ``DPPOConfig``: PPO's; ``NCDPOAPPOConfig``: APPO's): the module (``diffusion()``,
    ``module_class``), the defaults of ``ncdpo_rllib.rl.defaults`` and the keys the learners add."""

    module_class = DiffusionPolicyModule
    learner_class = NCDPOTorchLearner

    def _set_diffusion_defaults(self) -> None:
        self.use_kl_loss = False
        self.grad_clip = None  # the actor's and the critic's gradients are clipped separately
        # The learner skips a step with non-finite gradients itself (UpdateControl). True makes RLlib's
        # apply_gradients check no gradient (False: it zeroes NaNs and steps, a host sync per parameter).
        self.torch_skip_nan_gradients = True
        # Per-iteration returns, and a local evaluation EnvRunner given the training observation
        # filter (RLlib syncs remote ones only): also for a config built by hand, not by build_algo_config.
        self.callbacks_class = EpisodeReturnCallback
        for f in fields(AlgorithmDefaults):
            if f.name not in DPPO_ONLY:
                setattr(self, f.name, getattr(DEFAULTS, f.name))
        self.critic_hidden: list[int] = list(DEFAULTS.critic_hidden)
        self.diffusion_config: DiffusionConfig = DiffusionConfig()
        self.pixels: Optional[dict] = None
        # Sampling: 1 runner x 8 vector envs, observations normalised (MeanStdFilter).
        self.num_env_runners = 1
        self.num_envs_per_env_runner = 8
        self._env_to_module_connector = mean_std_filter_connector

    def training(
        self,
        *,
        critic_lr: Optional[float] = NotProvided,
        actor_grad_clip: Optional[float] = NotProvided,
        critic_grad_clip: Optional[float] = NotProvided,
        target_kl: Optional[float] = NotProvided,
        critic_warmup_iters: int = NotProvided,
        kl_to_reference: float = NotProvided,
        logp_reduction: str = NotProvided,
        logp_clamp: Optional[tuple[float, float]] = NotProvided,
        advantage_normalization: str = NotProvided,
        advantage_clip_quantiles: Optional[tuple[float, float]] = NotProvided,
        reward_scale_running: bool = NotProvided,
        **kwargs,
    ):
        """RLlib's training(...) plus the critic_lr, per-optimizer clips, target_kl,
        critic warm-up iterations (actor frozen), the KL-to-reference weight, the log-prob
        reduction (``sum`` | ``mean``) and clamp, the advantage treatment (``batch`` |
        ``minibatch`` standardisation, quantile clip) and running reward scaling."""
        super().training(**kwargs)
        for name, value in (
            ("logp_reduction", logp_reduction),
            ("logp_clamp", logp_clamp),
            ("advantage_normalization", advantage_normalization),
            ("advantage_clip_quantiles", advantage_clip_quantiles),
            ("reward_scale_running", reward_scale_running),
            ("critic_lr", critic_lr),
            ("actor_grad_clip", actor_grad_clip),
            ("critic_grad_clip", critic_grad_clip),
            ("target_kl", target_kl),
            ("critic_warmup_iters", critic_warmup_iters),
            ("kl_to_reference", kl_to_reference),
        ):
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    def diffusion(self, config: Optional[DiffusionConfig] = None, *, critic_hidden=NotProvided, pixels=NotProvided,
                  **overrides):
        """Set the diffusion policy: a DiffusionConfig and/or field overrides; ``pixels``: the
        image encoders' settings (``DiffusionPolicyModule``'s model_config["pixels"]) or None."""
        base = config or self.diffusion_config
        self.diffusion_config = dataclasses.replace(base, **overrides) if overrides else base
        if critic_hidden is not NotProvided:
            self.critic_hidden = list(critic_hidden)
        if pixels is not NotProvided:
            self.pixels = dict(pixels) if pixels else None
        return self

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(
            module_class=self.module_class,
            model_config={
                DIFFUSION: self.diffusion_config.to_dict(),
                "critic_hidden": self.critic_hidden,
                "reference_policy": self.kl_to_reference > 0,
                **({"pixels": self.pixels} if self.pixels else {}),
            },
        )

    def get_default_learner_class(self):
        return self.learner_class

    def validate(self) -> None:
        super().validate()
        if self.target_kl is not None and self.target_kl <= 0:
            self._value_error("`target_kl` must be > 0 or None")
        if self.critic_warmup_iters < 0 or self.kl_to_reference < 0:
            self._value_error("`critic_warmup_iters` and `kl_to_reference` must be >= 0")
        if self.use_kl_loss:
            self._value_error("NCDPO has no KL penalty term: set use_kl_loss=False (use target_kl to bound updates)")
        if self.logp_reduction not in ("sum", "mean"):
            self._value_error("`logp_reduction` must be 'sum' or 'mean'")
        if self.logp_clamp is not None and not (len(self.logp_clamp) == 2 and self.logp_clamp[0] < self.logp_clamp[1]):
            self._value_error("`logp_clamp` must be [low, high] with low < high, or None")
        if self.advantage_normalization not in ("batch", "minibatch"):
            self._value_error("`advantage_normalization` must be 'batch' or 'minibatch'")
        q = self.advantage_clip_quantiles
        if q is not None and not (len(q) == 2 and 0 <= q[0] < q[1] <= 1):
            self._value_error("`advantage_clip_quantiles` must be [low, high] with 0 <= low < high <= 1, or None")
        if self.torch_compile_learner:
            self._value_error("torch_compile_learner is not supported by the diffusion learners (gradient hooks, "
                              "early stop)")


class NCDPOConfig(DiffusionAlgorithmConfig, PPOConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or NCDPO)
        self._set_diffusion_defaults()


class NCDPO(PPO):
    """PPO's training step; the NCDPO parts live in the module, the learner and the config."""

    @classmethod
    def get_default_config(cls) -> NCDPOConfig:
        return NCDPOConfig()
