"""``NCDPOTorchLearner``: PPO on the noise-conditioned likelihood, backprop through all steps.

What it changes in RLlib's ``PPOTorchLearner``:
- the loss (same clipped surrogate + clipped value loss), with the diagnostics NCDPO needs:
  ratio mean/max, clip fraction, approx KL, final-step std, explained variance, and the
  gradient norm reaching the first, middle and last denoising step;
- two optimizers per module, ``actor`` (lr) and ``critic`` (critic_lr), each with its own
  global-norm clip (one shared clip lets a large critic gradient starve the actor);
- target-KL early stop: once a minibatch's approx KL exceeds 1.5 * target_kl, no further
  optimizer steps for that module in this ``update()`` call;
- critic warm-up: for the first ``critic_warmup_iters`` iterations only the critic steps
  (a pre-trained actor is not moved by advantages from an untrained critic);
- the log-ratio of the whole action chunk (``logp_reduction: sum``) or per action dimension
  (``mean``, DPPO's convention), optionally from per-element log-probs clamped (``logp_clamp``);
- advantages optionally re-standardised and quantile-clipped per minibatch (DPPO's reference);
- optional running reward scaling before GAE (``reward_scale_running``);
- an optional KL-to-reference term (``kl_to_reference``): the KL between the current and
  the reference (initial / pre-trained) policy's final Gaussians, same stored noise;
- a NaN/inf guard: a minibatch step with non-finite gradients is skipped and counted
  (RLlib's default zeroes the NaNs and steps); non-finite parameters raise
  ``NonFiniteParametersError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.learner import GeneralAdvantageEstimation
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import ENTROPY_KEY, POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME
from ray.rllib.utils.torch_utils import explained_variance

from ncdpo_rllib.diffusion import gaussian_log_prob_elements, reduce_log_prob

from .module import NOISE
from .reward_scaling import RunningRewardScaling

ACTOR, CRITIC = "actor", "critic"


def policy_advantages(config, adv: torch.Tensor) -> torch.Tensor:
    """The advantages the policy loss sees (valid rows of a minibatch). RLlib's GAE connector
    already standardised them over the whole batch; ``advantage_normalization: minibatch``
    standardises them again per minibatch, and ``advantage_clip_quantiles: [lo, hi]`` clips
    them to their own lo..hi quantiles (DPPO's reference does both, in that order)."""
    if config.advantage_normalization == "minibatch" and adv.numel() > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    if config.advantage_clip_quantiles is not None and adv.numel() > 0:
        lo, hi = config.advantage_clip_quantiles
        adv = adv.clamp(torch.quantile(adv, lo), torch.quantile(adv, hi))
    return adv


def clipped_surrogate(adv: torch.Tensor, ratio: torch.Tensor, clip) -> torch.Tensor:
    """PPO's clipped surrogate min(A r, A clip(r, 1 - eps, 1 + eps)), elementwise; ``clip`` a
    number or a tensor broadcasting against ``ratio`` (DPPO's per-step clips)."""
    return torch.min(adv * ratio, adv * torch.clamp(ratio, 1 - clip, 1 + clip))


def value_loss(values: torch.Tensor, targets: torch.Tensor, vf_clip_param) -> torch.Tensor:
    """Squared value error, clipped at ``vf_clip_param`` (RLlib's convention; None = no clip)."""
    err = (values - targets) ** 2
    return err.clamp(max=vf_clip_param) if vf_clip_param else err


def global_norm(tensors) -> torch.Tensor:
    """The L2 norm of all ``tensors`` together, with torch's multi-tensor kernels (one call, not
    a few small ops per tensor); NaN/inf if any element is."""
    tensors = list(tensors)
    return torch.nn.utils.get_total_norm(tensors, foreach=all(t.device.type in ("cpu", "cuda") for t in tensors))


def all_finite(tensors) -> torch.Tensor:
    """Whether every element of ``tensors`` is finite, as one boolean tensor (no host sync)."""
    return global_norm(tensors).isfinite()


def clip_by_global_norm(grads: list[torch.Tensor], clip) -> torch.Tensor:
    """Scales ``grads`` in place so that their global norm is at most ``clip`` (None: no clip) and
    returns the norm before clipping: RLlib's ``clip_gradients(grad_clip_by="global_norm")`` in two
    multi-tensor calls, except that a non-finite norm stays non-finite (RLlib's caps it at 1e9),
    so that it doubles as the finiteness check."""
    norm = global_norm(grads)
    if clip:
        torch._foreach_mul_(grads, (clip / (norm + 1e-6)).clamp(max=1.0))
    return norm


def adam(params: list) -> torch.optim.Optimizer:
    """Adam with the fused kernel where torch has it for these parameters' device (CPU and CUDA:
    one kernel per step instead of a few per parameter), else the default."""
    try:
        return torch.optim.Adam(params, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params)


@dataclass
class UpdateControl:
    """Which optimizer steps an ``update()`` call skips (``NCDPOTorchLearner.apply_gradients``)."""

    actor_frozen: bool = False
    """Critic warm-up (``critic_warmup_iters``): the actors do not step in this update() call."""
    kl_stopped: set = field(default_factory=set)
    """Modules past 1.5 x ``target_kl``: no further steps in this update() call."""
    skip_step: set = field(default_factory=set)
    """Modules with non-finite gradients in this minibatch: this step only is skipped."""


class NonFiniteParametersError(RuntimeError):
    """Raised when a module's parameters became NaN/inf: training cannot continue."""


class DiffusionLearnerMixin:
    """What the diffusion policy's learners share, whatever RLlib learner they extend (PPO's:
    ``NCDPOTorchLearner``, ``DPPOTorchLearner``; APPO's: ``NCDPOAPPOTorchLearner``): the actor's and
    the critic's optimizers with their own clips, the per-denoising-step gradient norms, and the
    update control (critic warm-up, target-KL stop, non-finite gradients)."""

    def build(self) -> None:
        super().build()
        self.control = UpdateControl()

    # --- optimizers -------------------------------------------------------------------
    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        module = self.module[module_id].unwrapped()
        if not hasattr(module, "actor_parameters"):  # e.g. a stock module: PPO's default
            return super().configure_optimizers_for_module(module_id, config)
        for name, params, lr in (
            (ACTOR, module.actor_parameters(), config.lr),
            (CRITIC, module.critic_parameters(), config.critic_lr or config.lr),
        ):
            self.register_optimizer(
                module_id=module_id,
                optimizer_name=name,
                optimizer=adam(params),
                params=params,
                lr_or_lr_schedule=lr,
            )

    def postprocess_gradients_for_module(self, *, module_id, config=None, module_gradients_dict):
        """Clip each optimizer's gradients with its own global norm; flag non-finite ones."""
        clips = {ACTOR: config.actor_grad_clip, CRITIC: config.critic_grad_clip}
        out, finite = {}, []
        for name, optimizer in self.get_optimizers_for_module(module_id):
            grads = self.filter_param_dict_for_optimizer(param_dict=module_gradients_dict, optimizer=optimizer)
            grads = {pid: g for pid, g in grads.items() if g is not None}
            if not grads:
                continue
            norm = clip_by_global_norm(list(grads.values()), clips.get(name, config.grad_clip))
            finite.append(norm.isfinite())
            self.metrics.log_value((module_id, f"grad_norm_{name}"), norm, reduce="mean")
            out.update(grads)
        if finite and not bool(torch.stack(finite).all()):  # one host sync per module
            self.control.skip_step.add(module_id)
        self._log_denoising_step_grad_norms(module_id)
        return out

    def _log_denoising_step_grad_norms(self, module_id) -> None:
        probe = getattr(self.module[module_id].unwrapped(), "step_grad_norms", None)
        norms = probe.first_mid_last() if probe is not None else {}
        if norms:
            self.metrics.log_dict(norms, key=module_id, reduce="mean")

    # --- update control -------------------------------------------------------------
    # What may step in an update() call, in one place: ``control`` is reset per update() call
    # (before_gradient_based_update), filled while the loss and gradients are computed (the KL
    # stop in _maybe_stop_on_kl, non-finite gradients in postprocess_gradients_for_module) and
    # applied in apply_gradients. The optimizers' parameters are read through RLlib's public
    # get_optimizers_for_module (``optimizer_params``), nowhere else.
    def before_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().before_gradient_based_update(timesteps=timesteps)
        # Warm-up counted in env steps (restored with the algorithm), so that it survives --resume.
        per_iter = self.config.train_batch_size_per_learner * max(self.config.num_learners, 1)
        lifetime = int(timesteps.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0) or 0)
        warmup = self.config.critic_warmup_iters
        self.control = UpdateControl(actor_frozen=warmup > 0 and round(lifetime / per_iter) <= warmup)

    def optimizer_params(self, module_id, only: str = "") -> list[torch.nn.Parameter]:
        """The parameters of ``module_id``'s optimizers (of the one named ``only``, if given); none
        for a module RLlib registered no optimizer for."""
        try:
            named = self.get_optimizers_for_module(module_id)
        except KeyError:
            return []
        return [p for name, optimizer in named if not only or name == only
                for group in optimizer.param_groups for p in group["params"]]

    def apply_gradients(self, gradients_dict) -> None:
        """RLlib's apply_gradients, minus what must not step this minibatch (``control``): the
        modules past the target KL, those with non-finite gradients (RLlib's default would zero
        the NaNs and step anyway) and, during the critic warm-up, the actors."""
        control = self.control
        for module_id in control.skip_step:
            self.metrics.log_value((module_id, "nonfinite_updates_skipped"), 1, reduce="sum")
        frozen = [p for m in control.kl_stopped | control.skip_step for p in self.optimizer_params(m)]
        if control.actor_frozen:
            frozen += [p for m in self.module.keys() for p in self.optimizer_params(m, only=ACTOR)]
        frozen_refs = {self.get_param_ref(p) for p in frozen}
        for param in frozen:
            param.grad = None  # Adam skips parameters without a gradient
        super().apply_gradients({ref: g for ref, g in gradients_dict.items() if ref not in frozen_refs})
        control.skip_step = set()  # per minibatch; the KL stop lasts for the whole update() call
        for module_id in self.module.keys():
            params = self.optimizer_params(module_id)
            if params and not bool(all_finite(params)):
                raise NonFiniteParametersError(
                    f"parameters of module {module_id!r} are NaN/inf; lower the learning rate or the gradient "
                    "clips and resume from the last checkpoint"
                )

    # --- diagnostics ----------------------------------------------------------------------
    def _log_policy_diagnostics(self, module_id, config, fwd_out, *, ratio, log_ratio, clip) -> None:
        """Ratio, clip fraction, approx KL (and the target-KL stop it decides), final-step std,
        critic warm-up: the diagnostics every diffusion learner logs, under the same names."""
        approx_kl = ((ratio - 1) - log_ratio).mean()  # Schulman's k3 estimator
        self._maybe_stop_on_kl(module_id, config, approx_kl)
        self.metrics.log_dict(
            {
                "ratio_mean": ratio.mean(),
                "clip_fraction": ((ratio - 1).abs() > clip).float().mean(),
                "approx_kl": approx_kl,
                "kl_stop_fraction": float(module_id in self.control.kl_stopped),
                "actor_frozen": float(self.control.actor_frozen),
            },
            key=module_id,
            reduce="mean",
        )
        if not getattr(self.module[module_id].unwrapped(), "discrete", False):
            final_std = fwd_out[Columns.ACTION_DIST_INPUTS].chunk(2, dim=-1)[1].exp().mean()
            self.metrics.log_value((module_id, "final_std"), final_std, reduce="mean")
        self.metrics.log_value((module_id, "ratio_max"), ratio.max(), reduce="max")

    def _maybe_stop_on_kl(self, module_id, config, approx_kl: torch.Tensor) -> None:
        """Target-KL early stop; with several learners, decided on the mean KL, identically on all."""
        if not config.target_kl:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(approx_kl, op=torch.distributed.ReduceOp.SUM)
            approx_kl /= torch.distributed.get_world_size()
        if approx_kl > 1.5 * config.target_kl:
            self.control.kl_stopped.add(module_id)


