"""Asynchronous NCDPO: the diffusion policy on RLlib's APPO (IMPALA's actor-learner design).

EnvRunners sample without waiting for the learner, with the weights they last pulled; the
learner consumes their batches from a queue (APPO's circular buffer, each batch reused
``circular_buffer_iterations_per_batch`` times) and corrects for the lag with V-trace. What
changes for the diffusion policy is only the likelihood: the behaviour log-prob the runner
stored, the target network's and the learner's are all the final Gaussian's
N(a; m_theta(s, zeta), sigma^2) with the runner's stored noise zeta, so the importance weights
pi / mu are exact (DPPO's per-step likelihoods would need one correction per denoising step).

- ``DiffusionAPPOModule``: ``DiffusionPolicyModule`` + RLlib's ``TargetNetworkAPI`` (the target
  network is a copy of the actor: chain, final std, image encoder) and ``InferenceOnlyAPI`` (the
  copy stays on the learner: runners never receive it).
- ``NCDPOAPPOTorchLearner``: APPO's loss (V-trace targets and advantages, the clipped surrogate on
  pi / pi_target) with the diffusion learners' optimizers, clips and update control
  (``DiffusionLearnerMixin``), plus the diagnostics NCDPO logs, the learner's queue depth
  ``learner_queue_size`` (batches waiting) and its count of trained rows ``trained_rows_total``. RLlib itself logs the staleness,
  ``diff_num_grad_updates_vs_sampler_policy``: learner updates since the weights that sampled the
  batch, counting the one in progress (1 = sampled with the newest weights).
- ``NCDPOAPPOConfig`` / ``NCDPOAPPO``: APPO's config and training step with the module and learner.

    from ncdpo_rllib.rl.appo import NCDPOAPPOConfig
    algo = NCDPOAPPOConfig().environment("Pendulum-v1").build_algo()
"""

from __future__ import annotations

import torch

from ray.rllib.algorithms.appo import APPO, APPOConfig
from ray.rllib.algorithms.appo.torch.appo_torch_learner import APPOTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import TARGET_NETWORK_ACTION_DIST_INPUTS, InferenceOnlyAPI, TargetNetworkAPI

from .config import DiffusionAlgorithmConfig
from .defaults import APPO_DEFAULTS
from .learner import DiffusionLearnerMixin
from .module import NOISE, DiffusionPolicyModule

TARGET_ACTOR = "target_actor"
TRAINED_ROWS = "trained_rows_total"
"""The async learner's count of rows it trained (x epochs and reuse) since its process started:
exact where RLlib's lifetime counts, summed across the learner thread's bunched results, are not."""


class DiffusionAPPOModule(DiffusionPolicyModule, TargetNetworkAPI, InferenceOnlyAPI):
    """The diffusion policy with APPO's target network: a frozen copy of the actor, scored on the
    same stored noise (``forward_target``) and refreshed from the actor by the learner."""

    # A state without the target copy (a pre-trained policy, a sync NCDPO checkpoint) fills it from the actor.
    FROZEN_COPIES = DiffusionPolicyModule.FROZEN_COPIES + ((f"{TARGET_ACTOR}.", "actor."),)

    def make_target_networks(self) -> None:
        setattr(self, TARGET_ACTOR, make_target_network(self.actor))

    def get_target_network_pairs(self):
        return [(self.actor, getattr(self, TARGET_ACTOR))]

    def forward_target(self, batch: dict) -> dict:
        with torch.no_grad():
            inputs = self._dist_inputs(self._cond(batch), batch[NOISE], actor=getattr(self, TARGET_ACTOR))
        return {TARGET_NETWORK_ACTION_DIST_INPUTS: inputs}

    def get_non_inference_attributes(self) -> list[str]:
        return [TARGET_ACTOR]


class NCDPOAPPOTorchLearner(DiffusionLearnerMixin, APPOTorchLearner):
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        """APPO's loss on the noise-conditioned likelihood (the module's final Gaussian), then the
        diagnostics: ratio and approx KL of the learner's policy against the behaviour policy (the
        runner's weights) and the queue depth."""
        total = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        with torch.no_grad():
            module = self.module[module_id].unwrapped()
            mask = batch[Columns.LOSS_MASK].bool()
            dist = module.get_train_action_dist_cls().from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
            log_ratio = (dist.logp(batch[Columns.ACTIONS]) - batch[Columns.ACTION_LOGP])[mask]
            self._log_policy_diagnostics(module_id, config, fwd_out, ratio=log_ratio.exp(), log_ratio=log_ratio,
                                         clip=config.clip_param)
            counts = self.__dict__.setdefault("_trained_rows", {})
            counts[module_id] = counts.get(module_id, 0) + int(mask.sum())
            self.metrics.log_value((module_id, TRAINED_ROWS), counts[module_id], reduce="mean", window=1)
            queue = getattr(self, "_learner_thread_in_queue", None)
            if queue is not None:
                self.metrics.log_value((module_id, "learner_queue_size"), queue.qsize(), reduce="mean")
        return total


class NCDPOAPPOConfig(DiffusionAlgorithmConfig, APPOConfig):
    """APPO's config with the diffusion module and learner; the diffusion keys and the learner
    options are NCDPO's (``DiffusionAlgorithmConfig``); the async knobs APPO's, with defaults from
    ``ncdpo_rllib.rl.defaults.APPO_DEFAULTS``."""

    module_class = DiffusionAPPOModule
    learner_class = NCDPOAPPOTorchLearner

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or NCDPOAPPO)
        self._set_diffusion_defaults()
        for name, value in APPO_DEFAULTS.items():
            setattr(self, name, value)

    def validate(self) -> None:
        super().validate()
        unsupported = {"target_kl": self.target_kl is not None, "kl_to_reference": bool(self.kl_to_reference),
                       "logp_reduction": self.logp_reduction != "sum", "logp_clamp": self.logp_clamp is not None,
                       "advantage_normalization": self.advantage_normalization != "batch",
                       "advantage_clip_quantiles": self.advantage_clip_quantiles is not None,
                       "reward_scale_running": bool(self.reward_scale_running)}
        used = [k for k, v in unsupported.items() if v]
        if used:
            self._value_error(f"{', '.join(used)}: not on the APPO path (V-trace replaces GAE, the policy loss is "
                              "APPO's on the exact log-probs); use the synchronous ncdpo algorithm for them")


class NCDPOAPPO(APPO):
    """APPO's asynchronous training step; the NCDPO parts live in the module, learner and config."""

    @classmethod
    def get_default_config(cls) -> NCDPOAPPOConfig:
        return NCDPOAPPOConfig()
