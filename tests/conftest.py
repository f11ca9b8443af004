"""Shared fixtures: a tiny experiment file and a way to run the real ``ncdpo`` CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


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
