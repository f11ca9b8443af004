"""Demonstration datasets in memory: plain numpy ``Episode`` arrays (all behaviour cloning needs), their
checks, the (observation window, action chunk) pairs and a summary. On disk a dataset is a Minari
directory (``minari_store.py``); D4RL-layout files come in through ``d4rl.py``. Every problem with a
file a user gave us is a one-line ``DatasetError`` naming the file, the problem and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ncdpo_rllib.errors import DatasetError


EPISODE_KEYS = ("observations", "actions", "rewards", "terminations", "truncations")
D4RL_SUFFIXES = (".hdf5", ".h5", ".npz")
"""The file types ``ncdpo dataset import`` reads (D4RL layout)."""


@dataclass(eq=False)  # == on numpy fields would be ambiguous; compare arrays explicitly
class Episode:
    """One episode: T steps, T+1 observations (the last is the one after the final step, as in Minari)."""

    observations: np.ndarray  # float32 (T+1, obs_dim)
    actions: np.ndarray  # float32 (T, act_dim), in the env's own action units
    rewards: np.ndarray  # float32 (T,)
    terminated: bool = False
    truncated: bool = False

    def __post_init__(self) -> None:
        self.observations = np.asarray(self.observations, dtype=np.float32)
        self.actions = np.asarray(self.actions, dtype=np.float32)
        self.rewards = np.asarray(self.rewards, dtype=np.float32)
        self.terminated = bool(self.terminated)
        self.truncated = bool(self.truncated)

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def ret(self) -> float:
        """Undiscounted return, summed in float64 so long episodes do not lose precision."""
        return float(np.sum(self.rewards, dtype=np.float64))


@dataclass(eq=False)
class Dataset:
    """A demonstration dataset: the env it was collected on, its episodes and free-form metadata."""

    env_id: str
    episodes: list[Episode]
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_steps(self) -> int:
        return sum(len(ep) for ep in self.episodes)

    @property
    def returns(self) -> np.ndarray:
        return np.array([ep.ret for ep in self.episodes], dtype=np.float64)

    @property
    def obs_dim(self) -> int:
        return int(self._first().observations.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self._first().actions.shape[1])

    def _first(self) -> Episode:
        if not self.episodes:
            raise ValueError("the dataset has no episodes, so it has no obs_dim/action_dim")
        return self.episodes[0]


def numeric_array(arr: Any, what: str, where: str, fix: str) -> np.ndarray:
    """The array, if it holds numbers (bool/int/float); strings and objects cannot be demonstrations."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise DatasetError(f"{where}: {what} has dtype {arr.dtype}, expected numbers; {fix}")
    return arr


def check_episode(ep: Episode, where: str, fix: str) -> None:
    """Shapes must line up (T+1 observations, T actions and rewards) and every value be finite."""
    obs, act, rew = ep.observations, ep.actions, ep.rewards
    for name, arr, want in (("observations", obs, "(T+1, obs_dim)"), ("actions", act, "(T, act_dim)")):
        if arr.ndim != 2:
            raise DatasetError(f"{where}: {name} have shape {arr.shape}, expected 2-D {want}; {fix}")
    if rew.ndim != 1:
        raise DatasetError(f"{where}: rewards have shape {rew.shape}, expected 1-D (T,); {fix}")
    steps = len(act)
    if steps == 0:
        raise DatasetError(f"{where}: the episode has no steps (no actions); {fix}")
    if len(obs) != steps + 1 or len(rew) != steps:
        raise DatasetError(
            f"{where}: length mismatch: {len(obs)} observations, {steps} actions, {len(rew)} rewards "
            f"(need T+1, T, T); {fix}"
        )
    for name, arr in (("observations", obs), ("actions", act), ("rewards", rew)):
        if not np.isfinite(arr).all():
            raise DatasetError(f"{where}: {name} contain non-finite values (NaN/inf); {fix}")


def check_episodes(episodes: Sequence[Episode], where: str, fix: str) -> None:
    """Every episode valid, and all of them with the same obs/action dims (no ragged data)."""
    if not episodes:
        raise DatasetError(f"{where}: the dataset has no episodes; {fix}")
    dims = None
    for i, ep in enumerate(episodes):
        check_episode(ep, f"{where}: episode {i}", fix)
        ep_dims = (ep.observations.shape[1], ep.actions.shape[1])
        if dims is not None and ep_dims != dims:
            raise DatasetError(
                f"{where}: episode {i} has (obs_dim, act_dim) = {ep_dims} but episode 0 has {dims} "
                f"(ragged dims); {fix}"
            )
        dims = ep_dims


def episode_from_arrays(arrays: Mapping[str, Any], where: str, fix: str) -> Episode:
    """Build an Episode from Minari's per-episode arrays, checking dtypes before converting."""
    obs = numeric_array(arrays["observations"], "observations", where, fix)
    act = numeric_array(arrays["actions"], "actions", where, fix)
    rew = numeric_array(arrays["rewards"], "rewards", where, fix)
    term = numeric_array(arrays["terminations"], "terminations", where, fix).reshape(-1)
    trunc = numeric_array(arrays["truncations"], "truncations", where, fix).reshape(-1)
    return Episode(obs, act, rew, bool(term[-1]) if term.size else False, bool(trunc[-1]) if trunc.size else False)


def make_windows(
    dataset: Dataset | Sequence[Episode], obs_history: int, action_chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Behaviour-cloning pairs with action chunking, one per step of every episode.

    cond[t] = observations[t-To+1 .. t] flattened (indices before 0 repeat observations[0]);
    target[t] = actions[t .. t+Ta-1] flattened (indices past the end repeat the last action),
    the DPPO / diffusion-policy convention, so every step contributes a full-size sample.
    Returns float32 arrays (N, To*obs_dim) and (N, Ta*act_dim), N = total steps.
    """
    if obs_history < 1 or action_chunk < 1:
        raise ValueError(f"obs_history and action_chunk must be >= 1, got {obs_history}, {action_chunk}")
    episodes = dataset.episodes if isinstance(dataset, Dataset) else list(dataset)
    if not episodes:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    conds, targets = [], []
    for ep in episodes:
        steps = np.arange(len(ep))[:, None]
        obs_idx = np.maximum(steps + np.arange(1 - obs_history, 1)[None, :], 0)
        act_idx = np.minimum(steps + np.arange(action_chunk)[None, :], len(ep) - 1)
        conds.append(ep.observations[obs_idx].reshape(len(ep), -1))
        targets.append(ep.actions[act_idx].reshape(len(ep), -1))
    return (np.concatenate(conds).astype(np.float32, copy=False),
            np.concatenate(targets).astype(np.float32, copy=False))


def describe(dataset: Dataset) -> str:
    """One paragraph for `ncdpo dataset info`: env, size, returns and level."""
    returns = dataset.returns
    where = f" at {dataset.path}" if dataset.path is not None else ""
    level = dataset.metadata.get("level")
    head = f"{dataset.env_id or 'unknown env'} dataset{where}" + (f" (level: {level})" if level else "")
    if not len(returns):
        return f"{head}: no episodes."
    lengths = np.array([len(ep) for ep in dataset.episodes])
    return (
        f"{head}: {len(returns)} episodes, {dataset.num_steps} steps "
        f"(length {lengths.min()}-{lengths.max()}), obs_dim {dataset.obs_dim}, action_dim {dataset.action_dim}; "
        f"return mean {returns.mean():.2f} ± {returns.std():.2f} "
        f"(min {returns.min():.2f}, max {returns.max():.2f})."
    )
