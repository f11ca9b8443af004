"""Evaluate a policy: a local EnvRunner with a training checkpoint's state (module weights AND
observation filter statistics) or with a pre-trained module's state, running full episodes with
the deterministic policy (``explore=False``). ``ncdpo evaluate`` and ``ncdpo pretrain``'s final
evaluation both come through ``evaluation_episodes``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from ray.rllib.core import DEFAULT_MODULE_ID

from ncdpo_rllib.errors import CheckpointError
from ncdpo_rllib.rl.callbacks import finished_episode_stats

from .build import build_algo_config, check_experiment
from .checkpoints import load_checkpoint_meta, restore_failed
from .pretrained import is_pretrained, load_module_state, load_pretrained_meta
from .tracking import Tracker


RL_MODULE_DIR = Path("learner_group") / "learner" / "rl_module"
MODULE_DIR = RL_MODULE_DIR / DEFAULT_MODULE_ID


def load_env_runner(ckpt: Path, exp, *, seed: int, record_dir=None, num_envs: int = 1, video: Optional[dict] = None):
    """A local Single/MultiAgentEnvRunner with the checkpoint's connector state (observation
    filter) and the trained module weights (every policy's, for a PettingZoo env).

    RLlib's ``env_runner`` component holds the connector states, but not the module when
    the run sampled with remote EnvRunners (the driver's runner then has none); the
    trained weights are the learner's, under learner_group/learner/rl_module/.
    """
    from ray.rllib.env.multi_agent_env_runner import MultiAgentEnvRunner
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    cfg = build_algo_config(exp, record_dir=record_dir, video=video)
    cfg.env_runners(num_env_runners=0, num_envs_per_env_runner=num_envs)
    cfg.debugging(seed=seed)
    multi = exp.env.kind == "pettingzoo"
    runner = MultiAgentEnvRunner(config=cfg) if multi else SingleAgentEnvRunner(config=cfg)
    module_dir = RL_MODULE_DIR if multi else MODULE_DIR
    for part in (ckpt / "env_runner", ckpt / module_dir):
        if not part.is_dir():
            raise CheckpointError(f"checkpoint {str(ckpt)!r} is incomplete: {part.relative_to(ckpt)}/ missing")
    try:
        runner.restore_from_path(str((ckpt / "env_runner").resolve()))
        runner.module.restore_from_path(str((ckpt / module_dir).resolve()))
    except Exception as e:  # RLlib raises assorted errors on a damaged checkpoint
        raise restore_failed(ckpt, e) from None
    return runner


def evaluation_episodes(runner, episodes: int, explore: bool = False):
    """(finished episodes, returns, success rate or None) of ``episodes`` full episodes of the
    deterministic policy (``explore``: the stochastic one); the runner is stopped afterwards."""
    try:
        done = runner.sample(num_episodes=episodes, explore=explore, random_actions=False)
    finally:
        runner.stop()
    return finished_episode_stats(done, episodes)


def pretrained_env_runner(exp, module_state: dict, seed: int = 12345, video: Optional[dict] = None):
    """A local SingleAgentEnvRunner with a module state dict (a pre-trained policy, which
    normalises observations itself: no observation filter)."""
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    cfg = build_algo_config(exp, pretrained=True, video=video)
    cfg.env_runners(num_env_runners=0, num_envs_per_env_runner=1)
    cfg.debugging(seed=seed)
    runner = SingleAgentEnvRunner(config=cfg)
    runner.module.set_state(module_state)
    return runner


def evaluate_module(exp, module_state: dict, episodes: int, seed: int = 12345):
    """(returns, success rate or None) of a module state dict (a pre-trained policy) on exp's env;
    the success rate for envs reporting ``info["success"]``."""
    _, returns, success_rate = evaluation_episodes(pretrained_env_runner(exp, module_state, seed), episodes)
    return returns, success_rate


def evaluate_pretrained(checkpoint: str, *, episodes: int, seed: int, video: int = 0,
                        video_dir: Optional[str] = None, explore: bool = False) -> tuple[dict, object, dict]:
    ckpt, exp, meta = load_pretrained_meta(checkpoint)
    check_experiment(exp)
    spec = _video_spec(video, video_dir, ckpt / "videos" / f"evaluate-seed{seed}")
    runner = pretrained_env_runner(exp, load_module_state(ckpt), seed, video=spec)
    _, returns, success_rate = evaluation_episodes(runner, episodes, explore)
    summary = _summary(exp, ckpt, returns, trained_env_steps=0) | {"explore": explore}
    if success_rate is not None:
        summary["success_rate"] = success_rate
    if spec:
        summary["videos"] = _videos(spec)
    return summary, exp, meta


def _video_spec(episodes: int, video_dir: Optional[str], default: Path) -> Optional[dict]:
    """``--video N``: where the first N evaluation episodes go (earlier videos there removed)."""
    if not episodes:
        return None
    if episodes < 0:
        raise CheckpointError("--video must be >= 0")
    out = Path(video_dir) if video_dir else default
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("episode-*.mp4"):
        old.unlink()
    return {"dir": str(out.resolve()), "episodes": episodes}


def _videos(spec: dict) -> list[str]:
    return [str(p) for p in sorted(Path(spec["dir"]).glob("episode-*.mp4"))]


def _summary(exp, ckpt, returns: np.ndarray, trained_env_steps: int) -> dict:
    return {
        "env": exp.env.id,
        "algorithm": exp.algorithm,
        "checkpoint": str(ckpt),
        "episodes": int(len(returns)),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "return_min": float(returns.min()),
        "return_max": float(returns.max()),
        "trained_env_steps": trained_env_steps,
    }


def _track(exp, summary: dict, *, seed: int, source_run_id, uri) -> str | None:
    """One MLflow run per evaluation (stage: evaluate) in the checkpoint's experiment and store."""
    tags = {"stage": "evaluate", "checkpoint": summary["checkpoint"], "eval_seed": str(seed),
            "policy": "stochastic" if summary.get("explore") else "deterministic"}
    if source_run_id:
        tags["source_run_id"] = source_run_id
    tracker = Tracker(exp, uri=uri, tags=tags)
    metrics = {f"eval/{k}": summary[k] for k in ("return_mean", "return_std", "return_min", "return_max", "episodes")}
    metrics.update({f"eval/agent_return_mean/{a}": r for a, r in summary.get("agent_return_mean", {}).items()})
    for video in summary.get("videos", []):
        tracker.log_artifact(Path(video), "videos")
    if "success_rate" in summary:
        metrics["eval/success_rate"] = summary["success_rate"]
    status = "FAILED"
    try:
        tracker.log_metrics(metrics, step=summary["trained_env_steps"])
        status = "FINISHED"
    finally:
        tracker.finish(status)
    return tracker.run_id


def evaluate(checkpoint: str, *, episodes: int = 10, seed: int = 12345, track: bool = True, video: int = 0,
             video_dir: Optional[str] = None, explore: bool = False) -> dict:
    """A training checkpoint (or run dir), or a pre-trained one (``ncdpo pretrain`` output).

    ``track``: log the result as its own MLflow run (tag ``stage: evaluate``) in the store and
    experiment the checkpoint was trained with (unless its config disabled tracking).
    ``explore``: the stochastic policy instead of the deterministic one.
    ``video``: record the first N episodes as MP4 in ``video_dir`` (default: the run directory's
    ``videos/evaluate-<checkpoint>-seed<seed>/``), logged with the MLflow run."""
    if episodes < 1:
        raise CheckpointError("--episodes must be >= 1")
    if video > episodes:
        raise CheckpointError(f"--video {video} > --episodes {episodes}: record at most the episodes evaluated")
    if is_pretrained(checkpoint):
        summary, exp, meta = evaluate_pretrained(checkpoint, episodes=episodes, seed=seed, video=video,
                                                 video_dir=video_dir, explore=explore)
        source, uri = meta.get("mlflow_run_id"), meta.get("mlflow_uri")
    else:
        ckpt, exp, state = load_checkpoint_meta(checkpoint)
        check_experiment(exp)
        spec = _video_spec(video, video_dir, ckpt.parent.parent / "videos" / f"evaluate-{ckpt.name}-seed{seed}")
        runner = load_env_runner(ckpt, exp, seed=seed, video=spec)
        finished, returns, success_rate = evaluation_episodes(runner, episodes, explore)
        summary = _summary(exp, ckpt, returns, trained_env_steps=state.env_steps) | {"explore": explore}
        if spec:
            summary["videos"] = _videos(spec)
        if success_rate is not None:  # Meta-World: share of episodes that succeeded
            summary["success_rate"] = success_rate
        if exp.env.kind == "pettingzoo":
            per_agent: dict[str, list[float]] = {}
            for ep in finished:
                for agent, sa in ep.agent_episodes.items():
                    per_agent.setdefault(str(agent), []).append(float(sa.get_return()))
            summary["agent_return_mean"] = {a: float(np.mean(r)) for a, r in sorted(per_agent.items())}
        source, uri = state.mlflow_run_id, state.mlflow_uri
    if track:
        summary["mlflow_run_id"] = _track(exp, summary, seed=seed, source_run_id=source, uri=uri)
    return summary
