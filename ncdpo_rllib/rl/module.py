"""``DiffusionPolicyModule``: the diffusion policy as an RLlib RLModule (new API stack).

Forward passes (see ``docs/architecture.md``):

- exploration: draw all noise (B, S+1, D), run the chain WITHOUT grad, act
  a = m + sigma * z_1; return ACTIONS, ACTION_LOGP, ACTION_DIST_INPUTS and the noise
  under ``NOISE`` (RLlib stores extra model outputs in the episode; they reach the
  learner batch under the same key).
- train: re-run the chain from the stored noise WITH grad; return ACTION_DIST_INPUTS
  (mean, log_std) so that the PPO ratio is that of the noise-conditioned likelihood.
- inference (evaluation, ``explore=False``): the final-step mean m_theta, with the
  chain's noise drawn (``inference_noise: sample``, default) or zero (``zero``).

Discrete action spaces select the logit-diffusion head (``DiscreteDiffusionPolicy``): the
chain denoises a logit vector, ACTION_DIST_INPUTS are the logits (``TorchCategorical``),
the stored noise is (S, n) and inference takes the argmax.

Pixel observations (``model_config["pixels"]``, see ``ncdpo_rllib.rl.encoders``): the actor's
chain and the critic each get their own ``ObservationEncoder`` (CNN or small ViT); the
actor's sits inside ``actor`` (so behaviour cloning, the EMA, the reference copy and the PPO
update all include it), and the train forward backpropagates through the chain into it.

The critic V(s) is a separate MLP, not conditioned on the noise. With a centralised critic
(``model_config["actor_obs_dim"]`` = d) the observation is [own obs (d), global state] as
``CentralCriticObservations`` builds it: the actor reads the first d entries, the critic all.

State beyond the networks: ``obs_shift``/``obs_scale``, the observation normaliser of a
pre-trained policy (identity unless ``ncdpo pretrain`` set it from its dataset), applied
before the actor and the critic; and, when ``model_config["reference_policy"]`` is true, a
frozen copy ``reference`` of the actor as it was initialised (or pre-trained) for the
KL-to-reference regulariser.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import fields
from typing import Any, Optional

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchCategorical, TorchDiagGaussian
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from ncdpo_rllib.diffusion import DiffusionConfig, DiffusionPolicy, DiscreteDiffusionPolicy, StepGradNorms
from ncdpo_rllib.diffusion.denoiser import ACTIVATIONS

from .defaults import DEFAULTS

NOISE = "ncdpo_noise"
"""Batch / episode column holding the pre-sampled noise, shape (S+1, action_dim) per step
((S, n) for the discrete head)."""

DIFFUSION = "diffusion"
"""The model_config key holding the ``DiffusionConfig`` (as a dict)."""


def diffusion_config_from_model_config(model_config: Optional[dict]) -> DiffusionConfig:
    """The ``DiffusionConfig`` of an RLModule ``model_config``: ``model_config["diffusion"]``. A
    module saved before the settings were nested (its DiffusionConfig fields at the top level of
    model_config) is read from those fields."""
    model_config = model_config or {}
    if DIFFUSION in model_config:
        return DiffusionConfig(**model_config[DIFFUSION])
    names = {f.name for f in fields(DiffusionConfig)}
    return DiffusionConfig(**{k: v for k, v in model_config.items() if k in names})


def mlp(in_dim: int, hidden: list[int], out_dim: int, activation: str = "mish") -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), ACTIVATIONS[activation]()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


PIXEL_KEYS = ("image_size", "frames", "use_state", "type", "feature_dim", "random_shift")


class DiffusionPolicyModule(TorchRLModule, ValueFunctionAPI):
    """model_config: ``diffusion`` (a ``DiffusionConfig`` as a dict), ``critic_hidden`` (list of ints),
    ``reference_policy`` (bool), ``actor_obs_dim`` (int or None: the centralised critic) and
    ``pixels`` (None, or a dict: image_size, frames, cameras, use_state, type, feature_dim,
    random_shift, shift_in_finetune)."""

    def setup(self):
        self.discrete = isinstance(self.action_space, gym.spaces.Discrete)
        if not self.discrete and (not isinstance(self.action_space, gym.spaces.Box) or len(self.action_space.shape) != 1):
            raise ValueError(
                f"DiffusionPolicyModule supports 1-D Box and Discrete action spaces; got {self.action_space}"
            )
        self.diffusion_config = diffusion_config_from_model_config(self.model_config)
        obs_dim = int(gym.spaces.flatdim(self.observation_space))
        self.actor_obs_dim = int((self.model_config or {}).get("actor_obs_dim") or obs_dim)
        self.pixels: Optional[dict] = (self.model_config or {}).get("pixels")
        encoder = self._encoder(self.actor_obs_dim)
        cond_dim = encoder.out_dim if encoder is not None else self.actor_obs_dim
        if self.discrete:
            self.actor = DiscreteDiffusionPolicy(self.diffusion_config, int(self.action_space.n), cond_dim, encoder)
        else:
            action_dim = int(np.prod(self.action_space.shape))
            self.actor = DiffusionPolicy(self.diffusion_config, action_dim, cond_dim, encoder)
        critic_hidden = (self.model_config or {}).get("critic_hidden", DEFAULTS.critic_hidden)
        critic_encoder = self._encoder(obs_dim)
        head = mlp(critic_encoder.out_dim if critic_encoder is not None else obs_dim, list(critic_hidden), 1,
                   self.diffusion_config.activation)
        self.critic = nn.Sequential(critic_encoder, head) if critic_encoder is not None else head
        self.register_buffer("obs_shift", torch.zeros(obs_dim))
        self.register_buffer("obs_scale", torch.ones(obs_dim))
        self.reference: Optional[DiffusionPolicy] = None
        if (self.model_config or {}).get("reference_policy"):
            self.reference = copy.deepcopy(self.actor).requires_grad_(False)
        self.step_grad_norms = StepGradNorms()

    def _encoder(self, obs_dim: int) -> Optional[nn.Module]:
        if not self.pixels:
            return None
        from .encoders import ObservationEncoder

        return ObservationEncoder(obs_dim, **{k: self.pixels[k] for k in PIXEL_KEYS},
                                  cameras=self.pixels.get("cameras", 1))  # older checkpoints: one camera

    @property
    def encoders(self) -> list[nn.Module]:
        """The image encoders (actor's, critic's; empty for state observations)."""
        if not self.pixels:
            return []
        base = [self.actor.base_encoder] if self.actor.base_encoder is not None else []
        return [self.actor.encoder, *base, self.critic[0]]

    @property
    def shift_in_update(self) -> bool:
        """Random shift in the PPO update's forwards (``encoder.shift_in_finetune``)."""
        return bool(self.pixels and self.pixels.get("shift_in_finetune"))

    @contextlib.contextmanager
    def shifting(self, on: bool = True):
        """Random-shift augmentation on in the encoders for the duration (behaviour cloning,
        and the PPO update with ``shift_in_finetune``)."""
        for enc in self.encoders:
            enc.shifting = on
        try:
            yield
        finally:
            for enc in self.encoders:
                enc.shifting = False

    # --- state: pre-trained weights, the reference copy ---------------------------------
    def set_obs_normalizer(self, shift, scale) -> None:
        """Per-entry shift/scale of the observation; pixel entries stay (0, 1): the encoder
        scales images itself."""
        shift = torch.as_tensor(shift, dtype=torch.float32).clone()
        scale = torch.as_tensor(scale, dtype=torch.float32).clamp(min=1e-6)
        if self.pixels:
            enc = self.actor.encoder
            pixel = torch.ones(enc.frames, shift.numel() // enc.frames, dtype=torch.bool)
            pixel[:, : enc.state_dim] = False
            pixel = pixel.reshape(-1)
            shift[pixel], scale[pixel] = 0.0, 1.0
        self.obs_shift.copy_(shift)
        self.obs_scale.copy_(scale)

    # Frozen copies and what fills them when a state lacks them: (copy's prefix, source's prefix).
    FROZEN_COPIES = (
        ("actor.sampler.base_denoiser.", "actor.sampler.denoiser."),  # frozen_base
        ("actor.base_encoder.", "actor.encoder."),
        ("reference.", "actor."),  # kl_to_reference
    )

    def _fill_frozen_copies(self, state: dict) -> dict:
        """A state without a frozen copy (a pre-trained or older checkpoint, a config that
        just turned it on) fills it with the weights it copies, from that same state."""
        own = self.state_dict()
        for copy_prefix, source in self.FROZEN_COPIES:
            if any(k.startswith(copy_prefix) for k in own) and not any(k.startswith(copy_prefix) for k in state):
                state = {**state, **{copy_prefix + k[len(source):]: v for k, v in state.items()
                                     if k.startswith(source) and copy_prefix + k[len(source):] in own}}
        return state

    def set_state(self, state: dict) -> None:
        """RLlib's set_state, with missing frozen copies (base, reference) filled from the state."""
        super().set_state(self._fill_frozen_copies(state))

    def load_pretrained(self, state: dict) -> None:
        """Start from a pre-trained module's state: actor, observation normaliser and the
        reference; the critic stays fresh and the final std keeps this config's init_std
        (behaviour cloning never trains it)."""
        own = self.state_dict()
        copies = tuple(prefix for prefix, _ in self.FROZEN_COPIES)
        keep = {"actor.log_std"} | {k for k in own if k.startswith("critic.")}
        merged = {k: v for k, v in state.items() if k in own and k not in keep and not k.startswith(copies)}
        missing = [k for k in own if k not in merged and k not in keep and not k.startswith(copies)]
        if missing:
            raise ValueError(f"the pre-trained state lacks {missing[:3]}")
        new = {**own, **{k: torch.as_tensor(v) for k, v in merged.items()}}
        self.set_state({k: v for k, v in new.items() if not k.startswith(copies)})

    # --- distributions: the final step is a diagonal Gaussian (or a categorical) -------
    def _dist_cls(self):
        return TorchCategorical if self.discrete else TorchDiagGaussian

    def get_inference_action_dist_cls(self):
        return self._dist_cls()

    def get_exploration_action_dist_cls(self):
        return self._dist_cls()

    def get_train_action_dist_cls(self):
        return self._dist_cls()

    # --- forwards ---------------------------------------------------------------------
    def _obs(self, batch: dict) -> torch.Tensor:
        obs = batch[Columns.OBS].reshape(batch[Columns.OBS].shape[0], -1).float()
        return (obs - self.obs_shift) / self.obs_scale

    def _cond(self, batch: dict) -> torch.Tensor:
        """The actor's input: the (normalised) own observation."""
        return self._obs(batch)[:, : self.actor_obs_dim]

    def _dist_inputs(self, cond: torch.Tensor, noise: torch.Tensor, actor: Optional[nn.Module] = None,
                     **chain_kwargs) -> torch.Tensor:
        """ACTION_DIST_INPUTS from stored noise: [mean, log_std], or the logits (of ``actor``, default
        the policy's own)."""
        out = (self.actor if actor is None else actor)(cond, noise, **chain_kwargs)
        return out if self.discrete else torch.cat(out, dim=-1)

    def _forward_exploration(self, batch: dict, **kwargs) -> dict:
        with torch.inference_mode():
            cond = self._cond(batch)
            noise = self.actor.sample_noise(cond.shape[0])
            if self.discrete:
                action, logp, dist_inputs = self.actor.act(cond, noise)
            else:
                action, logp, mean, log_std = self.actor.act(cond, noise)
                dist_inputs = torch.cat([mean, log_std], dim=-1)
        return {
            Columns.ACTIONS: action,
            Columns.ACTION_LOGP: logp,
            Columns.ACTION_DIST_INPUTS: dist_inputs,
            NOISE: noise,
        }

    def _forward_inference(self, batch: dict, **kwargs) -> dict:
        with torch.inference_mode():
            cond = self._cond(batch)
            noise = self.actor.sample_noise(cond.shape[0])
            if self.diffusion_config.inference_noise == "zero":
                noise = torch.zeros_like(noise)
            return {Columns.ACTION_DIST_INPUTS: self._dist_inputs(cond, noise, evaluation=True)}

    def _forward_train(self, batch: dict, **kwargs) -> dict:
        # A fresh probe per pass: the learner reads per-step gradient norms after backward.
        self.step_grad_norms = StepGradNorms()
        with self.shifting(self.shift_in_update):
            return {Columns.ACTION_DIST_INPUTS: self._dist_inputs(self._cond(batch), batch[NOISE],
                                                                  grad_probe=self.step_grad_norms)}

    def compute_values(self, batch: dict, embeddings: Optional[Any] = None) -> torch.Tensor:
        return self.critic(self._obs(batch)).squeeze(-1)

    def values_for_update(self, batch: dict) -> torch.Tensor:
        """V(s) in the PPO update's value loss: shifted frames with ``shift_in_finetune``
        (GAE's value pass, ``compute_values``, never shifts)."""
        with self.shifting(self.shift_in_update):
            return self.compute_values(batch)

    # --- parameter groups (separate optimizers in the learner) ------------------------
    def actor_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.actor.parameters() if p.requires_grad]

    def critic_parameters(self) -> list[nn.Parameter]:
        return list(self.critic.parameters())

    @property
    def num_sampler_steps(self) -> int:
        return self.actor.sampler.num_steps
