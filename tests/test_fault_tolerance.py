"""Fault tolerance of a training run, with real processes: a killed EnvRunner is replaced and
training goes on; a SIGKILLed driver resumes with no gap or duplicate in MLflow; GPU learners
asked for on a machine without GPUs fall back to CPU with a clear line."""

import contextlib
import os
import re
import uuid
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, interrupt_cli, last_json, run_cli


def _spawn_train(tmp_path, config_text: str, args=(), env_extra=None) -> tuple[subprocess.Popen, str]:
    """``ncdpo train`` on ``config_text`` in a process group of its own (killable as a whole), with
    its own MLflow store; returns (the process, the store's URI)."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    config = tmp_path / "tiny.yaml"
    config.write_text(config_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": uri, **(env_extra or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ncdpo_rllib.cli", "train", str(config), *args],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    return proc, uri


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_has_no_gap_or_duplicate(tmp_path):
    proc, uri = _spawn_train(tmp_path, TINY.replace("stop: {iterations: 2, env_steps: null}", "stop: {iterations: 5, env_steps: null}")
                             .replace("checkpoint: {every: 1}", "checkpoint: {every: 2}"), ["--set", "tracking.run_name=killed"])
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


def _marked_env_runner_pids(marker: str) -> list[int]:
    """EnvRunner actor processes of the run whose environment carries ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"SingleAgentEnvRunner" in cmdline and f"NCDPO_TEST_MARK={marker}".encode() in environ:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, iterations", [("ncdpo", 10), ("ncdpo-appo", 30)])
def test_killed_env_runner_is_restarted_and_training_finishes(tmp_path, algorithm, iterations):
    """Synchronous and asynchronous (APPO: the other runner samples on meanwhile) alike. Enough
    iterations that the restarted runner (a new process importing torch and RLlib) comes back
    before the run ends, which takes a while on a loaded 2-core machine: an asynchronous
    iteration is shorter (it ends once its steps are sampled)."""
    marker = uuid.uuid4().hex
    proc, uri = _spawn_train(
        tmp_path,
        f"algorithm: {algorithm}\n"
        + TINY.replace("stop: {iterations: 2, env_steps: null}", f"stop: {{iterations: {iterations}, env_steps: null}}")
        .replace("resources: {env_runners: 0, envs_per_runner: 2}", "resources: {env_runners: 2, envs_per_runner: 1}"),
        ["--json"], {"NCDPO_TEST_MARK": marker},
    )
    lines, killed = [], None
    try:
        deadline = time.time() + 300
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("iter    2") and killed is None:
                pids = _marked_env_runner_pids(marker)
                assert len(pids) >= 2, pids  # two runners (plus, possibly, their worker processes)
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
            if time.time() > deadline:
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = "".join(lines)
    assert proc.returncode == 0, stderr[-3000:]
    assert killed is not None and "env runner failure: restarted" in stderr, stderr[-3000:]
    summary = last_json(proc.stdout.read())
    assert summary["iterations"] == iterations
    client = MlflowClient(uri)
    restarts = client.get_metric_history(summary["mlflow_run_id"], "env_runner_restarts")
    assert max(m.value for m in restarts) >= 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_learner_without_gpu_falls_back_to_cpu(tmp_path, tiny_config):
    out = run_cli(["train", tiny_config, "--set", "resources.gpus_per_learner=1", "--set", "stop.iterations=1",
                   "--set", "tracking.enabled=false"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "learners run on CPU" in out.stderr and "local learner, CPU" in out.stderr


@pytest.mark.slow
def test_first_sigint_checkpoints_after_the_iteration_and_resume_has_no_gap_or_duplicate(tmp_path):
    """SIGINT (Ctrl-C) or SIGTERM: the iteration finishes, a checkpoint is written, the MLflow run is
    KILLED (not left RUNNING), the last line gives the --resume command, exit 130; resuming then
    logs every step once. A second signal would abort at once (KeyboardInterrupt)."""
    config = (TINY.replace("stop: {iterations: 2, env_steps: null}", "stop: {iterations: 6, env_steps: null}")
              .replace("checkpoint: {every: 1}", "checkpoint: {every: 100}"))
    (tmp_path / "tiny.yaml").write_text(config)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    # The signal lands during iteration 3: no periodic checkpoint covers 1..2.
    code, _, rest = interrupt_cli(["train", "tiny.yaml", "--set", "tracking.run_name=interrupted"], tmp_path,
                                  "iter    2", {"MLFLOW_TRACKING_URI": uri})
    assert code == 130, rest[-3000:]
    last = rest.strip().splitlines()[-1]
    run_dir = tmp_path / "runs" / "interrupted"
    assert last.startswith("ncdpo train: stopped by SIGINT after iteration ") and f"--resume {run_dir}" in last, last
    stopped_at = int(last.split("after iteration ")[1].split()[0])
    assert stopped_at >= 2 and (run_dir / "checkpoints" / f"iter_{stopped_at:06d}").is_dir()
    assert not (run_dir / "checkpoints" / "final").exists() and "Traceback" not in rest
    client = MlflowClient(uri)
    (run,) = client.search_runs(client.get_experiment_by_name("cli-test").experiment_id)
    assert run.info.status == "KILLED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "env_steps")) == [
        256 * i for i in range(1, stopped_at + 1)]  # every finished iteration reached MLflow

    resumed = run_cli(["train", "--resume", run_dir, "--json"], tmp_path, {"MLFLOW_TRACKING_URI": uri})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert last_json(resumed.stdout)["iterations"] == 6
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "env_steps"))
    assert steps == [256 * i for i in range(1, 7)], steps  # no gap, no duplicate


