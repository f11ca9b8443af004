"""Experiments: the typed config, the train / evaluate runners, checkpoints, MLflow tracking."""

from .config import ExperimentConfig, load_config, parse_config
from ncdpo_rllib.errors import CheckpointError, ConfigError, UserError

__all__ = ["CheckpointError", "ConfigError", "ExperimentConfig", "UserError", "load_config", "parse_config"]
