"""``ncdpo collect``: make demonstration datasets the way D4RL did, with RLlib's PPO.

1. Train an MLP-PPO expert (this config's ppo / stop / resources), checkpointing every
   ``collect.checkpoint_every`` iterations, with every training rollout recorded raw
   (``RecordingWrapper`` below RLlib's connectors), or take an existing ppo run.
2. Rate every checkpoint (deterministic episodes). expert = the best; medium = the
   earlier checkpoint whose return is closest to ``medium_fraction`` x the expert's.
3. Record ``steps_per_level`` env steps of each policy (its mean action unless
   ``collect.stochastic``) and write
   the levels: expert, medium, medium-replay (the training rollouts up to the medium
   checkpoint), medium-expert (medium + expert), as datasets under <out>/<env id>/<level>/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from .checkpoints import FINAL, STATE_FILE, load_checkpoint_meta, periodic_checkpoints, resolve_checkpoint
from .config import ExperimentConfig
from ncdpo_rllib.errors import ConfigError, TrainingInterrupted

from .stopping import StopRequest, interruptible
from .tracking import Tracker

ROLLOUTS = "rollouts"


def _level_dirs(exp: ExperimentConfig) -> dict[str, Path]:
    root = Path(exp.collect.out) / exp.env.id
    return {level: root / level for level in exp.collect.levels}


def _run_checkpoints(run_dir: Path) -> list[Path]:
    final = run_dir / "checkpoints" / FINAL
    return [*periodic_checkpoints(run_dir), *([final] if (final / STATE_FILE).is_file() else [])]


def _rate(ckpts: list[Path], episodes: int, log) -> list[tuple[Path, float]]:
    from .evaluate import evaluate

    rated = []
    for ckpt in ckpts:
        ret = evaluate(str(ckpt), episodes=episodes, track=False)["return_mean"]
        log(f"rated {ckpt.parent.parent.name}/{ckpt.name}: return {ret:.1f}")
        rated.append((ckpt, ret))
    return rated


def pick_levels(rated: list[tuple[Path, float]], fraction: float) -> tuple[int, int]:
    """(expert index, medium index): the best checkpoint, and the one before it whose return
    is closest to fraction x expert's (the earliest checkpoint if the expert is the first)."""
    returns = np.array([r for _, r in rated])
    expert = int(returns.argmax())
    if expert == 0:
        return 0, 0
    medium = int(np.abs(returns[:expert] - fraction * returns[expert]).argmin())
    return expert, medium


def record_policy(ckpt: Path, steps: int, stochastic: bool, seed: int, log, label: str):
    """Whole episodes of a checkpoint's policy, at least ``steps`` env steps in all."""
    from ncdpo_rllib.data import read_shards

    from .evaluate import load_env_runner

    ckpt, exp, _ = load_checkpoint_meta(ckpt)
    with tempfile.TemporaryDirectory(prefix="ncdpo-record-") as tmp:
        runner = load_env_runner(ckpt, exp, seed=seed, record_dir=tmp, num_envs=8)
        try:
            episodes = []
            while sum(len(ep) for ep in episodes) < steps:
                runner.sample(num_timesteps=min(steps, 8000), explore=stochastic, random_actions=False)
                episodes = read_shards(tmp)
                log(f"  {label}: {sum(len(ep) for ep in episodes):,}/{steps:,} env steps, {len(episodes)} episodes")
        finally:
            runner.stop()
    kept, total = [], 0
    for ep in episodes:  # whole episodes, as few as reach the budget
        if total >= steps:
            break
        kept.append(ep)
        total += len(ep)
    return kept