def test_sigterm_is_a_stop_request_and_a_second_signal_aborts():
    """The handler ``train`` installs: SIGTERM (a scheduler's, ``kill``) and SIGINT alike set the stop
    request and return; the second raises KeyboardInterrupt; the previous handlers come back after."""
    from ncdpo_rllib.experiment.stopping import StopRequest

    said = []
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest(said.append) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stop.signal == "SIGTERM" and "finishing this iteration" in said[0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before


@contextlib.contextmanager
def _killed_if_left(proc: subprocess.Popen):
    """Kill the process's group if the block ends (a failed assertion, a timeout) with it still running."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_for(stream, needle: str, timeout_s: float = 240) -> str:
    """Read lines until one contains needle; the lines read so far (for assertion messages)."""
    seen, deadline = [], time.time() + timeout_s
    for line in stream:
        seen.append(line)
        if needle in line:
            return "".join(seen)
        if time.time() > deadline:
            break
    raise AssertionError(f"no line with {needle!r} in:\n" + "".join(seen)[-3000:])


@pytest.mark.slow
def test_tracking_server_outage_buffers_metrics_and_a_lasting_one_is_replayed(tmp_path, restartable_mlflow_server):
    """A real mlflow server goes away mid-run and comes back: training never stops and the metrics of
    the outage arrive. It goes away again for good: the run ends normally (here on a first Ctrl-C),
    its checkpoint complete, the last line naming what was not logged and the replay command; the
    replay, once the server is back, leaves every step logged exactly once."""
    server = restartable_mlflow_server
    proc, _ = _spawn_train(tmp_path, TINY.replace("stop: {iterations: 2, env_steps: null}", "stop: {iterations: 500, env_steps: null}"),
                           ["--set", "tracking.run_name=outage", "--set", "tracking.flush_timeout_s=2", "--json"],
                           {"MLFLOW_TRACKING_URI": server.url})
    with _killed_if_left(proc):
        _wait_for(proc.stderr, "iter    2 ")
        server.stop()
        t_down = time.time()
        _wait_for(proc.stderr, f"MLflow at {server.url} unreachable")
        server.start()
        back = _wait_for(proc.stderr, "the buffered metrics are logged")
        assert "Traceback" not in back
        server.stop()
        _wait_for(proc.stderr, f"MLflow at {server.url} unreachable")
        outage_s = time.time() - t_down
        _wait_for(proc.stderr, "iter ")  # one more iteration with the server away
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    spill_line = [ln for ln in stderr.splitlines() if "still unreachable after 2 s" in ln]
    assert len(spill_line) == 1, stderr[-3000:]
    run_dir = tmp_path / "runs" / "outage"
    (spill,) = run_dir.glob("unlogged-*.jsonl")
    assert f"ncdpo replay {spill}" in spill_line[0] and "the run's status KILLED" in spill_line[0]
    saved = sorted((run_dir / "checkpoints").glob("iter_*"))[-1]
    from ncdpo_rllib.integrity import manifest_problem

    assert manifest_problem(saved) is None
    iterations = int(saved.name.split("_")[1])

    server.start()
    replayed = run_cli(["replay", spill, "--json"], tmp_path)
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    assert not spill.exists()
    client = MlflowClient(server.url)
    (run,) = client.search_runs(client.get_experiment_by_name("cli-test").experiment_id)
    assert run.info.status == "KILLED"
    for name in ("env_steps", "iteration", "learner/default_policy/ratio_mean"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert sorted(steps) == [256 * i for i in range(1, iterations + 1)], (name, steps)  # no gap, no duplicate
    print(f"survived a {outage_s:.0f} s outage (server down, up, down for good) over {iterations} iterations")
    again = run_cli(["replay", spill], tmp_path)
    assert again.returncode == 2 and "no such file" in again.stderr


def _marked_learner_pids(marker: str) -> list[int]:
    """The remote Learner actor process of the run whose environment carries ``marker`` (Ray names
    a LearnerGroup's actors ray::_WrappedExecutable)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and b"ray::_WrappedExecutable" in (proc / "cmdline").read_bytes()
                    and f"NCDPO_TEST_MARK={marker}".encode() in (proc / "environ").read_bytes()):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_a_dead_remote_learner_stops_the_run_in_one_line_naming_the_checkpoint(tmp_path):
    """resources.learners: 1, the learner process SIGKILLed mid-run: RLlib 2.60 cannot restart
    learners, so the run stops (within the test's timeout: it never hangs) with one line naming the
    last checkpoint and the --resume command, and the resume goes on from there."""
    marker = uuid.uuid4().hex
    proc, uri = _spawn_train(
        tmp_path, TINY.replace("stop: {iterations: 2, env_steps: null}", "stop: {iterations: 200, env_steps: null}")
        .replace("resources: {env_runners: 0, envs_per_runner: 2}", "resources: {env_runners: 0, envs_per_runner: 2, learners: 1}"),
        ["--set", "tracking.run_name=learner"], {"NCDPO_TEST_MARK": marker},
    )
    with _killed_if_left(proc):
        _wait_for(proc.stderr, "iter    3 ")
        (pid,) = _marked_learner_pids(marker)
        os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = [ln for ln in stderr.splitlines() if ": error: " in ln]
    run_dir = (tmp_path / "runs" / "learner").resolve()
    assert "a learner process died (" in line and f"ncdpo train --resume {run_dir}" in line, line
    last = re.search(r"last checkpoint (\S+);", line).group(1)
    assert Path(last).parent == run_dir / "checkpoints" and int(last[-6:]) >= 2  # iteration 3 printed, then checkpointed
    assert MlflowClient(uri).search_runs(MlflowClient(uri).get_experiment_by_name("cli-test").experiment_id)[0].info.status == "FAILED"
    resumed = run_cli(["train", "--resume", run_dir, "--set", f"stop.iterations={int(last[-6:]) + 1}", "--json"],
                      tmp_path, {"MLFLOW_TRACKING_URI": uri})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert last_json(resumed.stdout)["iterations"] == int(last[-6:]) + 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runners_on(node) -> list[int]:
    """PIDs of the EnvRunner actor processes a Ray node's raylet started."""
    raylet = node.all_processes["raylet"][0].process.pid
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or b"SingleAgentEnvRunner" not in (proc / "cmdline").read_bytes():
                continue
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == raylet:
                pids.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_lost_worker_node_leaves_the_run_going_and_its_runner_comes_back_on_a_new_node(tmp_path):
    """A multi-node Ray cluster on this machine (Ray's own ``cluster_utils.Cluster``: a head with no
    CPUs, three 1-CPU worker nodes holding the algorithm's bundles, so both EnvRunners sit on worker
    nodes); ``ncdpo train`` joins it through RAY_ADDRESS. One runner's node is removed mid-run (all its
    processes killed): training goes on with the runner left, a node added later takes the lost runner
    (RLlib restarts it there, the progress line says so); stopped then with Ctrl-C (the run is long
    enough for any machine), every iteration's metrics are in MLflow once and every checkpoint is intact."""
    from ray.cluster_utils import Cluster

    from ncdpo_rllib.integrity import manifest_problem

    from ray._private.utils import get_ray_address_file

    # Cluster() records its address where a bare ray.init() looks for one to join; ncdpo's init_ray and
    # the other tests ask for a local instance, and the file is put back as it was afterwards.
    address_file = Path(get_ray_address_file(None))
    before = address_file.read_text() if address_file.is_file() else None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "gcs_server_port": _free_port(),
                                                            "include_dashboard": False})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
        proc, uri = _spawn_train(
            tmp_path,
            TINY.replace("stop: {iterations: 2, env_steps: null}", "stop: {iterations: 1000, env_steps: null}")
            .replace("resources: {env_runners: 0, envs_per_runner: 2}", "resources: {env_runners: 2, envs_per_runner: 1}"),
            ["--set", "tracking.run_name=lost-node", "--json"], {"RAY_ADDRESS": cluster.address})
        with _killed_if_left(proc):
            seen = _wait_for(proc.stderr, "iter    2 ")
            hosts = [n for n in nodes if _runners_on(n)]
            assert hosts, "no EnvRunner on the cluster's worker nodes:\n" + seen[-2000:]
            cluster.remove_node(hosts[0], allow_graceful=False)
            after_loss = _wait_for(proc.stderr, "env runners: 1 of 2 healthy; training goes on")
            after_loss += _wait_for(proc.stderr, "iter ")  # an iteration on the runner left
            cluster.add_node(num_cpus=1)
            rest = after_loss + _wait_for(proc.stderr, "env runner failure: restarted")
            rest += _wait_for(proc.stderr, "iter ")  # an iteration with both runners again
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=300)
        stderr = seen + rest + stderr
        assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
        assert "actor_manager" not in stderr, stderr[-3000:]  # RLlib's own ERROR lines: ours say it
    finally:
        cluster.shutdown()
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(before)
    stopped_at = int(stderr.strip().splitlines()[-1].split("after iteration ")[1].split()[0])
    client = MlflowClient(uri)
    (run,) = client.search_runs(client.get_experiment_by_name("cli-test").experiment_id)
    run_id = run.info.run_id
    assert sorted(m.value for m in client.get_metric_history(run_id, "iteration")) == list(range(1, stopped_at + 1))
    steps = sorted(m.step for m in client.get_metric_history(run_id, "env_steps"))
    assert len(set(steps)) == stopped_at, steps  # no iteration's metrics lost or logged twice
    assert max(m.value for m in client.get_metric_history(run_id, "env_runner_restarts")) >= 1
    run_dir = tmp_path / "runs" / "lost-node"
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert ckpts and all(manifest_problem(c) is None for c in ckpts)
