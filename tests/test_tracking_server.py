"""A tracking server only its users can reach: ``ncdpo mlflow-auth`` makes the credentials, a real
``mlflow server --app-name basic-auth`` on 127.0.0.1 refuses requests without them, and a run
logged with them arrives."""

import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request

from mlflow.tracking import MlflowClient

from tests.conftest import MlflowServer, last_json, run_cli

LOG_ONE_RUN = """
from ncdpo_rllib.experiment.config import parse_config
from ncdpo_rllib.experiment.tracking import Tracker
tracker = Tracker(parse_config({"env": {"id": "Pendulum-v1"}, "tracking": {"experiment": "secure"}}))
for step in (100, 200):
    tracker.log_metrics({"return_mean": step / 10}, step)
tracker.finish()
print(tracker.run_id)
"""


def _client_env(home, **extra) -> dict:
    """A client process's environment: no MLflow settings of ours, its own HOME (~/.mlflow/credentials)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return env | {"HOME": str(home), **extra}


def test_basic_auth_server_refuses_strangers_and_logs_runs_with_the_credentials(tmp_path):
    auth_dir, home = tmp_path / "auth", tmp_path / "home"
    made = run_cli(["mlflow-auth", auth_dir, "--credentials", home / ".mlflow" / "credentials", "--json"], tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    files = last_json(made.stdout)
    for path in (files["auth_config"], files["server_env"], files["credentials"]):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    again = run_cli(["mlflow-auth", auth_dir, "--credentials", home / ".mlflow" / "credentials", "--json"], tmp_path)
    assert again.returncode == 0 and last_json(again.stdout) == files  # rerun: the same credentials
    other = run_cli(["mlflow-auth", tmp_path / "other", "--credentials", home / ".mlflow" / "credentials"], tmp_path)
    assert other.returncode == 2 and "holds other MLflow credentials" in other.stderr  # never overwritten

    server = MlflowServer(tmp_path, auth_env=auth_dir / "server.env")
    server.start()
    try:
        search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
        try:
            urllib.request.urlopen(search, timeout=10)
            raise AssertionError("the server answered a request without credentials")
        except urllib.error.HTTPError as e:
            assert e.code == 401

        stranger = run_cli(["compare", "--tracking-uri", server.url, "--experiment", "secure"], tmp_path,
                           {"HOME": str(tmp_path / "nobody")})
        assert stranger.returncode == 2 and "Traceback" not in stranger.stderr
        assert len([ln for ln in stranger.stderr.splitlines() if ": error: " in ln]) == 1, stranger.stderr

        logged = subprocess.run([sys.executable, "-c", LOG_ONE_RUN], capture_output=True, text=True, timeout=120,
                                env=_client_env(home, MLFLOW_TRACKING_URI=server.url))
        assert logged.returncode == 0, logged.stderr[-3000:]
        run_id = logged.stdout.strip().splitlines()[-1]
        password = dict(line.split(" = ") for line in (home / ".mlflow" / "credentials").read_text().splitlines()
                        if " = " in line)["mlflow_tracking_password"]
        os.environ.update(MLFLOW_TRACKING_USERNAME="ncdpo", MLFLOW_TRACKING_PASSWORD=password)
        try:
            run = MlflowClient(server.url).get_run(run_id)
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
        assert run.info.status == "FINISHED" and run.data.metrics["return_mean"] == 20.0
    finally:
        server.stop()
