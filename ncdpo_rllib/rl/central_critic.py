"""MAPPO's centralised critic on RLlib's extension points.

RLlib's new stack has no shared-critic helper. Here it is two pieces:

- ``CentralCriticObservations``, an env-to-module connector: at every env step it rewrites
  each agent's latest observation in the episode as [own obs, global state], the global
  state being every agent's latest observation in a fixed (sorted) agent order, zeros for
  agents absent at this step (left the episode), then one alive bit per agent (so the
  critic can tell an absent agent from one at the origin). It writes into the episodes (as RLlib's
  MeanStdFilter does), so the learner's batches, GAE's value bootstrap included, see the
  same vectors the env runners saw.
- a module whose actor reads the first ``actor_obs_dim`` entries (its own observation) and
  whose critic reads all of it: ``DiffusionPolicyModule`` (``model_config["actor_obs_dim"]``)
  and, for the MLP+MAPPO baseline, ``MLPCentralCriticModule`` below.
"""

from __future__ import annotations

from typing import Any, Optional

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from ray.rllib.connectors.env_to_module.observation_preprocessor import MultiAgentObservationPreprocessor
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchCategorical, TorchDiagGaussian
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from .module import mlp


class CentralCriticObservations(MultiAgentObservationPreprocessor):
    """Multi-agent env-to-module piece: obs_i -> [obs_i, obs_a1, obs_a2, ..., alive_a1, alive_a2, ...]
    (agents sorted)."""

    def recompute_output_observation_space(self, input_observation_space, input_action_space) -> gym.Space:
        spaces = dict(input_observation_space.spaces)
        self._agents = sorted(spaces)  # ParallelPettingZooEnv's own agent order varies by process
        self._dims = {a: int(gym.spaces.flatdim(spaces[a])) for a in self._agents}
        total = sum(self._dims.values()) + len(self._agents)  # observations, then one alive bit per agent
        return gym.spaces.Dict({
            a: gym.spaces.Box(-np.inf, np.inf, (self._dims[a] + total,), np.float32) for a in self._agents
        })

    def preprocess(self, observations: dict, episode) -> dict:
        """``observations``: the raw latest observation of each agent that stepped now."""
        if not observations:
            return {}
        state = np.concatenate([
            *(np.asarray(observations[a], np.float32).reshape(-1) if a in observations
              else np.zeros(self._dims[a], np.float32) for a in self._agents),
            np.array([a in observations for a in self._agents], np.float32),
        ])
        return {a: np.concatenate([np.asarray(o, np.float32).reshape(-1), state]) for a, o in observations.items()}


class MLPCentralCriticModule(TorchRLModule, ValueFunctionAPI):
    """The MLP+MAPPO baseline's module when ``multi_agent.central_critic`` is on: RLlib's
    default PPO shape (separate actor and critic MLPs, tanh, [256, 256]; the actor outputs the
    mean and log-std, or the logits), with the actor on its own observation and the critic on
    [own, global]. model_config: ``actor_obs_dim``, ``hidden`` (list), ``critic_hidden``."""

    def setup(self):
        cfg = self.model_config or {}
        obs_dim = int(gym.spaces.flatdim(self.observation_space))
        self.actor_obs_dim = int(cfg.get("actor_obs_dim") or obs_dim)
        self.discrete = isinstance(self.action_space, gym.spaces.Discrete)
        out = int(self.action_space.n) if self.discrete else 2 * int(np.prod(self.action_space.shape))
        self.pi = mlp(self.actor_obs_dim, list(cfg.get("hidden", [256, 256])), out, "tanh")
        self.vf = mlp(obs_dim, list(cfg.get("critic_hidden", [256, 256])), 1, "tanh")
        nn.init.normal_(self.pi[-1].weight, std=0.01)  # small initial outputs: near-uniform / near-zero-mean policy
        nn.init.zeros_(self.pi[-1].bias)

    def _dist_cls(self):
        return TorchCategorical if self.discrete else TorchDiagGaussian

    get_inference_action_dist_cls = get_exploration_action_dist_cls = get_train_action_dist_cls = _dist_cls

    def _forward(self, batch: dict, **kwargs) -> dict:
        obs = batch[Columns.OBS].reshape(batch[Columns.OBS].shape[0], -1).float()
        return {Columns.ACTION_DIST_INPUTS: self.pi(obs[:, : self.actor_obs_dim])}

    def compute_values(self, batch: dict, embeddings: Optional[Any] = None) -> torch.Tensor:
        obs = batch[Columns.OBS].reshape(batch[Columns.OBS].shape[0], -1).float()
        return self.vf(obs).squeeze(-1)

