"""RLlib callbacks: per-iteration episode statistics, and the evaluation runner's observation filter.

RLlib's ``episode_return_mean`` is smoothed over the last 100 episodes; researchers
comparing curves want the mean over the episodes that ended in *this* iteration too.
Windowless mean/min/max stats are cleared at each reduce, i.e. once per iteration.
"""

from __future__ import annotations

import numpy as np
from ray.rllib.callbacks.callbacks import RLlibCallback

ITER_RETURN_MEAN = "iter_return_mean"
ITER_RETURN_MIN = "iter_return_min"
ITER_RETURN_MAX = "iter_return_max"
ITER_EPISODE_LEN = "iter_episode_len_mean"
ITER_SUCCESS_RATE = "iter_success_rate"


def episode_success(chunks) -> float | None:
    """1.0 if any step's ``info["success"]`` was set (Meta-World's count), 0.0 if never,
    None for envs that report no success flag."""
    if not hasattr(chunks[-1], "get_infos"):
        return None
    flags = [float(info["success"]) for c in chunks if hasattr(c, "t_started")
             for info in c.get_infos() if isinstance(info, dict) and "success" in info]
    return float(max(flags) > 0) if flags else None


def finished_episode_stats(episodes, n: int):
    """The first ``n`` finished episodes of a ``sample()`` call, their returns (multi-agent:
    summed over agents) and success rate (None for envs without a success flag)."""
    finished = [ep for ep in episodes if ep.is_done][:n]
    successes = [episode_success([ep]) for ep in finished]
    success_rate = float(np.mean(successes)) if successes and None not in successes else None
    return finished, np.array([ep.get_return() for ep in finished], dtype=float), success_rate


def episode_return_and_length(chunks) -> tuple[float, int]:
    """Return and length of an episode that arrived in chunks (one per ``sample()`` call);
    multi-agent: the sum over agents (RLlib's convention) and the env steps.

    In Ray 2.60 a chunk kept for metrics can overlap its successor by one step (RLlib's own
    ``episode_len_mean`` then reads 201 on Pendulum's 200-step episodes, and the return
    counts one reward twice); each chunk's rewards are counted only up to where the next
    chunk starts.
    """
    if not hasattr(chunks[-1], "t_started"):  # a MultiAgentEpisode: team return, summed over agents
        return float(sum(c.get_return() for c in chunks)), int(chunks[-1].env_t)
    ret = 0.0
    for chunk, nxt in zip(chunks, [*chunks[1:], None]):
        rewards = np.asarray(chunk.get_rewards(), dtype=float)
        if nxt is not None:
            rewards = rewards[: max(nxt.t_started - chunk.t_started, 0)]
        ret += float(rewards.sum())
    return ret, int(chunks[-1].t)


def per_iteration_timers(metrics_logger) -> None:
    """Make RLlib's sampling and learner-update timers report *this* iteration's time.

    RLlib creates them on first use as an EMA (coefficient 0.01) over iterations, which the
    first, warm-up iteration dominates for ~100 iterations. Created beforehand as ``item``
    stats, the same ``log_time`` blocks in ``PPO.training_step`` keep the latest value.
    """
    from ray.rllib.utils.metrics import ENV_RUNNER_SAMPLING_TIMER, LEARNER_UPDATE_TIMER, TIMERS

    for name in (ENV_RUNNER_SAMPLING_TIMER, LEARNER_UPDATE_TIMER):
        metrics_logger.log_value((TIMERS, name), float("nan"), reduce="item")


def sync_local_eval_connectors(algorithm) -> None:
    """Give a *local* evaluation EnvRunner the training EnvRunners' connector states (the
    MeanStdFilter's statistics). RLlib broadcasts them to remote evaluation EnvRunners only
    (``EnvRunnerGroup.sync_env_runner_states`` returns early without remote ones), so with
    ``evaluation_num_env_runners=0`` the deterministic policy was evaluated on observations
    normalised by statistics of the evaluation episodes alone."""
    from ray.rllib.core import COMPONENT_ENV_TO_MODULE_CONNECTOR, COMPONENT_MODULE_TO_ENV_CONNECTOR

    group, source = algorithm.eval_env_runner_group, algorithm.env_runner
    if group is None or group.num_healthy_remote_workers() > 0 or group.local_env_runner is None or source is None:
        return
    components = [COMPONENT_ENV_TO_MODULE_CONNECTOR, COMPONENT_MODULE_TO_ENV_CONNECTOR]
    group.local_env_runner.set_state(source.get_state(components=components))


def arm_evaluation_video(algorithm, evaluations: int) -> None:
    """``eval.video_every``: before every Nth evaluation (the 1st, N+1th, ...), arm the local
    evaluation runner's video recorder (``tasks.video.EpisodeVideo``, found by its ``video``
    writer's ``arm``: this layer does not import the task side) for one episode."""
    video = (algorithm.evaluation_config.env_config or {}).get("video") if algorithm.evaluation_config else None
    runner = algorithm.eval_env_runner
    if not (video and video.get("every") and runner is not None and (evaluations - 1) % video["every"] == 0):
        return
    for env in getattr(getattr(runner.env, "unwrapped", runner.env), "envs", []):
        while env is not None:
            writer = getattr(env, "video", None)
            if hasattr(writer, "arm"):
                writer.arm(1)
                break
            env = getattr(env, "env", None)


class EpisodeReturnCallback(RLlibCallback):
    def on_algorithm_init(self, *, algorithm, metrics_logger=None, **kwargs) -> None:
        per_iteration_timers(metrics_logger if metrics_logger is not None else algorithm.metrics)

    def on_evaluate_start(self, *, algorithm, metrics_logger=None, **kwargs) -> None:
        sync_local_eval_connectors(algorithm)
        self.evaluations = getattr(self, "evaluations", 0) + 1
        arm_evaluation_video(algorithm, self.evaluations)

    def on_episode_end(self, *, episode, prev_episode_chunks=None, metrics_logger=None, **kwargs) -> None:
        if metrics_logger is None:
            return
        ret, length = episode_return_and_length([*(prev_episode_chunks or []), episode])
        metrics_logger.log_value(ITER_RETURN_MEAN, ret, reduce="mean")
        metrics_logger.log_value(ITER_RETURN_MIN, ret, reduce="min")
        metrics_logger.log_value(ITER_RETURN_MAX, ret, reduce="max")
        metrics_logger.log_value(ITER_EPISODE_LEN, float(length), reduce="mean")
        success = episode_success([*(prev_episode_chunks or []), episode])
        if success is not None:
            metrics_logger.log_value(ITER_SUCCESS_RATE, success, reduce="mean")


BASE_ENV_STEPS = "base_env_steps"


class ChunkedEnvStepsCallback(EpisodeReturnCallback):
    """With action chunking RLlib counts policy steps; this counts the env steps the chunks
    actually executed (a chunk cut by the episode's end executes fewer than Ta)."""

    def on_episode_step(self, *, episode, metrics_logger=None, **kwargs) -> None:
        if metrics_logger is not None:
            info = episode.get_infos(-1) or {}
            metrics_logger.log_value(BASE_ENV_STEPS, int(info.get("chunk_steps", 1)), reduce="sum")
