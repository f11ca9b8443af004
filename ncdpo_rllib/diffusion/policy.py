"""The noise-conditioned policies: pi_theta(a | s, zeta) = N(m_theta(s, zeta), sigma^2 I) for
continuous actions, Categorical(softmax(y_theta(s, zeta))) for discrete ones.

Pure torch: the RLlib module in ``ncdpo_rllib.rl`` wraps this, nothing here knows RLlib.
Actions are in normalised units ([-1, 1] is the env's range after RLlib's unsquashing).
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
from torch import nn

from .config import DiffusionConfig
from .denoiser import DenoiserMLP
from .sampler import Chain, NoiseConditionedSampler

LOG_STD_BOUNDS = (-5.0, 2.0)


class _DenoisingChain(nn.Module):
    """What both heads share: the denoiser, the noise-conditioned sampler, the noise draw,
    and an optional observation ``encoder`` (e.g. a CNN for pixels) applied to ``cond`` by
    every public method, so that behaviour cloning and the PPO update train it through the
    chain (``cond_dim`` is then its output width)."""

    def __init__(self, cfg: DiffusionConfig, action_dim: int, cond_dim: int, encoder: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        self.action_dim = action_dim
        self.encoder = encoder if encoder is not None else nn.Identity()
        denoiser = DenoiserMLP(
            action_dim, cond_dim, cfg.hidden, cfg.step_embed_dim, cfg.residual, cfg.activation
        )
        self.sampler = NoiseConditionedSampler(cfg, denoiser)
        # ``frozen_base``: the early steps see a frozen copy of the encoder's features too.
        self.base_encoder = copy.deepcopy(self.encoder).requires_grad_(False) if cfg.frozen_base else None

    @property
    def noise_shape(self) -> tuple[int, int]:
        return self.sampler.noise_shape(self.action_dim)

    def sample_noise(self, batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return torch.randn((batch, *self.noise_shape), generator=generator, device=self.sampler.abar.device)

    def encode(self, cond: torch.Tensor) -> torch.Tensor:
        """What the denoiser is conditioned on: the encoder's features (identity for state)."""
        return self.encoder(cond)

    def run(self, cond: torch.Tensor, noise: torch.Tensor, *, evaluation: bool = False, **chain_kwargs) -> Chain:
        """The sampler on the encoded observation (and the frozen base's, with ``frozen_base``);
        ``evaluation``: the evaluation std floor and DDIM eta (``eval_sigma_min``, ``eval_ddim_eta``)."""
        if self.base_encoder is not None and self.sampler.first_finetuned_step > 0:
            with torch.no_grad():
                chain_kwargs["base_cond"] = self.base_encoder(cond)
        if evaluation:
            chain_kwargs.setdefault("floor", self.cfg.eval_sigma_min)
            chain_kwargs.setdefault("eta", self.cfg.eval_ddim_eta)
        return self.sampler(self.encode(cond), noise, **chain_kwargs)

    def chain(self, cond: torch.Tensor, noise: torch.Tensor, **chain_kwargs) -> Chain:
        return self.run(cond, noise, keep_chain=True, **chain_kwargs)


