"""Hostile inputs (property-based, ``hypothesis``): whatever YAML document or ``--set`` value a user
writes, reading the config either works or raises our one-line ConfigError, never another exception;
any byte-level corruption of a checkpoint or dataset file is a one-line error naming the file."""

import shutil
import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from ncdpo_rllib.errors import CheckpointError, ConfigError
from ncdpo_rllib.experiment.config import ExperimentConfig, load_config

KEYS = ["algorithm", "seed", "env", "env.id", "env.kind", "env.action_chunk", "env.obs_history", "env.kwargs",
        "env.max_episode_steps", "env.observation", "diffusion", "diffusion.denoising_steps", "diffusion.hidden",
        "diffusion.sampler", "diffusion.ddim_steps", "diffusion.init_std", "diffusion.finetune_steps", "ppo",
        "ppo.lr", "ppo.clip_param", "ppo.minibatch_size", "ppo.train_batch_size", "ppo.target_kl",
        "ppo.logp_clamp", "ppo.advantage_clip_quantiles", "stop.env_steps", "stop.iterations", "eval.every",
        "eval.episodes", "eval.video_every", "checkpoint.keep", "multi_agent.policies", "multi_agent.groups",
        "resources.env_runners", "tracking.uri", "include", "init_from", "nonsense", "ppo.nonsense", ""]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                      max_leaves=10)


def _read(path: Path, overrides=None):
    try:
        assert isinstance(load_config(path, overrides), ExperimentConfig)
    except ConfigError as e:
        message = str(e)
        assert message and "\n" not in message.strip(), message  # one line


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
def test_random_yaml_documents_load_or_fail_in_one_line(tmp_path, doc):
    path = tmp_path / "random.yaml"
    data: dict = {}
    for dotted, value in doc.items():  # dotted keys as nested sections
        node, *parts = dotted.split(".") if dotted else [""]
        target = data
        for part in [node, *parts][:-1]:
            target = target.setdefault(part, {}) if isinstance(target.get(part, {}), dict) else {}
        target[[node, *parts][-1]] = value
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    _read(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=st.text(max_size=30))
def test_random_set_values_load_or_fail_in_one_line(tmp_path, key, value):
    path = tmp_path / "base.yaml"
    path.write_text("env: {id: Pendulum-v1}\n")
    _read(path, [f"{key}={value}"])


def _damage(data, root: Path, copy: Path) -> str | None:
    """Copy root to copy, then flip, truncate or empty a byte range of one of its files (not the
    manifest); the damaged file's relative path, or None when the draw changed nothing."""
    from ncdpo_rllib.integrity import MANIFEST

    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    rel = data.draw(st.sampled_from([f for f in files if f != MANIFEST]))
    shutil.copytree(root, copy)
    target = copy / rel
    raw = bytearray(target.read_bytes())
    how = data.draw(st.sampled_from(["flip", "truncate", "empty"]))
    if how == "flip" and raw:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))]
    else:
        raw = bytearray()
    if bytes(raw) == target.read_bytes():
        return None
    target.write_bytes(bytes(raw))
    return rel


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_byte_corruption_of_a_checkpoint_is_a_one_line_error_naming_the_file(tmp_path, data, checkpoint):
    from ncdpo_rllib.experiment.checkpoints import load_checkpoint_meta

    copy = tmp_path / f"ckpt-{uuid.uuid4().hex}"
    rel = _damage(data, checkpoint, copy)
    if rel is None:
        return
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_meta(copy)
    assert rel in str(err.value) and "\n" not in str(err.value).strip()
    shutil.rmtree(copy)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small dataset as write_dataset writes it (Minari hdf5 + metadata + manifest)."""
    import numpy as np

    from ncdpo_rllib.data import Episode, write_dataset

    rng = np.random.default_rng(0)
    episodes = [Episode(observations=rng.normal(size=(n + 1, 3)).astype(np.float32),
                        actions=rng.uniform(-1, 1, (n, 2)).astype(np.float32), rewards=rng.normal(size=n),
                        terminated=False, truncated=True) for n in (5, 8)]
    return write_dataset(tmp_path_factory.mktemp("data") / "medium", episodes, "Pendulum-v1")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), foreign=st.booleans())
def test_random_byte_corruption_of_a_dataset_is_a_one_line_error_naming_the_file(tmp_path, data, foreign, dataset):
    """Ours (with the manifest): always a DatasetError naming the damaged file. Without a manifest (a
    dataset another tool wrote), a changed number can still be a valid dataset: then it loads, and any
    other damage is one DatasetError line, never another exception."""
    from ncdpo_rllib.data import DatasetError, load_dataset
    from ncdpo_rllib.integrity import MANIFEST

    copy = tmp_path / f"data-{uuid.uuid4().hex}"
    rel = _damage(data, dataset, copy)
    if rel is None:
        return
    if foreign:
        (copy / MANIFEST).unlink()
    try:
        load_dataset(copy)
        assert foreign, f"damage to {rel} went unnoticed"
    except DatasetError as e:
        message = str(e)
        assert "\n" not in message.strip() and (foreign or rel in message), message
    shutil.rmtree(copy)


@pytest.fixture
def checkpoint(tiny_run) -> Path:
    """The session's tiny training checkpoint, shared by the corruption examples (each works on a copy)."""
    return tiny_run / "checkpoints" / "final"



@pytest.fixture(scope="module")
def d4rl_files(tmp_path_factory) -> Path:
    """One small D4RL-layout file in each format `ncdpo dataset import` reads (.hdf5 and .npz)."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {"observations": rng.normal(size=(12, 3)).astype(np.float32),
              "actions": rng.uniform(-1, 1, (12, 2)).astype(np.float32),
              "rewards": rng.normal(size=12).astype(np.float32),
              "terminals": np.eye(1, 12, 5, dtype=bool)[0], "timeouts": np.eye(1, 12, 11, dtype=bool)[0]}
    root = tmp_path_factory.mktemp("d4rl")
    with h5py.File(root / "demo.hdf5", "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
    np.savez_compressed(root / "demo.npz", **arrays)
    return root


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_byte_corruption_of_an_imported_file_loads_or_is_one_line(tmp_path, data, d4rl_files):
    """A user's D4RL file carries no checksum: a changed number may import fine; any other damage is
    one DatasetError line naming the file, never another exception."""
    from ncdpo_rllib.data import DatasetError, import_dataset

    copy = tmp_path / f"d4rl-{uuid.uuid4().hex}"
    rel = _damage(data, d4rl_files, copy)
    if rel is None:
        return
    try:
        import_dataset(copy / rel, copy / "out", env_id="Pendulum-v1")
    except DatasetError as e:
        assert "\n" not in str(e).strip() and rel in str(e), str(e)
    shutil.rmtree(copy)
