"""Demonstration datasets: Minari directories on disk, plain numpy episodes in memory.

On disk a dataset is a Minari dataset directory (Farama's offline-RL standard), so any Minari
tool can read ours and we can read theirs. In memory it is a list of `Episode` arrays, which is
all behaviour cloning needs. Every problem with a file a user gave us is a one-line
`DatasetError` naming the file, the problem and the fix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import h5py
import numpy as np

from ncdpo_rllib.errors import DatasetError, one_line

DATA_DIR = "data"
METADATA_FILE = "metadata.json"
MAIN_FILE = "main_data.hdf5"
NCDPO_KEY = "ncdpo"
EPISODE_KEYS = ("observations", "actions", "rewards", "terminations", "truncations")
D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
D4RL_SUFFIXES = (".hdf5", ".h5", ".npz")
_FOREIGN_META_KEYS = ("dataset_id", "algorithm_name", "description", "author", "minari_version",
                      "ref_min_score", "ref_max_score")


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


# --------------------------------------------------------------------------- validation


def _numeric(arr: Any, what: str, where: str, fix: str) -> np.ndarray:
    """The array, if it holds numbers (bool/int/float); strings and objects cannot be demonstrations."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise DatasetError(f"{where}: {what} has dtype {arr.dtype}, expected numbers; {fix}")
    return arr


def _check_episode(ep: Episode, where: str, fix: str) -> None:
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


def _check_episodes(episodes: Sequence[Episode], where: str, fix: str) -> None:
    """Every episode valid, and all of them with the same obs/action dims (no ragged data)."""
    if not episodes:
        raise DatasetError(f"{where}: the dataset has no episodes; {fix}")
    dims = None
    for i, ep in enumerate(episodes):
        _check_episode(ep, f"{where}: episode {i}", fix)
        ep_dims = (ep.observations.shape[1], ep.actions.shape[1])
        if dims is not None and ep_dims != dims:
            raise DatasetError(
                f"{where}: episode {i} has (obs_dim, act_dim) = {ep_dims} but episode 0 has {dims} "
                f"(ragged dims); {fix}"
            )
        dims = ep_dims


def _episode_from_arrays(arrays: Mapping[str, Any], where: str, fix: str) -> Episode:
    """Build an Episode from Minari's per-episode arrays, checking dtypes before converting."""
    obs = _numeric(arrays["observations"], "observations", where, fix)
    act = _numeric(arrays["actions"], "actions", where, fix)
    rew = _numeric(arrays["rewards"], "rewards", where, fix)
    term = _numeric(arrays["terminations"], "terminations", where, fix).reshape(-1)
    trunc = _numeric(arrays["truncations"], "truncations", where, fix).reshape(-1)
    return Episode(obs, act, rew, bool(term[-1]) if term.size else False, bool(trunc[-1]) if trunc.size else False)


# --------------------------------------------------------------------------- writing


def _plain_json(value: Any) -> Any:
    """Metadata as plain JSON types (numpy scalars and arrays, paths included), so it round-trips."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, (Path, set, tuple)):
            return str(obj) if isinstance(obj, Path) else list(obj)
        raise TypeError(f"metadata value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")

    return json.loads(json.dumps(value, default=default))


def _dataset_id(env_id: str, level: str) -> str:
    """Minari needs an id of the form namespace/name-vN; ours is ncdpo/<env>/<level>-v0."""
    from minari.dataset.minari_dataset import parse_dataset_id

    clean = [re.sub(r"[^-\w]+", "_", part).strip("_") or "dataset" for part in (env_id, level)]
    dataset_id = f"ncdpo/{clean[0]}/{clean[1]}-v0"
    try:
        parse_dataset_id(dataset_id)
    except ValueError:
        return "ncdpo/dataset-v0"
    return dataset_id


def _env_spec(env_id: str) -> Any:
    """The registered EnvSpec (lets Minari's recover_environment work), or None for unknown ids."""
    import gymnasium as gym

    try:
        return gym.spec(env_id)
    except gym.error.Error:
        return None


def _write_minari(root: Path, episodes: Sequence[Episode], env_id: str, metadata: dict[str, Any]) -> None:
    """Write a complete Minari (hdf5) dataset directory at root with Minari's own storage writer."""
    import gymnasium as gym
    import minari
    from minari.dataset.minari_storage import MinariStorage

    obs_dim, act_dim = episodes[0].observations.shape[1], episodes[0].actions.shape[1]
    root.mkdir()
    storage = MinariStorage.new(
        root.absolute() / DATA_DIR,  # minari 0.5.4's get_size() breaks on relative paths
        observation_space=gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32),
        action_space=gym.spaces.Box(-np.inf, np.inf, (act_dim,), np.float32),
        env_spec=_env_spec(env_id),
        data_format="hdf5",
        jpeg_encoding=False,
    )
    level = str(metadata.get("level") or root.name)
    storage.update_metadata({
        "dataset_id": _dataset_id(env_id, level),
        "minari_version": minari.__version__,
        "description": f"NCDPO demonstrations for {env_id} ({level})",
        NCDPO_KEY: {"env_id": env_id, "metadata": metadata},
    })
    storage.update_episodes(_buffer(ep) for ep in episodes)