class NCDPOTorchLearner(DiffusionLearnerMixin, PPOTorchLearner):
    def build(self) -> None:
        """PPO's build; with ``reward_scale_running``, the reward scaler right before GAE."""
        super().build()
        if getattr(self.config, "reward_scale_running", False) and self._learner_connector is not None:
            self._learner_connector.insert_before(
                GeneralAdvantageEstimation, RunningRewardScaling(gamma=self.config.gamma)
            )

    # --- the loss -----------------------------------------------------------------------
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        mask = batch.get(Columns.LOSS_MASK)
        if mask is None:
            mask = torch.ones_like(batch[Columns.ACTION_LOGP], dtype=torch.bool)

        dist = module.get_train_action_dist_cls().from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
        log_ratio = self._final_log_ratio(module, config, batch, fwd_out, dist)[mask]
        ratio = torch.exp(log_ratio)
        adv = policy_advantages(config, batch[Postprocessing.ADVANTAGES][mask])
        surrogate = clipped_surrogate(adv, ratio, config.clip_param)

        values = module.values_for_update(batch)[mask]
        value_targets = batch[Postprocessing.VALUE_TARGETS][mask]
        vf_loss = value_loss(values, value_targets, config.vf_clip_param)
        entropy = dist.entropy()[mask]
        entropy_coeff = self.entropy_coeff_schedulers_per_module[module_id].get_current_value()

        total = (-surrogate + config.vf_loss_coeff * vf_loss - entropy_coeff * entropy).mean()
        kl_ref = self._kl_to_reference(module, batch, fwd_out)[mask] if config.kl_to_reference else None
        if kl_ref is not None:
            total = total + config.kl_to_reference * kl_ref.mean()

        with torch.no_grad():
            self._log_diagnostics(
                module_id, config, fwd_out,
                surrogate=surrogate, vf_loss=vf_loss, entropy=entropy, ratio=ratio, log_ratio=log_ratio,
                values=values, value_targets=value_targets, clip=config.clip_param,
            )
            if kl_ref is not None:
                self.metrics.log_value((module_id, "kl_to_reference"), kl_ref.mean(), reduce="mean")
        return total

    @staticmethod
    def _final_log_ratio(module, config, batch, fwd_out, dist) -> torch.Tensor:
        """log pi_new(a | s, zeta) - log pi_old(a | s, zeta), per row. With ``logp_reduction:
        sum`` and no clamp, the exact Gaussian (or categorical) log-probs; otherwise each
        element's log-prob (new: this forward's mean/std, old: the rollout's, stored as
        ACTION_DIST_INPUTS) is clamped and summed or averaged over the chunk x action dims."""
        if module.discrete or (config.logp_reduction == "sum" and config.logp_clamp is None):
            return dist.logp(batch[Columns.ACTIONS]) - batch[Columns.ACTION_LOGP]
        action = batch[Columns.ACTIONS]
        new, old = (
            reduce_log_prob(gaussian_log_prob_elements(action, *inputs.chunk(2, dim=-1)),
                            config.logp_reduction, config.logp_clamp)
            for inputs in (fwd_out[Columns.ACTION_DIST_INPUTS], batch[Columns.ACTION_DIST_INPUTS])
        )
        return new - old

    def _log_diagnostics(self, module_id, config, fwd_out, *, surrogate, vf_loss, entropy, ratio, log_ratio,
                         values, value_targets, clip) -> None:
        """The losses, then the policy diagnostics and the target-KL stop (``_log_policy_diagnostics``);
        inputs: valid rows only (DPPO's ratios: every (env step, denoising step) pair, ``clip`` one per step)."""
        self.metrics.log_dict(
            {
                POLICY_LOSS_KEY: -surrogate.mean(),
                VF_LOSS_KEY: vf_loss.mean(),
                ENTROPY_KEY: entropy.mean(),
                "vf_explained_var": explained_variance(value_targets, values),
            },
            key=module_id,
            reduce="mean",
        )
        self._log_policy_diagnostics(module_id, config, fwd_out, ratio=ratio, log_ratio=log_ratio, clip=clip)

    @staticmethod
    def _kl_to_reference(module, batch, fwd_out) -> torch.Tensor:
        """KL(N(m, s^2) || N(m_ref, s^2)) per row, s the current std (detached): the
        reference runs the chain from the same stored noise, without grad. Discrete head:
        KL(Categorical(y) || Categorical(y_ref)), same noise."""
        if module.discrete:
            logp = torch.log_softmax(fwd_out[Columns.ACTION_DIST_INPUTS], -1)
            with torch.no_grad():
                ref = torch.log_softmax(module.reference(module._cond(batch), batch[NOISE]), -1)
            return (logp.exp() * (logp - ref)).sum(-1)
        mean, log_std = fwd_out[Columns.ACTION_DIST_INPUTS].chunk(2, dim=-1)
        with torch.no_grad():
            ref_mean, _ = module.reference(module._cond(batch), batch[NOISE])
        return ((mean - ref_mean) ** 2 / (2 * torch.exp(2 * log_std.detach()))).sum(-1)
