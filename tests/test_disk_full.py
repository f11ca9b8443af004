"""A full disk, for real: a size-limited tmpfs (mounted here; the test is skipped where the machine
refuses mounts). A checkpoint or dataset write that runs out of space leaves the previous version
untouched and loadable, leaves no temporary files, and stops with one line naming the path and the
space needed and free."""

import contextlib
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ncdpo_rllib.integrity import manifest_problem, tree_size
from tests.conftest import TINY, run_cli


@contextlib.contextmanager
def small_filesystem(path: Path, size_bytes: int):
    """A tmpfs of size_bytes (rounded up to 4 KiB pages) mounted at path, unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    size = 4096 * math.ceil(size_bytes / 4096)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN): {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _episodes(steps: int, seed: int = 0):
    from ncdpo_rllib.data import Episode

    rng = np.random.default_rng(seed)
    return [Episode(observations=rng.normal(size=(steps + 1, 17)).astype(np.float32),
                    actions=rng.uniform(-1, 1, (steps, 6)).astype(np.float32),
                    rewards=rng.normal(size=steps).astype(np.float32), truncated=True)]


def test_a_dataset_that_does_not_fit_leaves_the_previous_one(tmp_path):
    from ncdpo_rllib.data import DatasetError, load_dataset, write_dataset

    with small_filesystem(tmp_path / "disk", 1 << 20) as disk:
        small = write_dataset(disk / "medium", _episodes(100), "HalfCheetah-v5")
        with pytest.raises(DatasetError) as err:
            write_dataset(disk / "medium", _episodes(20_000, seed=1), "HalfCheetah-v5", overwrite=True)  # ~2 MB
        message = str(err.value)
        assert "\n" not in message and f"no space left to write dataset {small}" in message, message
        assert "MB free there" in message and "already there is untouched" in message
        assert load_dataset(small).episodes[0].actions.shape == (100, 6)
        assert manifest_problem(small) is None
        assert sorted(p.name for p in disk.iterdir()) == ["medium"]  # no temporary directory left


def test_a_checkpoint_that_does_not_fit_stops_in_one_line_and_keeps_the_previous_one(tmp_path, tiny_run):
    """iter_000001 fits, the final checkpoint does not: exit 2, one line with the path, the sizes and
    the --resume command; iter_000001 intact; no temporary checkpoint left."""
    from ncdpo_rllib.experiment.checkpoints import load_checkpoint_meta

    size = tree_size(tiny_run / "checkpoints" / "final")
    (tmp_path / "tiny.yaml").write_text(TINY)
    with small_filesystem(tmp_path / "runs", int(size * 1.5)):  # tree_size: allocated blocks, as tmpfs counts
        proc = run_cli(["train", "tiny.yaml", "--set", "tracking.enabled=false", "--set", "tracking.run_name=full"],
                       tmp_path)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        (line,) = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
        run_dir = tmp_path / "runs" / "full"
        assert f"no space left to write checkpoint {run_dir.resolve() / 'checkpoints' / 'final'}" in line, line
        assert "MB free there" in line and f"ncdpo train --resume {run_dir.resolve()}" in line, line
        kept = run_dir / "checkpoints" / "iter_000001"
        assert f"newest: {kept.resolve()}" in line, line
        assert manifest_problem(kept) is None and load_checkpoint_meta(kept)[2].iteration == 1
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["iter_000001"]
