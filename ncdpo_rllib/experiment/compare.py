"""``ncdpo compare``: group MLflow runs, aggregate seeds, draw learning curves, tabulate.

The curve math is in ``curves.py``, the table / plot / HTML output in ``report.py``, the MLflow
access in ``tracking.py``; this module selects and groups the runs and writes the report.

Runs are selected by experiment name, an MLflow filter string, or run ids; grouped by any
tag or param (a key resolves as a tag first, then as a param); the runs inside a group
(normally the seeds) are aggregated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ncdpo_rllib.errors import UserError, one_line

from .curves import (Group, Series, aggregate, group_label, group_value, history_series, run_stats,
                     short_range_note, summary_row, wall_clock_series)
from .report import plot_bands, render_html, summary_table, write_csv
from .tracking import (check_store_exists, find_experiment, log_params, metric_history, mlflow_client, mlflow_errors,
                       resolve_tracking_uri, search_all_runs)

DEFAULT_GROUP_BY = ("algorithm", "denoising_steps")
DEFAULT_METRIC = "return_mean"
WALL_METRIC = "wall_s"
THROUGHPUT_METRIC = "env_steps_per_s"
COMPARE_STAGE = "compare"
PROFILE_STAGE = "profile"
NOT_CURVES = (COMPARE_STAGE, PROFILE_STAGE, "evaluate", "collect")
"""Stages whose runs hold no learning curve: left out of the selection."""


# ---------------------------------------------------------------- MLflow access


def select_runs(client, experiment_id: Optional[str], filter_string: Optional[str],
                run_ids: Sequence[str]) -> list:
    """Runs by id, or by experiment + filter; comparison runs themselves are never selected."""
    from mlflow.exceptions import MlflowException

    if run_ids:
        runs = []
        for rid in run_ids:
            try:
                runs.append(client.get_run(rid))
            except MlflowException:
                raise UserError(f"no run with id '{rid}' at {client.tracking_uri}") from None
        if experiment_id is not None:
            runs = [r for r in runs if r.info.experiment_id == experiment_id]
    else:
        try:
            runs = search_all_runs(client, experiment_id, filter_string or "")
        except MlflowException as e:
            raise UserError(f"invalid filter {filter_string!r}: {one_line(e)}") from None
    runs = [r for r in runs if r.data.tags.get("stage") not in NOT_CURVES]
    if not runs:
        what = (f"filter {filter_string!r}" if filter_string else
                "the given run ids in this experiment" if run_ids else "the experiment has no runs")
        raise UserError(f"no runs match ({what}); nothing to compare")
    return sorted(runs, key=lambda r: r.info.start_time or 0)


def fetch_series(client, run_id: str, key: str) -> Series:
    return history_series(metric_history(client, run_id, key))


def collect_groups(client, runs: Sequence, group_by: Sequence[str], metric: str,
                   threshold: Optional[float], task_key: Optional[str] = None) -> tuple[dict[str, Group], list[str]]:
    """Fetch histories, group the runs, compute per-run stats; notes list the runs skipped."""
    groups: dict[str, Group] = {}
    notes: list[str] = []
    for run in runs:
        rid = run.info.run_id
        env = fetch_series(client, rid, metric)
        if len(env.x) == 0:
            notes.append(f"run {rid} ({run.info.run_name}) skipped: no '{metric}' history")
            continue
        wall_raw = fetch_series(client, rid, WALL_METRIC)
        wall = wall_clock_series(env, wall_raw)
        if len(wall.x) == 0:
            notes.append(f"run {rid} ({run.info.run_name}): no '{WALL_METRIC}', left out of the wall-clock plot")
        tput = fetch_series(client, rid, THROUGHPUT_METRIC)
        label = group_label(run.data.tags, run.data.params, group_by)
        g = groups.setdefault(label, Group(label))
        g.run_ids.append(rid)
        g.env_curves.append(env)
        if len(wall.x):
            g.wall_curves.append(wall)
        g.stats.append(run_stats(rid, env, wall, tput, threshold))
        g.tasks.append(group_value(run.data.tags, run.data.params, task_key) if task_key else "-")
    if not groups:
        have = sorted({k for r in runs for k in r.data.metrics})
        shown = ", ".join(have[:15]) + (", ..." if len(have) > 15 else "")
        raise UserError(f"metric '{metric}' is not logged by any of the {len(runs)} selected runs"
                        + (f"; they log: {shown}" if have else ""))
    return groups, notes


# ---------------------------------------------------------------- entry point


def compare(
    experiment: Optional[str],
    out: Path,
    *,
    filter_string: Optional[str] = None,
    run_ids: Sequence[str] = (),
    group_by: Sequence[str] = DEFAULT_GROUP_BY,
    metric: str = DEFAULT_METRIC,
    threshold: Optional[float] = None,
    tracking_uri: Optional[str] = None,
    command: str = "",
    log_to_mlflow: bool = True,
    aggregate_over: Optional[str] = None,
    task_key: Optional[str] = None,
    score: str = "final",
    score_ranges: Optional[dict[str, tuple[float, float]]] = None,
    reps: int = 2000,
) -> dict[str, Any]:
    """Select, group, aggregate, write the report into ``out``, log it as a comparison run.

    Returns the plotted labels per figure, the aggregated bands, the table rows and paths,
    so callers (and tests) can check what was drawn without parsing images.

    ``aggregate_over="iqm"``: also the rliable statistics over tasks x runs (``task_key`` names
    the tag/param that tells tasks apart; ``score``: each run's final or best metric value,
    optionally normalised per task by ``score_ranges``): IQM and mean with 95% stratified-
    bootstrap intervals, probability of improvement for every pair of groups, performance
    profiles (``aggregate.md``, ``aggregate.png``, ``aggregate.json``)."""
    if experiment is None and not run_ids:
        raise UserError("give --experiment NAME and/or --runs ID ...")
    if aggregate_over not in (None, "iqm"):
        raise UserError(f"--aggregate {aggregate_over!r}: the aggregate is iqm")
    if aggregate_over and not task_key:
        raise UserError("--aggregate iqm needs --task-key KEY: the tag or param that tells tasks apart (e.g. env)")
    if score not in ("final", "best"):
        raise UserError(f"--score {score!r}: choose final or best")
    group_by = list(group_by) or list(DEFAULT_GROUP_BY)
    uri = resolve_tracking_uri(tracking_uri)
    check_store_exists(uri)
    client = mlflow_client(uri)
    with mlflow_errors(uri):
        exp = find_experiment(client, experiment) if experiment is not None else None
        runs = select_runs(client, exp.experiment_id if exp else None, filter_string, run_ids)
        groups, notes = collect_groups(client, runs, group_by, metric, threshold, task_key)

    notes += [n for g in groups.values() if (n := short_range_note(g.label, g.run_ids, g.env_curves))]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env_bands = {g.label: aggregate(g.env_curves) for g in groups.values()}
    wall_bands = {g.label: aggregate(g.wall_curves) for g in groups.values()}
    files = {
        "curves_env_steps": out / "curves_env_steps.png",
        "curves_wall_clock": out / "curves_wall_clock.png",
        "summary_csv": out / "summary.csv",
        "summary_md": out / "summary.md",
        "report": out / "report.html",
    }
    plotted = {
        "env_steps": plot_bands(env_bands, "env steps", metric, files["curves_env_steps"], threshold),
        "wall_clock": plot_bands(wall_bands, "wall-clock (s)", metric, files["curves_wall_clock"], threshold),
    }
    rows = [summary_row(g, threshold) for g in groups.values()]
    write_csv(rows, files["summary_csv"])
    table_md = summary_table(rows, metric, threshold)
    selection = "\n".join([
        f"tracking uri: {uri}",
        f"experiment: {experiment if experiment is not None else '-'}",
        f"filter: {filter_string or '-'}",
        f"run ids: {' '.join(run_ids) if run_ids else '-'}",
        f"group by: {', '.join(group_by)}",
        f"metric: {metric}",
        f"threshold: {threshold if threshold is not None else '-'}",
        "runs:",
        *(f"  {g.label}: {' '.join(g.run_ids)}" for g in groups.values()),
    ])
    with mlflow_errors(uri):
        profiles = profile_tables(client, exp.experiment_id) if exp is not None else []
    profile_md = "".join(f"\n## Latency and memory vs K\n\n{t}\n" for t in profiles)
    agg = None
    if aggregate_over:
        agg, agg_md = aggregate_groups(groups, metric, score, score_ranges or {}, reps, out, files)
        notes += agg.pop("notes")
        profile_md += f"\n## Aggregate over tasks x runs (rliable)\n\n{agg_md}\n"
    files["summary_md"].write_text(
        f"# Comparison: {experiment or 'selected runs'}\n\n{table_md}\n{profile_md}```\n{selection}\n```\n")
    title = f"Comparison: {experiment or 'selected runs'} ({metric})"
    files["report"].write_text(render_html(
        title, [files[k] for k in ("curves_env_steps", "curves_wall_clock", "aggregate_png") if k in files], table_md, rows,
        selection, command or "-", notes, profiles))

    run_id = None
    if log_to_mlflow:
        with mlflow_errors(uri, "logging the comparison run"):
            run_id = log_comparison_run(client, runs[0].info.experiment_id if exp is None else exp.experiment_id,
                                        list(files.values()), experiment, filter_string, run_ids, group_by, metric, threshold)
    return {
        "groups": {g.label: g.run_ids for g in groups.values()},
        "plotted": plotted,
        "bands": {"env_steps": {k: b.to_dict() for k, b in env_bands.items()},
                  "wall_clock": {k: b.to_dict() for k, b in wall_bands.items()}},
        "rows": rows,
        "notes": notes,
        "files": {k: str(v) for k, v in files.items()},
        "mlflow_run_id": run_id,
        "mlflow_uri": uri,
        "aggregate": agg,
    }


def aggregate_groups(groups: dict[str, Group], metric: str, score: str, ranges: dict, reps: int,
                     out: Path, files: dict) -> tuple[dict, str]:
    """The rliable aggregate of each group's per-run scores, by task; writes its files."""
    from .aggregate import aggregate_markdown, aggregate_scores, normalize, plot_aggregate, score_matrix

    matrices, notes, all_tasks = {}, [], set()
    for g in groups.values():
        by_task: dict[str, list[float]] = {}
        for task, st in zip(g.tasks, g.stats):
            by_task.setdefault(task, []).append(st.final if score == "final" else st.best)
        matrices[g.label], _, note = score_matrix(normalize(by_task, ranges) if ranges else by_task)
        all_tasks |= set(by_task)
        if note:
            notes.append(f"{g.label}: {note}")
    for g in groups.values():
        missing = all_tasks - set(g.tasks)
        if missing:
            raise UserError(f"--aggregate: group {g.label!r} has no runs on {', '.join(sorted(missing))}; "
                            "every group needs every task (narrow the selection with --filter)")
    name = f"{score} {metric}" + (" (normalised)" if ranges else "")
    agg = aggregate_scores(matrices, reps=reps)
    agg["tasks"], agg["score"] = sorted(all_tasks), name
    files["aggregate_md"], files["aggregate_png"], files["aggregate_json"] = (
        out / "aggregate.md", out / "aggregate.png", out / "aggregate.json")
    md = aggregate_markdown(agg, name) + f"\n\nTasks: {', '.join(sorted(all_tasks))}."
    files["aggregate_md"].write_text(md + "\n")
    plot_aggregate(agg, name, files["aggregate_png"])
    files["aggregate_json"].write_text(json.dumps(agg, indent=1))
    return {**agg, "notes": notes}, md


