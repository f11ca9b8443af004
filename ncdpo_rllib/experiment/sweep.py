"""``ncdpo sweep``: a grid (seeds x config keys) of ``train()`` runs on Ray Tune, under one MLflow parent run.

Each grid point is one Tune trial that calls the project's ``train()`` in its trial actor (on the
Ray cluster ``ncdpo train`` would use), with its own MLflow run tagged ``mlflow.parentRunId`` =
the sweep's parent run (tagged ``stage: sweep``, params = the grid). ``resume=True`` skips points
whose child run FINISHED and continues the others from their last checkpoint, into the same
parent. At the end ``compare`` groups the children by the grid keys.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from ncdpo_rllib.errors import ConfigError, TrainingInterrupted, UserError

from .checkpoints import resolve_checkpoint
from .config import ExperimentConfig, load_config
from .tracking import experiment_id, log_params, mlflow_client, mlflow_errors, resolve_tracking_uri, search_all_runs

SWEEP_STAGE = "sweep"
PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "sweep"


@dataclasses.dataclass
class Point:
    name: str
    values: dict[str, Any]  # grid key -> value (seed included)
    exp: ExperimentConfig
    resume: Optional[str] = None
    resources: Any = None


def _split_values(raw: str) -> list[str]:
    """``1,2,[3,4]`` -> ['1', '2', '[3,4]'] (commas inside brackets/braces/quotes stay)."""
    out, depth, cur, quote = [], 0, "", None
    for ch in raw:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    out.append(cur)
    return [v.strip() for v in out if v.strip()]


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["a.b=1,2", ...]`` -> {"a.b": ["1", "2"]} (raw strings, parsed as YAML by the config loader)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected dotted.key=V1,V2,...")
        key, raw = (s.strip() for s in item.split("=", 1))
        if not key:
            raise ConfigError(f"--grid {item!r}: empty key")
        if key == "seed":
            raise ConfigError("--grid seed=...: give seeds with --seeds")
        values = _split_values(raw)
        if not values:
            raise ConfigError(f"--grid {key}=: no values (give --grid {key}=V1,V2,...)")
        if key in grid:
            raise ConfigError(f"--grid {key} given twice")
        grid[key] = values
    return grid


def _fmt_value(raw: str) -> str:
    try:
        v = yaml.safe_load(raw)
    except yaml.YAMLError:
        v = raw
    text = str(v).replace(" ", "").replace("/", "_")
    return text


def build_points(config: Union[str, Path, list], grid: dict[str, list[str]], seeds: Sequence[int],
                 overrides: Sequence[str], sweep_name: str, ckpt_root: Path, uri: str) -> list[Point]:
    """Every point's validated ExperimentConfig (any bad key or value fails here, before anything runs)."""
    keys = list(grid)
    points = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        for seed in seeds:
            sets = [*overrides, *(f"{k}={v}" for k, v in zip(keys, combo)), f"seed={seed}"]
            exp = load_config(config, sets)
            label = "-".join([*(f"{k}={_fmt_value(v)}" for k, v in zip(keys, combo)), f"seed={seed}"])
            name = f"{sweep_name}-{label}"
            exp = dataclasses.replace(
                exp,
                tracking=dataclasses.replace(exp.tracking, run_name=name, uri=uri),
                checkpoint=dataclasses.replace(exp.checkpoint, dir=str(ckpt_root)),
                init_from=str(Path(exp.init_from).resolve()) if exp.init_from else None,
            )
            values = {k: yaml.safe_load(v) if v else v for k, v in zip(keys, combo)}
            values["seed"] = seed
            points.append(Point(name, values, exp))
    return points


def _find_parent(client, experiment_id: str, name: str):
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.stage = '{SWEEP_STAGE}' and attributes.run_name = '{name}'")
    return runs[0] if runs else None


def _children(client, experiment_id: str, parent_id: str) -> list:
    return search_all_runs(client, experiment_id, f"tags.{PARENT_TAG} = '{parent_id}'")


def _plan_resume(points: list[Point], children: list, client, log) -> list[Point]:
    """The points still to run; each gets ``resume`` = its run dir when it has a checkpoint."""
    by_name: dict[str, list] = {}
    for run in children:
        by_name.setdefault(run.info.run_name, []).append(run)
    todo = []
    for p in points:
        runs = by_name.get(p.name, [])
        if any(r.info.status == "FINISHED" for r in runs):
            continue
        run_dir = Path(p.exp.checkpoint.dir) / p.name
        try:
            resolve_checkpoint(run_dir)
            p.resume = str(run_dir)
            log(f"{p.name}: continuing from its last checkpoint")
        except UserError:
            # Nothing to continue from: start the point afresh, dropping its partial run.
            for r in runs:
                client.delete_run(r.info.run_id)
            if run_dir.exists():
                shutil.rmtree(run_dir)
        todo.append(p)
    return todo


def _resources(exp: ExperimentConfig):
    """The trial's reservation: what RLlib itself asks Tune for this algorithm config."""
    from .build import build_algo_config, rllib_validation

    with rllib_validation():
        algo_cfg = build_algo_config(exp)
        return algo_cfg.algo_class.default_resource_request(algo_cfg)


