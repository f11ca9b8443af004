"""The demonstration-dataset layer: Minari round trips, D4RL import, recording shards, BC windows."""

import os
import time
from pathlib import Path

import gymnasium as gym
import h5py
import minari
import numpy as np
import pytest

from ncdpo_rllib.data import (
    Dataset,
    DatasetError,
    Episode,
    RecordingWrapper,
    describe,
    import_dataset,
    load_dataset,
    make_windows,
    read_shards,
    write_dataset,
)
from ncdpo_rllib.errors import UserError
from ncdpo_rllib.integrity import MANIFEST


def _episodes(obs_dim=3, act_dim=2, lengths=(4, 2), seed=0) -> list[Episode]:
    rng = np.random.default_rng(seed)
    flags = [(True, False), (False, True), (False, False)]
    return [
        Episode(rng.normal(size=(t + 1, obs_dim)), rng.normal(size=(t, act_dim)), rng.normal(size=t), *flags[i % 3])
        for i, t in enumerate(lengths)
    ]


def _raises(fn, *needles: str) -> str:
    """Call fn; it must raise a one-line DatasetError containing every needle."""
    with pytest.raises(DatasetError) as info:
        fn()
    msg = str(info.value)
    assert isinstance(info.value, UserError)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def _assert_same(a: list[Episode], b: list[Episode]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.observations, y.observations)
        np.testing.assert_array_equal(x.actions, y.actions)
        np.testing.assert_array_equal(x.rewards, y.rewards)
        assert (x.terminated, x.truncated) == (y.terminated, y.truncated)


@pytest.fixture
def written(tmp_path) -> Path:
    return write_dataset(tmp_path / "Pendulum-v1" / "medium", _episodes(), "Pendulum-v1",
                         {"level": "medium", "expert_return": np.float32(-150.5)})


# ------------------------------------------------------------------ write / load


def test_round_trip_equal_arrays_and_real_minari_dataset(written):
    ds = load_dataset(written)
    _assert_same(ds.episodes, _episodes())
    assert ds.env_id == "Pendulum-v1" and ds.path == written
    assert ds.metadata == {"level": "medium", "expert_return": -150.5}
    assert (ds.num_steps, ds.obs_dim, ds.action_dim, len(ds.episodes[0])) == (6, 3, 2, 4)
    assert ds.episodes[0].observations.dtype == np.float32
    np.testing.assert_allclose(ds.returns, [ep.ret for ep in _episodes()])
    assert sorted(p.name for p in (written / "data").iterdir()) == ["main_data.hdf5", "metadata.json"]
    # The same directory is a genuine Minari dataset.
    m = minari.MinariDataset(written / "data")
    assert m.spec.dataset_id == "ncdpo/Pendulum-v1/medium-v0"
    assert (m.total_episodes, m.total_steps) == (2, 6)
    np.testing.assert_array_equal(m[0].actions, ds.episodes[0].actions)
    # Pointing at data/ works too.
    _assert_same(load_dataset(written / "data").episodes, ds.episodes)


def test_write_accepts_a_dataset_and_unregistered_env(tmp_path):
    ds = Dataset("MyRobot-v0", _episodes(lengths=(3,)), {"source": "teleop"})
    out = write_dataset(tmp_path / "robot", ds)
    back = load_dataset(out)
    assert (back.env_id, back.metadata) == ("MyRobot-v0", {"source": "teleop"})
    _assert_same(back.episodes, ds.episodes)


def _pixel_episodes(size=16, state_dim=5, lengths=(6, 3), seed=0) -> list[Episode]:
    """[state, image] observations as collect writes them: the image's 0..255 values as float32."""
    rng = np.random.default_rng(seed)
    return [Episode(np.concatenate([rng.normal(size=(t + 1, state_dim)),
                                    rng.integers(0, 256, size=(t + 1, 3 * size * size))], axis=1),
                    rng.normal(size=(t, 2)), rng.normal(size=t), False, True) for t in lengths]