def _buffer(ep: Episode) -> Any:
    """Minari's episode record: per-step termination/truncation flags, set on the last step only."""
    from minari.data_collector import EpisodeBuffer

    term, trunc = np.zeros(len(ep), dtype=bool), np.zeros(len(ep), dtype=bool)
    term[-1], trunc[-1] = ep.terminated, ep.truncated
    return EpisodeBuffer(observations=ep.observations, actions=ep.actions, rewards=ep.rewards,
                         terminations=term, truncations=trunc, infos={})


def _fsync_tree(root: Path) -> None:
    """Flush the files to disk before the rename makes them visible."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _is_dataset_dir(path: Path) -> bool:
    return (path / DATA_DIR / METADATA_FILE).is_file() or (path / METADATA_FILE).is_file()


def _swap_in(tmp: Path, dest: Path) -> None:
    """Rename tmp to dest; an existing dest is moved aside first and deleted only once tmp is in place."""
    if not dest.exists():
        os.rename(tmp, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_dataset(
    path: str | os.PathLike,
    data: Dataset | Iterable[Episode],
    env_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write episodes as a Minari dataset directory at exactly `path`; return that path.

    On disk (Minari 0.5 hdf5 layout, readable with ``minari.MinariDataset(path / "data")``)::

        <path>/data/metadata.json     Minari metadata: dataset_id ncdpo/<env>/<level>-v0, spaces
                                      (unbounded float32 Boxes of the data's dims), env_spec when
                                      env_id is registered, and ours under "ncdpo":
                                      {"env_id": ..., "metadata": {...}}
        <path>/data/main_data.hdf5    groups episode_<i> with observations (T+1, obs_dim),
                                      actions (T, act_dim), rewards (T,), terminations (T,),
                                      truncations (T,), an empty infos group; attrs id, total_steps

    The dataset is built in a hidden sibling directory and renamed into place, so readers never
    see a half-written one. `env_id` and `metadata` default to those of a `Dataset` argument;
    `metadata["level"]` (default: the directory name) names the Minari dataset_id.
    """
    dest = Path(path)
    if isinstance(data, Dataset):
        episodes = list(data.episodes)
        env_id = env_id or data.env_id
        metadata = data.metadata if metadata is None else metadata
    else:
        episodes = list(data)
    if not env_id:
        raise ValueError("write_dataset needs an env_id")
    _check_episodes(episodes, str(dest), "fix the episodes before writing them")
    meta = _plain_json(dict(metadata or {}))
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise DatasetError(f"{dest}: a dataset already exists there; pass overwrite=True (--overwrite) "
                               "or choose another path")
        if not dest.is_dir() or not (_is_dataset_dir(dest) or not any(dest.iterdir())):
            raise DatasetError(f"{dest}: exists and is not a dataset directory; refusing to replace it - "
                               "remove it yourself or choose another path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_minari(tmp, episodes, env_id, meta)
        _fsync_tree(tmp)
        _swap_in(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------- loading

_LOAD_FIX = "re-create the dataset (write_dataset / ncdpo dataset import)"


def _data_dir(root: Path) -> Path:
    """The Minari data directory inside root (root itself if the user pointed at data/)."""
    if not root.exists():
        raise DatasetError(f"{root}: no such dataset directory; check the path, or create one with "
                           "`ncdpo dataset import` or write_dataset")
    if root.is_file():
        hint = ("import it first with `ncdpo dataset import` (import_dataset)"
                if root.suffix in D4RL_SUFFIXES else "pass the dataset's directory")
        raise DatasetError(f"{root}: is a file, not a Minari dataset directory; {hint}")
    for candidate in (root / DATA_DIR, root):
        if (candidate / METADATA_FILE).is_file():
            return candidate
    raise DatasetError(f"{root}: not a Minari dataset (no {DATA_DIR}/{METADATA_FILE}); pass a dataset "
                       "directory, or create one with `ncdpo dataset import` or write_dataset")


def _read_metadata(data_dir: Path) -> dict[str, Any]:
    file = data_dir / METADATA_FILE
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{file}: unreadable metadata ({one_line(e)}); {_LOAD_FIX}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{file}: metadata is not a JSON object; {_LOAD_FIX}")
    return raw


def _read_hdf5_episodes(file: Path, total: int | None) -> list[Episode]:
    """Read Minari's main_data.hdf5 directly with h5py, so each problem gets a precise message."""
    if not file.is_file():
        raise DatasetError(f"{file}: missing; the dataset is incomplete - {_LOAD_FIX}")
    if file.stat().st_size == 0 and not total:
        return []  # Minari creates the file empty and fills it with the first episode
    try:
        with h5py.File(file, "r") as f:
            names = sorted((k for k in f.keys() if re.fullmatch(r"episode_\d+", k)), key=lambda k: int(k[8:]))
            expected = [f"episode_{i}" for i in range(len(names) if total is None else total)]
            if names != expected:
                raise DatasetError(f"{file}: holds {len(names)} episode groups but metadata.json says "
                                   f"total_episodes={total} (groups must be episode_0..episode_N-1); "
                                   f"the dataset is incomplete - {_LOAD_FIX}")
            return [_read_h5_episode(f[name], f"{file}: {name}") for name in names]
    except OSError as e:
        raise DatasetError(f"{file}: not a readable HDF5 file ({one_line(e)}); the file is corrupt or "
                           f"truncated - {_LOAD_FIX}") from None


def _read_h5_episode(group: Any, where: str) -> Episode:
    arrays = {}
    for key in EPISODE_KEYS:
        if key not in group:
            raise DatasetError(f"{where}: missing key '{key}' (an episode needs {', '.join(EPISODE_KEYS)}); "
                               f"{_LOAD_FIX}")
        node = group[key]
        if not isinstance(node, h5py.Dataset):
            raise DatasetError(f"{where}: '{key}' is a group (Dict/Tuple space); only flat Box observations "
                               "and actions are supported - flatten them (FlattenObservation) and re-record")
        arrays[key] = node[()]
    return _episode_from_arrays(arrays, where, _LOAD_FIX)


def _read_other_format(data_dir: Path, data_format: str) -> list[Episode]:
    """Arrow/parquet Minari datasets: let Minari decode them, then validate the arrays ourselves."""
    from minari.dataset.minari_storage import MinariStorage

    try:
        storage = MinariStorage.read(data_dir)
        raw = list(storage.get_episodes(range(storage.total_episodes)))
    except ImportError as e:
        raise DatasetError(f"{data_dir}: reading {data_format} datasets needs an extra package ({one_line(e)}); "
                           "pip install 'minari[arrow]'") from None
    except Exception as e:  # noqa: BLE001 - any decoding failure means an unreadable dataset
        raise DatasetError(f"{data_dir}: cannot read the {data_format} dataset ({one_line(e)}); {_LOAD_FIX}") from None
    episodes = []
    for i, arrays in enumerate(raw):
        missing = [k for k in EPISODE_KEYS if arrays.get(k) is None]
        if missing:
            raise DatasetError(f"{data_dir}: episode {i}: missing key '{missing[0]}'; {_LOAD_FIX}")
        episodes.append(_episode_from_arrays(arrays, f"{data_dir}: episode {i}", _LOAD_FIX))
    return episodes


def _env_and_metadata(raw: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Ours from the "ncdpo" key; for foreign Minari datasets, env id from env_spec and a few Minari keys."""
    ours = raw.get(NCDPO_KEY)
    if isinstance(ours, dict) and ours.get("env_id"):
        return str(ours["env_id"]), dict(ours.get("metadata") or {})
    env_id = ""
    if isinstance(raw.get("env_spec"), str):
        try:
            env_id = str(json.loads(raw["env_spec"]).get("id") or "")
        except (json.JSONDecodeError, AttributeError):
            env_id = ""
    return env_id, {k: raw[k] for k in _FOREIGN_META_KEYS if k in raw}


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Load a Minari dataset directory (ours or any user's; the root or its data/ dir) and validate it.

    Raises DatasetError (one line: file, problem, fix) for a missing path, a directory that is not
    a dataset, corrupt HDF5/JSON, missing keys, mismatched or ragged shapes, NaN/inf and no episodes.
    `env_id` is "" for a foreign dataset without an env_spec.
    """
    root = Path(path)
    data_dir = _data_dir(root)
    raw = _read_metadata(data_dir)
    data_format = raw.get("data_format", "hdf5")
    total = raw.get("total_episodes")
    if data_format == "hdf5":
        episodes = _read_hdf5_episodes(data_dir / MAIN_FILE, total if isinstance(total, int) else None)
    else:
        episodes = _read_other_format(data_dir, str(data_format))
    where = str(data_dir / MAIN_FILE) if data_format == "hdf5" else str(data_dir)
    _check_episodes(episodes, where, _LOAD_FIX)
    env_id, metadata = _env_and_metadata(raw)
    return Dataset(env_id=env_id, episodes=episodes, metadata=metadata, path=root)


# --------------------------------------------------------------------------- D4RL import


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
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
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
    except OSError as e:
        raise DatasetError(f"{src}: not a readable HDF5 file ({one_line(e)}); the file is corrupt or "
                           "truncated - re-export it") from None


def _check_flat(arrays: dict[str, np.ndarray], src: Path) -> dict[str, np.ndarray]:
    """D4RL arrays with the right ndim, numbers, one length N >= 1 and finite values."""
    fix = "fix the file (D4RL layout: observations (N, obs_dim), actions (N, act_dim), rewards/terminals/timeouts (N,))"
    out = {}
    for key, arr in arrays.items():
        arr = _numeric(arr, f"'{key}'", str(src), fix)
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


# --------------------------------------------------------------------------- training pairs and summary


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
