"""Tiny PettingZoo envs for the error-path tests (importable as ``tests.pz_fixtures``)."""

import gymnasium as gym
import numpy as np
from pettingzoo import AECEnv


class DictObsAEC(AECEnv):
    """A parallelizable AEC env whose observations are a Dict: not supported by the policies."""

    metadata = {"name": "dict_obs_aec_v0", "is_parallelizable": True}

    def __init__(self):
        super().__init__()
        self.possible_agents = ["a_0", "a_1"]
        self._obs = gym.spaces.Dict({"pos": gym.spaces.Box(-1, 1, (2,), np.float32)})

    def observation_space(self, agent):
        return self._obs

    def action_space(self, agent):
        return gym.spaces.Discrete(2)


def env(**kwargs):
    return DictObsAEC(**kwargs)

