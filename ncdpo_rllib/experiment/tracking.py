"""MLflow tracking through ``MlflowClient`` (no global active run, so nothing leaks between runs).

Metric names are stable (documented in ``docs/configuration.md``); every metric is
logged with ``step = env steps``; ``wall_s`` is its own metric for wall-clock curves.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from .config import ExperimentConfig, flatten
from ncdpo_rllib.errors import UserError, one_line

DEFAULT_DB = "mlflow.db"


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a sqlite file in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


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
        from mlflow.exceptions import MlflowException

        self.uri = resolve_tracking_uri(exp.tracking.uri or uri)
        try:
            self._open(exp, run_id)
        except MlflowException as e:
            raise UserError(f"MLflow at {self.uri}: {one_line(e)}") from None

    def _open(self, exp: ExperimentConfig, run_id: Optional[str]) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:
            self.client.get_run(run_id)  # raises if the run is not in this store
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        experiment = self.client.get_experiment_by_name(exp.tracking.experiment)
        exp_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(exp.tracking.experiment)
        )
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
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(exp.to_dict()).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_artifact(self, path: Path) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path))

    def log_artifacts(self, path: Path, artifact_path: str) -> None:
        if self.enabled:
            self.client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.client.set_terminated(self.run_id, status=status)
