"""``ncdpo compare``: pure aggregation, synthetic runs in sqlite, a real ``mlflow server``, bad input."""

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import trim_mean
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from ncdpo_rllib.experiment.compare import compare
from ncdpo_rllib.experiment.curves import (
    RunStats, Group, Series, aggregate, common_grid, first_reaching, group_value, history_series,
    short_range_note, summary_row, wall_clock_series,
)
from ncdpo_rllib.experiment.report import NOT_REACHED, format_row, summary_table
from tests.conftest import TINY, last_json, run_cli

# ---------------------------------------------------------------- pure functions


def test_aggregate_unequal_runs_by_hand():
    a = Series(np.array([0.0, 100, 200, 300]), np.array([0.0, 10, 20, 30]))
    b = Series(np.array([50.0, 150, 250]), np.array([5.0, 5, 25]))
    band = aggregate([a, b], points=5)
    # common range: max first step (50) .. min last step (250); never extrapolated.
    assert band.x.tolist() == [50, 100, 150, 200, 250]
    # a on the grid: 5 10 15 20 25 ; b: 5 5 5 15 25
    assert band.mean.tolist() == [5, 7.5, 10, 17.5, 25]
    assert band.lo.tolist() == [5, 5, 5, 15, 25]
    assert band.hi.tolist() == [5, 10, 15, 20, 25]
    assert common_grid([a, Series(np.array([400.0, 500]), np.array([1.0, 2]))]).size == 0  # disjoint
    assert short_range_note("g", ["a", "b"], [a, b]) is None  # 200 of 300 steps shared: fine
    short = Series(np.array([0.0, 60]), np.array([1.0, 2]))
    assert "by run s" in short_range_note("g", ["a", "s"], [a, short])


def test_history_keeps_last_value_per_step_and_drops_nan():
    s = history_series([(200, 3.0), (100, 1.0), (200, 4.0), (300, float("nan"))])
    assert s.x.tolist() == [100, 200] and s.y.tolist() == [1.0, 4.0]
    w = wall_clock_series(s, Series(np.array([0.0, 300]), np.array([0.0, 30])))
    assert w.x.tolist() == [10, 20] and w.y.tolist() == [1.0, 4.0]


def test_time_to_threshold_known_curve():
    x, y = np.array([0.0, 10, 20, 30]), np.array([1.0, 3, 2, 5])
    assert first_reaching(x, y, 3) == 10      # exactly at the threshold counts
    assert first_reaching(x, y, 2.5) == 10    # first logged point above, no interpolation
    assert first_reaching(x, y, 4) == 30      # the dip at 20 does not count
    assert first_reaching(x, y, 5.1) is None

    def stats(rid, steps):
        return RunStats(rid, 1.0, 2.0, steps, None if steps is None else steps / 10, 100.0)

    g = Group("algorithm=x", ["r0", "r1"], stats=[stats("r0", 300.0), stats("r1", None)])
    row = summary_row(g, threshold=28.0)
    assert row["reached"] == 1 and row["env_steps_to_threshold_mean"] == 300
    assert format_row(row)["env steps to threshold"] == "300 ± 0 (1/2)"
    none = summary_row(Group("g", ["r1"], stats=[stats("r1", None)]), threshold=28.0)
    cells = format_row(none)
    assert cells["env steps to threshold"] == cells["wall s to threshold"] == f"{NOT_REACHED} (0/1)"
    assert f"{NOT_REACHED} (0/1)" in summary_table([none], "return_mean", 28.0)
    assert format_row(summary_row(g, None))["env steps to threshold"] == "- (no threshold)"


def test_group_key_tag_then_param():
    tags, params = {"algorithm": "ncdpo", "seed": "1"}, {"seed": "7", "diffusion.denoising_steps": "10"}
    assert group_value(tags, params, "seed") == "1"                       # tag wins
    assert group_value(tags, params, "params.seed") == "7"                # forced param
    assert group_value(tags, params, "diffusion.denoising_steps") == "10"  # param fallback
    assert group_value(tags, params, "nope") == "-"


# ---------------------------------------------------------------- synthetic runs in sqlite


def _log_run(client, exp_id, tags, points, wall_per_step, tput=1000.0, params=None):
    run = client.create_run(exp_id, tags=tags)
    rid = run.info.run_id
    metrics = []
    for step, value in points:
        metrics += [Metric("return_mean", value, 0, step), Metric("wall_s", step * wall_per_step, 0, step),
                    Metric("env_steps_per_s", tput, 0, step)]
    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in (params or {}).items()])
    client.set_terminated(rid)
    return rid


