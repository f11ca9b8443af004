"""MLflow, all of it: ``Tracker`` (one run of train / pretrain / evaluate / collect) and the client
helpers ``ncdpo compare`` and ``ncdpo sweep`` use, through ``MlflowClient`` (no global active run,
so nothing leaks between runs).

Metric names are stable (documented in ``docs/configuration.md``); every metric is
logged with ``step = env steps``; ``wall_s`` is its own metric for wall-clock curves.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import time
from pathlib import Path
from typing import Optional

from ncdpo_rllib.errors import UserError, one_line

from .config import ExperimentConfig
from .filelock import exclusive
from .loader import flatten

DEFAULT_DB = "mlflow.db"
PARAM_MAX = 6000
"""MLflow's longest param value; longer ones are cut."""


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a sqlite file in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def mlflow_client(uri: str):
    """An ``MlflowClient`` on ``uri`` (synchronous logging: a run's last metrics are in the store
    when the call returns)."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    # The client creates the store's schema, and two processes that create one file at once (two
    # `ncdpo train` started together on a fresh store) fail with "table ... already exists" or a
    # migration error: they take turns on the store's folder for it.
    folder = Path(uri[len("sqlite:///"):]).parent
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive(folder), mlflow_errors(uri, "opening the store"):
        client = MlflowClient(tracking_uri=uri)
    return client


@contextlib.contextmanager
def mlflow_errors(uri: str, doing: str = ""):
    """An MLflow error inside the block as a one-line UserError naming the store."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        raise UserError(f"MLflow at {uri}: {doing + ': ' if doing else ''}{one_line(e)}") from None


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


def experiment_id(client, name: str) -> str:
    """The id of the experiment ``name``, created if it does not exist."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # another process made it meanwhile
        if experiment is None:
            raise
        return experiment.experiment_id


def search_all_runs(client, experiment_id: str, filter_string: str = "") -> list:
    """Every run of the experiment that matches ``filter_string`` (all pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of metric ``key``."""
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def log_params(client, run_id: str, params: dict) -> None:
    """Params as strings, each cut to MLflow's limit, in batches of 100."""
    from mlflow.entities import Param

    batch = [Param(k, str(v)[:PARAM_MAX]) for k, v in params.items()]
    for i in range(0, len(batch), 100):
        client.log_batch(run_id, params=batch[i : i + 100])


def environment_tags() -> dict[str, str]:
    """What a comparison needs to trust two runs: code version, library versions, hardware."""
    import platform
    import subprocess

    import ray
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "git_commit": commit or "unknown",
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "hardware": f"{os.cpu_count()} CPU cores ({platform.machine()}), GPU: {gpu}",
    }


class Tracker:
    """One MLflow run. ``enabled=False`` makes every call a no-op."""

    def __init__(
        self,
        exp: ExperimentConfig,
        *,
        run_id: Optional[str] = None,
        uri: Optional[str] = None,
        tags: Optional[dict[str, str]] = None,
    ):
        """``run_id``/``uri``: continue that run (resume); the config's uri wins if set.
        ``tags``: added to the standard ones (e.g. stage: pretrain)."""
        self.extra_tags = dict(tags or {})
        self.enabled = exp.tracking.enabled
        self.run_id: Optional[str] = None
        self.uri: Optional[str] = None
        if not self.enabled:
            return
        self.uri = resolve_tracking_uri(exp.tracking.uri or uri)
        with mlflow_errors(self.uri):
            self._open(exp, run_id)

    def _open(self, exp: ExperimentConfig, run_id: Optional[str]) -> None:
        self.client = mlflow_client(self.uri)
        if run_id is not None:
            self.client.get_run(run_id)  # raises if the run is not in this store
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        exp_id = experiment_id(self.client, exp.tracking.experiment)
        tags = {
            "algorithm": exp.algorithm,
            "env": exp.env.id,
            "seed": str(exp.seed),
            "denoising_steps": str(exp.diffusion.denoising_steps if exp.algorithm != "ppo" else "n/a"),
            "stage": "finetune" if exp.init_from else "train",
            **environment_tags(),
            **self.extra_tags,
        }
        run = self.client.create_run(exp_id, run_name=exp.tracking.run_name, tags=tags)
        self.run_id = run.info.run_id
        log_params(self.client, self.run_id, flatten(exp.to_dict()))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def log_artifacts(self, path: Path, artifact_path: str) -> None:
        if self.enabled:
            self.client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.client.set_terminated(self.run_id, status=status)
