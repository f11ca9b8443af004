"""Demonstration data: Minari datasets on disk, D4RL import, recording from envs, BC windows."""

from ncdpo_rllib.errors import DatasetError

from .d4rl import import_dataset
from .datasets import Dataset, Episode, describe, make_windows
from .minari_store import load_dataset, write_dataset
from .recording import RecordingWrapper, read_shards

__all__ = [
    "Dataset",
    "DatasetError",
    "Episode",
    "RecordingWrapper",
    "describe",
    "import_dataset",
    "load_dataset",
    "make_windows",
    "read_shards",
    "write_dataset",
]