@pytest.fixture
def synth_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("synth", artifact_location=(tmp_path / "artifacts").as_uri())
    nc = {"algorithm": "ncdpo", "denoising_steps": "5"}
    ids = {
        "a0": _log_run(client, exp_id, {**nc, "seed": "0"}, [(0, 0.0), (100, 10), (200, 20), (300, 30)], 0.1,
                       params={"diffusion.denoising_steps": "5"}),
        "a1": _log_run(client, exp_id, {**nc, "seed": "1"}, [(50, 5.0), (150, 5), (250, 25)], 0.2, tput=2000.0,
                       params={"diffusion.denoising_steps": "5"}),
        "b0": _log_run(client, exp_id, {"algorithm": "ppo", "denoising_steps": "n/a", "seed": "0"},
                       [(0, -10.0), (100, 0), (200, 10)], 0.05),
    }
    prof = client.create_run(exp_id, tags={"stage": "profile", "env": "Pendulum-v1"})
    client.log_batch(prof.info.run_id, metrics=[Metric("profile/inference_ms", v, 0, k) for k, v in ((5, 1.25), (10, 2.5))])
    client.set_terminated(prof.info.run_id)
    pre = client.create_run(exp_id, tags={"stage": "pretrain", "algorithm": "ncdpo", "denoising_steps": "5"})
    client.log_metric(pre.info.run_id, "pretrain/val_loss", 0.5, step=1)
    client.set_terminated(pre.info.run_id)
    return uri, client, ids


def test_grouping_and_seed_aggregation(synth_store, tmp_path):
    uri, client, ids = synth_store
    res = compare("synth", tmp_path / "out", tracking_uri=uri, threshold=20.0)
    g_nc, g_ppo = "algorithm=ncdpo, denoising_steps=5", "algorithm=ppo, denoising_steps=n/a"
    assert set(res["groups"]) == {g_nc, g_ppo} and sorted(res["groups"][g_nc]) == sorted([ids["a0"], ids["a1"]])
    assert sorted(res["plotted"]["env_steps"]) == sorted(res["plotted"]["wall_clock"]) == [g_nc, g_ppo]
    assert any("no 'return_mean' history" in n for n in res["notes"])  # the pretrain run is skipped
    summary = Path(res["files"]["summary_md"]).read_text()  # the profile run: a table by K, not a group
    assert "| K | inference_ms |" in summary and "| 5 | 1.25 |" in summary and "| 10 | 2.50 |" in summary
    assert "Latency and memory vs K" in Path(res["files"]["report"]).read_text()

    band = res["bands"]["env_steps"][g_nc]
    x = np.array(band["x"])
    assert x[0] == 50 and x[-1] == 250  # the range both seeds cover
    a0 = x / 10
    a1 = np.where(x <= 150, 5.0, 5 + (x - 150) * 0.2)
    np.testing.assert_allclose(band["mean"], (a0 + a1) / 2)
    np.testing.assert_allclose(band["lo"], np.minimum(a0, a1))
    np.testing.assert_allclose(band["hi"], np.maximum(a0, a1))
    wall = res["bands"]["wall_clock"][g_nc]  # a0: wall = step/10 -> 0..30 s; a1: step/5 -> 10..50 s
    assert wall["x"][0] == 10 and wall["x"][-1] == 30

    rows = {r["group"]: r for r in res["rows"]}
    r = rows[g_nc]
    assert r["runs"] == 2 and r["final_mean"] == 27.5 and r["final_std"] == 2.5   # finals 30, 25
    assert r["best_mean"] == 27.5 and r["best_std"] == 2.5
    assert r["env_steps_to_threshold_mean"] == 225 and r["env_steps_to_threshold_std"] == 25  # 200, 250
    assert r["wall_s_to_threshold_mean"] == pytest.approx(35)                             # 20 s, 50 s
    assert r["reached"] == 2 and r["env_steps_per_s_mean"] == 1500
    assert rows[g_ppo]["reached"] == 0 and rows[g_ppo]["env_steps_to_threshold_mean"] is None
    md = (tmp_path / "out" / "summary.md").read_text()
    assert f"{NOT_REACHED} (0/1)" in md and "225 ± 25 (2/2)" in md and "27.50 ± 2.50" in md
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "src=\"http" not in html

    crun = client.get_run(res["mlflow_run_id"])
    assert crun.data.tags["stage"] == "compare" and crun.data.params["metric"] == "return_mean"
    assert crun.data.params["group_by"] == "algorithm,denoising_steps"
    arts = {Path(a.path).name for a in client.list_artifacts(res["mlflow_run_id"], "comparison")}
    assert {"report.html", "summary.csv", "summary.md", "curves_env_steps.png", "curves_wall_clock.png"} <= arts

    # The comparison run is never selected; group by a param; a filter narrows the selection.
    again = compare("synth", tmp_path / "out2", tracking_uri=uri, group_by=["diffusion.denoising_steps"],
                    filter_string="tags.algorithm = 'ncdpo'", log_to_mlflow=False)
    assert again["groups"] == {"diffusion.denoising_steps=5": [ids["a0"], ids["a1"]]}


