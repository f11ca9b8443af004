"""DPPO (Ren et al. 2024) on the same diffusion policy: the baseline of ``NCDPO.md`` section 5.

DPPO treats each denoising step as a Gaussian sub-action of a two-level MDP. Exploration
stores the whole chain x_K .. x_1, a; the learner scores every transition separately
(no backprop through the chain) and applies PPO per (env step, denoising step):

- sampler step i < S-1:  N(x_{i+1}; mu_theta(x_i, k_i, s), sigma_i^2), sigma_i >= sigma_min;
- sampler step S-1:      N(a; m_theta, max(exp(log_std), sigma_min)^2), the policy's final
  Gaussian (the one NCDPO uses), floored like the others;
- every pair shares the env step's advantage, weighted by gamma_denoise^(S-1-i), and only
  the last ``finetune_steps`` sampler steps enter the loss.

One difference from DPPO's code: there the steps that are not fine-tuned run a frozen copy
of the pre-trained denoiser; here all steps share one denoiser (as NCDPO's
``finetune_steps`` does), so the early steps drift with the fine-tuned weights.

    from ncdpo_rllib.rl.dppo import DPPOConfig
    algo = DPPOConfig().environment("Pendulum-v1").training(gamma_denoise=0.99).build_algo()
"""

from __future__ import annotations

import math

import torch

from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.algorithms.ppo import PPO
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.evaluation.postprocessing import Postprocessing

from ncdpo_rllib.diffusion import gaussian_log_prob

from .config import NCDPOConfig
from .learner import NCDPOTorchLearner
from .module import DiffusionPolicyModule

DPPO_CHAIN = "dppo_chain"
"""Batch / episode column: the chain x_K, x after each intermediate step, then the action: (S+1, D)."""
DPPO_STEP_LOGP = "dppo_step_logp"
"""Batch / episode column: old log-prob of each sampler step's transition, (S,); in the train
forward's output: new log-probs of the fine-tuned steps only, (S_ft,) = the last S_ft columns."""


class DPPOModule(DiffusionPolicyModule):
    """The diffusion module, scored per denoising step. Inference and critic: the parent's."""

    def setup(self):
        super().setup()
        if self.discrete:
            raise ValueError("DPPO here supports Box action spaces only (use algorithm: ncdpo for Discrete)")
        if self.diffusion_config.sigma_min <= 0:
            raise ValueError("DPPO needs sigma_min > 0: every denoising step must be a proper Gaussian")

    @property
    def first_finetuned_step(self) -> int:
        """Index of the first sampler step whose log-prob enters the loss."""
        ft = self.diffusion_config.finetune_steps
        return 0 if ft is None else max(self.num_sampler_steps - ft, 0)

    def _final_log_std(self, batch: int) -> torch.Tensor:
        return self.actor.final_log_std(batch).clamp(min=math.log(self.diffusion_config.sigma_min))

    def _step_log_stds(self, batch: int, first: int = 0) -> torch.Tensor:
        """(B, S - first, D) log-std of each transition: intermediate steps, then the final one."""
        inter = self.actor.sampler.transition_stds().log()[:, None].expand(-1, self.actor.action_dim)
        log_stds = torch.cat([inter.expand(batch, -1, -1), self._final_log_std(batch)[:, None]], dim=1)
        return log_stds[:, first:]

    def _forward_exploration(self, batch: dict, **kwargs) -> dict:
        with torch.no_grad():
            cond = self._cond(batch)
            B = cond.shape[0]
            noise = self.actor.sample_noise(B)
            states = self.actor.chain(cond, noise).states  # x_K, ..., x_1, m_theta
            mean, log_std = states[-1], self._final_log_std(B)
            action = mean + log_std.exp() * noise[:, -1]
            # Each transition drew x_{i+1} = mu_i + sigma_i z_{i+1}: its log-prob is that of
            # sigma_i z_{i+1} under N(0, sigma_i^2), with no extra denoiser call.
            log_stds = self._step_log_stds(B)
            step_logp = gaussian_log_prob(log_stds.exp() * noise[:, 1:], torch.zeros_like(log_stds), log_stds)
        return {
            Columns.ACTIONS: action,
            Columns.ACTION_LOGP: step_logp[:, self.first_finetuned_step :].sum(-1),
            Columns.ACTION_DIST_INPUTS: torch.cat([mean, log_std], dim=-1),
            DPPO_CHAIN: torch.stack([*states[:-1], action], dim=1),
            DPPO_STEP_LOGP: step_logp,
        }

    def _forward_train(self, batch: dict, **kwargs) -> dict:
        """New log-probs of the fine-tuned steps from the stored chain: one batched denoiser call."""
        self.grad_probe = {}  # no backprop through the chain: nothing to probe
        cond, chain, first = self._cond(batch), batch[DPPO_CHAIN], self.first_finetuned_step
        with self.shifting(self.shift_in_update):
            features = self.actor.encode(cond)
        means = self.actor.sampler.step_means(features, chain, first)
        log_stds = self._step_log_stds(cond.shape[0], first)
        return {
            Columns.ACTION_DIST_INPUTS: torch.cat([means[:, -1], log_stds[:, -1]], dim=-1),
            DPPO_STEP_LOGP: gaussian_log_prob(chain[:, first + 1 :], means, log_stds),
        }


