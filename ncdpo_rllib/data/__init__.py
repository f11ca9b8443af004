"""Demonstration data: Minari datasets on disk, D4RL import, recording from envs, BC windows."""

from ncdpo_rllib.data.datasets import (
    Dataset,
    Episode,
    describe,
    import_dataset,
    load_dataset,
    make_windows,
    write_dataset,
)
from ncdpo_rllib.data.recording import RecordingWrapper, read_shards
from ncdpo_rllib.errors import DatasetError

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
