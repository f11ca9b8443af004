"""Checkpoints: RLlib's own ``save_to_path`` plus the run's bookkeeping, written atomically.

Layout of one checkpoint directory (self-contained: ``evaluate`` and ``--resume`` need
nothing else)::

    <run dir>/checkpoints/iter_000010/
        experiment.yaml      the resolved experiment config
        ncdpo_state.json     iteration, env steps, wall seconds, best return, MLflow run id
        algorithm_state.pkl, learner_group/, env_runner/, ...   (RLlib's checkpoint)
        ncdpo_manifest.json  the SHA-256 of every other file, written last

It is written under a hidden temporary name and renamed into place when complete, so a
crash never leaves a half-written checkpoint where a reader would look. Reading one checks the
manifest first: a truncated or altered file is a one-line error naming it (not a crash deep in
RLlib), and a run directory falls back to its newest intact checkpoint, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from datetime import datetime
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import yaml

from .config import ExperimentConfig, parse_config
from ncdpo_rllib.errors import CheckpointError, ConfigError, one_line
from ncdpo_rllib.integrity import MANIFEST, NoSpace, manifest_problem, no_space_message, staged, tree_size, write_manifest

STATE_FILE = "ncdpo_state.json"
CONFIG_FILE = "experiment.yaml"
FINAL = "final"


@dataclass
class RunState:
    iteration: int = 0
    env_steps: int = 0
    wall_s: float = 0.0
    best_return: Optional[float] = None
    last_return: Optional[float] = None
    mlflow_run_id: Optional[str] = None
    mlflow_uri: Optional[str] = None
    run_dir: Optional[str] = None
    """Absolute, so that --resume works from any working directory."""


def save_checkpoint(algo, ckpt_dir: Path, exp: ExperimentConfig, state: RunState) -> Path:
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.parent / f".tmp-{ckpt_dir.name}"
    try:
        with staged(tmp):
            algo.save_to_path(str(tmp.resolve()))
            unfinished = unfinished_components(tmp)
            if unfinished:  # not a user error: train() turns a dead learner into its one line
                raise RuntimeError(f"RLlib did not finish writing {', '.join(unfinished)} of checkpoint {ckpt_dir} "
                                   "(the process that holds it stopped answering)")
            (tmp / CONFIG_FILE).write_text(exp.to_yaml())
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
            write_manifest(tmp)
    except NoSpace as e:
        run_dir = ckpt_dir.parent.parent
        kept = [p for p in (*periodic_checkpoints(run_dir), ckpt_dir) if (p / STATE_FILE).is_file()]
        needed = max([e.written, *map(tree_size, kept)])
        then = (f"the previous checkpoints are untouched (newest: {kept[-1]}); free space, then continue with: "
                f"ncdpo train --resume {run_dir}") if kept else "no earlier checkpoint; free space, then start again"
        raise CheckpointError(f"{no_space_message('checkpoint', ckpt_dir, needed)}; {then}") from None
    old = ckpt_dir.parent / f".old-{ckpt_dir.name}"
    if ckpt_dir.exists():  # swap: at every instant one complete checkpoint has the name or .old-
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)
    return ckpt_dir


def unfinished_components(path: Path) -> list[str]:
    """The parts of an RLlib checkpoint at ``path`` whose writing did not finish. RLlib writes each
    component's ``metadata.json`` first and its state file (``state.*``; an RLModule's
    ``module_state.*``) last; a remote Learner writes its own part, and RLlib 2.60 does not check
    that it did (a Learner killed while saving leaves a checkpoint that fails to restore)."""
    path = Path(path)
    return [str(meta.parent.relative_to(path)) or "." for meta in sorted(path.rglob("metadata.json"))
            if not any(meta.parent.glob("state.*")) and not any(meta.parent.glob("module_state.*"))]


def checkpoint_problem(path: Path) -> Optional[str]:
    """What is wrong with a checkpoint directory (its manifest's verdict, or an RLlib part whose
    writing did not finish: a checkpoint from before that check), or None."""
    problem = manifest_problem(path)
    unfinished = unfinished_components(path) if problem is None else []
    return f"incomplete: RLlib did not finish writing {', '.join(unfinished)}" if unfinished else problem


_REPORTED: set[str] = set()


def clean_stale(run_dir: Path) -> None:
    """Remove temporary checkpoint directories a crashed run left behind."""
    root = Path(run_dir) / "checkpoints"
    for stale in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
    for old in root.glob(".old-*") if root.is_dir() else []:
        target = root / old.name.removeprefix(".old-")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:  # crashed between the two renames: the old checkpoint is the complete one
            os.replace(old, target)


def supersede_later_checkpoints(run_dir: Path, iteration: int) -> list[Path]:
    """Resuming from iteration N: move checkpoints of later iterations aside (kept, not deleted)."""
    moved = []
    root = Path(run_dir) / "checkpoints"
    for ckpt in [*periodic_checkpoints(run_dir), root / FINAL]:
        state_file = ckpt / STATE_FILE
        if not state_file.is_file():
            continue
        try:
            later = json.loads(state_file.read_text()).get("iteration", 0) > iteration
        except (OSError, json.JSONDecodeError):
            later = False
        if later:
            dest = Path(run_dir) / "superseded" / f"{ckpt.name}-{datetime.now():%Y%m%d-%H%M%S}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(ckpt, dest)
            moved.append(dest)
    return moved


def periodic_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("iter_*") if p.is_dir()) if root.is_dir() else []


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the ``keep`` newest periodic checkpoints (names sort by iteration)."""
    for old in periodic_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir (checked against its manifest), or a run dir (-> its final checkpoint, else
    its latest periodic one: the newest intact one, with a line on stderr for each one skipped)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} not found")
    if (p / STATE_FILE).is_file() or (p / MANIFEST).is_file():
        problem = checkpoint_problem(p)
        if problem:
            raise CheckpointError(f"checkpoint {str(p)!r} is {problem}")
        return p
    skipped = []
    for candidate in [p / "checkpoints" / FINAL, *reversed(periodic_checkpoints(p))]:
        if not (candidate / STATE_FILE).is_file() and not (candidate / MANIFEST).is_file():
            continue
        problem = checkpoint_problem(candidate)
        if problem is None and (candidate / STATE_FILE).is_file():
            for bad, why in skipped:
                if bad not in _REPORTED:
                    _REPORTED.add(bad)
                    print(f"checkpoint {bad} is {why}; using the newest intact one, {candidate}", file=sys.stderr)
            return candidate
        skipped.append((str(candidate), problem or f"incomplete: {STATE_FILE} missing"))
    if skipped:
        raise CheckpointError(f"no intact checkpoint in {str(p)!r}: " + "; ".join(f"{b} is {w}" for b, w in skipped))
    raise CheckpointError(
        f"{str(p)!r} is not an ncdpo checkpoint (no {STATE_FILE}); pass a directory under "
        "<run>/checkpoints/ or a run directory"
    )


