"""Hostile inputs (property-based, ``hypothesis``): whatever YAML document or ``--set`` value a user
writes, reading the config either works or raises our one-line ConfigError, never another exception;
any byte-level corruption of a checkpoint file is a one-line CheckpointError naming the file."""

import shutil
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


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_byte_corruption_of_a_checkpoint_is_a_one_line_error_naming_the_file(tmp_path, data, checkpoint):
    from ncdpo_rllib.experiment.checkpoints import MANIFEST, load_checkpoint_meta

    files = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())
    rel = data.draw(st.sampled_from([f for f in files if f != MANIFEST]))
    copy = tmp_path / f"ckpt-{data.draw(st.integers(0, 10**9))}"
    shutil.copytree(checkpoint, copy)
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
        return
    target.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_meta(copy)
    assert rel in str(err.value) and "\n" not in str(err.value).strip()
    shutil.rmtree(copy)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """One real (tiny) training checkpoint, shared by the corruption examples."""
    from tests.conftest import TINY, last_json, run_cli

    root = tmp_path_factory.mktemp("ckpt")
    (root / "tiny.yaml").write_text(TINY)
    out = run_cli(["train", root / "tiny.yaml", "--set", "stop.iterations=1", "--set", "tracking.enabled=false",
                   "--json"], root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / last_json(out.stdout)["checkpoint"]

