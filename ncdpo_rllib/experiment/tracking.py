"""MLflow, all of it: ``Tracker`` (one run of train / pretrain / evaluate / collect) and the client
helpers ``ncdpo compare`` and ``ncdpo sweep`` use, through ``MlflowClient`` (no global active run,
so nothing leaks between runs).

Metric names are stable (documented in ``docs/configuration.md``); every metric is
logged with ``step = env steps``; ``wall_s`` is its own metric for wall-clock curves.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ncdpo_rllib.errors import UserError, one_line
from ncdpo_rllib.integrity import write_atomic

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
    # A tracking server that is down must not hold training for minutes (MLflow's default: 7
    # retries with exponential backoff, about 4 minutes per call): one quick retry, then the
    # Tracker's backlog takes over. The user's own settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
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


TRANSIENT = ("database is locked", "connection refused", "max retries exceeded", "failed to establish",
             "timed out", "connection reset", "connection aborted", "remote end closed", "bad gateway",
             "service unavailable", "gateway timeout", "temporarily unavailable", "503", "502", "504")
"""What an MLflow write failure says when the store may come back: a server that is down or restarting,
a sqlite file another writer holds longer than MLflow's 20 s busy timeout."""
UNLOGGED = "unlogged-{run_id}.jsonl"


def transient(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    text = one_line(e).lower()
    return any(hint in text for hint in TRANSIENT)


class Tracker:
    """One MLflow run. ``enabled=False`` makes every call a no-op.

    Writes that fail because the store is unreachable or busy (:func:`transient`) never stop the
    caller: metric batches wait in order in a backlog and go out with the next write that gets
    through; ``finish`` waits up to ``tracking.flush_timeout_s`` for the store, then writes what is
    still unsent (metrics, artifacts, the run's final status) to ``<spill_dir>/unlogged-<run>.jsonl``
    for ``ncdpo replay``. Any other MLflow error is raised."""

    def __init__(
        self,
        exp: ExperimentConfig,
        *,
        run_id: Optional[str] = None,
        uri: Optional[str] = None,
        tags: Optional[dict[str, str]] = None,
        log: Optional[Callable[[str], None]] = None,
        spill_dir: Optional[Path] = None,
    ):
        """``run_id``/``uri``: continue that run (resume); the config's uri wins if set.
        ``tags``: added to the standard ones (e.g. stage: pretrain). ``log``: where outage notes go
        (stderr). ``spill_dir``: where unsent records go at the end (the working directory)."""
        self.extra_tags = dict(tags or {})
        self.enabled = exp.tracking.enabled
        self.flush_timeout_s = exp.tracking.flush_timeout_s
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.spill_dir = spill_dir
        self.run_id: Optional[str] = None
        self.uri: Optional[str] = None
        self.backlog: list[list] = []  # metric chunks (<= 1000 each), oldest first
        self.unsent_artifacts: list[tuple[str, Optional[str]]] = []
        self.outage_since: Optional[float] = None
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
            "denoising_steps": str(exp.diffusion.denoising_steps if exp.diffusion_policy else "n/a"),
            "stage": "finetune" if exp.init_from else "train",
            **environment_tags(),
            **self.extra_tags,
        }
        run = self.client.create_run(exp_id, run_name=exp.tracking.run_name, tags=tags)
        self.run_id = run.info.run_id
        log_params(self.client, self.run_id, flatten(exp.to_dict()))

    def _unreachable(self, e: BaseException) -> None:
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            self.log(f"MLflow at {self.uri} unreachable ({one_line(e)[:200]}): metrics are kept and sent "
                     "when it is back; training goes on")

    def _sent(self, write: Callable[[], object]) -> bool:
        """Run one write: True if it got through, False if the store refused it for now (noted once
        per outage); any other error is raised."""
        try:
            write()
            return True
        except Exception as e:
            if not transient(e):
                raise
            self._unreachable(e)
            return False

    def _log_artifact_now(self, path: str, artifact_path: Optional[str]) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, path, artifact_path=artifact_path)
        else:
            self.client.log_artifact(self.run_id, path, artifact_path=artifact_path)

    def _drain(self) -> bool:
        """Send the backlog in order; False (backlog kept) when the store is unreachable."""
        while self.backlog:
            if not self._sent(lambda: self.client.log_batch(self.run_id, metrics=self.backlog[0])):
                return False
            self.backlog.pop(0)
        while self.unsent_artifacts:
            if not self._sent(lambda: self._log_artifact_now(*self.unsent_artifacts[0])):
                return False
            self.unsent_artifacts.pop(0)
        if self.outage_since is not None:
            self.log(f"MLflow at {self.uri} is back after {time.monotonic() - self.outage_since:.0f} s: "
                     "the buffered metrics are logged")
            self.outage_since = None
        return True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
        self.backlog += [batch[i : i + 1000] for i in range(0, len(batch), 1000)]
        self._drain()

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            self.unsent_artifacts.append((str(Path(path).resolve()), artifact_path))
            self._drain()

    def log_artifacts(self, path: Path, artifact_path: str) -> None:
        self.log_artifact(path, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if not (self.enabled and self.run_id):
            return
        deadline = time.monotonic() + self.flush_timeout_s
        while True:
            if self._drain() and self._sent(lambda: self.client.set_terminated(self.run_id, status=status)):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(min(5.0, max(deadline - time.monotonic(), 0.0)))
        self._spill(status)

    def _spill(self, status: str) -> None:
        path = Path(self.spill_dir or Path.cwd()) / UNLOGGED.format(run_id=self.run_id)
        metrics = [m for chunk in self.backlog for m in chunk]
        records = [{"uri": self.uri, "run_id": self.run_id, "status": status}]
        records += [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in metrics]
        records += [{"artifact": p, "artifact_path": a} for p, a in self.unsent_artifacts]
        _write_records(path, records)
        keys = sorted({m.key for m in metrics})
        steps = f", steps {min(m.step for m in metrics):,}..{max(m.step for m in metrics):,}" if metrics else ""
        self.log(f"MLflow at {self.uri} still unreachable after {self.flush_timeout_s:g} s: {len(metrics)} metric "
                 f"values ({len(keys)} keys{steps}), {len(self.unsent_artifacts)} artifact(s) and the run's status "
                 f"{status} were not logged; they are in {path}; when the server is back: ncdpo replay {path}")


def _write_records(path: Path, records: list[dict]) -> None:
    """The unlogged file: a header (uri, run_id, status), then one record per metric value or artifact."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def replay(path: str | Path, uri: Optional[str] = None) -> dict:
    """Log what a Tracker could not (``unlogged-<run>.jsonl``) to its run: metrics in their order,
    artifacts, then the run's final status. Sent records leave the file as they go, so a replay that
    fails half-way can be run again without logging anything twice; the file is removed when done."""
    from mlflow.entities import Metric

    path = Path(path)
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        header, rest = records[0], records[1:]
        run_id, status = header["run_id"], header["status"]
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (ncdpo replay takes the unlogged-<run>.jsonl a run wrote)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, IndexError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a file of unlogged MLflow records ({one_line(e)})") from None
    uri = uri or header.get("uri")
    client = mlflow_client(uri)
    metrics = [r for r in rest if "key" in r]
    artifacts = [r for r in rest if "artifact" in r]

    sent = uploaded = 0
    with mlflow_errors(uri, f"replaying {path.name}"):
        try:
            client.get_run(run_id)
            for i in range(0, len(metrics), 1000):
                chunk = metrics[i : i + 1000]
                client.log_batch(run_id, metrics=[Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
                                                  for r in chunk])
                sent += len(chunk)
            for r in artifacts:
                p = Path(r["artifact"])
                if p.is_dir():
                    client.log_artifacts(run_id, str(p), artifact_path=r.get("artifact_path"))
                elif p.is_file():
                    client.log_artifact(run_id, str(p), artifact_path=r.get("artifact_path"))
                uploaded += 1
            client.set_terminated(run_id, status=status)
        except BaseException:
            _write_records(path, [header, *metrics[sent:], *artifacts[uploaded:]])  # what is left, for a rerun
            raise
    path.unlink()
    return {"run_id": run_id, "mlflow_uri": uri, "metrics": sent, "artifacts": len(artifacts), "status": status}


AUTH_INI, AUTH_DB, SERVER_ENV, CREDENTIALS = "basic_auth.ini", "basic_auth.db", "server.env", "credentials"
AUTH_USER = "ncdpo"


def server_auth(directory: str | Path, credentials: Optional[str | Path] = None) -> dict:
    """Credentials for an ``mlflow server --app-name basic-auth`` (MLflow's basic-auth app), made
    once per cluster in ``directory`` (rerunning keeps them), every file mode 600:

    - ``basic_auth.ini``: the auth app's config (``MLFLOW_AUTH_CONFIG_PATH``): its user store
      ``basic_auth.db`` next to it, the admin user ``ncdpo`` with a random password;
    - ``server.env``: the server's environment (that path, and a random Flask secret key for its
      CSRF protection);
    - ``credentials`` (or the ``credentials`` path given, e.g. ``~/.mlflow/credentials``, which
      every MLflow client of that user reads): the client side, in MLflow's credentials-file format.
    """
    import configparser
    import secrets

    root = Path(directory).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    ini = root / AUTH_INI
    if ini.is_file():
        cfg = configparser.ConfigParser()
        cfg.read(ini)
        password = cfg.get("mlflow", "admin_password", fallback=None)
        if not password:
            raise UserError(f"{ini}: exists without an admin_password; remove it (and {AUTH_DB}) to make new credentials")
    else:
        password = secrets.token_urlsafe(24)
        write_atomic(ini, "[mlflow]\n"
                            "default_permission = READ\n"
                            f"database_uri = sqlite:///{root / AUTH_DB}\n"
                            f"admin_username = {AUTH_USER}\n"
                            f"admin_password = {password}\n"
                            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
                     mode=0o600)
    env = root / SERVER_ENV
    if not env.is_file():
        write_atomic(env, f"MLFLOW_AUTH_CONFIG_PATH={ini}\nMLFLOW_FLASK_SERVER_SECRET_KEY={secrets.token_hex(32)}\n",
                     mode=0o600)
    client = Path(credentials).expanduser() if credentials else root / CREDENTIALS
    text = f"[mlflow]\nmlflow_tracking_username = {AUTH_USER}\nmlflow_tracking_password = {password}\n"
    if client.is_file() and client.read_text() != text:
        raise UserError(f"{client}: holds other MLflow credentials; move it aside or pass --credentials elsewhere")
    client.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(client, text, mode=0o600)
    return {"auth_config": str(ini), "server_env": str(env), "credentials": str(client), "username": AUTH_USER}
