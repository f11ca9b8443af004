"""DPPO (Ren et al. 2024) on the same diffusion policy: the baseline of ``NCDPO.md`` section 5,
as its reference implementation (irom-princeton/dppo) fine-tunes (``docs/architecture.md``,
"DPPO: reference -> ours", lists every difference).

DPPO treats each denoising step as a Gaussian sub-action of a two-level MDP. Exploration
stores the whole chain x_K .. x_1, a; the learner scores every transition separately
(no backprop through the chain) and applies PPO per (env step, denoising step):

- sampler step i < S-1:  N(x_{i+1}; mu_theta(x_i, k_i, s), sigma_i^2), drawn with sigma_i >=
  ``sigma_min``, scored with sigma_i >= ``logprob_sigma_min``;
- sampler step S-1:      N(a; m_theta, max(exp(log_std), floor)^2), the policy's final
  Gaussian (the one NCDPO uses), floored like the others;
- per-element log-probs, optionally clamped (``logp_clamp``, the reference's [-5, 2]), summed
  or averaged (``logp_reduction``, the reference's mean) over the chunk x action dims;
- every pair shares the env step's advantage (optionally re-standardised and quantile-clipped
  per minibatch), weighted by gamma_denoise^(S-1-i); the clip is annealed over the fine-tuned
  steps (``clip_param`` at the last, ``clip_param_base`` at the earliest, exponential at
  ``clip_param_rate``); only the last ``finetune_steps`` sampler steps enter the loss, and
  with ``frozen_base`` the earlier ones run a frozen copy of the pre-trained denoiser.

    from ncdpo_rllib.rl.dppo import DPPOConfig
    algo = DPPOConfig().environment("Pendulum-v1").training(gamma_denoise=0.99).build_algo()
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.algorithms.ppo import PPO
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing

from ncdpo_rllib.diffusion import StepGradNorms, gaussian_log_prob_elements, reduce_log_prob

from .config import NCDPOConfig
from .defaults import DEFAULTS
from .learner import NCDPOTorchLearner, clipped_surrogate, policy_advantages, value_loss
from .module import DiffusionPolicyModule

DPPO_CHAIN = "dppo_chain"
"""Batch / episode column: the chain x_K, x after each intermediate step, then the action: (S+1, D)."""
DPPO_STEP_LOGP = "dppo_step_logp"
"""Batch / episode column: old per-element log-prob of each sampler step's transition, (S, D);
in the train forward's output: the new ones of the fine-tuned steps only, (S_ft, D) = the last
S_ft rows."""


def check_gaussian_steps(diffusion_config) -> None:
    """DPPO scores every denoising step as a Gaussian: both std floors must be positive (the
    config's validate() and the module's setup() both ask, for users of either alone)."""
    if diffusion_config.sigma_min <= 0 or diffusion_config.scoring_sigma_min <= 0:
        raise ValueError("DPPO needs diffusion sigma_min > 0 and logprob_sigma_min > 0: every denoising step is a Gaussian")


class DPPOModule(DiffusionPolicyModule):
    """The diffusion module, scored per denoising step. Inference and critic: the parent's."""

    def setup(self):
        super().setup()
        if self.discrete:
            raise ValueError("DPPO here supports Box action spaces only (use algorithm: ncdpo for Discrete)")
        check_gaussian_steps(self.diffusion_config)

    @property
    def first_finetuned_step(self) -> int:
        """Index of the first sampler step whose log-prob enters the loss."""
        return self.actor.sampler.first_finetuned_step

    def _step_log_stds(self, batch: int, floor: float, first: int = 0) -> torch.Tensor:
        """(B, S - first, D) log-std of each transition, floored at ``floor``: intermediate
        steps, then the final one."""
        inter = self.actor.sampler.transition_stds(floor).log()[:, None].expand(-1, self.actor.action_dim)
        final = self.actor.final_log_std(batch).clamp(min=math.log(floor))
        log_stds = torch.cat([inter.expand(batch, -1, -1), final[:, None]], dim=1)
        return log_stds[:, first:]

    def _forward_exploration(self, batch: dict, **kwargs) -> dict:
        cfg = self.diffusion_config
        with torch.inference_mode():
            cond = self._cond(batch)
            B = cond.shape[0]
            noise = self.actor.sample_noise(B)
            states = self.actor.chain(cond, noise).states  # x_K, ..., x_1, m_theta
            sample_log_stds = self._step_log_stds(B, cfg.sigma_min)
            mean, log_std = states[-1], sample_log_stds[:, -1]
            action = mean + log_std.exp() * noise[:, -1]
            # Each transition drew x_{i+1} = mu_i + sigma_i z_{i+1}: its log-prob under the
            # scoring std is that of sigma_i z_{i+1} under N(0, scoring std^2), with no extra
            # denoiser call. Kept per element, (B, S, D): the loss clamps and reduces them.
            step_logp = gaussian_log_prob_elements(
                sample_log_stds.exp() * noise[:, 1:], torch.zeros_like(sample_log_stds),
                self._step_log_stds(B, cfg.scoring_sigma_min),
            )
        return {
            Columns.ACTIONS: action,
            Columns.ACTION_LOGP: step_logp[:, self.first_finetuned_step :].sum((-1, -2)),
            Columns.ACTION_DIST_INPUTS: torch.cat([mean, log_std], dim=-1),
            DPPO_CHAIN: torch.stack([*states[:-1], action], dim=1),
            DPPO_STEP_LOGP: step_logp,
        }

    def _forward_train(self, batch: dict, **kwargs) -> dict:
        """New per-element log-probs of the fine-tuned steps from the stored chain: one
        batched denoiser call."""
        self.step_grad_norms = StepGradNorms()  # no backprop through the chain: nothing to probe
        cond, chain, first = self._cond(batch), batch[DPPO_CHAIN], self.first_finetuned_step
        with self.shifting(self.shift_in_update):
            features = self.actor.encode(cond)
        means = self.actor.sampler.step_means(features, chain, first)
        log_stds = self._step_log_stds(cond.shape[0], self.diffusion_config.scoring_sigma_min, first)
        return {
            Columns.ACTION_DIST_INPUTS: torch.cat([means[:, -1], log_stds[:, -1]], dim=-1),
            DPPO_STEP_LOGP: gaussian_log_prob_elements(chain[:, first + 1 :], means, log_stds),
        }


