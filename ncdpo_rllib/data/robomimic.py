"""robomimic's HDF5 layout: read it (``ncdpo dataset import FILE.hdf5 DIR --format robomimic``) and
write it (``ncdpo collect`` with ``collect.scripted`` on a robosuite task writes one next to the
Minari dataset, so the importer is tested on files the project makes itself).

The layout (robomimic's ``docs/datasets/overview``)::

    data                     attrs: env_args (JSON: env_name, type, env_kwargs), total
    data/demo_<i>            attrs: num_samples
        actions (N, act_dim), rewards (N,), dones (N,)
        obs/<key> (N, ...)   low-dim keys (N, d); image keys (N, H, W, 3) uint8
        next_obs/<key>       the observation after each step (optional here)
    mask/<filter>            demo names (bytes) of a split, e.g. train, valid

Imported observations are the selected keys, flattened and concatenated in the order given;
image keys (after the low-dim ones, all of one size) are appended as the project's pixel layout
does it (``[state, image per camera]``, row-major H, W, C), so a robosuite config with
``env.observation: pixels_state`` and those cameras (``env.camera``, ``env.extra_cameras``) reads
it. Each episode's final observation is ``next_obs`` of its last step when the file has it, else
a repeat of the last observation.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import h5py
import numpy as np

from ncdpo_rllib.errors import DatasetError, one_line

from .datasets import Dataset, Episode
from .minari_store import write_dataset

IMAGE_SUFFIX = "_image"
ROBOSUITE_ENV_TYPE = 1
"""robomimic's EnvType.ROBOSUITE_TYPE, the ``type`` in ``env_args``."""


def _demo_names(data: h5py.Group) -> list[str]:
    names = [k for k in data if re.fullmatch(r"demo_\d+", k)]
    return sorted(names, key=lambda k: int(k.split("_")[1]))


def read_robomimic(src: str | os.PathLike, obs_keys: Sequence[str], filter_key: Optional[str] = None
                   ) -> tuple[list[Episode], dict[str, Any]]:
    """(episodes, info) from a robomimic file: info has ``env_name``, ``env_args``, ``obs_keys``,
    ``image`` ({keys, size} or None) and ``demos`` (the demo names read, in order)."""
    path = Path(src)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file; check the path")
    if not obs_keys:
        raise DatasetError(f"{path}: no observation keys selected; pass --obs-keys (e.g. robot0_eef_pos object)")
    images = [k for k in obs_keys if k.endswith(IMAGE_SUFFIX)]
    if images and list(obs_keys[-len(images):]) != images:
        raise DatasetError(f"{path}: image keys go after the low-dim ones (the pixel layout is [state, images]); "
                           f"got {', '.join(obs_keys)}")
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # noqa: BLE001 - h5py raises OSError and others on a damaged file
        raise DatasetError(f"{path}: not a readable HDF5 file ({one_line(e)}); the file is corrupt or truncated") from None
    with f:
        if "data" not in f or not isinstance(f["data"], h5py.Group):
            raise DatasetError(f"{path}: no 'data' group; a robomimic file holds data/demo_<i>/(obs, actions, "
                               "rewards, dones) (a D4RL-layout file imports without --format robomimic)")
        data = f["data"]
        if "env_args" not in data.attrs:
            raise DatasetError(f"{path}: 'data' has no env_args attribute (robomimic writes the env's name and "
                               "controller there); re-export the file with robomimic")
        try:
            env_args = json.loads(data.attrs["env_args"])
            env_name = str(env_args["env_name"])
        except (ValueError, TypeError, KeyError):
            raise DatasetError(f"{path}: data.attrs['env_args'] is not robomimic's JSON with an env_name") from None
        demos = _demo_names(data)
        if filter_key is not None:
            masks = sorted(f["mask"]) if "mask" in f else []
            if filter_key not in masks:
                raise DatasetError(f"{path}: no mask/{filter_key}; the file's filters: {', '.join(masks) or 'none'}")
            wanted = [n.decode() if isinstance(n, bytes) else str(n) for n in f["mask"][filter_key][()]]
            unknown = sorted(set(wanted) - set(demos))
            if unknown:
                raise DatasetError(f"{path}: mask/{filter_key} names demos that are not in data: {', '.join(unknown[:3])}")
            demos = [d for d in demos if d in set(wanted)]
        if not demos:
            raise DatasetError(f"{path}: no demonstrations (data/demo_<i>) to import")
        episodes, image = [], None
        for name in demos:
            episode, size = _read_demo(path, name, data[name], obs_keys)
            episodes.append(episode)
            image = image or size
    info = {"env_name": env_name, "env_args": env_args, "obs_keys": list(obs_keys), "demos": demos,
            "image": {"keys": images, "size": image} if images else None}
    return episodes, info