class StopFlag:
    """A Ray actor (num_cpus=0) the sweep's driver sets on its first SIGINT / SIGTERM: the trials,
    in other processes (or nodes) that the signal does not reach, poll it between iterations."""

    def __init__(self):
        self.reason: Optional[str] = None

    def set(self, reason: str) -> None:
        self.reason = reason

    def get(self) -> Optional[str]:
        return self.reason


def _make_trainable(points: list[Point], parent_id: str, sweep_name: str, flag, again: str):
    specs = [(p.exp.to_dict(), p.resume) for p in points]

    def trainable(config: dict) -> None:
        import logging

        import ray
        from ray import tune

        from ncdpo_rllib.errors import TrainingInterrupted

        from .config import parse_config
        from .train import train

        logging.getLogger("ray.rllib").setLevel(logging.ERROR)
        logging.getLogger("ray.rllib.utils.actor_manager").setLevel(logging.CRITICAL)  # train says it (see cli)
        data, resume = specs[config["point"]]

        def stop_requested() -> Optional[str]:
            try:
                return ray.get(flag.get.remote(), timeout=30)
            except Exception:  # the flag is gone (the driver's node): nobody can ask this point to stop
                return None

        if stop_requested():  # the sweep was stopped before this point began
            tune.report({"interrupted": 1, "not_started": 1})
            return
        exp = parse_config(data)
        try:
            summary = train(exp, resume=resume, tags={PARENT_TAG: parent_id, SWEEP_TAG: sweep_name},
                            stop_requested=stop_requested, resume_command=again)
        except TrainingInterrupted:  # checkpointed; the MLflow run is KILLED; --resume continues it
            tune.report({"interrupted": 1, "not_started": 0})
            return
        tune.report({k: v for k, v in summary.items() if isinstance(v, (int, float))}
                    | {"mlflow_run_id": summary["mlflow_run_id"]})

    return trainable


