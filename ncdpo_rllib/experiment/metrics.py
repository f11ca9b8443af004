"""The stable MLflow metric names of a training iteration (``docs/configuration.md``, "Metrics"),
read from RLlib's result dict."""

from __future__ import annotations

import math
from typing import Any, Optional


def _num(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def sampled_env_steps(result: dict, action_chunk: int = 1) -> int:
    """Base-env steps sampled in an iteration: the chunk callback's count (a chunk cut by the episode's
    end counts the steps it executed), else RLlib's policy-step count x ``action_chunk``, else 0. RLlib
    reports NaN for a sum that no EnvRunner logged to in the iteration (seen once, under heavy CPU
    contention); such a count falls through to the next source."""
    from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED

    from ncdpo_rllib.rl.callbacks import BASE_ENV_STEPS

    runners = result.get(ENV_RUNNER_RESULTS, {})
    for value, scale in ((runners.get(BASE_ENV_STEPS), 1), (runners.get(NUM_ENV_STEPS_SAMPLED), action_chunk)):
        if (v := _num(value)) is not None:
            return int(v * scale)
    return 0


def iteration_metrics(result: dict, eval_every: int = 0) -> dict[str, float]:
    """Flatten an ``algo.train()`` result into the stable MLflow metric names.

    ``eval_every``: the evaluation interval. RLlib repeats the last evaluation's results in
    the next iteration's result; evaluation metrics are kept only for iterations that ran one."""
    from ray.rllib.utils.metrics import (
        ALL_MODULES,
        ENV_RUNNER_RESULTS,
        ENV_RUNNER_SAMPLING_TIMER,
        LEARNER_RESULTS,
        LEARNER_UPDATE_TIMER,
        TIMERS,
    )

    from ncdpo_rllib.rl.callbacks import (
        ITER_EPISODE_LEN,
        ITER_RETURN_MAX,
        ITER_RETURN_MEAN,
        ITER_RETURN_MIN,
        ITER_SUCCESS_RATE,
    )

    runners = result.get(ENV_RUNNER_RESULTS, {})
    evaluated = bool(eval_every) and int(result.get("training_iteration", 0)) % eval_every == 0
    evaluation = result.get("evaluation", {}).get(ENV_RUNNER_RESULTS, {}) if evaluated else {}
    faults = result.get("fault_tolerance", {})
    timers = result.get(TIMERS, {})
    out = {
        "time_sampling_s": _num(timers.get(ENV_RUNNER_SAMPLING_TIMER)),
        "time_learner_s": _num(timers.get(LEARNER_UPDATE_TIMER)),
        "env_runner_restarts": _num(faults.get("num_remote_worker_restarts")),
        "env_runners_healthy": _num(faults.get("num_healthy_workers")),
        "eval_return_mean": _num(evaluation.get(ITER_RETURN_MEAN)),
        "eval_success_rate": _num(evaluation.get(ITER_SUCCESS_RATE)),
        "success_rate": _num(runners.get(ITER_SUCCESS_RATE)),
        "return_mean": _num(runners.get(ITER_RETURN_MEAN)),
        "return_min": _num(runners.get(ITER_RETURN_MIN)),
        "return_max": _num(runners.get(ITER_RETURN_MAX)),
        "episode_len_mean": _num(runners.get(ITER_EPISODE_LEN)),
        "return_mean_smoothed": _num(runners.get("episode_return_mean")),
        "episodes": _num(runners.get("num_episodes")),
    }
    for key, name in (("agent_episode_returns_mean", "agent_return_mean"),
                      ("module_episode_returns_mean", "policy_return_mean")):
        for who, value in (runners.get(key) or {}).items():  # multi-agent: per agent / per policy
            v = _num(value)
            if v is not None:
                out[f"{name}/{who}"] = v
    for module_id, values in result.get(LEARNER_RESULTS, {}).items():
        if module_id == ALL_MODULES or not isinstance(values, dict):
            continue
        for key, value in values.items():
            v = _num(value)
            if v is not None:
                out[f"learner/{module_id}/{key}"] = v
    return {k: v for k, v in out.items() if v is not None}