def _read_demo(path: Path, name: str, g: h5py.Group, obs_keys: Sequence[str]) -> tuple[Episode, Optional[int]]:
    where = f"{path}: data/{name}"
    for key in ("actions", "rewards", "dones", "obs"):
        if key not in g:
            raise DatasetError(f"{where} has no '{key}'; a robomimic demo has actions, rewards, dones and obs/<key>")
    actions = np.asarray(g["actions"][()], np.float32)
    n = len(actions)
    if actions.ndim != 2 or n == 0:
        raise DatasetError(f"{where}/actions has shape {actions.shape}, expected (N, action_dim) with N >= 1")
    columns, size = [], None
    for key in obs_keys:
        if key not in g["obs"]:
            raise DatasetError(f"{where}/obs has no '{key}'; it has {', '.join(sorted(g['obs']))}")
        value = g["obs"][key][()]
        if len(value) != n:
            raise DatasetError(f"{where}: obs/{key} has {len(value)} steps, actions {n}; the demo is damaged")
        if key.endswith(IMAGE_SUFFIX):
            if value.ndim != 4 or value.shape[1] != value.shape[2] or value.shape[3] != 3:
                raise DatasetError(f"{where}/obs/{key} has shape {value.shape}, expected (N, H, H, 3) RGB")
            if size is not None and value.shape[1] != size:
                raise DatasetError(f"{where}/obs/{key} is {value.shape[1]}x{value.shape[1]}, the image before it "
                                   f"{size}x{size}; the cameras' images must be one size")
            size = int(value.shape[1])
        columns.append(np.asarray(value, np.float32).reshape(n, -1))
    observations = np.concatenate(columns, axis=1)
    final = observations[-1]
    if "next_obs" in g and all(k in g["next_obs"] for k in obs_keys):
        final = np.concatenate([np.asarray(g["next_obs"][k][-1], np.float32).reshape(-1) for k in obs_keys])
    rewards, dones = np.asarray(g["rewards"][()], np.float32).reshape(-1), np.asarray(g["dones"][()]).reshape(-1)
    for key, value in (("rewards", rewards), ("dones", dones)):
        if len(value) != n:
            raise DatasetError(f"{where}: {key} has {len(value)} steps, actions {n}; the demo is damaged")
    if not (np.isfinite(observations).all() and np.isfinite(actions).all() and np.isfinite(rewards).all()):
        raise DatasetError(f"{where} contains non-finite values (NaN/inf); fix or drop that demo")
    terminated = bool(dones[-1])
    return Episode(np.concatenate([observations, final[None]]), actions, rewards, terminated, not terminated), size


def is_robomimic_file(path: str | os.PathLike) -> bool:
    """An HDF5 file (not a dataset directory): what ``pretrain.dataset`` reads as robomimic's layout."""
    return Path(path).is_file() and Path(path).suffix in (".hdf5", ".h5")


