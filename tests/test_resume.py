"""Fault tolerance of a training run: SIGKILL the driver between checkpoints, --resume, and the
MLflow run's step series has no gap and no duplicate."""

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, last_json, run_cli


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_has_no_gap_or_duplicate(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    config = tmp_path / "tiny.yaml"
    config.write_text(
        TINY.replace("stop: {iterations: 2, env_steps: null}", "stop: {iterations: 5, env_steps: null}")
        .replace("checkpoint: {every: 1}", "checkpoint: {every: 2}")
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"MLFLOW_TRACKING_URI": uri}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ncdpo_rllib.cli", "train", str(config), "--set", "tracking.run_name=killed"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        for line in proc.stderr:  # wait for iteration 3: checkpoint 2 is on disk, 3 is not covered
            if line.startswith("iter    3") or time.time() > deadline:
                break
        assert line.startswith("iter    3"), line
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    run_dir = tmp_path / "runs" / "killed"
    assert (run_dir / "checkpoints" / "iter_000002").is_dir()
    assert not (run_dir / "checkpoints" / "final").exists()

    resumed = run_cli(["train", "--resume", run_dir, "--json"], tmp_path, {"MLFLOW_TRACKING_URI": uri})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = last_json(resumed.stdout)
    assert summary["iterations"] == 5 and summary["env_steps"] == 5 * 256
    client = MlflowClient(uri)
    (run,) = client.search_runs(client.get_experiment_by_name("cli-test").experiment_id)
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    for name in ("env_steps", "iteration", "wall_s", "learner/default_policy/ratio_mean"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert sorted(steps) == [256 * i for i in range(1, 6)], (name, steps)  # no gap, no duplicate
    iterations = sorted(m.value for m in client.get_metric_history(run.info.run_id, "iteration"))
    assert iterations == [1, 2, 3, 4, 5]
