"""A two-agent parallel env in which ``b`` leaves after 2 steps (``tests.pz_leaving``).

Observations are [agent index, step]; ``a`` goes on until step 5. Real PettingZoo API."""

import gymnasium as gym
import numpy as np
from pettingzoo import ParallelEnv


class LeavingEnv(ParallelEnv):
    metadata = {"name": "leaving_v0"}

    def __init__(self):
        self.possible_agents = ["a", "b"]
        self._obs = gym.spaces.Box(-10, 10, (2,), np.float32)

    def observation_space(self, agent):
        return self._obs

    def action_space(self, agent):
        return gym.spaces.Discrete(2)

    def _observe(self):
        return {ag: np.array([self.possible_agents.index(ag), self.t], np.float32) for ag in self.agents}

    def reset(self, seed=None, options=None):
        self.agents, self.t = list(self.possible_agents), 0
        return self._observe(), {ag: {} for ag in self.agents}

    def step(self, actions):
        self.t += 1
        rewards = {ag: 1.0 for ag in self.agents}
        done = {ag: (ag == "b" and self.t >= 2) or self.t >= 5 for ag in self.agents}
        obs = self._observe()
        trunc = {ag: False for ag in self.agents}
        infos = {ag: {} for ag in self.agents}
        self.agents = [ag for ag in self.agents if not done[ag]]
        return obs, rewards, done, trunc, infos


def parallel_env(**kwargs):
    return LeavingEnv(**kwargs)
