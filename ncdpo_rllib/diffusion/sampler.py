"""The noise-conditioned sampler: explicit noise in, the final step's mean out.

Noise layout, one row per draw, shape (B, S + 1, D) with S = sampler steps:

    noise[:, 0]      z_{K+1}: the starting point x_K (clipped to +-noise_clip)
    noise[:, i]      the noise added after sampler step i (i = 1 .. S-1)
    noise[:, S]      z_1: the final step's noise, used by the policy head for the action

The sampler reads rows 0..S-1 (zeta in ``NCDPO.md``); given them the chain is a
deterministic, differentiable function of (cond, zeta, theta).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ncdpo_rllib.errors import one_line

from .config import DiffusionConfig
from .denoiser import Denoiser
from .schedules import NoiseSchedule


@dataclass
class Chain:
    """What one pass through the chain produced (for tests and diagnostics)."""

    mean: torch.Tensor  # (B, D) final step's mean m_theta
    states: list[torch.Tensor] = field(default_factory=list)  # x after each step, x_K first
    x0_preds: list[torch.Tensor] = field(default_factory=list)  # x0_hat at each step


def sampler_timesteps(cfg: DiffusionConfig) -> list[int]:
    """The schedule steps the sampler visits, from K down to 1."""
    K, S = cfg.denoising_steps, cfg.sampler_steps
    if S == K:
        return list(range(K, 0, -1))
    # DDIM: S evenly spaced steps from K to 1 (both ends kept when S > 1).
    steps = torch.linspace(K, 1, S).round().long().tolist()
    return sorted(set(steps), reverse=True)


class StepGradNorms:
    """The norm of d(loss)/d(output of each denoising step), filled during the backward pass: give
    one to ``NoiseConditionedSampler.forward(grad_probe=...)``, read it after ``backward()``. Does
    the gradient survive K steps? (step 0 is the first denoising step, at x_K).

    No hooks (a compiled chain has no intermediate tensors to hook): the chain adds ``tap[i]``, a
    zero leaf tensor, to the output of each step i that has grad, and d(loss)/d(tap[i]) is then
    d(loss)/d(output of step i)."""

    def __init__(self):
        self.tap: Optional[torch.Tensor] = None
        self.steps: range = range(0)

    def make_tap(self, steps: range, like: torch.Tensor) -> torch.Tensor:
        """The zero leaf (S, B, D) for the chain to add, watching ``steps``."""
        self.steps = steps
        self.tap = torch.zeros((steps.stop, *like.shape), dtype=like.dtype, device=like.device, requires_grad=True)
        return self.tap

    @property
    def grad(self) -> Optional[torch.Tensor]:
        """d(loss)/d(output of each step), (S, B, D); None before a backward pass (or without grad)."""
        return None if self.tap is None else self.tap.grad

    @property
    def norms(self) -> dict[int, torch.Tensor]:
        """{step: gradient norm}; empty before a backward pass."""
        return {} if self.grad is None else {i: self.grad[i].norm() for i in self.steps}

    def first_mid_last(self) -> dict[str, torch.Tensor]:
        """{grad_norm_step_first, _mid, _last}; empty before a backward pass (or without grad)."""
        if self.grad is None:
            return {}
        steps = list(self.steps)
        picks = {"first": steps[0], "mid": steps[len(steps) // 2], "last": steps[-1]}
        norms = self.grad[list(picks.values())].flatten(1).norm(dim=1)  # these three only, one call
        return {f"grad_norm_step_{name}": norm for name, norm in zip(picks, norms)}


class NoiseConditionedSampler(nn.Module):
    """Runs the reverse chain x_K -> ... -> m_theta from explicit noise."""

    def __init__(self, cfg: DiffusionConfig, denoiser: Denoiser):
        super().__init__()
        self.cfg = cfg
        self.denoiser = denoiser
        # ``frozen_base``: the steps before the fine-tuned ones run this frozen copy.
        self.base_denoiser = copy.deepcopy(denoiser).requires_grad_(False) if cfg.frozen_base else None
        sched = NoiseSchedule.make(
            cfg.schedule, cfg.denoising_steps, cfg.beta_min, cfg.beta_max, cfg.cosine_beta_clip
        )
        c_x0, c_xk = sched.posterior_mean_coefs
        for name, value in {
            "abar": sched.abar,
            "abar_prev": sched.abar_prev,
            "post_var": sched.posterior_variance,
            "c_x0": c_x0,
            "c_xk": c_xk,
        }.items():
            self.register_buffer(name, value.float(), persistent=False)
        self._compiled: Optional[Callable] = None  # built on first use (``_run_compiled``)
        self._compile_failed = False
        self.timesteps = sampler_timesteps(cfg)
        if len(self.timesteps) != cfg.sampler_steps:
            raise ValueError(f"ddim_steps={cfg.ddim_steps} gives duplicate steps for K={cfg.denoising_steps}")
        # Step i goes from k[i] to k_prev[i]; the last k_prev is 0 (the clean action).
        self.register_buffer("step_k", torch.tensor(self.timesteps), persistent=False)
        self.register_buffer("step_k_prev", torch.tensor([*self.timesteps[1:], 0]), persistent=False)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the compiled chain behind (it is bound to this instance)."""
        return {**self.__dict__, "_compiled": None}

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def noise_shape(self, action_dim: int) -> tuple[int, int]:
        return (self.num_steps + 1, action_dim)

    # --- one step ------------------------------------------------------------------
    def _x0(self, pred: torch.Tensor, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """x0_hat from the denoiser's prediction for states x at steps k (a (N,) or (1,) tensor),
        the x0 clip applied."""
        if self.cfg.prediction == "x0":
            x0 = pred
        else:
            abar = self.abar[k - 1][:, None]
            x0 = (x - torch.sqrt(1 - abar) * pred) / torch.sqrt(abar)
        c = self.cfg.x0_clip
        if c is not None:
            x0 = x0.clamp(-c, c) if self.cfg.x0_clip_mode == "hard" else c * torch.tanh(x0 / c)
        return x0

    def _mean(self, x: torch.Tensor, x0: torch.Tensor, k: torch.Tensor, k_prev: torch.Tensor, eta: float):
        """Mean of x_{k_prev} given x_k and x0_hat (DDPM posterior or DDIM), rows with k_prev = 0
        are x0_hat itself; k, k_prev: (N,) tensors. The one place of the reverse-step math."""
        if self.cfg.sampler == "ddpm":
            mean = self.c_x0[k - 1][:, None] * x0 + self.c_xk[k - 1][:, None] * x
        else:
            abar = self.abar[k - 1][:, None]
            # Epsilon consistent with the (possibly clipped) x0, as DDIM needs it.
            eps = (x - torch.sqrt(abar) * x0) / torch.sqrt(1 - abar)
            sigma, abar_p = self._sigma_at(k, k_prev, eta)[:, None], self._abar_at(k_prev)[:, None]
            mean = torch.sqrt(abar_p) * x0 + torch.sqrt((1 - abar_p - sigma**2).clamp(min=0)) * eps
        return torch.where((k_prev == 0)[:, None], x0, mean)

    def _step(self, x: torch.Tensor, i: int, denoiser: nn.Module, terms: tuple[torch.Tensor, torch.Tensor],
              floor: Optional[float] = None, eta: Optional[float] = None):
        """Sampler step i from x with the denoiser's prepared ``terms`` (``Denoiser.prepare``).
        Returns (x0_hat, mean of the next state, its std); the last step has no std (None)."""
        eta = self.cfg.ddim_eta if eta is None else eta
        k, k_prev = self.step_k[i : i + 1], self.step_k_prev[i : i + 1]
        step_terms, cond_term = terms
        x0 = self._x0(denoiser.step(x, step_terms[i], cond_term), x, k)
        mean = self._mean(x, x0, k, k_prev, eta)
        if i == self.num_steps - 1:
            return x0, mean, None
        sigma = self._sigma_at(k, k_prev, eta)[0]
        return x0, mean, sigma.clamp(min=self.cfg.sigma_min if floor is None else floor)

    # --- the chain -----------------------------------------------------------------
    @property
    def first_finetuned_step(self) -> int:
        """Index of the first sampler step that is fine-tuned (0 unless ``finetune_steps``)."""
        ft = self.cfg.finetune_steps
        return 0 if ft is None else max(self.num_steps - ft, 0)

    def forward(
        self,
        cond: torch.Tensor,
        noise: torch.Tensor,
        *,
        keep_chain: bool = False,
        grad_probe: Optional["StepGradNorms"] = None,
        base_cond: Optional[torch.Tensor] = None,
        floor: Optional[float] = None,
        eta: Optional[float] = None,
    ) -> Chain:
        """Final-step mean from explicit noise (B, S+1, D); row S is not read here.

        grad_probe: records the norm of d(loss)/d(output of each sampler step) during the
        backward pass (``StepGradNorms``).
        base_cond: the frozen base's conditioning (``frozen_base``; default: cond).
        floor, eta: the intermediate steps' std floor and DDIM eta (default: the config's
        sampling values; evaluation passes its own).
        """
        tap = None
        if grad_probe is not None and torch.is_grad_enabled():
            tap = grad_probe.make_tap(range(self.first_finetuned_step, self.num_steps), noise[:, 0])
        run = self._run_steps if self.cfg.compile is None or self._compile_failed else self._run_compiled
        states, x0_preds = run(cond, noise, base_cond, tap, floor, eta, keep_chain)
        return Chain(mean=states[-1], states=states if keep_chain else [], x0_preds=x0_preds)

    def _run_steps(self, cond, noise, base_cond, tap, floor, eta, keep_chain: bool):
        """The chain: (states: x_K then the state after each step (the last only, unless
        keep_chain), x0_hat of each step (keep_chain)). What ``diffusion.compile`` compiles."""
        first_grad_step = self.first_finetuned_step
        # The per-step and per-observation terms of each denoiser, once per chain.
        terms = self.denoiser.prepare(self.step_k, cond)
        base_terms = None
        if self.base_denoiser is not None and first_grad_step > 0:
            with torch.no_grad():
                base_terms = self.base_denoiser.prepare(self.step_k, cond if base_cond is None else base_cond)
        x = noise[:, 0]
        if self.cfg.noise_clip is not None:
            x = x.clamp(-self.cfg.noise_clip, self.cfg.noise_clip)
        states, x0_preds = [x], []
        grad_on = torch.is_grad_enabled()
        for i in range(self.num_steps):
            frozen = base_terms is not None and i < first_grad_step
            with torch.set_grad_enabled(grad_on and i >= first_grad_step):
                args = (x, i, *((self.base_denoiser, base_terms) if frozen else (self.denoiser, terms)), floor, eta)
                if self.cfg.grad_checkpointing and torch.is_grad_enabled():
                    x0, mean, std = checkpoint(self._step, *args, use_reentrant=False)
                else:
                    x0, mean, std = self._step(*args)
                x = mean if std is None else mean + std * noise[:, i + 1]
                if tap is not None and i >= first_grad_step:
                    x = x + tap[i]
            if keep_chain:
                states.append(x)
                x0_preds.append(x0)
        return (states if keep_chain else [x]), x0_preds

    def _run_compiled(self, *args):
        """``_run_steps`` through ``torch.compile`` (``diffusion.compile``), compiled on first use. A
        platform where compiling fails (no C++ compiler, an unsupported op) falls back to eager for
        good, with one warning."""
        if self._compiled is None:
            self._compiled = torch.compile(self._run_steps, mode=self.cfg.compile)
        try:
            return self._compiled(*args)
        except Exception as e:  # noqa: BLE001 (whatever the compiler raised; eager below re-raises real errors)
            self._compile_failed = True
            logging.getLogger(__name__).warning(
                f"diffusion.compile={self.cfg.compile}: torch.compile failed here ({one_line(e)}); "
                f"the denoising chain runs eagerly")
            return self._run_steps(*args)

    # --- every step at once, from a stored chain (DPPO's per-step likelihoods) ---------
    def _abar_at(self, k: torch.Tensor) -> torch.Tensor:
        """abar_k for a tensor of steps, with abar_0 = 1 (a clean action)."""
        return torch.where(k > 0, self.abar[(k - 1).clamp(min=0)], torch.ones_like(self.abar[0]))

    def _sigma_at(self, k: torch.Tensor, k_prev: torch.Tensor, eta: Optional[float] = None) -> torch.Tensor:
        """``_step``'s std (before the floor) for tensors of steps k -> k_prev (k_prev > 0)."""
        if self.cfg.sampler == "ddpm":
            return torch.sqrt(self.post_var[k - 1])
        eta = self.cfg.ddim_eta if eta is None else eta
        abar_t, abar_p = self.abar[k - 1], self._abar_at(k_prev)
        return eta * torch.sqrt((1 - abar_p) / (1 - abar_t) * (1 - abar_t / abar_p))

    def transition_stds(self, floor: Optional[float] = None) -> torch.Tensor:
        """(S-1,) floored std of each intermediate step (floor: default the sampling floor,
        ``sigma_min``, exactly as ``_step`` draws it; DPPO scores with its own floor).

        It depends on the schedule only, so a step's log-prob needs no denoiser call for
        it. The last step has none here: its Gaussian is the policy's final one.
        """
        floor = self.cfg.sigma_min if floor is None else floor
        return self._sigma_at(self.step_k[:-1], self.step_k_prev[:-1]).clamp(min=floor)

    def step_means(self, cond: torch.Tensor, states: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Mean of sampler steps first..S-1 given stored chain states, (B, S - first, D).

        states: (B, S+1, D), x_K first, then the state after each step. Each step's mean
        depends on theta only through its own denoiser call on a *stored* input, so the
        S - first calls run as one batch of B * (S - first), with grad, through the same
        ``_x0``/``_mean`` as the chain; the last step's mean is its x0_hat, i.e. m_theta.
        """
        B, n = states.shape[0], self.num_steps - first
        x = states[:, first : self.num_steps].reshape(B * n, -1)  # row b * n + j: step first + j of draw b
        k, k_prev = self.step_k[first:], self.step_k_prev[first:]
        step_terms, cond_term = self.denoiser.prepare(k, cond)
        pred = self.denoiser.step(x, torch.cat([step_terms] * B), cond_term.repeat_interleave(n, dim=0))
        k, k_prev = k.repeat(B), k_prev.repeat(B)
        return self._mean(x, self._x0(pred, x, k), k, k_prev, self.cfg.ddim_eta).view(B, n, -1)
