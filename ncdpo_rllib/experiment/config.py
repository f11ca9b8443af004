"""The typed experiment configuration: one YAML file, validated once, here, at the edge.

Every key, its type and default is declared below; ``docs/configuration.md`` documents
them. Unknown keys and wrong types raise ``ConfigError`` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ncdpo_rllib.diffusion import DiffusionConfig

from .errors import ConfigError


@dataclass
class EnvConfig:
    """The task."""

    id: str = "Pendulum-v1"
    """A Gymnasium env id (registered, e.g. ``Pendulum-v1``, ``HalfCheetah-v5``)."""
    kind: Literal["gymnasium"] = "gymnasium"
    """Env family (PettingZoo multi-agent envs come with the multi-agent issue)."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments for ``gymnasium.make``."""
    normalize_observations: bool = True
    """RLlib's MeanStdFilter connector; its statistics are saved in checkpoints."""


@dataclass
class StopConfig:
    """Training stops when any criterion that is set (not null) is reached."""

    env_steps: Optional[int] = 200_000
    """Stop after this many env steps (checked after each iteration; null = no limit)."""
    iterations: Optional[int] = None
    """Stop after this many training iterations (null = no limit)."""

    def __post_init__(self):
        if self.env_steps is None and self.iterations is None:
            raise ValueError("stop: set env_steps or iterations")
        for name in ("env_steps", "iterations"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"stop.{name} must be >= 1")


@dataclass
class PPOSection:
    """PPO hyperparameters, shared by NCDPO and the MLP PPO baseline (one key apart)."""

    lr: float = 3e-4
    """Actor learning rate (the only one for algorithm: ppo)."""
    critic_lr: Optional[float] = 1e-3
    """Critic learning rate (ncdpo only; null = lr)."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda (RLlib's ``lambda_``)."""
    clip_param: float = 0.2
    """PPO ratio clip epsilon."""
    vf_clip_param: float = 10.0
    """Clip of the squared value error (RLlib's convention)."""
    vf_loss_coeff: float = 1.0
    """Weight of the value loss (ncdpo: the critic has its own optimizer, so mostly a scale)."""
    entropy_coeff: float = 0.0
    """Entropy bonus of the final-step Gaussian (state-independent for ncdpo)."""
    num_epochs: int = 10
    """Passes over each iteration's batch."""
    minibatch_size: int = 128
    """Rows per gradient step."""
    train_batch_size: int = 4000
    """Env steps sampled per training iteration."""
    actor_grad_clip: Optional[float] = 0.5
    """Global-norm clip of the actor's gradient (ncdpo)."""
    critic_grad_clip: Optional[float] = 0.5
    """Global-norm clip of the critic's gradient (ncdpo)."""
    grad_clip: Optional[float] = 0.5
    """Global-norm clip of the single optimizer (algorithm: ppo)."""
    target_kl: Optional[float] = None
    """Stop an iteration's epochs once a minibatch's approx KL exceeds 1.5 x this (ncdpo)."""
    critic_hidden: list[int] = field(default_factory=lambda: [256, 256])
    """Critic MLP layer sizes (ncdpo; the ppo baseline keeps RLlib's default module)."""

    def __post_init__(self):
        if self.minibatch_size > self.train_batch_size:
            raise ValueError("ppo.minibatch_size must be <= ppo.train_batch_size")
        for name in ("lr", "gamma", "num_epochs", "minibatch_size", "train_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ppo.{name} must be > 0")


@dataclass
class ResourcesConfig:
    """Where rollouts and updates run (RLlib's env_runners / learners settings)."""

    env_runners: int = 1
    """Remote EnvRunner actors (0 = sample in the driver process)."""
    envs_per_runner: int = 8
    """Vectorised envs per EnvRunner."""
    cpus_per_runner: int = 1
    """CPUs reserved per EnvRunner actor."""
    learners: int = 0
    """Remote Learner actors (0 = one local learner in the driver)."""
    gpus_per_learner: float = 0
    """GPUs per learner (0 = CPU)."""

    def __post_init__(self):
        if min(self.env_runners, self.learners, self.gpus_per_learner) < 0:
            raise ValueError("resources: env_runners, learners and gpus_per_learner must be >= 0")
        if self.envs_per_runner < 1 or self.cpus_per_runner < 1:
            raise ValueError("resources: envs_per_runner and cpus_per_runner must be >= 1")


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    enabled: bool = True
    """false = no MLflow run at all."""
    experiment: str = "default"
    """MLflow experiment name."""
    uri: Optional[str] = None
    """MLflow tracking URI; null = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd."""
    run_name: Optional[str] = None
    """MLflow run name and run directory name; null = <algorithm>-<env>-s<seed>-<time>."""


@dataclass
class CheckpointConfig:
    """Checkpoints (RLlib's, plus the resolved config and run state)."""

    dir: str = "runs"
    """Each run writes runs/<run name>/ (checkpoints, the resolved config)."""
    every: int = 10
    """Checkpoint every N iterations (0 = only at the end)."""
    keep: int = 3
    """Periodic checkpoints kept (the final one is always kept)."""

    def __post_init__(self):
        if self.every < 0 or self.keep < 1:
            raise ValueError("checkpoint: every must be >= 0 and keep >= 1")


@dataclass
class ExperimentConfig:
    """One experiment: a YAML file maps onto this, section by section."""

    algorithm: Literal["ncdpo", "ppo"] = "ncdpo"
    """ncdpo = the diffusion policy; ppo = RLlib's PPO with its default MLP module."""
    env: EnvConfig = field(default_factory=EnvConfig)
    seed: int = 0
    """Seeds envs, torch and the rollout noise (RLlib's ``debugging(seed=...)``)."""
    stop: StopConfig = field(default_factory=StopConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    ppo: PPOSection = field(default_factory=PPOSection)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- parsing and validation ---------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {int: "integer", float: "number", bool: "true/false", str: "string", dict: "mapping"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {_type_name(tp)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads "1e-4" as a string: accept what float() reads as a number.
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported annotation {tp} for {key}")
    if not ok or (tp is float and not math.isfinite(value)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "the config file"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {full!r}{hint}; allowed keys here: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ValueError as e:
        msg = str(e)
        raise ConfigError(msg if prefix == "" or msg.startswith(prefix) else f"{prefix}: {msg}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings (value parsed as YAML) to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        *parents, last = dotted.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {part!r} is not a mapping")
            node = child
        node[last] = value
    return data


def parse_config(data: Any, overrides: Optional[list[str]] = None) -> ExperimentConfig:
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of keys, got {type(data).__name__}")
    data = apply_overrides(dict(data), overrides or [])
    return _build(ExperimentConfig, data, "")


def load_config(path: Union[str, Path, None], overrides: Optional[list[str]] = None) -> ExperimentConfig:
    """Read and validate a YAML experiment file (None: all defaults)."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    return parse_config(data, overrides)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