def test_pixel_datasets_store_the_image_as_uint8_and_read_back_exactly(tmp_path):
    episodes = _pixel_episodes()
    pixels = write_dataset(tmp_path / "pixels", episodes, "reach-v3", {"image_size": 16})
    flat = write_dataset(tmp_path / "flat", episodes, "reach-v3", {})  # no image_size: one float32 Box
    _assert_same(load_dataset(pixels).episodes, episodes)
    _assert_same(load_dataset(flat).episodes, episodes)
    with h5py.File(pixels / "data" / "main_data.hdf5") as f:
        obs = f["episode_0/observations"]
        assert (obs["state"].dtype, obs["state"].shape) == (np.float32, (7, 5))
        assert (obs["image"].dtype, obs["image"].shape) == (np.uint8, (7, 16, 16, 3))
        # the image as a camera gives it: row-major (H, W, 3), the layout the flat rows hold
        np.testing.assert_array_equal(obs["image"][2].reshape(-1), episodes[0].observations[2, 5:])
    with h5py.File(flat / "data" / "main_data.hdf5") as f:
        assert f["episode_0/observations"].dtype == np.float32
    # Minari itself reads the Dict space
    m = minari.MinariDataset(pixels / "data")
    assert m.observation_space["image"].dtype == np.uint8 and m[1].observations["image"].shape == (4, 16, 16, 3)
    # images that are not whole numbers in 0..255 (e.g. normalised) stay float32: nothing is lost
    scaled = [Episode(ep.observations / 255.0, ep.actions, ep.rewards, ep.terminated, ep.truncated)
              for ep in episodes]
    kept = write_dataset(tmp_path / "scaled", scaled, "reach-v3", {"image_size": 16})
    _assert_same(load_dataset(kept).episodes, scaled)
    with h5py.File(kept / "data" / "main_data.hdf5") as f:
        assert f["episode_0/observations"].dtype == np.float32


