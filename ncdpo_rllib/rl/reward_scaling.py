"""Running reward scaling (``ppo.reward_scale_running``): a learner connector piece.

As DPPO's reference (after PPG's / baselines' reward normaliser) does: each reward is divided
by the running standard deviation of the discounted return ret_t = gamma * ret_{t-1} + r_t
(the mean is not subtracted) and clipped to +-``clip``. The piece sits right before RLlib's
GAE connector, so value targets and advantages are computed on the scaled rewards; the
episodes (and the returns RLlib reports) keep the env's own rewards.

The running statistics live in the learner (one set per module, updated on every batch, the
artificial bootstrap row PPO appends to each episode chunk excluded); an episode cut across
two iterations carries its discounted return into the next chunk. They are not part of the
checkpoint: a resumed run starts them afresh (one batch re-estimates them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns


class RunningStat:
    """Running mean/variance of a stream of scalars (Chan et al.'s parallel update)."""

    def __init__(self, epsilon: float = 1e-4):
        self.count, self.mean, self.var = epsilon, 0.0, 1.0

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        n, mean, var = x.size, float(x.mean()), float(x.var())
        delta, total = mean - self.mean, self.count + n
        m2 = self.var * self.count + var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total


class RunningRewardScaling(ConnectorV2):
    def __init__(self, input_observation_space=None, input_action_space=None, *, gamma: float,
                 clip: float = 10.0, epsilon: float = 1e-8, **kwargs):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.gamma, self.clip, self.epsilon = gamma, clip, epsilon
        self.stats: dict[Any, RunningStat] = {}
        self._carry: dict[Any, float] = {}  # (episode id, agent id) -> return at the chunk's end

    def __call__(self, *, rl_module, episodes, batch, **kwargs):
        sa_episodes = list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False))
        carry = {}
        for module_id, module_batch in batch.items():
            if Columns.REWARDS not in module_batch:
                continue
            rewards_t = module_batch[Columns.REWARDS]
            rewards = rewards_t.detach().cpu().numpy() if torch.is_tensor(rewards_t) else np.asarray(rewards_t)
            chunks = [e for e in sa_episodes if e.module_id in (None, module_id)]
            lens = [len(e) for e in chunks]
            if sum(lens) != rewards.shape[0]:  # padded (recurrent) batches: not supported
                raise ValueError("reward_scale_running: the batch's rewards do not line up with its episodes")
            returns, offset = [], 0
            for episode, n in zip(chunks, lens):
                key = (episode.id_, getattr(episode, "agent_id", None))
                ret = self._carry.get(key, 0.0) if episode.t_started > 0 else 0.0
                out = np.empty(n)
                for t in range(n):
                    ret = self.gamma * ret + float(rewards[offset + t])
                    out[t] = ret
                offset += n
                returns.append(out[:-1])  # the last row is PPO's artificial bootstrap step
                if not episode.is_done and n >= 2:
                    carry[key] = float(out[-2])
            stat = self.stats.setdefault(module_id, RunningStat())
            stat.update(np.concatenate(returns) if returns else np.zeros(0))
            scaled = np.clip(rewards / np.sqrt(stat.var + self.epsilon), -self.clip, self.clip)
            module_batch[Columns.REWARDS] = (
                torch.as_tensor(scaled, dtype=rewards_t.dtype, device=rewards_t.device)
                if torch.is_tensor(rewards_t) else scaled.astype(rewards.dtype)
            )
        self._carry = carry
        return batch