class DiffusionPolicy(_DenoisingChain):
    def __init__(self, cfg: DiffusionConfig, action_dim: int, cond_dim: int, encoder: Optional[nn.Module] = None):
        super().__init__(cfg, action_dim, cond_dim, encoder)
        log_std = torch.full((action_dim,), math.log(cfg.init_std))
        if cfg.std == "learned":
            self.log_std = nn.Parameter(log_std)
        else:
            self.register_buffer("log_std", log_std)

    def final_log_std(self, batch: int) -> torch.Tensor:
        return self.log_std.clamp(*LOG_STD_BOUNDS).expand(batch, -1)

    def forward(self, cond: torch.Tensor, noise: torch.Tensor, **chain_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log_std) of the final step, each (B, D), from stored noise."""
        mean = self.run(cond, noise, **chain_kwargs).mean
        return mean, self.final_log_std(mean.shape[0])

    def act(self, cond: torch.Tensor, noise: torch.Tensor):
        """Exploration: a = m + sigma * z_1 with z_1 = noise[:, -1]; returns (a, logp, mean, log_std)."""
        mean, log_std = self(cond, noise)
        action = mean + log_std.exp() * noise[:, -1]
        return action, gaussian_log_prob(action, mean, log_std), mean, log_std

    @torch.no_grad()
    def mean_spread(self, cond: torch.Tensor, num_noises: int = 64) -> torch.Tensor:
        """Std of the final mean across noise draws, per state, averaged over action dims.

        The diagnostic for epsilon-prediction from scratch: there the mean is mostly the
        amplified starting noise (spread ~1), which PPO never shrinks (NCDPO.md, section 3).
        """
        B = cond.shape[0]
        reps = cond.repeat_interleave(num_noises, dim=0)
        mean, _ = self(reps, self.sample_noise(B * num_noises))
        return mean.view(B, num_noises, -1).std(dim=1).mean(dim=-1)

    def bc_loss(self, cond: torch.Tensor, actions: torch.Tensor, generator: Optional[torch.Generator] = None):
        """DDPM behaviour-cloning loss, target consistent with ``cfg.prediction``."""
        sampler = self.sampler
        B = actions.shape[0]
        k = torch.randint(1, self.cfg.denoising_steps + 1, (B,), generator=generator, device=actions.device)
        eps = torch.randn(actions.shape, generator=generator, device=actions.device)
        abar = sampler.abar[k - 1][:, None]
        x_k = torch.sqrt(abar) * actions + torch.sqrt(1 - abar) * eps
        target = actions if self.cfg.prediction == "x0" else eps
        return ((sampler.denoiser(x_k, k, self.encode(cond)) - target) ** 2).mean()


class DiscreteDiffusionPolicy(_DenoisingChain):
    """Logit diffusion for n discrete actions (NCDPO.md, section 3).

    The chain denoises a logit vector y in R^n; given zeta (every noise the chain reads,
    shape (S, n)) y is a deterministic, differentiable function of (s, zeta, theta), and
    a ~ Categorical(softmax(y)), so log pi(a | s, zeta) = log_softmax(y)[a] exactly. There
    is no final-step Gaussian (no ``log_std``); ``x0_clip`` bounds the logits if set.
    """

    def __init__(self, cfg: DiffusionConfig, num_actions: int, cond_dim: int, encoder: Optional[nn.Module] = None):
        super().__init__(cfg, num_actions, cond_dim, encoder)

    @property
    def noise_shape(self) -> tuple[int, int]:
        return (self.sampler.num_steps, self.action_dim)  # no final-step noise: the draw is categorical

    def forward(self, cond: torch.Tensor, noise: torch.Tensor, **chain_kwargs) -> torch.Tensor:
        """Logits (B, n) from stored noise."""
        return self.run(cond, noise, **chain_kwargs).mean

    def act(self, cond: torch.Tensor, noise: torch.Tensor, generator: Optional[torch.Generator] = None):
        """Exploration: a ~ Categorical(softmax(y)); returns (a, logp, logits)."""
        logits = self(cond, noise)
        action = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
        return action, categorical_log_prob(action, logits), logits

    def bc_loss(self, cond, actions, generator=None):
        raise NotImplementedError("behaviour cloning of a discrete (logit) diffusion policy is not supported")


def categorical_log_prob(action: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[a]: the closed form."""
    return torch.log_softmax(logits, -1).gather(-1, action.long().unsqueeze(-1)).squeeze(-1)


def gaussian_log_prob_elements(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Per-element log N(x; mean, exp(log_std)^2), same shape as x: the closed form."""
    z = (x - mean) * torch.exp(-log_std)
    return -0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim of log N(x; mean, exp(log_std)^2)."""
    return gaussian_log_prob_elements(x, mean, log_std).sum(-1)


def reduce_log_prob(elements: torch.Tensor, reduction: str = "sum", clamp: Optional[Sequence[float]] = None):
    """Per-element log-probs (..., D) -> (...): optionally clamped element-wise (DPPO's [-5, 2]),
    then summed (the likelihood of the whole action chunk) or averaged over the D = chunk x
    action dims (DPPO's convention: a log-ratio and KL per action dimension)."""
    if clamp is not None:
        elements = elements.clamp(*clamp)
    return elements.mean(-1) if reduction == "mean" else elements.sum(-1)