# ---------------------------------------------------------------- bad input through the CLI


@pytest.mark.parametrize("args, needle", [
    (["--experiment", "synht"], "did you mean: synth"),
    (["--experiment", "synth", "--filter", "tags.algorithm = 'nope'"], "no runs match"),
    (["--experiment", "synth", "--metric", "nope"], "metric 'nope' is not logged"),
    (["--experiment", "synth", "--filter", "this is not a filter"], "invalid filter"),
    (["--runs", "0123456789abcdef"], "no run with id"),
    (["--store"], "no MLflow store at"),
])
def test_bad_input_one_line(synth_store, tmp_path, args, needle):
    uri, _, _ = synth_store
    if args[0] == "--store":
        uri, args = f"sqlite:///{tmp_path / 'missing.db'}", ["--experiment", "synth"]
    r = run_cli(["compare", *args, "--out", tmp_path / "o", "--tracking-uri", uri], cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ncdpo compare: error:") and needle in lines[0], r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "missing.db").exists()


# ---------------------------------------------------------------- a real mlflow server


def test_compare_against_mlflow_server(mlflow_server, tmp_path):
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    run_ids = []
    for seed in (0, 1):
        r = run_cli(["train", cfg, "--set", f"seed={seed}", "--set", "stop.iterations=4", "--json"],
                    cwd=tmp_path, env_extra=env)
        assert r.returncode == 0, r.stderr[-3000:]
        run_ids.append(last_json(r.stdout)["mlflow_run_id"])

    out = tmp_path / "report"
    r = run_cli(["compare", "--experiment", "cli-test", "--group-by", "seed", "--threshold=-1e9",
                 "--out", out, "--json"], cwd=tmp_path, env_extra=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    res = last_json(r.stdout)
    for name in ("curves_env_steps.png", "curves_wall_clock.png", "summary.csv", "summary.md", "report.html"):
        assert (out / name).stat().st_size > 0
    assert sorted(res["plotted"]["env_steps"]) == sorted(res["plotted"]["wall_clock"]) == ["seed=0", "seed=1"]
    assert res["groups"] == {"seed=0": [run_ids[0]], "seed=1": [run_ids[1]]}

    client = MlflowClient(tracking_uri=mlflow_server)
    with open(out / "summary.csv") as f:
        rows = {row["group"]: row for row in csv.DictReader(f)}
    for seed, rid in enumerate(run_ids):
        hist = sorted(client.get_metric_history(rid, "return_mean"), key=lambda m: m.step)
        tput = [m.value for m in client.get_metric_history(rid, "env_steps_per_s")]
        row = rows[f"seed={seed}"]
        assert row["runs"] == "1"
        assert float(row["final_mean"]) == pytest.approx(hist[-1].value)
        assert float(row["best_mean"]) == pytest.approx(max(m.value for m in hist))
        assert float(row["env_steps_per_s_mean"]) == pytest.approx(np.mean(tput))
        assert float(row["env_steps_to_threshold_mean"]) == hist[0].step  # any return beats -1e9
        assert row["reached"] == "1"

    crun = client.get_run(res["mlflow_run_id"])
    assert crun.data.tags["stage"] == "compare" and crun.info.experiment_id == client.get_run(run_ids[0]).info.experiment_id
    arts = {Path(a.path).name for a in client.list_artifacts(res["mlflow_run_id"], "comparison")}
    assert "report.html" in arts and "curves_env_steps.png" in arts


# ---------------------------------------------------------------- aggregate over tasks (rliable)


def test_iqm_and_probability_of_improvement_by_hand():
    from ncdpo_rllib.experiment.aggregate import aggregate_scores, score_matrix

    # 8 scores: the middle 50% are 3, 4, 5, 6 -> IQM 4.5 (mean 4.5 too; make it differ)
    a = np.array([[1.0, 2, 3, 4], [5, 6, 7, 100]])
    b = a - 0.5  # worse on every (run, task) pair, by a margin smaller than the spread
    agg = aggregate_scores({"a": a, "b": b}, reps=300)
    assert agg["algorithms"]["a"]["iqm"] == pytest.approx(4.5) and agg["algorithms"]["a"]["mean"] == pytest.approx(16)
    lo, hi = agg["algorithms"]["a"]["iqm_ci"]
    assert lo <= 4.5 <= hi
    # P(a > b): per task, a's 2 runs vs b's 2 runs; e.g. task 0: a {1, 5} vs b {0.5, 4.5} -> 3/4
    by_hand = np.mean([np.mean([[x > y for y in b[:, t]] for x in a[:, t]]) for t in range(4)])
    assert agg["probability_of_improvement"]["a > b"]["p"] == pytest.approx(by_hand)
    assert agg["probability_of_improvement"]["b > a"]["p"] == pytest.approx(1 - by_hand)
    assert agg["profiles"]["fraction_above"]["a"][0] == 1.0  # every score above the lowest tau (0)
    m, tasks, note = score_matrix({"t1": [1, 2, 3], "t0": [4, 5]})
    assert tasks == ["t0", "t1"] and m.tolist() == [[4, 1], [5, 2]] and "first 2" in note


def test_compare_aggregate_over_tasks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("agg", artifact_location=(tmp_path / "artifacts").as_uri())
    rng = np.random.default_rng(0)
    finals, ids = {}, {}
    for algo, shift in (("ncdpo", 0.2), ("dppo", 0.0)):
        for task in ("reach", "door", "drawer"):
            for seed in range(3):
                final = float(np.clip(rng.uniform(0.2, 0.7) + shift, 0, 1))
                finals.setdefault(algo, []).append(final)
                ids[(algo, task, seed)] = _log_run(client, exp_id, {"algorithm": algo, "env": task, "seed": str(seed)},
                                                   [(0, 0.1), (100, final)], 0.1)
    res = compare("agg", tmp_path / "out", tracking_uri=uri, group_by=["algorithm"], aggregate_over="iqm",
                  task_key="env", reps=300, log_to_mlflow=False)
    agg = res["aggregate"]
    assert agg["tasks"] == ["door", "drawer", "reach"]
    for algo in ("ncdpo", "dppo"):
        stats = agg["algorithms"][f"algorithm={algo}"]
        v = np.sort(finals[algo])  # 9 scores: rliable's IQM is scipy's 25% trimmed mean
        assert stats["runs"] == 3 and stats["tasks"] == 3
        assert stats["iqm"] == pytest.approx(trim_mean(v, 0.25), rel=1e-9)
        assert stats["iqm_ci"][0] <= stats["iqm"] <= stats["iqm_ci"][1]
    p = agg["probability_of_improvement"]["algorithm=ncdpo > algorithm=dppo"]["p"]
    assert p + agg["probability_of_improvement"]["algorithm=dppo > algorithm=ncdpo"]["p"] == pytest.approx(1)
    assert p > 0.5
    assert Path(res["files"]["aggregate_png"]).stat().st_size > 0
    assert "IQM of final return_mean" in Path(res["files"]["summary_md"]).read_text()
    html = Path(res["files"]["report"]).read_text()
    assert html.count("data:image/png;base64,") == 3
    with pytest.raises(Exception, match="needs --task-key"):
        compare("agg", tmp_path / "o2", tracking_uri=uri, aggregate_over="iqm", log_to_mlflow=False)
    some = [rid for (algo, task, _), rid in ids.items() if algo == "dppo" or task == "reach"]
    with pytest.raises(Exception, match="has no runs on door, drawer"):
        compare("agg", tmp_path / "o3", tracking_uri=uri, run_ids=some, group_by=["algorithm"],
                aggregate_over="iqm", task_key="env", log_to_mlflow=False)