def restore_failed(ckpt: Path, e: BaseException) -> CheckpointError:
    """The one-line error for a checkpoint RLlib could not load (damaged or foreign files)."""
    msg = one_line(e, with_type=True)
    return CheckpointError(f"checkpoint {str(ckpt)!r} could not be restored: {msg}")


def load_checkpoint_meta(path: str | Path, overrides: Optional[list[str]] = None) -> tuple[Path, ExperimentConfig, RunState]:
    """Read and check a checkpoint's config and state (not the weights)."""
    ckpt = resolve_checkpoint(path)
    try:
        state = RunState(**json.loads((ckpt / STATE_FILE).read_text()))
        raw = yaml.safe_load((ckpt / CONFIG_FILE).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} is incomplete: {Path(e.filename).name} missing") from None
    except (json.JSONDecodeError, TypeError, yaml.YAMLError) as e:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} is corrupt: {one_line(e, with_type=True)}") from None
    try:
        exp = parse_config(raw, overrides)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has an invalid {CONFIG_FILE}: {e}") from None
    if not (ckpt / "algorithm_state.pkl").is_file() and not any(ckpt.glob("algorithm_state*")):
        raise CheckpointError(f"checkpoint {str(ckpt)!r} is incomplete: RLlib's algorithm state is missing")
    return ckpt, exp, state
