"""``ncdpo compare``: group MLflow runs, aggregate seeds, draw learning curves, tabulate.

Runs are selected by experiment name, an MLflow filter string, or run ids; grouped by any
tag or param (a key resolves as a tag first, then as a param); the runs inside a group
(normally the seeds) are aggregated.

Aggregation: each run's metric history (``step`` = env steps) is linearly interpolated onto
a common grid of ``GRID_POINTS`` points spanning only the range *every* run of the group
covers (``max`` of the first steps .. ``min`` of the last steps), so a short run never gets
extrapolated and a long one is cut to the shared range. The line is the mean over runs, the
band is min..max over runs. Wall-clock curves use, as x, the ``wall_s`` metric logged at the
same step (interpolated over steps where a step lacks it) and the same rule.

Table statistics are per run and then mean +- std (population std, ddof=0, so one run gives
0) over the runs of a group: final = the run's last logged value, best = its maximum,
time-to-threshold = the first *logged* point whose value is >= the threshold (no
interpolation between points), averaged over the runs that reached it and shown with k/n.
"""

from __future__ import annotations

import base64
import csv
import difflib
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ncdpo_rllib.errors import UserError, one_line
from .tracking import resolve_tracking_uri

GRID_POINTS = 200
DEFAULT_GROUP_BY = ("algorithm", "denoising_steps")
DEFAULT_METRIC = "return_mean"
WALL_METRIC = "wall_s"
THROUGHPUT_METRIC = "env_steps_per_s"
COMPARE_STAGE = "compare"
PROFILE_STAGE = "profile"
NOT_CURVES = (COMPARE_STAGE, PROFILE_STAGE, "evaluate", "collect")
"""Stages whose runs hold no learning curve: left out of the selection."""
NOT_REACHED = "not reached"


# ---------------------------------------------------------------- data classes


@dataclass
class Series:
    """One curve: x ascending, y the metric at those x."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class Band:
    """A group's aggregated curve on its common grid: mean line and min..max band."""

    x: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def to_dict(self) -> dict[str, list[float]]:
        return {k: [float(v) for v in getattr(self, k)] for k in ("x", "mean", "lo", "hi")}


@dataclass
class RunStats:
    """Per-run numbers the table aggregates."""

    run_id: str
    final: float
    best: float
    steps_to_threshold: Optional[float]
    wall_to_threshold: Optional[float]
    throughput: Optional[float]


@dataclass
class Group:
    label: str
    run_ids: list[str] = field(default_factory=list)
    env_curves: list[Series] = field(default_factory=list)
    wall_curves: list[Series] = field(default_factory=list)
    stats: list[RunStats] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)  # per run: its value of --task-key (aggregates)


# ---------------------------------------------------------------- pure helpers


def group_value(tags: dict[str, str], params: dict[str, str], key: str) -> str:
    """A tag named ``key``, else a param, else ``-``; ``tags.``/``params.`` prefixes force one."""
    if key.startswith("tags."):
        return tags.get(key[5:], "-")
    if key.startswith("params."):
        return params.get(key[7:], "-")
    if key in tags:
        return tags[key]
    return params.get(key, "-")


def group_label(tags: dict[str, str], params: dict[str, str], keys: Sequence[str]) -> str:
    """``algorithm=ncdpo, denoising_steps=5``: readable in legends and tables."""
    return ", ".join(f"{k.split('.', 1)[1] if k.startswith(('tags.', 'params.')) else k}="
                     f"{group_value(tags, params, k)}" for k in keys)


def history_series(points: Sequence[tuple[int, float]]) -> Series:
    """(step, value) pairs -> a Series sorted by step, last value kept per step, non-finite dropped.

    A resumed run may log a step twice; the later value is the one the run ended with."""
    by_step: dict[int, float] = {}
    for step, value in points:
        if value is not None and math.isfinite(value):
            by_step[int(step)] = float(value)
    steps = sorted(by_step)
    return Series(np.asarray(steps, dtype=float), np.asarray([by_step[s] for s in steps], dtype=float))


