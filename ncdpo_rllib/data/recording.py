"""Record demonstrations from inside any env: one shard file per finished episode.

The wrapper sits on the env itself (inside whatever RLlib builds around it), so it sees the raw
observation before any connector and the action the env actually received, in the env's units.
Many env-runner processes can record into one directory: every shard is written atomically under
a unique name, and `read_shards` merges them in the order they were written.
"""

from __future__ import annotations

import os
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np

from ncdpo_rllib.errors import DatasetError, one_line

from .datasets import Episode, check_episode

SHARD_PREFIX = "episode-"
SHARD_KEYS = ("observations", "actions", "rewards", "terminated", "truncated", "written_at")


def _flat(x: Any) -> np.ndarray:
    """A float32 1-D copy: later in-place edits by the caller must not change what was recorded."""
    return np.array(x, dtype=np.float32).reshape(-1)


class RecordingWrapper(gym.Wrapper):
    """Records (obs, action, reward, terminated, truncated) and writes each finished episode to `out_dir`.

    Shards are ``episode-<time_ns>-<pid>-<counter>-<uuid8>.npz`` with arrays observations (T+1, obs_dim),
    actions (T, act_dim), rewards (T,), terminated, truncated and written_at (Unix time, float64).
    An episode cut short (reset or close before it terminated or was truncated) is discarded.
    Wrap the env as ``gymnasium.make`` returns it, so TimeLimit truncations are recorded.
    """

    def __init__(self, env: gym.Env, out_dir: str | os.PathLike):
        super().__init__(env)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.last_shard: Path | None = None
        self._counter = 0
        self._obs: list[np.ndarray] = []
        self._actions: list[np.ndarray] = []
        self._rewards: list[float] = []

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        obs, info = self.env.reset(seed=seed, options=options)
        self._clear()
        self._obs.append(_flat(obs))
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self._obs:  # stepping without a reset is the env's problem, not ours to record
            self._actions.append(_flat(action))
            self._rewards.append(float(reward))
            self._obs.append(_flat(obs))
            if terminated or truncated:
                self.last_shard = self._write(bool(terminated), bool(truncated))
                self._clear()
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        self._clear()
        super().close()

    def _clear(self) -> None:
        self._obs, self._actions, self._rewards = [], [], []

    def _write(self, terminated: bool, truncated: bool) -> Path:
        """Write the episode to a hidden tmp file, flush it, then os.replace it to its final name."""
        written_at = time.time()
        self._counter += 1
        name = f"{SHARD_PREFIX}{time.time_ns():020d}-{os.getpid()}-{self._counter:06d}-{uuid.uuid4().hex[:8]}.npz"
        final, tmp = self.out_dir / name, self.out_dir / f".{name}.tmp"
        try:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    observations=np.stack(self._obs),
                    actions=np.stack(self._actions),
                    rewards=np.asarray(self._rewards, dtype=np.float32),
                    terminated=np.bool_(terminated),
                    truncated=np.bool_(truncated),
                    written_at=np.float64(written_at),
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final


def _read_shard(path: Path) -> tuple[float, Episode]:
    fix = "delete the shard (it was not written by RecordingWrapper, or the disk corrupted it)"
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in SHARD_KEYS if k not in f.files]
            if missing:
                raise DatasetError(f"{path}: missing key '{missing[0]}' in episode shard; {fix}")
            arrays = {k: f[k] for k in SHARD_KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: unreadable episode shard ({one_line(e)}); {fix}") from None
    episode = Episode(arrays["observations"], arrays["actions"], arrays["rewards"],
                      bool(arrays["terminated"]), bool(arrays["truncated"]))
    check_episode(episode, str(path), fix)
    return float(arrays["written_at"]), episode


def read_shards(out_dir: str | os.PathLike, until_time: float | None = None) -> list[Episode]:
    """Episodes recorded in `out_dir`, oldest first; with `until_time`, only those written at or before it.

    written_at is taken just before a shard is written, so a shard can appear a moment after its
    time: to cut at "now" from another process, pass a time slightly in the past.
    """
    root = Path(out_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such recording directory; check the path (RecordingWrapper's out_dir)")
    shards = [(t, path.name, ep) for path in root.glob(f"{SHARD_PREFIX}*.npz")
              for t, ep in [_read_shard(path)] if until_time is None or t <= until_time]
    shards.sort(key=lambda s: (s[0], s[1]))
    return [ep for _, _, ep in shards]