def collect(exp: ExperimentConfig, *, resume: str | Path | None = None,
            log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Train (or, with ``resume``, continue training) the expert, then rate its checkpoints and record
    the datasets. ``resume``: the expert's run directory after an interruption; a finished expert is
    not trained again (an interruption while rating or recording loses only that part)."""
    from .build import check_experiment
    from .train import train

    c = exp.collect
    if c.scripted:
        if resume is not None:
            raise ConfigError("collect.scripted records in one pass: there is nothing to --resume; run it again")
        return collect_scripted(exp, log=log)
    if exp.env.pixels:
        raise ConfigError("pixel datasets are recorded from the scripted experts: set collect.scripted: true")
    if exp.algorithm != "ppo":
        raise ConfigError("collect trains an MLP-PPO expert: set algorithm: ppo")
    if exp.env.kind == "pettingzoo":
        raise ConfigError("collect records single-agent datasets: env.kind must be gymnasium, metaworld or robosuite")
    if exp.eval.every:
        raise ConfigError("collect: set eval.every to 0 (evaluation episodes would be recorded as "
                          "training rollouts); checkpoints are rated after training")
    if exp.env.action_chunk != 1 or exp.env.obs_history != 1:
        raise ConfigError("collect records per-step data: set env.action_chunk and env.obs_history to 1 "
                          "(chunks are made at pre-training)")
    check_experiment(exp)
    levels = _level_dirs(exp)
    taken = [str(p) for p in levels.values() if p.exists()]
    if taken:
        raise ConfigError(f"dataset directory {taken[0]} already exists: remove it or set collect.out")

    if c.expert_checkpoint is not None and resume is not None:
        raise ConfigError("collect: --resume continues the expert's training; collect.expert_checkpoint takes a "
                          "trained one: give one or the other")
    trained = None if resume is None else Path(resume) / "checkpoints" / FINAL
    if trained is not None and (trained / STATE_FILE).is_file():  # the expert finished: rate and record only
        _expert_state(trained, exp, "--resume")
        run_dir = Path(resume).resolve()
        ckpts = _run_checkpoints(run_dir)
        log(f"the expert in {run_dir} finished training: rating its {len(ckpts)} checkpoints")
    elif c.expert_checkpoint is not None:
        ckpt = resolve_checkpoint(c.expert_checkpoint)
        state = _expert_state(ckpt, exp, "collect.expert_checkpoint")
        run_dir = Path(state.run_dir or ckpt.parent.parent)
        ckpts = _run_checkpoints(run_dir) or [ckpt]
    else:
        ck = dataclasses.replace(exp.checkpoint, every=c.checkpoint_every, keep=10**6)
        summary = train(dataclasses.replace(exp, checkpoint=ck), resume=resume, log=log, record_rollouts=True,
                        resume_command="ncdpo collect --resume {run_dir}")
        run_dir = Path(summary["run_dir"])
        ckpts = _run_checkpoints(run_dir)

    tracker = Tracker(exp, tags={"stage": "collect", "expert_run_dir": str(run_dir)})
    status = "FAILED"
    try:
        try:
            with interruptible():  # no safe point while rating and recording: abandon it, write nothing
                summary = _rate_and_record(exp, run_dir, ckpts, levels, log)
        except KeyboardInterrupt:
            status = "KILLED"
            raise TrainingInterrupted(f"stopped by a signal while rating and recording (no dataset written); the "
                                      f"expert is trained; continue with: ncdpo collect --resume {run_dir}") from None
        tracker.log_metrics(_collect_metrics(summary), step=0)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "collect.json").write_text(json.dumps(summary, indent=2))
            tracker.log_artifact(Path(tmp) / "collect.json")
        status = "FINISHED"
        return {**summary, "mlflow_run_id": tracker.run_id}
    finally:
        tracker.finish(status)


def _expert_state(ckpt: Path, exp: ExperimentConfig, given_as: str):
    """The run state of an expert checkpoint, which must be MLP PPO on this config's env."""
    _, ckpt_exp, state = load_checkpoint_meta(ckpt)
    if ckpt_exp.algorithm != "ppo" or ckpt_exp.env.id != exp.env.id:
        raise ConfigError(f"{given_as} {ckpt} is a {ckpt_exp.algorithm} run on {ckpt_exp.env.id}; it must be "
                          f"algorithm: ppo on {exp.env.id}")
    return state


def _collect_metrics(summary: dict) -> dict[str, float]:
    out = {"collect/expert_return": summary["expert_return"], "collect/medium_return": summary["medium_return"]}
    for level, d in summary["datasets"].items():
        for key in ("episodes", "steps", "return_mean", "return_std"):
            out[f"dataset/{level}/{key}"] = d[key]
    return out


def _rate_and_record(exp: ExperimentConfig, run_dir: Path, ckpts: list[Path], levels: dict[str, Path], log) -> dict:
    from ncdpo_rllib.data import read_shards, write_dataset

    c = exp.collect
    rated = _rate(ckpts, c.eval_episodes, log)
    i_exp, i_med = pick_levels(rated, c.medium_fraction)
    expert_ckpt, expert_ret = rated[i_exp]
    medium_ckpt, medium_ret = rated[i_med]
    log(f"expert: {expert_ckpt} (return {expert_ret:.1f}); medium: {medium_ckpt} (return {medium_ret:.1f})")

    meta = {"expert_checkpoint": str(expert_ckpt), "expert_return": expert_ret,
            "medium_checkpoint": str(medium_ckpt), "medium_return": medium_ret,
            "stochastic": c.stochastic, "source": "ncdpo collect (RLlib PPO)"}
    episodes: dict[str, list] = {}
    if {"expert", "medium-expert"} & set(levels):
        episodes["expert"] = record_policy(expert_ckpt, c.steps_per_level, c.stochastic, exp.seed, log, "expert")
    if {"medium", "medium-expert"} & set(levels):
        episodes["medium"] = record_policy(medium_ckpt, c.steps_per_level, c.stochastic, exp.seed + 1, log, "medium")
    if "medium-replay" in levels:
        rollouts = run_dir / ROLLOUTS
        if rollouts.is_dir():
            until = (medium_ckpt / STATE_FILE).stat().st_mtime
            episodes["medium-replay"] = read_shards(rollouts, until_time=until)
        else:
            log(f"medium-replay skipped: {rollouts} has no recorded training rollouts")
    if "medium-expert" in levels:
        episodes["medium-expert"] = episodes["medium"] + episodes["expert"]

    empty = [level for level in levels if level in episodes and not episodes[level]]
    if empty:  # checked before writing anything: never half a set of levels
        raise ConfigError(f"collect: no complete episodes for level(s) {', '.join(empty)}; "
                          "raise collect.steps_per_level or train the expert longer")
    # Every level is written under a staging directory first and moved into place at the end (a first
    # signal waits for the moves): an interruption leaves no level, never some of them.
    staging = Path(c.out) / exp.env.id / f".collect-{run_dir.name}"
    shutil.rmtree(staging, ignore_errors=True)
    written = {}
    try:
        for level, path in levels.items():
            if level not in episodes:
                continue
            eps = episodes[level]
            write_dataset(staging / level, eps, exp.env.id, {**meta, "level": level})
            rets = np.array([ep.ret for ep in eps])
            written[level] = {"path": str(path.resolve()), "episodes": len(eps), "steps": int(sum(len(e) for e in eps)),
                              "return_mean": float(rets.mean()), "return_std": float(rets.std())}
            log(f"wrote {level}: {path} ({len(eps)} episodes, {written[level]['steps']:,} steps, "
                f"return {rets.mean():.1f} +- {rets.std():.1f})")
        with StopRequest(log, "move of the datasets into place"):
            for level in written:
                os.replace(staging / level, levels[level])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"run_dir": str(run_dir), "expert_return": expert_ret, "medium_return": medium_ret, "datasets": written}