def profile_tables(client, experiment_id: str) -> list[str]:
    """Markdown tables of the experiment's profile runs (``benchmarks/latency_memory.py``, tag
    stage=profile; metrics ``profile/*`` logged with step = K): one row per K."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.stage = '{PROFILE_STAGE}'")
    tables = []
    for run in runs:
        names = sorted(k for k in run.data.metrics if k.startswith("profile/"))
        by_k: dict[int, dict[str, float]] = {}
        for name in names:
            for step, value in metric_history(client, run.info.run_id, name):
                by_k.setdefault(step, {})[name] = value
        cols = [n.removeprefix("profile/") for n in names]
        lines = [f"Profile run {run.info.run_id} ({run.data.tags.get('env', '-')}):", "",
                 "| K | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
        lines += ["| " + " | ".join([str(k)] + [f"{by_k[k].get(n, float('nan')):.2f}" for n in names]) + " |"
                  for k in sorted(by_k)]
        tables.append("\n".join(lines))
    return tables


def log_comparison_run(client, experiment_id: str, paths: Sequence[Path], experiment: Optional[str],
                       filter_string: Optional[str], run_ids: Sequence[str], group_by: Sequence[str],
                       metric: str, threshold: Optional[float]) -> str:
    """A run tagged stage=compare holding the report files, so the comparison lives next to its runs."""
    run = client.create_run(experiment_id, run_name=f"compare-{metric}", tags={"stage": COMPARE_STAGE})
    rid = run.info.run_id
    params = {
        "experiment": experiment or "-",
        "filter": filter_string or "-",
        "run_ids": " ".join(run_ids) or "-",
        "group_by": ",".join(group_by),
        "metric": metric,
        "threshold": "-" if threshold is None else str(threshold),
    }
    log_params(client, rid, params)
    try:
        for path in paths:  # only our files: --out may be a directory holding other things
            client.log_artifact(rid, str(path), artifact_path="comparison")
    except Exception:
        client.set_terminated(rid, status="FAILED")
        raise
    client.set_terminated(rid, status="FINISHED")
    return rid