def test_write_is_atomic_and_refuses_overwrite(written, tmp_path, monkeypatch):
    parent = written.parent
    assert [p.name for p in parent.iterdir()] == ["medium"]  # no tmp leftovers
    _raises(lambda: write_dataset(written, _episodes(), "Pendulum-v1"), str(written), "already exists", "overwrite")
    write_dataset(written, _episodes(lengths=(7,)), "Pendulum-v1", overwrite=True)
    assert load_dataset(written).num_steps == 7
    assert [p.name for p in parent.iterdir()] == ["medium"]
    # A crash mid-write leaves neither a dataset nor a tmp dir behind.
    import minari.dataset._storages.hdf5_storage as h5s

    def boom(self, episodes):
        raise RuntimeError("disk full")

    monkeypatch.setattr(h5s.HDF5Storage, "update_episodes", boom)
    with pytest.raises(RuntimeError):
        write_dataset(tmp_path / "crash", _episodes(), "Pendulum-v1")
    with pytest.raises(RuntimeError):
        write_dataset(written, _episodes(), "Pendulum-v1", overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Pendulum-v1"]
    assert [p.name for p in parent.iterdir()] == ["medium"]
    assert load_dataset(written).num_steps == 7  # the old one survived the failed overwrite
    # Never replace something that is not a dataset.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    _raises(lambda: write_dataset(other, _episodes(), "Pendulum-v1", overwrite=True), "not a dataset directory")


def test_write_rejects_bad_episodes(tmp_path):
    bad = _episodes()
    bad[1].actions[0, 0] = np.nan
    _raises(lambda: write_dataset(tmp_path / "x", bad, "Pendulum-v1"), "episode 1", "NaN")
    _raises(lambda: write_dataset(tmp_path / "x", [], "Pendulum-v1"), "no episodes")
    ragged = _episodes(obs_dim=3) + _episodes(obs_dim=4)
    _raises(lambda: write_dataset(tmp_path / "x", ragged, "Pendulum-v1"), "ragged")
    assert not (tmp_path / "x").exists()


def _edit_episode(dataset: Path, key: str, value=None) -> None:
    with h5py.File(dataset / "data" / "main_data.hdf5", "a") as f:
        if key in f["episode_1"]:
            del f["episode_1"][key]
        if value is not None:
            f["episode_1"].create_dataset(key, data=value)


def test_load_errors_are_one_line_with_file_and_problem(written, tmp_path):
    main = str(written / "data" / "main_data.hdf5")
    (written / MANIFEST).unlink()  # a dataset another tool wrote has none: its damage meets the checks below
    _raises(lambda: load_dataset(tmp_path / "nope"), "nope", "no such dataset directory")
    (tmp_path / "empty_dir").mkdir()
    _raises(lambda: load_dataset(tmp_path / "empty_dir"), "empty_dir", "not a Minari dataset", "data/metadata.json")
    (tmp_path / "demo.hdf5").write_bytes(b"x")
    _raises(lambda: load_dataset(tmp_path / "demo.hdf5"), "demo.hdf5", "import")

    _edit_episode(written, "actions")
    _raises(lambda: load_dataset(written), main, "episode_1", "missing key 'actions'")
    _edit_episode(written, "actions", np.zeros((5, 2), np.float32))  # episode 1 has 2 steps
    _raises(lambda: load_dataset(written), main, "episode 1", "length mismatch")
    _edit_episode(written, "actions", np.zeros((2, 3), np.float32))  # act_dim 3 vs 2 in episode 0
    _raises(lambda: load_dataset(written), main, "ragged")
    _edit_episode(written, "actions", np.zeros((2,), np.float32))
    _raises(lambda: load_dataset(written), main, "shape (2,)", "2-D")
    _edit_episode(written, "actions", np.zeros((2, 2), np.float32))
    bad_obs = np.zeros((3, 3), np.float32)
    bad_obs[1, 2] = np.inf
    _edit_episode(written, "observations", bad_obs)
    _raises(lambda: load_dataset(written), main, "observations", "non-finite")

    (written / "data" / "main_data.hdf5").write_bytes(np.random.default_rng(0).bytes(4096))
    _raises(lambda: load_dataset(written), main, "not a readable HDF5 file", "corrupt")
    (written / "data" / "metadata.json").write_text("{not json")
    _raises(lambda: load_dataset(written), "metadata.json", "unreadable metadata")


def test_load_rejects_empty_and_incomplete_datasets(tmp_path):
    from minari.dataset.minari_storage import MinariStorage

    box = gym.spaces.Box(-1, 1, (2,), np.float32)
    (tmp_path / "empty").mkdir()
    MinariStorage.new(tmp_path / "empty" / "data", observation_space=box, action_space=box).update_metadata(
        {"dataset_id": "x/empty-v0", "minari_version": minari.__version__})
    _raises(lambda: load_dataset(tmp_path / "empty"), "main_data.hdf5", "no episodes")

    out = write_dataset(tmp_path / "cut", _episodes(lengths=(2, 3, 4)), "Pendulum-v1")
    with h5py.File(out / "data" / "main_data.hdf5", "a") as f:
        del f["episode_2"]
    _raises(lambda: load_dataset(out), str(out), "corrupt: data/main_data.hdf5 differs from the checksum")
    (out / MANIFEST).unlink()
    _raises(lambda: load_dataset(out), "main_data.hdf5", "total_episodes=3", "incomplete")


def test_the_manifest_catches_damage_no_structural_check_can(written):
    """A changed number is still a valid dataset: only the checksum written with the data finds it,
    whether the user points at the dataset or at its data/ directory."""
    assert load_dataset(written).episodes[1].actions[0, 0] != 0.5
    with h5py.File(written / "data" / "main_data.hdf5", "a") as f:
        f["episode_1"]["actions"][0, 0] = 0.5
    for path in (written, written / "data"):
        _raises(lambda: load_dataset(path), str(written), "corrupt: data/main_data.hdf5 differs", "re-create")
    (written / "data" / "metadata.json").unlink()
    _raises(lambda: load_dataset(written), "not a Minari dataset")  # nothing there to check against


def test_load_foreign_arrow_minari_dataset(tmp_path):
    """A user's Minari dataset in another storage format, without our metadata, still loads."""
    pytest.importorskip("pyarrow")
    from minari.data_collector import EpisodeBuffer
    from minari.dataset.minari_storage import MinariStorage

    eps = _episodes(lengths=(3, 2))
    (tmp_path / "theirs").mkdir()
    storage = MinariStorage.new(tmp_path / "theirs" / "data", env_spec=gym.spec("Pendulum-v1"),
                                observation_space=gym.spaces.Box(-9, 9, (3,), np.float32),
                                action_space=gym.spaces.Box(-9, 9, (2,), np.float32), data_format="arrow")
    storage.update_metadata({"dataset_id": "someone/pendulum/expert-v1", "minari_version": "0.5.4"})
    storage.update_episodes([
        EpisodeBuffer(observations=ep.observations, actions=ep.actions, rewards=ep.rewards,
                      terminations=np.eye(len(ep), dtype=bool)[-1] & ep.terminated,
                      truncations=np.eye(len(ep), dtype=bool)[-1] & ep.truncated)
        for ep in eps
    ])
    ds = load_dataset(tmp_path / "theirs")
    _assert_same(ds.episodes, eps)
    assert ds.env_id == "Pendulum-v1"
    assert ds.metadata["dataset_id"] == "someone/pendulum/expert-v1"


# ------------------------------------------------------------------ D4RL import


def _flat(n=8, obs_dim=3, act_dim=2):
    """Terminal at 2, timeout at 5, then a trailing 2-step run with neither: episodes of 3, 3, 2."""
    rng = np.random.default_rng(1)
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    terminals[2], timeouts[5] = True, True
    return {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "actions": rng.normal(size=(n, act_dim)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
        "next_observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
    }


def _save(path: Path, arrays: dict) -> Path:
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        with h5py.File(path, "w") as f:
            for k, v in arrays.items():
                f.create_dataset(k, data=v)
            f.create_group("infos").create_dataset("qpos", data=np.zeros((3, 2)))  # extra keys are ignored
    return path


def test_import_hdf5_with_next_observations(tmp_path):
    flat = _flat()
    src = _save(tmp_path / "hopper_medium.hdf5", flat)
    out = import_dataset(src, tmp_path / "Hopper-v5" / "medium", "Hopper-v5")
    ds = load_dataset(out)
    assert [len(ep) for ep in ds.episodes] == [3, 3, 2]
    assert [(ep.terminated, ep.truncated) for ep in ds.episodes] == [(True, False), (False, True), (False, True)]
    for ep, (s, e) in zip(ds.episodes, [(0, 3), (3, 6), (6, 8)]):
        np.testing.assert_array_equal(ep.observations[:-1], flat["observations"][s:e])
        np.testing.assert_array_equal(ep.observations[-1], flat["next_observations"][e - 1])
        np.testing.assert_array_equal(ep.actions, flat["actions"][s:e])
        np.testing.assert_array_equal(ep.rewards, flat["rewards"][s:e])
    assert ds.env_id == "Hopper-v5"
    assert ds.metadata["final_observation"] == "next_observations"
    assert ds.metadata["level"] == "medium" and ds.metadata["source"] == str(src)


def test_import_npz_without_next_observations_repeats_last(tmp_path):
    flat = _flat()
    del flat["next_observations"]
    flat["terminals"] = flat["terminals"].astype(np.float32)  # D4RL files often store flags as floats
    out = import_dataset(_save(tmp_path / "d.npz", flat), tmp_path / "ds", "Pendulum-v1")
    ds = load_dataset(out)
    assert [len(ep) for ep in ds.episodes] == [3, 3, 2]
    for ep, last in zip(ds.episodes, [2, 5, 7]):
        np.testing.assert_array_equal(ep.observations[-1], flat["observations"][last])
    assert ds.metadata["final_observation"] == "repeat_last"
    _raises(lambda: import_dataset(tmp_path / "d.npz", out, "Pendulum-v1"), "already exists")
    assert import_dataset(tmp_path / "d.npz", out, "Pendulum-v1", overwrite=True) == out


@pytest.mark.parametrize("suffix", [".hdf5", ".npz"])
def test_import_errors_are_one_line(tmp_path, suffix):
    def attempt(arrays=None, name="bad", raw: bytes | None = None):
        src = tmp_path / f"{name}{suffix}"
        if raw is not None:
            src.write_bytes(raw)
        else:
            _save(src, arrays)
        return lambda: import_dataset(src, tmp_path / "out", "Pendulum-v1")

    no_timeouts = {k: v for k, v in _flat().items() if k != "timeouts"}
    msg = _raises(attempt(no_timeouts, "nokey"), f"nokey{suffix}", "missing key(s) 'timeouts'")
    assert "observations, actions, rewards, terminals, timeouts" in msg
    _raises(attempt({**_flat(), "actions": _flat()["actions"][:-1]}, "short"), f"short{suffix}", "length mismatch")
    nan_obs = _flat()
    nan_obs["observations"][4, 1] = np.nan
    _raises(attempt(nan_obs, "nan"), f"nan{suffix}", "'observations'", "NaN")
    _raises(attempt({**_flat(), "observations": np.zeros(8, np.float32)}, "flat"), f"flat{suffix}", "shape (8,)", "2-D")
    _raises(attempt({**_flat(), "rewards": np.array([b"a"] * 8)}, "text"), f"text{suffix}", "'rewards'", "dtype")
    _raises(attempt(raw=np.random.default_rng(0).bytes(2048), name="junk"), f"junk{suffix}", "not a readable", "corrupt")
    _raises(lambda: import_dataset(tmp_path / f"missing{suffix}", tmp_path / "out", "X-v0"), "missing", "no such file")
    assert not (tmp_path / "out").exists()


def test_import_rejects_unsupported_inputs(tmp_path):
    (tmp_path / "d.csv").write_text("1,2")
    _raises(lambda: import_dataset(tmp_path / "d.csv", tmp_path / "o", "X-v0"), "d.csv", "unsupported file type")
    _raises(lambda: import_dataset(tmp_path, tmp_path / "o", "X-v0"), "is a directory")


# ------------------------------------------------------------------ recording


def test_recording_wrapper_writes_exact_episodes(tmp_path):
    out = tmp_path / "shards"
    env = RecordingWrapper(gym.make("Pendulum-v1", max_episode_steps=5), out)
    env.action_space.seed(0)
    expected, cutoffs = [], []
    for i in range(3):
        obs, _ = env.reset(seed=i)
        observations, actions, rewards = [np.array(obs, np.float32)], [], []
        done = False
        while not done:
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(np.array(obs, np.float32))
            actions.append(np.array(action, np.float32))
            rewards.append(reward)
            done = terminated or truncated
        expected.append(Episode(np.stack(observations), np.stack(actions), np.array(rewards), terminated, truncated))
        cutoffs.append(time.time())
        time.sleep(0.01)
    env.reset(seed=9)  # a cut episode: reset mid-way, then close mid-way
    env.step(env.action_space.sample())
    env.reset(seed=10)
    env.step(env.action_space.sample())
    env.close()

    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 3 and all(n.startswith("episode-") and n.endswith(".npz") for n in names)
    assert all(f"-{os.getpid()}-" in n for n in names)
    episodes = read_shards(out)
    _assert_same(episodes, expected)
    assert all(ep.truncated and not ep.terminated and len(ep) == 5 for ep in episodes)
    _assert_same(read_shards(out, until_time=cutoffs[0]), expected[:1])
    _assert_same(read_shards(out, until_time=cutoffs[1]), expected[:2])
    assert read_shards(out, until_time=cutoffs[0] - 60) == []
    # Shards become a dataset.
    ds = load_dataset(write_dataset(tmp_path / "rec", episodes, "Pendulum-v1", {"source": "recording"}))
    _assert_same(ds.episodes, expected)


def test_read_shards_errors(tmp_path):
    _raises(lambda: read_shards(tmp_path / "none"), "none", "no such recording directory")
    (tmp_path / "episode-0-1-1-x.npz").write_bytes(b"garbage")
    (tmp_path / ".episode-0-1-2-y.npz.tmp").write_bytes(b"half")  # in-flight tmp files are ignored
    _raises(lambda: read_shards(tmp_path), "episode-0-1-1-x.npz", "unreadable episode shard")


# ------------------------------------------------------------------ BC windows and summary


def test_make_windows_pads_both_ends():
    # Episode A: T=3, obs_dim 2, act_dim 1.  Episode B: T=1.
    oa = np.array([[0, 1], [10, 11], [20, 21], [30, 31]], np.float32)
    aa = np.array([[100], [101], [102]], np.float32)
    ob = np.array([[50, 51], [60, 61]], np.float32)
    ab = np.array([[200]], np.float32)
    ds = Dataset("X-v0", [Episode(oa, aa, np.zeros(3)), Episode(ob, ab, np.zeros(1))])
    cond, target = make_windows(ds, obs_history=2, action_chunk=3)
    assert cond.dtype == target.dtype == np.float32
    np.testing.assert_array_equal(cond, [
        [0, 1, 0, 1],  # t=0: o0 repeated before the start
        [0, 1, 10, 11],
        [10, 11, 20, 21],  # the final observation (30, 31) is never a condition
        [50, 51, 50, 51],
    ])
    np.testing.assert_array_equal(target, [
        [100, 101, 102],
        [101, 102, 102],  # the last action repeats past the end
        [102, 102, 102],
        [200, 200, 200],
    ])
    c1, t1 = make_windows(ds.episodes, obs_history=1, action_chunk=1)
    np.testing.assert_array_equal(c1, [[0, 1], [10, 11], [20, 21], [50, 51]])
    np.testing.assert_array_equal(t1, [[100], [101], [102], [200]])
    with pytest.raises(ValueError):
        make_windows(ds, 0, 1)


def test_describe(written):
    text = describe(load_dataset(written))
    assert "\n" not in text
    for needle in ("Pendulum-v1", "2 episodes", "6 steps", "level: medium", "return mean", "min", "max"):
        assert needle in text
