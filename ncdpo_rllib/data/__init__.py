"""Demonstration data: Minari datasets on disk, D4RL and robomimic import, recording from envs, BC windows."""

from ncdpo_rllib.errors import DatasetError

from .d4rl import import_dataset
from .datasets import Dataset, Episode, describe, make_windows
from .minari_store import load_dataset, write_dataset
from .recording import RecordingWrapper, read_shards
from .robomimic import import_robomimic

__all__ = [
    "Dataset",
    "DatasetError",
    "Episode",
    "RecordingWrapper",
    "describe",
    "import_dataset",
    "import_robomimic",
    "load_dataset",
    "make_windows",
    "read_shards",
    "write_dataset",
]