SCRIPTED = "scripted"
GIVE_UP_BEFORE = 25
"""A 'failed' scripted episode: the expert acts for fewer than this many steps, then random actions."""


def scripted_episodes(exp: ExperimentConfig, rng: np.random.Generator, log):
    """The task's scripted expert, degraded as ``collect`` asks; (episodes, success flags, the
    expert's name, the observation's keys as slices: robosuite's ``obs_slices``, else None)."""
    from ncdpo_rllib.data import Episode
    from ncdpo_rllib.tasks.envs import scripted_expert

    c = exp.collect
    env, expert, source = scripted_expert(exp.env)  # with pixels: observations are [state, image]
    episodes, successes, total = [], [], 0
    try:
        while total < c.steps_per_level:
            obs, _ = env.reset(seed=int(rng.integers(2**31)))
            give_up = int(rng.integers(0, GIVE_UP_BEFORE)) if rng.random() < c.failed_fraction else None
            observations, actions, rewards, success = [obs], [], [], 0.0
            while True:
                if give_up is not None and len(actions) >= give_up:
                    action = rng.uniform(-1, 1, env.action_space.shape)
                else:
                    action = expert(obs) + c.action_noise * rng.standard_normal(env.action_space.shape)
                action = np.clip(action, -1, 1).astype(np.float32)
                obs, reward, terminated, truncated, info = env.step(action)
                observations.append(obs)
                actions.append(action)
                rewards.append(reward)
                success = max(success, float(info["success"]))
                if terminated or truncated:
                    break
            episodes.append(Episode(np.array(observations), np.array(actions), np.array(rewards), terminated, truncated))
            successes.append(success)
            total += len(actions)
            if len(episodes) % 10 == 0:
                log(f"scripted {exp.env.id}: {len(episodes)} episodes, {total:,} steps, "
                    f"success rate {np.mean(successes):.2f}")
        layout = getattr(env.unwrapped, "obs_slices", None)
    finally:
        env.close()
    return episodes, successes, source, layout