def sweep(
    config: Union[str, Path, list],
    grid_items: Sequence[str],
    seeds: Optional[Sequence[int]] = None,
    overrides: Sequence[str] = (),
    *,
    name: Optional[str] = None,
    resume: bool = False,
    compare_out: Optional[Union[str, Path]] = None,
    command: Optional[str] = None,
    log=lambda msg: print(msg, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Run (or with ``resume``, continue) the sweep ``name``; ``command``: the command line that started
    it (the CLI's), from which the --resume hint after an interruption is made."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables; we print per trial
    grid = parse_grid(grid_items)
    base = load_config(config, list(overrides))
    if not base.tracking.enabled:
        raise ConfigError("sweep: needs tracking.enabled: true (the children are found in MLflow)")
    seeds = list(seeds) if seeds else [base.seed]
    if not grid and len(seeds) < 2:
        raise ConfigError("sweep: the grid is empty (give --grid KEY=V1,V2 and/or several --seeds)")
    if resume and not name:
        raise ConfigError("sweep --resume: give the sweep's --name")
    name = name or f"sweep-{base.algorithm}-{base.env.id}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    uri = resolve_tracking_uri(base.tracking.uri)
    ckpt_root = (Path(base.checkpoint.dir) / name).resolve()
    points = build_points(config, grid, seeds, overrides, name, ckpt_root, uri)
    if len({p.name for p in points}) != len(points):
        raise ConfigError("sweep: two grid points have the same name (repeated values?)")
    from .build import check_experiment

    for p in points:  # the env and RLlib's own validation, for every point, before anything runs
        check_experiment(p.exp)
        p.resources = _resources(p.exp)
    if not resume and ckpt_root.exists() and any(ckpt_root.iterdir()):
        raise ConfigError(f"sweep directory {ckpt_root} already exists: choose another --name, or add --resume")

    client = mlflow_client(uri)
    with mlflow_errors(uri):
        exp_id = experiment_id(client, base.tracking.experiment)
        parent = _find_parent(client, exp_id, name)
        if resume:
            if parent is None:
                raise UserError(f"sweep --resume: no sweep named {name!r} in MLflow experiment "
                                f"{base.tracking.experiment!r} at {uri}")
            parent_id = parent.info.run_id
            client.update_run(parent_id, status="RUNNING")
            todo = _plan_resume(points, _children(client, exp_id, parent_id), client, log)
        else:
            if parent is not None:
                raise UserError(f"sweep {name!r} already exists in MLflow experiment "
                                f"{base.tracking.experiment!r}: choose another --name, or add --resume")
            run = client.create_run(exp_id, run_name=name, tags={
                "stage": SWEEP_STAGE, "algorithm": base.algorithm, "env": base.env.id})
            parent_id = run.info.run_id
            params = {f"grid.{k}": ",".join(v) for k, v in grid.items()}
            params |= {"grid.seeds": ",".join(map(str, seeds)), "config": ",".join(str(Path(c).resolve()) for c in (config if isinstance(config, (list, tuple)) else [config])),
                       "overrides": " ".join(overrides) or "-", "points": str(len(points))}
            log_params(client, parent_id, params)
            todo = points

    configs = " ".join(str(c) for c in (config if isinstance(config, (list, tuple)) else [config]))
    again = command or f"ncdpo sweep {configs} ... (the same --grid, --seeds and --set)"
    again += "" if " --resume" in again else " --resume"
    again += "" if " --name" in again else f" --name {name}"
    log(f"sweep {name}: {len(points)} points, {len(todo)} to run | MLflow parent run {parent_id} at {uri}")
    errors: list[str] = []
    stopped: Optional[str] = None
    if todo:
        try:
            errors, stopped = _run_tune(todo, parent_id, ckpt_root, name, again, log)
        except KeyboardInterrupt:  # a second signal: the trials' last checkpoints stay as they were
            client.set_terminated(parent_id, status="KILLED")
            raise
    if stopped is not None:
        client.set_terminated(parent_id, status="KILLED")
        raise TrainingInterrupted(f"sweep {name} {stopped}; continue with: {again}")

    children = _children(client, exp_id, parent_id)
    finished = [r for r in children if r.info.status == "FINISHED"]
    status = "FINISHED" if len(finished) == len(points) and not errors else "FAILED"
    client.set_terminated(parent_id, status=status)

    from .compare import DEFAULT_GROUP_BY, compare

    out = Path(compare_out) if compare_out else ckpt_root / "comparison"
    comparison = None
    if finished:
        try:
            comparison = compare(
                base.tracking.experiment, out, filter_string=f"tags.{PARENT_TAG} = '{parent_id}'",
                group_by=list(grid) or list(DEFAULT_GROUP_BY), tracking_uri=uri,
                command="ncdpo " + " ".join(sys.argv[1:]),
            )
        except UserError as e:  # e.g. runs too short to finish an episode: the sweep itself is done
            log(f"  note: no comparison: {e}")
    if errors:
        raise UserError(f"sweep {name}: {len(errors)} point(s) failed ({'; '.join(errors)}); "
                        f"rerun with --resume --name {name}")
    return {
        "name": name,
        "parent_run_id": parent_id,
        "mlflow_uri": uri,
        "points": len(points),
        "ran": len(todo),
        "children": {r.info.run_name: r.info.run_id for r in children},
        "comparison": comparison["files"]["report"] if comparison else None,
        "comparison_dir": str(out),
        "dir": str(ckpt_root),
    }


def _run_tune(todo: list[Point], parent_id: str, ckpt_root: Path, name: str, again: str,
              log) -> tuple[list[str], Optional[str]]:
    """Run the points on Tune; (errors, what stopped the sweep or None). A first SIGINT / SIGTERM sets
    the StopFlag: running points finish their iteration and checkpoint, the others do not start."""
    import threading

    import ray
    from ray import tune

    from .build import init_ray
    from .stopping import StopRequest

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    init_ray()
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    flag = ray.remote(num_cpus=0)(StopFlag).options(scheduling_strategy=here).remote()  # lives as long as we do
    reservations = [p.resources for p in todo]
    trainable = tune.with_resources(_make_trainable(todo, parent_id, name, flag, again),
                                    lambda config: reservations[config["point"]])
    tuner = tune.Tuner(
        trainable,
        param_space={"point": tune.grid_search(list(range(len(todo))))},
        tune_config=tune.TuneConfig(num_samples=1, reuse_actors=False),
        run_config=tune.RunConfig(name=name, storage_path=str(ckpt_root / "tune"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    with StopRequest(log, "iteration of every running point") as stop:
        fitted = threading.Event()

        def pass_on() -> None:  # from the signal to the trials
            while not fitted.wait(0.2):
                if stop.signal is not None:
                    flag.set.remote(f"{stop.signal} to the sweep")
                    return

        threading.Thread(target=pass_on, daemon=True).start()
        before = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours is above: Tune's stops trials without a checkpoint
        try:
            results = tuner.fit()
        finally:
            fitted.set()
            if before is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER")
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = before
    errors, stopped, not_started = [], [], 0
    for res in results:
        p = todo[res.config["point"]]
        if (res.metrics or {}).get("interrupted"):
            not_started += int(res.metrics.get("not_started", 0))
            stopped += [] if res.metrics.get("not_started") else [p.name]
            log(f"  {p.name}: {'not started' if res.metrics.get('not_started') else 'stopped with a checkpoint'}")
        elif res.error is not None:
            lines = [x for x in str(res.error).strip().splitlines() if x.strip()]  # Ray's wrapper first
            errors.append(f"{p.name}: {(lines[-1].strip() if lines else type(res.error).__name__)[:200]}")
            log(f"  {p.name}: FAILED")
        else:
            m = res.metrics or {}
            log(f"  {p.name}: return {m.get('final_return')}, {m.get('env_steps')} env steps")
    if stop.signal is None or not (stopped or not_started):  # the signal came after every point had ended
        return errors, None
    return errors, (f"stopped by {stop.signal}: {len(stopped)} point(s) stopped with a checkpoint, "
                    f"{not_started} not started")
