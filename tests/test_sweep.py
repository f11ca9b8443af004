"""``ncdpo sweep``: a real 2x2 grid on Ray Tune through the CLI, one MLflow parent, resumable."""

import re

import pytest

from .conftest import TINY, last_json, run_cli

# Six iterations of 256 env steps on 2 envs: each env finishes 200-step Pendulum episodes, so every
# child logs return_mean and the comparison has curves; a checkpoint every iteration.
SWEEP_ARGS = ["--grid", "diffusion.denoising_steps=2,3", "--seeds", "0", "1", "--name", "sw",
              "--set", "stop.iterations=6"]


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("cli-test")
    return client.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_sweep_2x2_interrupted_resumed_parent_children_compare(tmp_path):
    """A 2x2 sweep (grid x seeds) through the CLI, interrupted and resumed:

    - a first SIGINT to ``ncdpo sweep`` reaches its trials (other processes) through the stop flag: the
      running points finish their iteration and checkpoint (MLflow runs KILLED), the waiting ones (2 at a
      time on CI's 2 cores) do not start, the parent is KILLED, exit 130 with the --resume command;
    - --resume finishes every point (each run's steps logged once), one parent with the grid as params,
      one child per point, checkpoints under <checkpoint.dir>/<name>/, the comparison report;
    - --resume again runs nothing; the same name without --resume is refused."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri}
    args = ["sweep", str(cfg), *SWEEP_ARGS]
    proc = subprocess.Popen([sys.executable, "-m", "ncdpo_rllib.cli", *args], cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list((tmp_path / "runs" / "sw").glob("*/checkpoints/iter_000002")) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert last.startswith("ncdpo sweep: sweep sw stopped by SIGINT: ") and last.endswith(
        f"continue with: ncdpo {' '.join(args)} --resume"), last
    runs = _runs(uri)
    (parent,) = [x for x in runs if x.data.tags.get("stage") == "sweep"]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    statuses = sorted(c.info.status for c in children)
    assert parent.info.status == "KILLED" and "KILLED" in statuses and set(statuses) <= {"KILLED", "FINISHED"}, statuses
    counts = re.search(r"(\d+) point\(s\) stopped with a checkpoint, (\d+) not started", last)
    stopped, not_started = int(counts.group(1)), int(counts.group(2))
    assert stopped == statuses.count("KILLED") and stopped + not_started + statuses.count("FINISHED") == 4, last
    for c in children:  # each stopped point left a checkpoint of its last iteration
        assert list((tmp_path / "runs" / "sw" / c.info.run_name / "checkpoints").glob("iter_*")), c.info.run_name

    r = run_cli([*args, "--resume", "--json"], tmp_path, env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = last_json(r.stdout)
    assert summary["points"] == 4 and summary["ran"] == 4 - statuses.count("FINISHED")
    runs = _runs(uri)
    assert len([x for x in runs if x.data.tags.get("stage") == "sweep"]) == 1
    parent = next(x for x in runs if x.data.tags.get("stage") == "sweep")
    assert parent.info.run_id == summary["parent_run_id"] and parent.info.status == "FINISHED"
    assert parent.data.params["grid.diffusion.denoising_steps"] == "2,3"
    assert parent.data.params["grid.seeds"] == "0,1"
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.info.run_name for c in children) == sorted(
        f"sw-diffusion.denoising_steps={k}-seed={s}" for k in (2, 3) for s in (0, 1))
    assert sorted((c.data.params["diffusion.denoising_steps"], c.data.params["seed"]) for c in children) == [
        ("2", "0"), ("2", "1"), ("3", "0"), ("3", "1")]
    client = MlflowClient(uri)
    for c in children:  # checkpoints under <checkpoint.dir>/<sweep name>/<point>/; every step once
        assert (tmp_path / "runs" / "sw" / c.info.run_name / "checkpoints" / "final").is_dir()
        steps = sorted(m.step for m in client.get_metric_history(c.info.run_id, "env_steps"))
        assert steps == [256 * i for i in range(1, 7)], (c.info.run_name, steps)

    out = tmp_path / "runs" / "sw" / "comparison"
    assert summary["comparison"] == str(out / "report.html")
    for name in ("report.html", "summary.csv", "summary.md", "curves_env_steps.png", "curves_wall_clock.png"):
        assert (out / name).is_file(), name
    csv = (out / "summary.csv").read_text()
    assert "diffusion.denoising_steps=2" in csv and "diffusion.denoising_steps=3" in csv
    assert str(out) in r.stderr

    # Resume again: every point FINISHED -> nothing runs, still one parent and 4 children.
    r2 = run_cli([*args, "--resume", "--json"], tmp_path, env, timeout=400)
    assert r2.returncode == 0, r2.stderr[-3000:]
    s2 = last_json(r2.stdout)
    assert s2["ran"] == 0 and s2["parent_run_id"] == parent.info.run_id
    runs = _runs(uri)
    assert len([x for x in runs if x.data.tags.get("stage") == "sweep"]) == 1
    children2 = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.info.run_id for c in children2) == sorted(c.info.run_id for c in children)

    # Without --resume the same name is refused.
    r3 = run_cli(args, tmp_path, env, timeout=120)
    assert r3.returncode == 2 and "--resume" in r3.stderr


@pytest.mark.parametrize("grid, message", [
    (["--grid", "diffusion.nosuchkey=2,3"], "unknown key 'diffusion.nosuchkey'"),
    (["--grid", "diffusion.denoising_steps=2,abc"], "diffusion.denoising_steps: expected integer"),
    (["--grid", "diffusion.denoising_steps="], "no values"),
    ([], "grid is empty"),
])
def test_sweep_bad_grid_one_line_error(tmp_path, grid, message):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    r = run_cli(["sweep", cfg, *grid, "--name", "bad"], tmp_path,
                {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ncdpo sweep: error:") and message in lines[0], r.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()  # nothing ran