def scripted_level(exp: ExperimentConfig) -> str:
    """scripted, or scripted-pixels<size>[-<extra camera>...] (observations [state, images]: for
    pixels and pixels_state)."""
    if not exp.env.pixels:
        return SCRIPTED
    return "-".join([f"{SCRIPTED}-pixels{exp.env.image_size}", *exp.env.extra_cameras])


def collect_scripted(exp: ExperimentConfig, *, log) -> dict:
    """``collect.scripted``: a Meta-World or robosuite task's scripted expert -> <out>/<task>/scripted (Minari)."""
    from ncdpo_rllib.data import write_dataset

    from ncdpo_rllib.tasks.envs import check_scripted

    c = exp.collect
    check_scripted(exp.env)
    from .build import check_experiment

    check_experiment(exp)
    path = Path(c.out) / exp.env.id / scripted_level(exp)
    robomimic_file = path.with_name(path.name + ".hdf5")  # robosuite tasks: robomimic's layout as well
    for existing in (path, robomimic_file):
        if existing.exists():
            raise ConfigError(f"{existing} already exists: remove it or set collect.out")
    tracker = Tracker(exp, tags={"stage": "collect"})
    status = "FAILED"
    try:
        episodes, successes, source, layout = scripted_episodes(exp, np.random.default_rng(exp.seed), log)
        rets = np.array([ep.ret for ep in episodes])
        meta = {"source": source,
                "observation": exp.env.observation, "image_size": exp.env.image_size if exp.env.pixels else None,
                "camera": exp.env.camera if exp.env.pixels else None,
                "cameras": exp.env.cameras if exp.env.pixels else None,
                "action_noise": c.action_noise, "failed_fraction": c.failed_fraction,
                "success_rate": float(np.mean(successes)), "episode_success": successes}
        if layout is not None:
            from ncdpo_rllib.data.robomimic import write_robomimic
            from ncdpo_rllib.tasks.robosuite_tasks import CONTROLLER

            image = ([f"{c}_image" for c in exp.env.cameras], exp.env.image_size) if exp.env.pixels else None
            write_robomimic(robomimic_file, episodes, exp.env.id, layout,
                            {"robots": exp.env.robots, "controller": CONTROLLER, **exp.env.kwargs}, image=image)
        try:
            write_dataset(path, episodes, exp.env.id, meta)
        except BaseException:
            robomimic_file.unlink(missing_ok=True)
            raise
        level = {"path": str(path.resolve()), "episodes": len(episodes), "steps": int(sum(len(e) for e in episodes)),
                 "return_mean": float(rets.mean()), "return_std": float(rets.std()),
                 "success_rate": float(np.mean(successes))}
        if layout is not None:
            level["robomimic_file"] = str(robomimic_file.resolve())
            log(f"wrote {robomimic_file} (robomimic's layout; ncdpo dataset import --format robomimic reads it)")
        log(f"wrote {path.name}: {path} ({level['episodes']} episodes, {level['steps']:,} steps, return "
            f"{rets.mean():.1f} +- {rets.std():.1f}, success rate {level['success_rate']:.2f})")
        tracker.log_metrics({f"dataset/{path.name}/{k}": v for k, v in level.items()
                             if k not in ("path", "robomimic_file")}, step=0)
        status = "FINISHED"
        return {"datasets": {path.name: level}, "mlflow_run_id": tracker.run_id}
    finally:
        tracker.finish(status)
