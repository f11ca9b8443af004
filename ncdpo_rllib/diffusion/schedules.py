"""Noise schedules: beta_1..beta_K and the quantities derived from them.

Index convention: tensors are indexed by the denoising step k = 1..K at position k-1;
``abar_prev[k-1]`` is abar_{k-1}, with abar_0 = 1 (a clean action).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def linear_betas(num_steps: int, beta_min: float, beta_max: float) -> torch.Tensor:
    """DDPM's linear schedule from beta_min (step 1) to beta_max (step K)."""
    if num_steps == 1:
        return torch.tensor([beta_max], dtype=torch.float64)
    return torch.linspace(beta_min, beta_max, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, max_beta: float = 0.999, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule; betas clipped at ``max_beta``.

    With few steps the last beta hits the clip, making abar_K tiny and 1/sqrt(abar_K)
    huge for epsilon-prediction: prefer a lower ``max_beta`` or the linear schedule.
    """
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    betas = 1 - abar[1:] / abar[:-1]
    return betas.clamp(max=max_beta)


@dataclass(frozen=True)
class NoiseSchedule:
    """Precomputed DDPM coefficients (float64 for accuracy, cast on use)."""

    betas: torch.Tensor  # (K,)

    @classmethod
    def make(
        cls, kind: str, num_steps: int, beta_min: float, beta_max: float, cosine_beta_clip: float = 0.999
    ) -> "NoiseSchedule":
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if kind == "linear":
            return cls(linear_betas(num_steps, beta_min, beta_max))
        if kind == "cosine":
            return cls(cosine_betas(num_steps, max_beta=cosine_beta_clip))
        raise ValueError(f"unknown schedule {kind!r}: expected 'linear' or 'cosine'")

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def abar(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)

    @property
    def abar_prev(self) -> torch.Tensor:
        return torch.cat([torch.ones(1, dtype=self.betas.dtype), self.abar[:-1]])

    @property
    def posterior_variance(self) -> torch.Tensor:
        """beta_k (1 - abar_{k-1}) / (1 - abar_k): zero at k = 1."""
        return self.betas * (1 - self.abar_prev) / (1 - self.abar)

    @property
    def posterior_mean_coefs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_x0, c_xk) with mean(x_{k-1} | x_k, x0) = c_x0 * x0 + c_xk * x_k."""
        c_x0 = self.betas * torch.sqrt(self.abar_prev) / (1 - self.abar)
        c_xk = (1 - self.abar_prev) * torch.sqrt(self.alphas) / (1 - self.abar)
        return c_x0, c_xk
