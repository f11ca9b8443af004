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