def load_robomimic(src: str | os.PathLike, obs_keys: Sequence[str], filter_key: Optional[str] = None) -> Dataset:
    """A robomimic file as a ``Dataset`` in memory (metadata: the env's name, its env_args, the keys,
    the filter, and for an image key the camera and image size)."""
    episodes, info = read_robomimic(src, obs_keys, filter_key)
    meta: dict[str, Any] = {"source": str(src), "imported_from": "robomimic",
                            "robomimic_env_args": info["env_args"], "obs_keys": info["obs_keys"],
                            "filter_key": filter_key, "demos": len(info["demos"])}
    if info["image"]:
        cameras = [key[: -len(IMAGE_SUFFIX)] for key in info["image"]["keys"]]
        meta.update(observation="pixels_state", camera=cameras[0], cameras=cameras, image_size=info["image"]["size"])
    return Dataset(env_id=info["env_name"], episodes=episodes, metadata=meta, path=Path(src))


def import_robomimic(src: str | os.PathLike, dest: str | os.PathLike, obs_keys: Sequence[str], *,
                     filter_key: Optional[str] = None, env_id: Optional[str] = None, overwrite: bool = False) -> Path:
    """A robomimic file as a Minari dataset at ``dest`` (``load_robomimic``'s metadata); return ``dest``."""
    dataset = load_robomimic(src, obs_keys, filter_key)
    if env_id and env_id != dataset.env_id:
        raise DatasetError(f"{src}: recorded on {dataset.env_id}, not {env_id}; drop --env-id or import the "
                           "file of that env")
    meta = {"level": Path(dest).name, **dataset.metadata}
    return write_dataset(dest, dataset.episodes, dataset.env_id, meta, overwrite=overwrite)


def write_robomimic(path: str | os.PathLike, episodes: Sequence[Episode], env_name: str,
                    key_slices: Mapping[str, slice], env_kwargs: Mapping[str, Any], *,
                    image: Optional[tuple[Sequence[str], int]] = None, valid_fraction: float = 0.1) -> Path:
    """Episodes (flat observations) in robomimic's layout: ``key_slices`` cut each observation into
    its keys; ``image`` = (keys, size) for the [state, images] layout's images, one key per camera
    (stored uint8). Masks ``train`` and ``valid`` (the last ``valid_fraction`` of the demos).
    Written whole: a temporary name, then a rename."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        _write(tmp, episodes, env_name, key_slices, env_kwargs, image, valid_fraction)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _write(tmp: Path, episodes, env_name, key_slices, env_kwargs, image, valid_fraction) -> None:
    state_dim = max((s.stop for s in key_slices.values()), default=0)
    names = [f"demo_{i}" for i in range(len(episodes))]
    with h5py.File(tmp, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": env_name, "type": ROBOSUITE_ENV_TYPE,
                                             "env_kwargs": dict(env_kwargs)})
        data.attrs["total"] = int(sum(len(ep) for ep in episodes))
        for name, ep in zip(names, episodes):
            g = data.create_group(name)
            g.attrs["num_samples"] = len(ep)
            g.create_dataset("actions", data=ep.actions)
            g.create_dataset("rewards", data=ep.rewards)
            dones = np.zeros(len(ep), np.int64)
            dones[-1] = int(ep.terminated)
            g.create_dataset("dones", data=dones)
            for group, rows in (("obs", ep.observations[:-1]), ("next_obs", ep.observations[1:])):
                og = g.create_group(group)
                for key, cut in key_slices.items():
                    og.create_dataset(key, data=rows[:, cut])
                if image:
                    keys, size = image
                    frames = rows[:, state_dim:].reshape(len(rows), len(keys), size, size, 3)
                    for i, key in enumerate(keys):
                        og.create_dataset(key, data=np.clip(np.rint(frames[:, i]), 0, 255).astype(np.uint8))
        n_valid = int(round(valid_fraction * len(names))) if len(names) > 1 else 0
        mask = f.create_group("mask")
        mask.create_dataset("train", data=np.array(names[: len(names) - n_valid], dtype="S"))
        mask.create_dataset("valid", data=np.array(names[len(names) - n_valid:], dtype="S"))