class DPPOTorchLearner(NCDPOTorchLearner):
    """NCDPO's learner (optimizers, clips, NaN guard, target KL) with DPPO's per-step loss."""

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        new_logp = fwd_out[DPPO_STEP_LOGP]  # (B, S_ft): the last S_ft sampler steps
        B, S_ft = new_logp.shape
        S = batch[DPPO_STEP_LOGP].shape[1]
        mask = batch.get(Columns.LOSS_MASK)
        mask = torch.ones(B, dtype=torch.bool, device=new_logp.device) if mask is None else mask

        log_ratio = new_logp - batch[DPPO_STEP_LOGP][:, S - S_ft :]
        ratio = torch.exp(log_ratio)
        step = torch.arange(S - S_ft, S, device=ratio.device)
        adv = batch[Postprocessing.ADVANTAGES][:, None] * config.gamma_denoise ** (S - 1 - step)
        clip = config.clip_param
        surrogate = torch.min(adv * ratio, adv * ratio.clamp(1 - clip, 1 + clip))[mask]  # (n, S_ft)

        values = module.values_for_update(batch)
        vf_err = (values - batch[Postprocessing.VALUE_TARGETS]) ** 2
        vf_loss = (vf_err.clamp(max=config.vf_clip_param) if config.vf_clip_param else vf_err)[mask]
        dist = module.get_train_action_dist_cls().from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
        entropy = dist.entropy()[mask]  # of the final Gaussian
        entropy_coeff = self.entropy_coeff_schedulers_per_module[module_id].get_current_value()
        total = -surrogate.mean() + (config.vf_loss_coeff * vf_loss - entropy_coeff * entropy).mean()

        with torch.no_grad():
            self._log_diagnostics(
                module_id, config, fwd_out,
                surrogate=surrogate, vf_loss=vf_loss, entropy=entropy,  # already masked
                ratio=ratio[mask], log_ratio=log_ratio[mask],
                values=values[mask], value_targets=batch[Postprocessing.VALUE_TARGETS][mask],
            )
        return total


class DPPOConfig(NCDPOConfig):
    """NCDPO's config (same PPO defaults, diffusion knobs, optimizers) plus ``gamma_denoise``."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or DPPO)
        self.gamma_denoise: float = 0.99

    def training(self, *, gamma_denoise: float = NotProvided, **kwargs) -> "DPPOConfig":
        """NCDPOConfig.training(...) plus ``gamma_denoise``: the per-denoising-step discount."""
        super().training(**kwargs)
        if gamma_denoise is not NotProvided:
            self.gamma_denoise = gamma_denoise
        return self

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        model_config = super().get_default_rl_module_spec().model_config
        return RLModuleSpec(module_class=DPPOModule, model_config=model_config)

    def get_default_learner_class(self):
        return DPPOTorchLearner

    def validate(self) -> None:
        super().validate()
        if not 0 < self.gamma_denoise <= 1:
            self._value_error(f"`gamma_denoise` must be in (0, 1], got {self.gamma_denoise}")
        if self.diffusion_config.sigma_min <= 0:
            self._value_error("DPPO needs diffusion sigma_min > 0 (each denoising step is a Gaussian)")
        if self.kl_to_reference:
            self._value_error("DPPO has no KL-to-reference term: set kl_to_reference=0")


class DPPO(PPO):
    """PPO's training step; the DPPO parts live in the module, the learner and the config."""

    @classmethod
    def get_default_config(cls) -> DPPOConfig:
        return DPPOConfig()