def wall_clock_series(metric: Series, wall: Series) -> Series:
    """The metric against ``wall_s`` at the same step (wall interpolated over steps if missing)."""
    if len(wall.x) == 0:
        return Series(np.empty(0), np.empty(0))
    return Series(np.interp(metric.x, wall.x, wall.y), metric.y.copy())


def common_grid(curves: Sequence[Series], points: int = GRID_POINTS) -> np.ndarray:
    """Grid over the x range every curve covers; empty if the ranges do not overlap."""
    curves = [c for c in curves if len(c.x)]
    if not curves:
        return np.empty(0)
    lo = max(float(c.x[0]) for c in curves)
    hi = min(float(c.x[-1]) for c in curves)
    if hi < lo:
        return np.empty(0)
    if hi == lo:
        return np.asarray([lo])
    return np.linspace(lo, hi, points)


def aggregate(curves: Sequence[Series], points: int = GRID_POINTS) -> Band:
    """Mean and min..max band of the curves, interpolated onto their common grid."""
    grid = common_grid(curves, points)
    if len(grid) == 0:
        e = np.empty(0)
        return Band(e, e, e, e)
    ys = np.stack([np.interp(grid, c.x, c.y) for c in curves if len(c.x)])
    return Band(grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0))


def short_range_note(label: str, run_ids: Sequence[str], curves: Sequence[Series],
                     min_fraction: float = 0.5) -> Optional[str]:
    """Say which run cuts a group's curve when the shared range is < ``min_fraction`` of the longest.

    The common-range rule means one short run (a smoke test, a crash) truncates its whole
    group; the note names it so the user can filter it out."""
    if len(curves) < 2:
        return None
    ends = [float(c.x[-1]) for c in curves]
    start = max(float(c.x[0]) for c in curves)
    longest = max(ends) - min(float(c.x[0]) for c in curves)
    if longest <= 0 or (min(ends) - start) >= min_fraction * longest:
        return None
    short = run_ids[int(np.argmin(ends))]
    return (f"group '{label}': curve cut at step {min(ends):,.0f} (runs go to {max(ends):,.0f}) by run {short}; "
            f"to leave short runs out, e.g. --filter \"metrics.env_steps >= {max(ends):.0f}\"")


def first_reaching(x: np.ndarray, y: np.ndarray, threshold: float) -> Optional[float]:
    """x of the first logged point with y >= threshold; None if the run never got there."""
    hit = np.nonzero(np.asarray(y) >= threshold)[0]
    return float(np.asarray(x)[hit[0]]) if len(hit) else None


def run_stats(run_id: str, env: Series, wall: Series, throughput: Series,
              threshold: Optional[float]) -> RunStats:
    """Final (last value), best (max), time to threshold in env steps and in wall seconds."""
    steps = wall_s = None
    if threshold is not None:
        steps = first_reaching(env.x, env.y, threshold)
        wall_s = first_reaching(wall.x, wall.y, threshold) if len(wall.x) else None
    return RunStats(
        run_id=run_id,
        final=float(env.y[-1]),
        best=float(env.y.max()),
        steps_to_threshold=steps,
        wall_to_threshold=wall_s,
        throughput=float(throughput.y.mean()) if len(throughput.y) else None,
    )


def mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """Mean and population std of the non-None values; (None, None) if there are none."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return None, None
    return float(v.mean()), float(v.std())


def summary_row(group: Group, threshold: Optional[float]) -> dict[str, Any]:
    """One table row: numbers as floats (CSV), None where not applicable/not reached."""
    s = group.stats
    final_m, final_s = mean_std([r.final for r in s])
    best_m, best_s = mean_std([r.best for r in s])
    steps_m, steps_s = mean_std([r.steps_to_threshold for r in s])
    wall_m, wall_s = mean_std([r.wall_to_threshold for r in s])
    reached = sum(r.steps_to_threshold is not None for r in s) if threshold is not None else None
    tput_m, _ = mean_std([r.throughput for r in s])
    return {
        "group": group.label,
        "runs": len(s),
        "final_mean": final_m, "final_std": final_s,
        "best_mean": best_m, "best_std": best_s,
        "threshold": threshold,
        "reached": reached,
        "env_steps_to_threshold_mean": steps_m, "env_steps_to_threshold_std": steps_s,
        "wall_s_to_threshold_mean": wall_m, "wall_s_to_threshold_std": wall_s,
        "env_steps_per_s_mean": tput_m,
    }


def _pm(m: Optional[float], s: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if m is None else f"{fmt.format(m)} ± {fmt.format(s or 0.0)}"


def format_row(row: dict[str, Any]) -> dict[str, str]:
    """Human-readable cells: mean ± std, 'not reached (0/n)', k/n when some runs missed."""
    n = row["runs"]
    if row["threshold"] is None:
        steps_cell = wall_cell = "- (no threshold)"
    elif not row["reached"]:
        steps_cell = wall_cell = f"{NOT_REACHED} (0/{n})"
    else:
        k = f" ({row['reached']}/{n})"
        steps_cell = _pm(row["env_steps_to_threshold_mean"], row["env_steps_to_threshold_std"], "{:,.0f}") + k
        wall_cell = _pm(row["wall_s_to_threshold_mean"], row["wall_s_to_threshold_std"], "{:.1f}") + k
    tput = row["env_steps_per_s_mean"]
    return {
        "group": row["group"],
        "runs": str(n),
        "final": _pm(row["final_mean"], row["final_std"]),
        "best": _pm(row["best_mean"], row["best_std"]),
        "env steps to threshold": steps_cell,
        "wall s to threshold": wall_cell,
        "env steps/s": "-" if tput is None else f"{tput:,.0f}",
    }


def markdown_table(rows: Sequence[dict[str, Any]], metric: str, threshold: Optional[float]) -> str:
    """The summary as a Markdown table with a one-line header saying what the numbers are."""
    cells = [format_row(r) for r in rows]
    cols = list(cells[0]) if cells else []
    head = (f"Metric `{metric}`; final = last logged value, best = max, mean ± std over runs"
            + (f"; threshold {threshold:g}" if threshold is not None else "") + ".\n\n")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(c[k] for k in cols) + " |" for c in cells]
    return head + "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Raw numbers (empty cell = not applicable / not reached) for spreadsheets and scripts."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else v for k, v in r.items()})


def plot_bands(bands: dict[str, Band], xlabel: str, ylabel: str, path: Path,
               threshold: Optional[float] = None) -> list[str]:
    """One mean line + min..max band per group; returns the group labels of the lines drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    try:
        for label, b in bands.items():
            if len(b.x) == 0:
                continue
            (line,) = ax.plot(b.x, b.mean, label=label, marker="o" if len(b.x) == 1 else None)
            ax.fill_between(b.x, b.lo, b.hi, color=line.get_color(), alpha=0.2, linewidth=0)
        if threshold is not None:
            ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label="_threshold")
        ax.set_title(f"{ylabel}: mean over runs, band = min..max", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        return [str(l.get_label()) for l in ax.get_lines() if not str(l.get_label()).startswith("_")]
    finally:
        plt.close(fig)


def render_html(title: str, images: Sequence[Path], table_md: str, rows: Sequence[dict[str, Any]],
                selection: str, command: str, notes: Sequence[str], profiles: Sequence[str] = ()) -> str:
    """A self-contained page: PNGs inlined as base64, the table, the selection and the command."""
    esc = html.escape
    cells = [format_row(r) for r in rows]
    cols = list(cells[0]) if cells else []
    table = ("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{esc(c[k])}</td>" for k in cols) + "</tr>" for c in cells)
             + "</table>")
    imgs = "".join(
        f'<figure><img alt="{esc(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{esc(p.name)}</figcaption></figure>'
        for p in images
    )
    caption = esc(table_md.split("\n", 1)[0])
    note_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}code,pre{{background:#f4f4f4}}</style>
</head><body><h1>{esc(title)}</h1>
{imgs}
<p>{caption}</p>{table}
<p>Curves: mean over the runs of a group, band = min..max over runs, on the step (or wall-clock)
range all runs of the group cover (linear interpolation onto a common grid).</p>
{"".join(f"<h2>Latency and memory vs K</h2><pre>{esc(t)}</pre>" for t in profiles)}
<h2>Selection</h2><pre>{esc(selection)}</pre>
<h2>Command</h2><pre>{esc(command)}</pre>
{f"<h2>Notes</h2><ul>{note_html}</ul>" if notes else ""}
</body></html>
"""


# ---------------------------------------------------------------- MLflow access


def check_store_exists(uri: str) -> None:
    """A sqlite store that is not there is a typo, not an empty store: do not create one."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise UserError(f"no MLflow store at {path} (give --tracking-uri or set MLFLOW_TRACKING_URI)")


def find_experiment(client, name: str):
    """The experiment, or a UserError naming the closest existing experiment names."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp
    names = [e.name for e in client.search_experiments()]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    hint = f"; did you mean: {', '.join(close)}" if close else (
        f"; experiments: {', '.join(sorted(names)[:10])}" if names else "; the store has no experiments")
    raise UserError(f"no experiment named '{name}' at {client.tracking_uri}{hint}")


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
            runs = []
            token = None
            while True:
                page = client.search_runs([experiment_id], filter_string=filter_string or "",
                                          max_results=1000, page_token=token)
                runs.extend(page)
                token = page.token
                if not token:
                    break
        except MlflowException as e:
            raise UserError(f"invalid filter {filter_string!r}: {one_line(e)}") from None
    runs = [r for r in runs if r.data.tags.get("stage") not in NOT_CURVES]
    if not runs:
        what = (f"filter {filter_string!r}" if filter_string else
                "the given run ids in this experiment" if run_ids else "the experiment has no runs")
        raise UserError(f"no runs match ({what}); nothing to compare")
    return sorted(runs, key=lambda r: r.info.start_time or 0)


def fetch_series(client, run_id: str, key: str) -> Series:
    return history_series([(m.step, m.value) for m in client.get_metric_history(run_id, key)])


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
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

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
    client = MlflowClient(tracking_uri=uri)
    try:
        exp = find_experiment(client, experiment) if experiment is not None else None
        runs = select_runs(client, exp.experiment_id if exp else None, filter_string, run_ids)
        groups, notes = collect_groups(client, runs, group_by, metric, threshold, task_key)
    except MlflowException as e:
        raise UserError(f"MLflow at {uri}: {one_line(e)}") from None

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
    table_md = markdown_table(rows, metric, threshold)
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
    try:
        profiles = profile_tables(client, exp.experiment_id) if exp is not None else []
    except MlflowException as e:
        raise UserError(f"MLflow at {uri}: {one_line(e)}") from None
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
        try:
            run_id = log_comparison_run(client, runs[0].info.experiment_id if exp is None else exp.experiment_id,
                                        list(files.values()), experiment, filter_string, run_ids, group_by, metric, threshold)
        except MlflowException as e:
            raise UserError(f"MLflow at {uri}: logging the comparison run: {one_line(e)}") from None
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
            for m in client.get_metric_history(run.info.run_id, name):
                by_k.setdefault(m.step, {})[name] = m.value
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
    from mlflow.entities import Param

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
    client.log_batch(rid, params=[Param(k, v[:6000]) for k, v in params.items()])
    try:
        for path in paths:  # only our files: --out may be a directory holding other things
            client.log_artifact(rid, str(path), artifact_path="comparison")
    except Exception:
        client.set_terminated(rid, status="FAILED")
        raise
    client.set_terminated(rid, status="FINISHED")
    return rid