def clip_schedule(config, num_steps: int, device=None) -> torch.Tensor:
    """(num_steps,) PPO clip of each fine-tuned denoising step, earliest first: ``clip_param``
    at the last step, ``clip_param_base`` at the earliest, exponential in between at rate
    ``clip_param_rate`` (DPPO's reference); ``clip_param`` throughout when the base is None."""
    clip = torch.full((num_steps,), float(config.clip_param), device=device)
    if config.clip_param_base is None or num_steps < 2:
        return clip
    t = torch.arange(num_steps, device=device, dtype=torch.float32) / (num_steps - 1)
    rate = config.clip_param_rate
    return config.clip_param_base + (config.clip_param - config.clip_param_base) * torch.expm1(rate * t) / math.expm1(rate)


class DPPOTorchLearner(NCDPOTorchLearner):
    """NCDPO's learner (optimizers, clips, NaN guard, target KL) with DPPO's per-step loss."""

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        new_elements = fwd_out[DPPO_STEP_LOGP]  # (B, S_ft, D): the last S_ft sampler steps
        B, S_ft, _ = new_elements.shape
        S = batch[DPPO_STEP_LOGP].shape[1]
        mask = batch.get(Columns.LOSS_MASK)
        mask = torch.ones(B, dtype=torch.bool, device=new_elements.device) if mask is None else mask

        new_logp, old_logp = (
            reduce_log_prob(x[mask], config.logp_reduction, config.logp_clamp)
            for x in (new_elements, batch[DPPO_STEP_LOGP][:, S - S_ft :])
        )  # (n, S_ft)
        log_ratio = new_logp - old_logp
        ratio = torch.exp(log_ratio)
        step = torch.arange(S - S_ft, S, device=ratio.device)
        adv = policy_advantages(config, batch[Postprocessing.ADVANTAGES][mask])
        adv = adv[:, None] * config.gamma_denoise ** (S - 1 - step)
        clip = clip_schedule(config, S_ft, ratio.device)
        surrogate = clipped_surrogate(adv, ratio, clip)  # (n, S_ft)

        values = module.values_for_update(batch)[mask]
        value_targets = batch[Postprocessing.VALUE_TARGETS][mask]
        vf_loss = value_loss(values, value_targets, config.vf_clip_param)
        dist = module.get_train_action_dist_cls().from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
        entropy = dist.entropy()[mask]  # of the final Gaussian
        entropy_coeff = self.entropy_coeff_schedulers_per_module[module_id].get_current_value()
        total = -surrogate.mean() + (config.vf_loss_coeff * vf_loss - entropy_coeff * entropy).mean()

        with torch.no_grad():
            self._log_diagnostics(
                module_id, config, fwd_out,
                surrogate=surrogate, vf_loss=vf_loss, entropy=entropy, ratio=ratio, log_ratio=log_ratio,
                values=values, value_targets=value_targets, clip=clip,
            )
        return total


class DPPOConfig(NCDPOConfig):
    """NCDPO's config (same PPO defaults, diffusion knobs, optimizers) plus ``gamma_denoise`` and
    the per-step clip schedule (``clip_param_base``, ``clip_param_rate``)."""

    module_class = DPPOModule
    learner_class = DPPOTorchLearner

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or DPPO)
        self.gamma_denoise: float = DEFAULTS.gamma_denoise
        self.clip_param_base: Optional[float] = DEFAULTS.clip_param_base
        self.clip_param_rate: float = DEFAULTS.clip_param_rate

    def training(self, *, gamma_denoise: float = NotProvided, clip_param_base: Optional[float] = NotProvided,
                 clip_param_rate: float = NotProvided, **kwargs) -> "DPPOConfig":
        """NCDPOConfig.training(...) plus ``gamma_denoise`` (the per-denoising-step discount) and
        the clip schedule over the fine-tuned steps."""
        super().training(**kwargs)
        for name, value in (("gamma_denoise", gamma_denoise), ("clip_param_base", clip_param_base),
                            ("clip_param_rate", clip_param_rate)):
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    def validate(self) -> None:
        super().validate()
        if not 0 < self.gamma_denoise <= 1:
            self._value_error(f"`gamma_denoise` must be in (0, 1], got {self.gamma_denoise}")
        check_gaussian_steps(self.diffusion_config)
        if self.kl_to_reference:
            self._value_error("DPPO has no KL-to-reference term: set kl_to_reference=0")
        if self.clip_param_base is not None and not 0 < self.clip_param_base <= self.clip_param:
            self._value_error("`clip_param_base` must be in (0, clip_param] or None")
        if self.clip_param_rate <= 0:
            self._value_error("`clip_param_rate` must be > 0")


class DPPO(PPO):
    """PPO's training step; the DPPO parts live in the module, the learner and the config."""

    @classmethod
    def get_default_config(cls) -> DPPOConfig:
        return DPPOConfig()
