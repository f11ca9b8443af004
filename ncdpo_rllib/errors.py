"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class UserError(Exception):
    """A problem with what the user gave us (config, paths, checkpoints): no traceback."""


class ConfigError(UserError):
    """An invalid experiment configuration."""


class CheckpointError(UserError):
    """A missing, incomplete or corrupt checkpoint."""


class TrainingDiverged(UserError):
    """Parameters became NaN/inf: the message names the last good checkpoint."""


class DatasetError(UserError):
    """A missing, malformed or corrupt demonstration dataset: the message names the file, problem and fix."""
