"""Gymnasium wrappers for the policy's view of a task: action chunks and observation history.

DPPO / diffusion-policy style action chunking: the policy emits Ta actions at once
(a flat vector of Ta x action_dim), the env executes them one after another and the
rewards are summed; an episode that ends inside a chunk ends the chunk there. The
observation is the last To env-step observations, concatenated (oldest first), the first
one repeated at the start of an episode. ``ncdpo_rllib.data.make_windows`` builds the
behaviour-cloning pairs with exactly the same conventions.
"""

from __future__ import annotations

from collections import deque

import gymnasium as gym
import numpy as np

CHUNK_STEPS = "chunk_steps"
"""info key: how many base-env steps the last chunk executed (<= Ta)."""


class ActionChunkObsHistory(gym.Wrapper):
    def __init__(self, env: gym.Env, action_chunk: int = 1, obs_history: int = 1):
        super().__init__(env)
        if action_chunk < 1 or obs_history < 1:
            raise ValueError("action_chunk and obs_history must be >= 1")
        act, obs = env.action_space, env.observation_space
        if not (isinstance(act, gym.spaces.Box) and isinstance(obs, gym.spaces.Box)):
            raise ValueError("action chunking needs Box observation and action spaces")
        self.action_chunk, self.obs_history = action_chunk, obs_history
        self._act_dim = int(np.prod(act.shape))
        self.action_space = gym.spaces.Box(
            np.tile(act.low.ravel(), action_chunk), np.tile(act.high.ravel(), action_chunk), dtype=act.dtype
        )
        self.observation_space = gym.spaces.Box(
            np.tile(obs.low.ravel(), obs_history), np.tile(obs.high.ravel(), obs_history), dtype=obs.dtype
        )
        self._history: deque = deque(maxlen=obs_history)

    def _obs(self) -> np.ndarray:
        return np.concatenate([o.ravel() for o in self._history]).astype(self.observation_space.dtype)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._history.extend([obs] * self.obs_history)
        return self._obs(), info

    def step(self, action):
        chunk = np.asarray(action).reshape(self.action_chunk, self._act_dim)
        total, terminated, truncated, info, success = 0.0, False, False, {}, 0.0
        for j, a in enumerate(chunk):
            obs, reward, terminated, truncated, info = self.env.step(a.reshape(self.env.action_space.shape))
            self._history.append(obs)  # per env step: the last To observations, as make_windows
            total += float(reward)
            success = max(success, float(info.get("success", 0.0)))
            if terminated or truncated:
                break
        info = {**info, CHUNK_STEPS: j + 1}
        if "success" in info:  # Meta-World: set if any step of the chunk succeeded
            info["success"] = success
        return self._obs(), total, terminated, truncated, info
