"""The denoiser f_theta(x_k, k, c): an MLP (optionally residual) with a step embedding."""

from __future__ import annotations

import math

import torch
from torch import nn


def mish_sigmoid_form(x: torch.Tensor) -> torch.Tensor:
    """x tanh(softplus(x)) written with one sigmoid: with e = exp(x), tanh(log(1 + e)) = ((1+e)^2 - 1)
    / ((1+e)^2 + 1), and 1 + e = 1 / (1 - s) for s = sigmoid(x), so it is s (2 - s) / (1 + (1 - s)^2):
    no cancellation and no overflow at either end."""
    s = torch.sigmoid(x)
    return x * (s * (2 - s) / (1 + (1 - s) ** 2))


def mish(x: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.mish`` eagerly; inside ``torch.compile`` (``diffusion.compile``)
    ``mish_sigmoid_form``, which the compiler fuses with the rest of the step. Torch's own
    decomposition goes through exp, log1p and tanh: a compiled K=10 chain's forward and backward at
    minibatch 128 took 1.8x as long with it here. Eagerly the formula's several ops lose to torch's
    one kernel."""
    if torch.compiler.is_compiling():
        return mish_sigmoid_form(x)
    return nn.functional.mish(x)


class Mish(nn.Module):
    """``nn.Mish`` through ``mish`` (same function, no parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x)


ACTIVATIONS = {"mish": Mish, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class SinusoidalStepEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of the integer step k, then a small MLP."""

    def __init__(self, dim: int, activation: str = "mish"):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), ACTIVATIONS[activation](), nn.Linear(dim * 2, dim))
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)  # not in the state: a function of dim

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        args = k.float()[:, None] * self.freqs[None, :]
        emb = torch.cat([args.sin(), args.cos()], dim=-1)
        if self.dim % 2:
            emb = torch.nn.functional.pad(emb, (0, 1))
        return self.mlp(emb)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, activation: str):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, width), ACTIVATIONS[activation](), nn.Linear(width, width), ACTIVATIONS[activation]()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class Denoiser(nn.Module):
    """f_theta(x_k, k, c): ``forward(x (B, D), k (B,), cond (B, C))`` predicts x0 or epsilon.

    A chain runs ``prepare(k (S,), cond)`` once and ``step(x, step_terms[i], cond_term)`` per
    step; by default these call ``forward``. A denoiser overrides them to compute what does not
    depend on x (the step embedding, the cond's share of the first layer) once per chain."""

    def prepare(self, k: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, cond

    def step(self, x: torch.Tensor, step_term: torch.Tensor, cond_term: torch.Tensor) -> torch.Tensor:
        return self(x, step_term.expand(x.shape[0]), cond_term)


class DenoiserMLP(Denoiser):
    """Predicts x0 or epsilon from (x_k, embed(k), cond).

    The output layer starts near zero, so that an untrained x0-predictor outputs ~0 for
    every noise: the policy's initial mean is ~0, as RLlib's MLP policy head's is.
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        hidden: list[int],
        step_embed_dim: int = 16,
        residual: bool = False,
        activation: str = "mish",
    ):
        super().__init__()
        act = ACTIVATIONS[activation]
        self.action_dim = action_dim
        self.step_embed = SinusoidalStepEmbedding(step_embed_dim, activation)
        in_dim = action_dim + step_embed_dim + cond_dim
        layers: list[nn.Module] = []
        if residual:
            width = hidden[0]
            layers += [nn.Linear(in_dim, width), act()]
            layers += [ResidualBlock(width, activation) for _ in hidden[1:]]
            last = width
        else:
            last = in_dim
            for width in hidden:
                layers += [nn.Linear(last, width), act()]
                last = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(last, action_dim)
        nn.init.uniform_(self.out.weight, -1e-3, 1e-3)
        nn.init.zeros_(self.out.bias)

    # The first layer reads [x, embed(k), cond]; it is applied as three terms, so that a chain,
    # which sees one cond for all its steps and the same K steps for every row, computes the
    # embedding and cond terms once (``prepare``) and only the x term per step (``step``).
    def _first_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first layer's weight split by input: (W_x, W_embed, W_cond)."""
        d, e = self.action_dim, self.step_embed.dim
        w = self.body[0].weight
        return w[:, :d], w[:, d : d + e], w[:, d + e :]

    def prepare(self, k: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(step terms (N_k, H), cond term (B, H)): the first layer's embed(k) and cond parts
        (its bias included in the cond term)."""
        _, w_e, w_c = self._first_weights()
        return self.step_embed(k) @ w_e.T, torch.nn.functional.linear(cond, w_c, self.body[0].bias)

    def step(self, x: torch.Tensor, step_term: torch.Tensor, cond_term: torch.Tensor) -> torch.Tensor:
        """The prediction from x (B, D) and prepared terms (broadcastable to (B, H))."""
        h = self.body[1](x @ self._first_weights()[0].T + step_term + cond_term)
        return self.out(self.body[2:](h))

    def forward(self, x: torch.Tensor, k: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: (B, D) noisy action, k: (B,) integer steps in 1..K, cond: (B, C)."""
        return self.step(x, *self.prepare(k, cond))
