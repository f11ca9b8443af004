"""Datasets on disk as Minari dataset directories (Farama's offline-RL standard), so any Minari tool
can read ours and we can read theirs: ``write_dataset`` (atomic) and ``load_dataset`` (validated)."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np

from ncdpo_rllib.errors import DatasetError, one_line
from ncdpo_rllib.integrity import manifest_problem, no_space_message, out_of_space, write_manifest

from .datasets import D4RL_SUFFIXES, EPISODE_KEYS, Dataset, Episode, check_episodes, episode_from_arrays

DATA_DIR = "data"
METADATA_FILE = "metadata.json"
MAIN_FILE = "main_data.hdf5"
NCDPO_KEY = "ncdpo"
STATE_KEY, IMAGE_KEY = "state", "image"
"""A pixel dataset's observations on disk: a Dict of the float32 state and the uint8 RGB image."""
_FOREIGN_META_KEYS = ("dataset_id", "algorithm_name", "description", "author", "minari_version",
                      "ref_min_score", "ref_max_score")


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


def _image_shape(episodes: Sequence[Episode], metadata: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The shape of a pixel dataset's images per step: (H, W, 3), or (cameras, H, W, 3) for several
    cameras (``metadata["image_size"]`` and ``["cameras"]``, as ``collect`` and the robomimic import
    write them), when the image columns at the end of each observation are whole numbers in 0..255,
    so uint8 stores them exactly; None otherwise."""
    size, cameras = metadata.get("image_size"), metadata.get("cameras") or [None]
    if not isinstance(size, int) or size <= 0 or not isinstance(cameras, list):
        return None
    shape = (size, size, 3) if len(cameras) == 1 else (len(cameras), size, size, 3)
    cols = int(np.prod(shape))
    if episodes[0].observations.shape[1] < cols:
        return None
    exact = all(np.array_equal(img, np.clip(np.rint(img), 0, 255)) for img in
                (ep.observations[:, -cols:] for ep in episodes))
    return shape if exact else None


def _observation_space(obs_dim: int, image: tuple[int, ...] | None) -> Any:
    import gymnasium as gym

    if image is None:
        return gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
    state_dim = obs_dim - int(np.prod(image))
    return gym.spaces.Dict({STATE_KEY: gym.spaces.Box(-np.inf, np.inf, (state_dim,), np.float32),
                            IMAGE_KEY: gym.spaces.Box(0, 255, image, np.uint8)})


def _stored_observations(obs: np.ndarray, image: tuple[int, ...] | None) -> Any:
    """Observations as written: flat float32, or {state: float32, image: uint8 (T+1, *image)}."""
    if image is None:
        return obs
    state_dim = obs.shape[1] - int(np.prod(image))
    return {STATE_KEY: obs[:, :state_dim], IMAGE_KEY: obs[:, state_dim:].astype(np.uint8).reshape(len(obs), *image)}


def _write_minari(root: Path, episodes: Sequence[Episode], env_id: str, metadata: dict[str, Any]) -> None:
    """Write a complete Minari (hdf5) dataset directory at root with Minari's own storage writer."""
    import gymnasium as gym
    import minari
    from minari.dataset.minari_storage import MinariStorage

    obs_dim, act_dim = episodes[0].observations.shape[1], episodes[0].actions.shape[1]
    image = _image_shape(episodes, metadata)
    root.mkdir()
    storage = MinariStorage.new(
        root.absolute() / DATA_DIR,  # minari 0.5.4's get_size() breaks on relative paths
        observation_space=_observation_space(obs_dim, image),
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
    storage.update_episodes(_buffer(ep, image) for ep in episodes)


def _buffer(ep: Episode, image: tuple[int, ...] | None = None) -> Any:
    """Minari's episode record: per-step termination/truncation flags, set on the last step only."""
    from minari.data_collector import EpisodeBuffer

    term, trunc = np.zeros(len(ep), dtype=bool), np.zeros(len(ep), dtype=bool)
    term[-1], trunc[-1] = ep.terminated, ep.truncated
    return EpisodeBuffer(observations=_stored_observations(ep.observations, image), actions=ep.actions,
                         rewards=ep.rewards,
                         terminations=term, truncations=trunc, infos={})


def _estimated_size(episodes: Sequence[Episode]) -> int:
    """Bytes the Minari HDF5 file will take, with a margin: the arrays (observations as float32, an
    upper bound for a pixel dataset's uint8 images; rewards as float64, two flag bytes per step), a
    few KiB of HDF5 structure per episode, 10% on top."""
    steps = sum(len(ep.rewards) for ep in episodes)
    arrays = sum(ep.observations.nbytes + ep.actions.nbytes for ep in episodes) + 10 * steps
    return int(1.1 * (arrays + 8192 * len(episodes) + (1 << 16)))


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
                                      (unbounded float32 Boxes of the data's dims; for a pixel
                                      dataset, a Dict of the state Box and a uint8 image Box),
                                      env_spec when env_id is registered, and ours under "ncdpo":
                                      {"env_id": ..., "metadata": {...}}
        <path>/data/main_data.hdf5    groups episode_<i> with observations (T+1, obs_dim) (a pixel
                                      dataset: a group of state (T+1, state_dim) float32 and image
                                      (T+1, H, W, 3) uint8, (T+1, cameras, H, W, 3) for several),
                                      actions (T, act_dim), rewards (T,), terminations (T,),
                                      truncations (T,), an empty infos group; attrs id, total_steps
        <path>/ncdpo_manifest.json    the SHA-256 of both files, checked by load_dataset

    The dataset is built in a hidden sibling directory and renamed into place, so readers never
    see a half-written one. `env_id` and `metadata` default to those of a `Dataset` argument;
    `metadata["level"]` (default: the directory name) names the Minari dataset_id. With
    `metadata["image_size"]` (a pixel dataset: [state, image] observations), the image is stored as
    uint8 when its values are whole numbers in 0..255 (4x smaller; read back exactly).
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
    check_episodes(episodes, str(dest), "fix the episodes before writing them")
    meta = _plain_json(dict(metadata or {}))
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise DatasetError(f"{dest}: a dataset already exists there; pass overwrite=True (--overwrite) "
                               "or choose another path")
        if not dest.is_dir() or not (_is_dataset_dir(dest) or not any(dest.iterdir())):
            raise DatasetError(f"{dest}: exists and is not a dataset directory; refusing to replace it - "
                               "remove it yourself or choose another path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    needed = _estimated_size(episodes)
    kept = "; the dataset already there is untouched" if _is_dataset_dir(dest) else ""
    no_room = lambda: DatasetError(f"{no_space_message('dataset', dest, needed)}{kept}; free space or write elsewhere")  # noqa: E731
    if needed > shutil.disk_usage(dest.parent).free:  # before HDF5 starts: it can crash closing a file it could not write
        raise no_room()
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_minari(tmp, episodes, env_id, meta)
        write_manifest(tmp)
        _fsync_tree(tmp)
        _swap_in(tmp, dest)
    except Exception as e:
        if not out_of_space(e):
            raise
        raise no_room() from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


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
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - h5py raises OSError, RuntimeError, KeyError, ... on damaged internals
        raise DatasetError(f"{file}: not a readable HDF5 file ({one_line(e)}); the file is corrupt or "
                           f"truncated - {_LOAD_FIX}") from None


def _read_h5_episode(group: Any, where: str) -> Episode:
    arrays = {}
    for key in EPISODE_KEYS:
        if key not in group:
            raise DatasetError(f"{where}: missing key '{key}' (an episode needs {', '.join(EPISODE_KEYS)}); "
                               f"{_LOAD_FIX}")
        node = group[key]
        if key == "observations" and isinstance(node, h5py.Group) and set(node) == {STATE_KEY, IMAGE_KEY}:
            arrays[key] = _flat_observations(node, where)
            continue
        if not isinstance(node, h5py.Dataset):
            raise DatasetError(f"{where}: '{key}' is a group (Dict/Tuple space); only flat Box observations "
                               "and actions are supported - flatten them (FlattenObservation) and re-record")
        arrays[key] = node[()]
    return episode_from_arrays(arrays, where, _LOAD_FIX)


def _flat_observations(group: Any, where: str) -> np.ndarray:
    """A pixel dataset's {state, image} observations as the flat float32 [state, image] rows."""
    state, image = group[STATE_KEY][()], group[IMAGE_KEY][()]
    if state.ndim != 2 or image.ndim not in (4, 5) or len(state) != len(image):
        raise DatasetError(f"{where}: observations/{STATE_KEY} {state.shape} and observations/{IMAGE_KEY} "
                           f"{image.shape} do not line up (need (T+1, state_dim) and (T+1, [cameras,] H, W, C)); "
                           f"{_LOAD_FIX}")
    return np.concatenate([state.astype(np.float32), image.reshape(len(image), -1).astype(np.float32)], axis=1)


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
        episodes.append(episode_from_arrays(arrays, f"{data_dir}: episode {i}", _LOAD_FIX))
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
    a dataset, a file that differs from the checksum written with it (ours), corrupt HDF5/JSON, missing keys, mismatched or ragged shapes, NaN/inf and no episodes.
    `env_id` is "" for a foreign dataset without an env_spec.
    """
    root = Path(path)
    data_dir = _data_dir(root)
    owner = data_dir.parent if data_dir.name == DATA_DIR else data_dir  # where write_dataset put the manifest
    problem = manifest_problem(owner)
    if problem:
        raise DatasetError(f"{owner}: {problem}; {_LOAD_FIX}")
    raw = _read_metadata(data_dir)
    data_format = raw.get("data_format", "hdf5")
    total = raw.get("total_episodes")
    if data_format == "hdf5":
        episodes = _read_hdf5_episodes(data_dir / MAIN_FILE, total if isinstance(total, int) else None)
    else:
        episodes = _read_other_format(data_dir, str(data_format))
    where = str(data_dir / MAIN_FILE) if data_format == "hdf5" else str(data_dir)
    check_episodes(episodes, where, _LOAD_FIX)
    env_id, metadata = _env_and_metadata(raw)
    return Dataset(env_id=env_id, episodes=episodes, metadata=metadata, path=root)


