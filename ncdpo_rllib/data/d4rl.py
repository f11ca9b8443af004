"""``ncdpo dataset import``: D4RL-layout flat arrays (``.hdf5`` / ``.h5`` / ``.npz``) split into episodes
and written as a Minari dataset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import h5py
import numpy as np

from ncdpo_rllib.errors import DatasetError, one_line

from .datasets import D4RL_SUFFIXES, Episode, numeric_array
from .minari_store import write_dataset

D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


def _read_flat_arrays(src: Path) -> dict[str, np.ndarray]:
    """The D4RL keys (plus next_observations if present) from an .hdf5/.h5 or .npz file."""
    if not src.exists():
        raise DatasetError(f"{src}: no such file; check the path")
    if src.is_dir():
        raise DatasetError(f"{src}: is a directory; import takes a D4RL-layout .hdf5/.h5/.npz file "
                           "(a Minari dataset directory can be used directly)")
    if src.suffix not in D4RL_SUFFIXES:
        raise DatasetError(f"{src}: unsupported file type '{src.suffix}'; expected a D4RL-layout "
                           f"{', '.join(D4RL_SUFFIXES)} file")
    wanted = (*D4RL_KEYS, "next_observations")
    reader: Callable[[Path, tuple[str, ...]], tuple[dict[str, np.ndarray], list[str]]]
    reader = _read_npz if src.suffix == ".npz" else _read_h5_flat
    arrays, present = reader(src, wanted)
    missing = [k for k in D4RL_KEYS if k not in present]
    if missing:
        raise DatasetError(f"{src}: missing key(s) {', '.join(repr(k) for k in missing)}; a D4RL-layout file "
                           f"needs {', '.join(D4RL_KEYS)} (optional next_observations)")
    return arrays


def _read_npz(src: Path, wanted: tuple[str, ...]) -> tuple[dict[str, np.ndarray], list[str]]:
    try:
        with np.load(src, allow_pickle=False) as f:
            present = list(f.files)
            return {k: f[k] for k in wanted if k in present}, present
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, EOFError, BadZipFile, zlib.error, ...
        raise DatasetError(f"{src}: not a readable .npz file ({one_line(e)}); the file is corrupt, truncated "
                           "or holds pickled objects - re-export it with numpy.savez") from None


def _read_h5_flat(src: Path, wanted: tuple[str, ...]) -> tuple[dict[str, np.ndarray], list[str]]:
    try:
        with h5py.File(src, "r") as f:
            present = list(f.keys())
            arrays = {}
            for k in (k for k in wanted if k in present):
                if not isinstance(f[k], h5py.Dataset):
                    raise DatasetError(f"{src}: '{k}' is a group, expected an array; a D4RL-layout file "
                                       "has flat arrays at the top level")
                arrays[k] = f[k][()]
            return arrays, present
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - h5py raises OSError, RuntimeError, KeyError, ... on damaged internals
        raise DatasetError(f"{src}: not a readable HDF5 file ({one_line(e)}); the file is corrupt or "
                           "truncated - re-export it") from None


def _check_flat(arrays: dict[str, np.ndarray], src: Path) -> dict[str, np.ndarray]:
    """D4RL arrays with the right ndim, numbers, one length N >= 1 and finite values."""
    fix = "fix the file (D4RL layout: observations (N, obs_dim), actions (N, act_dim), rewards/terminals/timeouts (N,))"
    out = {}
    for key, arr in arrays.items():
        arr = numeric_array(arr, f"'{key}'", str(src), fix)
        two_d = key in ("observations", "next_observations", "actions")
        if not two_d and arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]  # (N, 1) columns are common for rewards and flags
        if arr.ndim != (2 if two_d else 1):
            want = "2-D (N, dim)" if two_d else "1-D (N,)"
            raise DatasetError(f"{src}: '{key}' has shape {arr.shape}, expected {want}; {fix}")
        out[key] = arr
    lengths = {k: len(v) for k, v in out.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k} {n}" for k, n in lengths.items())
        raise DatasetError(f"{src}: length mismatch: {listed} rows (all must have the same N); {fix}")
    if lengths["observations"] == 0:
        raise DatasetError(f"{src}: contains no transitions (N = 0); export a non-empty dataset")
    nxt = out.get("next_observations")
    if nxt is not None and nxt.shape != out["observations"].shape:
        raise DatasetError(f"{src}: 'next_observations' has shape {nxt.shape} but 'observations' has "
                           f"{out['observations'].shape}; {fix}")
    for key in ("observations", "next_observations", "actions", "rewards"):
        if key in out and not np.isfinite(out[key]).all():
            raise DatasetError(f"{src}: '{key}' contains non-finite values (NaN/inf); {fix}")
    return out


def _split_episodes(arrays: dict[str, np.ndarray]) -> list[Episode]:
    """Cut the flat arrays after every terminal or timeout; a trailing remainder is a truncated episode."""
    obs, act, rew = arrays["observations"], arrays["actions"], arrays["rewards"]
    terminals, timeouts = arrays["terminals"].astype(bool), arrays["timeouts"].astype(bool)
    nxt = arrays.get("next_observations")
    n = len(obs)
    ends = np.flatnonzero(terminals | timeouts).tolist()
    trailing = not ends or ends[-1] != n - 1
    if trailing:
        ends.append(n - 1)
    episodes, start = [], 0
    for i, end in enumerate(ends):
        last_obs = nxt[end] if nxt is not None else obs[end]
        cut = trailing and i == len(ends) - 1
        episodes.append(Episode(
            observations=np.concatenate([obs[start:end + 1], last_obs[None]]),
            actions=act[start:end + 1],
            rewards=rew[start:end + 1],
            terminated=bool(terminals[end]) and not cut,
            truncated=bool(timeouts[end]) or cut,
        ))
        start = end + 1
    return episodes


def import_dataset(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    env_id: str,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Convert a D4RL-layout .hdf5/.h5/.npz file into a Minari dataset at `dest`; return `dest`.

    Episodes end at terminals | timeouts; a trailing run without either is kept as a truncated
    episode. Each episode's final observation is next_observations[last] when the file has them,
    else a repeat of its last observation (metadata "final_observation" says which: fine for
    behaviour cloning, which never uses it as an input).
    """
    src_path = Path(src)
    arrays = _check_flat(_read_flat_arrays(src_path), src_path)
    meta: dict[str, Any] = {
        "level": Path(dest).name,
        "source": str(src_path),
        "imported_from": "d4rl",
        "final_observation": "next_observations" if "next_observations" in arrays else "repeat_last",
    }
    meta.update(metadata or {})
    return write_dataset(dest, _split_episodes(arrays), env_id, meta, overwrite=overwrite)


