"""The training runner: build the RLlib algorithm, loop ``train()``, log, checkpoint, resume."""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

from ncdpo_rllib.errors import ConfigError, TrainingDiverged, TrainingInterrupted, UserError, WorkerLost, one_line
from ncdpo_rllib.rl.learner import NonFiniteParametersError
from ncdpo_rllib.tasks.multiagent import describe_mapping, policy_mapping

from .build import build_algo_config, check_experiment, init_ray, rllib_validation
from .checkpoints import (
    CONFIG_FILE,
    FINAL,
    RunState,
    clean_stale,
    load_checkpoint_meta,
    periodic_checkpoints,
    prune_checkpoints,
    restore_failed,
    save_checkpoint,
    supersede_later_checkpoints,
)
from .config import ExperimentConfig
from .loader import changed_keys
from .metrics import iteration_metrics, sampled_env_steps
from .pretrained import check_compatible, load_module_state, load_pretrained_meta
from .stopping import StopRequest
from .tracking import Tracker


def _run_name(exp: ExperimentConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return exp.tracking.run_name or f"{exp.algorithm}-{exp.env.id}-s{exp.seed}-{stamp}"


WEIGHT_LAG = "diff_num_grad_updates_vs_sampler_policy"
"""RLlib's staleness metric (per policy): learner updates since the weights that sampled the batch."""
TS_DROPPED = "learner_group_ts_dropped_lifetime"
"""RLlib's LearnerGroup count of env steps dropped because every remote learner was busy."""


def _progress(state: RunState, metrics: dict[str, float], steps_per_s: float, iter_s: float,
              asynchronous: bool = False) -> str:
    """One line per iteration: the training return, then what the run reports of: the success rate
    (envs with ``info["success"]``), this iteration's evaluation, the fraction of epochs that
    ``target_kl`` stopped (NCDPO / DPPO; the mean over policies) or, on the asynchronous path, the
    learner updates since the weights that sampled its batches (RLlib's count: 1 = the newest)."""
    ret = metrics.get("return_mean")
    parts = [f"iter {state.iteration:4d}", f"env steps {state.env_steps:9,d}",
             f"return {ret:9.2f}" if ret is not None else "return       n/a"]
    if "success_rate" in metrics:
        parts.append(f"success {metrics['success_rate']:4.2f}")
    evaluation = [f"{metrics['eval_return_mean']:.2f}"] if "eval_return_mean" in metrics else []
    if "eval_success_rate" in metrics:
        evaluation.append(f"success {metrics['eval_success_rate']:.2f}")
    if evaluation:
        parts.append("eval " + ", ".join(evaluation))
    lags = [v for k, v in metrics.items() if k.startswith("learner/") and k.endswith(f"/{WEIGHT_LAG}")]
    stops = [v for k, v in metrics.items() if k.startswith("learner/") and k.endswith("/kl_stop_fraction")]
    if asynchronous:
        if lags:
            parts.append(f"weight lag {sum(lags) / len(lags):4.1f}")
        parts.append(f"dropped {int(metrics.get('env_steps_dropped', 0)):7,d}")
    elif stops:
        parts.append(f"KL-stopped {sum(stops) / len(stops):4.0%}")
    parts += [f"{steps_per_s:7,.0f} steps/s", f"{iter_s:5.1f} s/iter", f"{state.wall_s:7.1f} s total"]
    return " | ".join(parts)


def _done(exp: ExperimentConfig, state: RunState) -> bool:
    s = exp.stop
    return (s.env_steps is not None and state.env_steps >= s.env_steps) or (
        s.iterations is not None and state.iteration >= s.iterations
    )


MODEL_KEYS = (
    "algorithm", "env.kind", "env.id", "env.kwargs", "env.normalize_observations", "env.action_chunk",
    "env.obs_history", "env.observation", "env.image_size", "env.camera", "env.extra_cameras",
    "env.robots", "env.obs_keys",
    "multi_agent",
    "encoder.type", "encoder.feature_dim",
    "diffusion", "ppo.critic_hidden", "init_from",
    "ppo.kl_to_reference",  # turning it on later would take the fine-tuned actor as the reference
)


def _check_resume_compatible(ckpt_exp: ExperimentConfig, exp: ExperimentConfig) -> None:
    """Keys that define the model (and its MLflow params) must not change on --resume."""
    changed = changed_keys(ckpt_exp.to_dict(), exp.to_dict(), MODEL_KEYS)
    if changed:
        raise ConfigError(
            f"--resume: the config changes {', '.join(changed)} from the checkpoint's; these define "
            "the model, so start a new run instead"
        )


def _build_algo(exp: ExperimentConfig, record_dir: Optional[Path] = None, eval_video_dir: Optional[Path] = None):
    with rllib_validation():
        return build_algo_config(exp, record_dir=record_dir,
                                 eval_video_dir=str(eval_video_dir) if eval_video_dir else None).build_algo()


def _log_evaluation_videos(tracker: Tracker, staging: Path, run_dir: Path, env_steps: int) -> None:
    """``eval.video_every``: move this iteration's evaluation video to videos/eval-<env steps>.mp4 and
    log it to the training run."""
    for video in sorted(staging.glob("eval-*.mp4")):
        dest = run_dir / "videos" / f"eval-{env_steps:09d}.mp4"
        video.replace(dest)
        tracker.log_artifact(dest, "videos")


def _start_from_pretrained(algo, state: dict) -> None:
    """Load pre-trained weights into every learner's module, then push them to the runners."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    def load(learner):
        learner.module[DEFAULT_MODULE_ID].unwrapped().load_pretrained(state)

    try:
        algo.learner_group.foreach_learner(load)
    except Exception as e:  # a shape mismatch surfaces here (possibly wrapped by Ray)
        msg = one_line(getattr(e, "cause", None) or e)
        raise ConfigError(f"init_from: the pre-trained weights do not fit this model: {msg}") from None
    # RLlib's sync_weights is fire-and-forget; measured with 2 remote EnvRunners, the first
    # iteration still sampled with the initial weights (first ratio 0, approx KL 306). Set
    # the state on every runner and wait for it.
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE

    module_state = algo.learner_group.get_state(components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}",
                                                inference_only=True)[COMPONENT_LEARNER]
    algo.env_runner_group.foreach_env_runner(lambda runner: runner.set_state(module_state), local_env_runner=True)


def _fit_gpus(exp: ExperimentConfig, log) -> ExperimentConfig:
    """GPU learners asked for but not in the Ray cluster: run them on CPU, and say so."""
    import dataclasses

    import ray

    r = exp.resources
    if not r.gpus_per_learner:
        return exp
    needed = r.gpus_per_learner * max(r.learners, 1)
    visible = ray.cluster_resources().get("GPU", 0)
    if visible >= needed:
        return exp
    log(f"resources.gpus_per_learner={r.gpus_per_learner}: the Ray cluster has {visible:g} GPU(s), "
        f"{needed:g} needed; learners run on CPU")
    return dataclasses.replace(exp, resources=dataclasses.replace(r, gpus_per_learner=0))


def _check_cpus(exp: ExperimentConfig, log) -> None:
    """A layout that needs more CPUs than the Ray cluster has would wait for them for ever (RLlib
    says nothing): on a local Ray that is a one-line error; on a cluster ($RAY_ADDRESS) an
    autoscaler may still add nodes, so a line says what the run waits for."""
    import ray

    r = exp.resources
    have = ray.cluster_resources().get("CPU", 0)
    if r.cpus_needed <= have:
        return
    msg = f"resources need {r.cpus_needed} CPUs ({r.cpus_needed_in_words}); the Ray cluster has {have:g}"
    if os.environ.get("RAY_ADDRESS"):
        log(f"{msg}: the run waits until nodes with room join")
    else:
        raise ConfigError(f"{msg}: lower resources.env_runners, resources.cpus_per_runner or resources.learners")


def _layout(exp: ExperimentConfig) -> str:
    r = exp.resources
    runners = f"{r.env_runners} env runner(s) x {r.envs_per_runner} envs" if r.env_runners else (
        f"sampling in the driver ({r.envs_per_runner} envs)")
    device = f"{r.gpus_per_learner:g} GPU each" if r.gpus_per_learner else "CPU"
    learners = f"{r.learners} remote learner(s), {device}" if r.learners else f"local learner, {device}"
    if exp.asynchronous:
        queue = f"{r.learner_requests_in_flight} batches in flight per learner, " if r.learners else ""
        learners += (f"; asynchronous: {queue}learner queue {r.learner_queue_batches} batches, each trained up to "
                     f"{exp.appo.batch_reuse}x, weights pushed every {r.broadcast_interval} update(s)")
    return f"{runners}; {learners}"


def _flush(tracker: Tracker, pending: list) -> None:
    for step, metrics in pending:
        tracker.log_metrics(metrics, step=step)
    pending.clear()


def _restore(algo, ckpt_path: Path) -> None:
    try:
        algo.restore_from_path(str(ckpt_path.resolve()))
    except Exception as e:  # RLlib raises assorted errors on a damaged checkpoint
        raise restore_failed(ckpt_path, e) from None


def _diverged(e: BaseException) -> Optional[BaseException]:
    """The NonFiniteParametersError inside ``e`` (possibly wrapped by Ray), else None."""
    for candidate in (e, getattr(e, "cause", None), e.__cause__):
        if isinstance(candidate, NonFiniteParametersError):
            return candidate
    return e if "NonFiniteParametersError" in str(e) else None


def _lost_process(e: BaseException, learners_alive: Callable[[], bool]) -> Optional[str]:
    """What died, when ``e`` is a Ray actor's death that RLlib did not recover from (EnvRunner
    deaths it does recover from never get here), else None. A learner's death can surface as a
    generic dead actor: when the traceback does not say, ``learners_alive()`` decides."""
    from ray.exceptions import RayActorError

    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    died = next((c for c in chain if isinstance(c, RayActorError)), None)
    if died is None:
        return None
    frames = [f.filename for c in chain for f in traceback.extract_tb(c.__traceback__)]
    learner = any(f.endswith("learner_group.py") for f in frames) or not learners_alive()
    who = "a learner process" if learner else "a Ray worker process"
    return f"{who} died ({type(died).__name__}: {one_line(died, 120)})"


def _resume_hint(resume_command: str, run_dir: Path) -> str:
    return resume_command.replace("{run_dir}", str(run_dir))  # not format(): a sweep's command may hold braces


def _learners_alive(algo) -> bool:
    """Whether every remote Learner still answers (RLlib may take a dead one out of service and fail
    later with an unrelated error instead of the actor's death)."""
    group = algo.learner_group
    if group.is_local:
        return True
    try:
        answers = list(group.foreach_learner(lambda learner: True, healthy_only=False, timeout_seconds=15))
    except Exception:  # noqa: BLE001 - the probe itself failing says the same
        return False
    return len(answers) == len(group) and all(a.ok for a in answers)


def train(
    exp: ExperimentConfig,
    *,
    resume: Optional[str] = None,
    log=lambda msg: print(msg, file=sys.stderr, flush=True),
    on_iteration: Optional[Callable[[RunState, dict], None]] = None,
    record_rollouts: bool = False,
    tags: Optional[dict[str, str]] = None,
    resume_command: str = "ncdpo train --resume {run_dir}",
    stop_requested: Optional[Callable[[], Optional[str]]] = None,
) -> dict:
    """Run (or resume) one experiment; return the summary dict printed by ``--json``.

    Everything the user can get wrong is checked before anything is written.
    ``on_iteration(state, metrics)`` is called after each iteration (benchmarks, tests).
    ``record_rollouts``: every training episode is written raw to <run dir>/rollouts/
    (``ncdpo collect``'s medium-replay data).
    ``tags``: extra MLflow tags for a new run (``ncdpo sweep``: the parent run id).
    ``resume_command``: what continues the run after an interruption (``{run_dir}`` is filled in):
    ``ncdpo collect --resume ...``, or the sweep's own command for its trials.
    ``stop_requested()``: polled before each iteration; a reason (not None) stops the run as a first
    SIGINT does (``ncdpo sweep``'s trials, which the sweep's signal does not reach).
    """
    ckpt_path, state = None, RunState()
    if resume is not None:
        ckpt_path, ckpt_exp, state = load_checkpoint_meta(resume)
        _check_resume_compatible(ckpt_exp, exp)
    spaces = check_experiment(exp)
    pretrained_state = None
    if exp.init_from is not None and ckpt_path is None:
        pre_dir, pre_exp, _ = load_pretrained_meta(exp.init_from)
        check_compatible(pre_exp, exp, str(pre_dir))
        pretrained_state = load_module_state(pre_dir)
    if state.run_dir:
        run_dir = Path(state.run_dir)
    else:
        run_dir = (Path(exp.checkpoint.dir) / _run_name(exp)).resolve()
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(
                f"run directory {run_dir} already exists: choose another tracking.run_name, "
                f"or continue it with --resume {run_dir}"
            )

    init_ray()
    exp = _fit_gpus(exp, log)
    _check_cpus(exp, log)
    video_staging = run_dir / "videos" / ".staging"
    if exp.eval.video_every:
        video_staging.mkdir(parents=True, exist_ok=True)
    algo = _build_algo(exp, run_dir / "rollouts" if record_rollouts else None,
                       video_staging if exp.eval.video_every else None)
    tracker, status, final, stop = None, "FAILED", None, None
    try:
        if ckpt_path is not None:
            _restore(algo, ckpt_path)
            log(f"resumed from {ckpt_path} at iteration {state.iteration}, {state.env_steps:,} env steps")
        elif pretrained_state is not None:
            _start_from_pretrained(algo, pretrained_state)
            log(f"starting from the pre-trained policy {exp.init_from}")
        tracker = Tracker(exp, run_id=state.mlflow_run_id, uri=state.mlflow_uri, tags=tags, log=log, spill_dir=run_dir)
        state.mlflow_run_id, state.mlflow_uri, state.run_dir = tracker.run_id, tracker.uri, str(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if ckpt_path is not None:
            clean_stale(run_dir)
            for moved in supersede_later_checkpoints(run_dir, state.iteration):
                log(f"moved a later checkpoint aside: {moved}")
        (run_dir / CONFIG_FILE).write_text(exp.to_yaml())
        tracker.log_artifact(run_dir / CONFIG_FILE)  # the resolved config, as a file to rerun
        log(
            f"{exp.algorithm} on {exp.env.id} (seed {exp.seed}) | {_layout(exp)} | run dir {run_dir}"
            + (f" | MLflow run {tracker.run_id} at {tracker.uri}" if tracker.enabled else "")
        )
        if exp.env.kind == "pettingzoo":
            mapping = policy_mapping(exp.multi_agent.policies, exp.multi_agent.groups, spaces)
            log(f"policies ({exp.multi_agent.policies}): {describe_mapping(mapping)}")
        pending: list[tuple[int, dict]] = []
        seen_restarts, short_of_runners, dropped_before = 0, False, 0
        stop = StopRequest(log).__enter__()  # restored in the finally below
        while not _done(exp, state):
            if stop.signal is None and stop_requested is not None:
                stop.signal = stop_requested()
            if stop.signal is not None:
                break
            t0 = time.perf_counter()
            try:
                result = algo.train()
            except Exception as e:
                cause = _diverged(e)
                if cause is None:
                    raise
                last = periodic_checkpoints(run_dir)
                raise TrainingDiverged(
                    f"training diverged at iteration {state.iteration + 1}: {one_line(cause)}; "
                    f"last good checkpoint: {last[-1] if last else 'none (set checkpoint.every)'}"
                ) from None
            iter_s = time.perf_counter() - t0
            sampled = sampled_env_steps(result, exp.env.action_chunk)  # base-env steps, not RLlib's chunks
            if not sampled:
                log(f"iteration {state.iteration + 1} sampled no env steps: the EnvRunners returned nothing "
                    f"within resources.sample_timeout_s ({exp.resources.sample_timeout_s} s); raise it for a slow env")
            state.iteration += 1
            state.env_steps += sampled
            state.wall_s += iter_s
            metrics = iteration_metrics(result, exp.eval.every)
            if exp.asynchronous:  # RLlib's count since this process started; the metric is per iteration
                dropped_lifetime = int(algo.learner_group.get_stats().get(TS_DROPPED, 0))
                metrics["env_steps_dropped"] = dropped_lifetime - dropped_before
                dropped_before = dropped_lifetime
            ret = metrics.get("return_mean")
            if ret is not None:
                state.last_return = ret
                state.best_return = ret if state.best_return is None else max(state.best_return, ret)
            metrics.update(
                {
                    "env_steps": state.env_steps,
                    "iteration": state.iteration,
                    "wall_s": state.wall_s,
                    "time_iter_s": iter_s,
                    "env_steps_per_s": sampled / iter_s,
                }
            )
            # MLflow gets an iteration's metrics once a checkpoint covers it: a run killed
            # between checkpoints and resumed then logs no step twice and skips none.
            pending.append((state.env_steps, metrics))
            log(_progress(state, metrics, sampled / iter_s, iter_s, exp.asynchronous))
            restarts = int(metrics.get("env_runner_restarts") or 0)
            healthy = metrics.get("env_runners_healthy")
            if restarts > seen_restarts:  # RLlib's count, for this process
                log(f"env runner failure: restarted ({restarts} restart(s) so far, "
                    f"{int(healthy or 0)} healthy); training goes on")
                seen_restarts = restarts
            if healthy is not None and exp.resources.env_runners and (healthy < exp.resources.env_runners) != short_of_runners:
                short_of_runners = not short_of_runners
                if short_of_runners:  # e.g. its node died: RLlib restarts it once a node has room
                    log(f"env runners: {int(healthy)} of {exp.resources.env_runners} healthy; training goes on with "
                        "them while RLlib restarts the others (where a node has room for them)")
            if exp.eval.video_every:
                _log_evaluation_videos(tracker, video_staging, run_dir, state.env_steps)
            if on_iteration is not None:
                on_iteration(state, metrics)
            if exp.checkpoint.every and state.iteration % exp.checkpoint.every == 0 and not _done(exp, state):
                save_checkpoint(algo, run_dir / "checkpoints" / f"iter_{state.iteration:06d}", exp, state)
                _flush(tracker, pending)
                prune_checkpoints(run_dir, exp.checkpoint.keep)
        if stop.signal is not None and not _done(exp, state):
            saved = run_dir / "checkpoints" / f"iter_{state.iteration:06d}"
            if not saved.is_dir():  # not this iteration's periodic one
                save_checkpoint(algo, saved, exp, state)
                _flush(tracker, pending)
                prune_checkpoints(run_dir, exp.checkpoint.keep)
            status = "KILLED"
            raise TrainingInterrupted(
                f"stopped by {stop.signal} after iteration {state.iteration} ({state.env_steps:,} env steps); "
                f"checkpoint {saved}; continue with: {_resume_hint(resume_command, run_dir)}")
        final = save_checkpoint(algo, run_dir / "checkpoints" / FINAL, exp, state)
        _flush(tracker, pending)
        tracker.log_artifacts(final, "checkpoint")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except UserError:
        raise
    except Exception as e:  # a Ray process the run needs died: one line, not RLlib's traceback
        lost = _lost_process(e, lambda: _learners_alive(algo)) or (
            None if _learners_alive(algo) else
            f"a learner process died (RLlib then failed with {type(e).__name__}: {one_line(e, 80)})")
        if lost is None:
            raise
        last = periodic_checkpoints(run_dir)
        resume = f"continue with: {_resume_hint(resume_command, run_dir)}" if last else "no checkpoint yet; start again"
        raise WorkerLost(f"{lost} at iteration {state.iteration} ({state.env_steps:,} env steps); RLlib 2.60 cannot "
                         f"replace it mid-run: last checkpoint {last[-1] if last else 'none'}; {resume}") from None
    finally:
        if stop is not None:
            stop.__exit__()
        if tracker is not None:
            tracker.finish(status)
        algo.stop()

    return {
        "final_return": state.last_return,
        "best_return": state.best_return,
        "env_steps": state.env_steps,
        "iterations": state.iteration,
        "wall_s": round(state.wall_s, 2),
        "checkpoint": str(final),
        "run_dir": str(run_dir),
        "mlflow_run_id": tracker.run_id,
        "mlflow_uri": tracker.uri,
    }
