"""Shared fixtures: a tiny experiment file and a way to run the real ``ncdpo`` CLI."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

# One compute thread per process: `make test` runs two pytest workers on CI's 2 cores, and each
# test's subprocesses (the CLI, Ray's workers) inherit this; torch's default of one thread per core
# in every process made compute-bound tests 2-5x slower side by side. Results do not depend on it.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

TINY = """\
env: {id: Pendulum-v1}
seed: 0
stop: {iterations: 2, env_steps: null}
diffusion: {denoising_steps: 3, hidden: [32, 32]}
ppo: {train_batch_size: 256, minibatch_size: 128, num_epochs: 1, critic_hidden: [32]}
resources: {env_runners: 0, envs_per_runner: 2}
checkpoint: {every: 1}
tracking: {experiment: cli-test}
"""


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One finished tiny training run (2 iterations, checkpoints iter_000001 and final, no tracking),
    trained once per session and shared read-only: a test that damages or resumes it works on a copy
    (``shutil.copytree``). Returns the run directory."""
    root = tmp_path_factory.mktemp("tiny_run")
    (root / "tiny.yaml").write_text(TINY)
    out = run_cli(["train", root / "tiny.yaml", "--set", "tracking.enabled=false", "--json"], root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / last_json(out.stdout)["run_dir"]


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def run_cli(args, cwd, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "ncdpo_rllib.cli", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def interrupt_cli(args, cwd, when: str, env_extra=None, timeout=240) -> tuple[int, str, str]:
    """Run ``ncdpo ARGS`` (own process group and MLflow settings, as ``run_cli``), send it SIGINT once a
    stderr line starts with ``when``; returns (exit code, stderr up to that line, the rest of stderr).
    The group is killed if anything goes wrong."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | (env_extra or {})
    proc = subprocess.Popen([sys.executable, "-m", "ncdpo_rllib.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        seen, deadline = [], time.time() + timeout
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(when) or time.time() > deadline:
                break
        assert seen and seen[-1].startswith(when), "".join(seen)[-3000:]
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, "".join(seen), rest


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


class ShippedPipeline:
    """A shipped config composed as a user would (``include:`` it from a file in ``tmp_path``),
    its stages run through the CLI with tiny budgets and an MLflow store in ``tmp_path``:
    ``stage("collect")`` runs ``ncdpo collect <file> <tiny> --json``, asserts it succeeded and
    returns its JSON summary; ``finetune(checkpoint)`` runs one training iteration from a
    pre-trained checkpoint and returns its MLflow run, checked to be a logged fine-tuning run."""

    def __init__(self, tmp_path: Path, config: str, tiny: list[str]):
        shipped = Path(__file__).resolve().parent.parent / "configs" / config
        self.cwd, self.file = tmp_path, tmp_path / "composed.yaml"
        self.file.write_text(f"include: {shipped}\n")
        self.tiny = list(tiny)
        self.env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"}

    def stage(self, command: str, *overrides: str) -> dict:
        sets = [arg for item in (*self.tiny, *overrides) for arg in ("--set", item)]
        proc = run_cli([command, self.file.name, *sets, "--json"], self.cwd, self.env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return last_json(proc.stdout)

    def finetune(self, checkpoint: str, *overrides: str):
        from mlflow.tracking import MlflowClient

        summary = self.stage("train", f"init_from={checkpoint}", "stop.iterations=1", "stop.env_steps=null",
                             *overrides)
        run = MlflowClient(self.env["MLFLOW_TRACKING_URI"]).get_run(summary["mlflow_run_id"])
        assert run.data.tags["stage"] == "finetune" and "success_rate" in run.data.metrics
        return run


def runner_and_learner(cfg, module_class=None):
    """A real SingleAgentEnvRunner and Learner built from an RLlib algorithm config, the runner
    holding the learner's weights. ``module_class``: a subclass of the config's module to build
    instead (e.g. one that records what its forward saw). Returns (cfg, runner, learner)."""
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    if module_class is not None:
        spec = cfg.get_default_rl_module_spec()
        cfg.rl_module(rl_module_spec=RLModuleSpec(module_class=module_class, model_config=spec.model_config))
    runner = SingleAgentEnvRunner(config=cfg)
    learner = cfg.build_learner(env=runner.env)
    runner.module.set_state(learner.module[DEFAULT_MODULE_ID].get_state())
    return cfg, runner, learner


def learner_stats(results: dict, module_id: str) -> dict:
    """A learner.update() result's metrics of one module as plain values (RLlib's Stats peeked)."""
    return {k: (v.peek() if hasattr(v, "peek") else v) for k, v in results[module_id].items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a sqlite backend and served artifacts under root;
    ``stop()`` then ``start()`` brings it back on the same port with the same store."""

    def __init__(self, root: Path, auth_env: Optional[Path] = None):
        """``auth_env``: the server.env of ``ncdpo mlflow-auth``: MLflow's basic-auth app with its settings."""
        self.root, self.port, self.proc, self.log = Path(root), _free_port(), None, None
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth_env = auth_env

    def start(self, timeout_s: float = 90) -> None:
        self.log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--serve-artifacts", "--artifacts-destination", str(self.root / "server-artifacts"),
             *(["--app-name", "basic-auth"] if self.auth_env else [])],
            cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, **self._auth_vars()},
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("mlflow server exited:\n" + (self.root / "server.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server not up in {timeout_s:g} s:\n"
                                   + (self.root / "server.log").read_text()[-2000:])
            time.sleep(0.5)

    def _auth_vars(self) -> dict:
        if not self.auth_env:
            return {}
        return dict(line.split("=", 1) for line in Path(self.auth_env).read_text().splitlines() if "=" in line)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own session: it and its workers
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        self.log.close()


@pytest.fixture
def mlflow_server(tmp_path):
    """The URL of a real mlflow server, up for the test."""
    server = MlflowServer(tmp_path)
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def restartable_mlflow_server(tmp_path):
    """A real mlflow server (started) that the test may stop and start again."""
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()
