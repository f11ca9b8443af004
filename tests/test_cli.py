"""The ``ncdpo`` CLI end to end: real subprocesses, real RLlib, a real MLflow sqlite store."""

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import last_json, run_cli


def test_train_resume_evaluate(tmp_path, tiny_config):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    env = {"MLFLOW_TRACKING_URI": uri}

    first = run_cli(["train", tiny_config, "--json"], tmp_path, env)
    assert first.returncode == 0, first.stderr[-3000:]
    s1 = last_json(first.stdout)
    assert s1["iterations"] == 2 and s1["env_steps"] == 512
    for key in ("final_return", "best_return", "wall_s", "checkpoint", "mlflow_run_id"):
        assert s1[key] is not None, key
    assert "iter    2 | env steps       512" in first.stderr  # one progress line per iteration
    assert "| KL-stopped " in first.stderr  # NCDPO: the fraction of epochs target_kl stopped
    ckpt = tmp_path / s1["checkpoint"]
    assert (ckpt / "ncdpo_state.json").is_file() and (ckpt / "experiment.yaml").is_file()
    assert (ckpt / "env_runner").is_dir() and (ckpt / "learner_group").is_dir()
    assert not list(ckpt.parent.glob(".tmp-*")), "no temporary checkpoint left behind"

    client = MlflowClient(uri)
    run = client.get_run(s1["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["algorithm"] == "ncdpo" and run.data.tags["env"] == "Pendulum-v1"
    for tag in ("git_commit", "ray_version", "torch_version", "hardware"):
        assert run.data.tags[tag], tag
    assert "experiment.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert run.data.params["diffusion.denoising_steps"] == "3" and run.data.params["ppo.lr"] == "0.0003"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "env_steps")] == [256, 512]
    assert len(client.get_metric_history(run.info.run_id, "return_mean")) >= 1  # no episode ends in iter 1
    for name in ("wall_s", "learner/default_policy/ratio_mean",
                 "learner/default_policy/grad_norm_step_first", "learner/default_policy/approx_kl"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 2, name
    iter_s = [m.value for m in client.get_metric_history(run.info.run_id, "time_iter_s")]
    sampling = [m.value for m in client.get_metric_history(run.info.run_id, "time_sampling_s")]
    learner = [m.value for m in client.get_metric_history(run.info.run_id, "time_learner_s")]
    assert len(sampling) == len(learner) == 2 and min(sampling + learner) > 0
    assert all(s + u <= t for s, u, t in zip(sampling, learner, iter_s))  # parts of this iteration's time
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
    assert "checkpoint/ncdpo_state.json" in artifacts

    # --resume the run directory: same MLflow run, steps continue without gap or duplicate.
    run_dir = tmp_path / s1["run_dir"]
    second = run_cli(["train", "--resume", run_dir, "--set", "stop.iterations=4", "--json"], tmp_path, env)
    assert second.returncode == 0, second.stderr[-3000:]
    s2 = last_json(second.stdout)
    assert s2["mlflow_run_id"] == s1["mlflow_run_id"] and s2["iterations"] == 4 and s2["env_steps"] == 1024
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "env_steps")]
    assert steps == [256, 512, 768, 1024]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"

    lengths = client.get_metric_history(run.info.run_id, "episode_len_mean")
    assert lengths and all(m.value == 200 for m in lengths)  # Pendulum: whole episodes, not chunks

    ev = run_cli(["evaluate", s2["checkpoint"], "--episodes", "2", "--json"], tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    e = last_json(ev.stdout)
    assert e["episodes"] == 2 and e["trained_env_steps"] == 1024 and -2000 < e["return_mean"] <= 0
    # ...logged as its own run in the store the checkpoint was trained with (no MLFLOW_* env here).
    ev_run = client.get_run(e["mlflow_run_id"])
    assert ev_run.data.tags["stage"] == "evaluate" and ev_run.data.tags["source_run_id"] == s1["mlflow_run_id"]
    assert ev_run.data.params["diffusion.denoising_steps"] == "3"
    [m] = client.get_metric_history(ev_run.info.run_id, "eval/return_mean")
    assert (m.value, m.step) == (pytest.approx(e["return_mean"]), 1024)
    untracked = last_json(run_cli(["evaluate", s2["checkpoint"], "--episodes", "1", "--no-track", "--json"],
                                  tmp_path).stdout)
    assert "mlflow_run_id" not in untracked


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err_lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(err_lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in err_lines[0]


@pytest.mark.parametrize(
    "sets, needles",
    [
        (["diffusion.denoising_step=5"], ["unknown key 'diffusion.denoising_step'", "denoising_steps"]),
        (["ppo.num_epochs=many"], ["ppo.num_epochs: expected integer"]),
        (["env.id=HalfCheetah-v9"], ["'HalfCheetah-v9' is not a registered Gymnasium env", "HalfCheetah-v5"]),
        (["env.id=Blackjack-v1"], ["observation space Tuple"]),
        (["env.kind=pettingzoo", "env.id=mpe2.no_such_env_v0"], ["cannot import module 'mpe2.no_such_env_v0'"]),
        (["env.kind=pettingzoo", "env.id=mpe2.simple_tag_v3", "multi_agent.policies=groups",
          "multi_agent.groups={adversaries: 'adversary_*', runners: 'runner_*'}"],
         ["pattern 'runner_*' matches no agent"]),
        # More than the local Ray has: RLlib would wait for the CPUs for ever.
        (["resources.env_runners=64"], ["resources need 64 CPUs (64 env runner(s) x 1)", "the Ray cluster has",
                                        "lower resources.env_runners"]),
    ],
)
def test_bad_config_fails_cleanly_and_writes_nothing(tmp_path, tiny_config, sets, needles):
    args = ["train", tiny_config]
    for s in sets:
        args += ["--set", s]
    proc = run_cli(args, tmp_path)
    _assert_one_line_error(proc, *needles)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_missing_and_corrupt_checkpoints_fail_cleanly(tmp_path, tiny_run):
    _assert_one_line_error(run_cli(["evaluate", tmp_path / "nope"], tmp_path), "not found")
    _assert_one_line_error(run_cli(["train", "--resume", tmp_path / "nope"], tmp_path), "not found")
    _assert_one_line_error(run_cli(["evaluate", tmp_path], tmp_path), "is not an ncdpo checkpoint")

    good = tiny_run / "checkpoints" / "final"
    broken_state = tmp_path / "broken_state"
    shutil.copytree(good, broken_state)
    (broken_state / "ncdpo_state.json").write_text("{not json")
    _assert_one_line_error(run_cli(["evaluate", broken_state], tmp_path), "is corrupt")

    missing_cfg = tmp_path / "missing_cfg"
    shutil.copytree(good, missing_cfg)
    (missing_cfg / "experiment.yaml").unlink()
    _assert_one_line_error(run_cli(["train", "--resume", missing_cfg], tmp_path), "experiment.yaml missing")

    broken_weights = tmp_path / "broken_weights"
    shutil.copytree(good, broken_weights)
    (broken_weights / "env_runner" / "state.pkl").write_bytes(b"garbage")  # the manifest catches it first
    _assert_one_line_error(run_cli(["evaluate", broken_weights], tmp_path), "is corrupt: env_runner/state.pkl differs")
    (broken_weights / "algorithm_state.pkl").write_bytes(b"garbage")
    _assert_one_line_error(
        run_cli(["train", "--resume", broken_weights, "--set", "stop.iterations=3"], tmp_path), "is corrupt"
    )
    (broken_weights / "ncdpo_manifest.json").unlink()  # a checkpoint from before manifests: RLlib finds out
    _assert_one_line_error(run_cli(["evaluate", broken_weights], tmp_path), "could not be restored")
    assert not (tmp_path / "runs").exists()  # no failed command started a run
    assert not (tmp_path / "mlflow.db").exists()


def test_resume_from_an_earlier_checkpoint_and_run_name_collisions(tmp_path, tiny_config):
    """--resume iter_1 of a finished 2-iteration run: the later 'final' is moved aside, the new
    final continues from iteration 1; a second run with the same run_name is refused."""
    out = run_cli(["train", tiny_config, "--set", "tracking.run_name=same", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / last_json(out.stdout)["run_dir"]
    again = run_cli(["train", tiny_config, "--set", "tracking.run_name=same"], tmp_path)
    _assert_one_line_error(again, "already exists", "--resume")

    other_cwd = tmp_path / "elsewhere"
    other_cwd.mkdir()
    resumed = run_cli(["train", "--resume", run_dir / "checkpoints" / "iter_000001", "--set", "stop.iterations=3",
                       "--json"], other_cwd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = last_json(resumed.stdout)
    assert s["iterations"] == 3 and Path(s["run_dir"]) == run_dir.resolve()
    assert s["mlflow_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"  # the original store, not the new cwd's
    assert len(list((run_dir / "superseded").iterdir())) == 1
    assert not (other_cwd / "mlflow.db").exists() and not (other_cwd / "runs").exists()
    changed = run_cli(["train", "--resume", run_dir, "--set", "diffusion.denoising_steps=7"], tmp_path)
    _assert_one_line_error(changed, "changes diffusion.denoising_steps")


WRITE_TOGETHER = """
import sys, time
from pathlib import Path
from ncdpo_rllib.experiment.config import parse_config
from ncdpo_rllib.experiment.tracking import Tracker
db, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
exp = parse_config({"env": {"id": "Pendulum-v1"}, "tracking": {"experiment": "shared", "uri": f"sqlite:///{db}"}})
ready.touch()
while not go.exists():
    time.sleep(0.01)
tracker = Tracker(exp)
for step in range(1, 31):
    tracker.log_metrics({f"m{k}": step * k for k in range(20)}, step)
tracker.finish()
print(tracker.run_id)
"""


def test_processes_that_share_a_fresh_store_all_open_it_and_log_everything(tmp_path):
    """Six Trackers started at once on a fresh sqlite store, as a sweep's parallel trials and a separate
    `ncdpo train` are: without taking turns, MLflow's schema creation fails in all but one of them
    ("table ... already exists", a migration error); then they all write at once. Every run is
    complete, no "database is locked" (MLflow's sqlite busy timeout is 20 s, and a write that still
    fails is buffered by the Tracker)."""
    import subprocess
    import sys
    import time

    db, go, n = tmp_path / "store.db", tmp_path / "go", 6
    procs = [subprocess.Popen([sys.executable, "-c", WRITE_TOGETHER, str(db), str(tmp_path / f"ready{i}"), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    deadline = time.time() + 180
    while not all((tmp_path / f"ready{i}").exists() for i in range(n)) and time.time() < deadline:
        time.sleep(0.1)  # every process has imported MLflow and the package
    go.touch()
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [err[-1500:] for _, err in results]
    assert not any("unreachable" in err for _, err in results)
    client = MlflowClient(f"sqlite:///{db}")
    assert [e.name for e in client.search_experiments()].count("shared") == 1  # made once, found by the others
    for run_id in (out.strip().splitlines()[-1] for out, _ in results):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        for key in ("m0", "m19"):
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, 31))


def test_a_locked_sqlite_store_and_a_server_that_refuses_are_transient_other_errors_are_not(tmp_path):
    """What the Tracker buffers and retries (the store may come back) and what it raises."""
    import sqlite3

    from mlflow.exceptions import MlflowException

    from ncdpo_rllib.experiment.tracking import transient

    holder = sqlite3.connect(tmp_path / "s.db", timeout=0, isolation_level=None)
    holder.execute("create table t (x)")
    holder.execute("begin exclusive")
    with pytest.raises(sqlite3.OperationalError) as locked:
        sqlite3.connect(tmp_path / "s.db", timeout=0).execute("insert into t values (1)")
    holder.execute("rollback")
    assert transient(locked.value)
    assert transient(MlflowException(f"(sqlite3.OperationalError) {locked.value}"))
    with pytest.raises(OSError) as refused:
        import socket

        socket.create_connection(("127.0.0.1", 9), timeout=2)  # the discard port: nothing listens
    assert transient(refused.value)
    assert not transient(MlflowException("RESOURCE_DOES_NOT_EXIST: Run 'abc' not found"))
    assert not transient(ValueError("could not convert string to float"))


def test_progress_line_shows_success_evaluation_and_kl_stops_when_reported():
    from ncdpo_rllib.experiment.checkpoints import RunState
    from ncdpo_rllib.experiment.train import _progress

    state = RunState(iteration=4, env_steps=32000, wall_s=50.0)
    plain = _progress(state, {"return_mean": -150.0}, 800.0, 10.0)
    assert plain == ("iter    4 | env steps    32,000 | return   -150.00 |     800 steps/s |  10.0 s/iter |"
                     "    50.0 s total")
    line = _progress(state, {"return_mean": 12.5, "success_rate": 0.25, "eval_return_mean": 30.0,
                             "eval_success_rate": 0.9, "learner/a/kl_stop_fraction": 0.5,
                             "learner/b/kl_stop_fraction": 1.0}, 800.0, 10.0)
    assert "| success 0.25 | eval 30.00, success 0.90 | KL-stopped  75% |" in line
    assert "return       n/a" in _progress(state, {}, 0.0, 1.0)


def test_ray_start_up_noise_is_filtered_from_stderr_and_everything_else_passes():
    """Ray's C++ code writes to file descriptor 2 directly; the CLI's filter drops its known noise
    line and passes every other line, in order, including the last one without a newline."""
    import subprocess
    import sys

    noise = (b"[2026-12-02 17:27:53,607 E 19007 19007] core_worker.cc:2465: Actor with class name: "
             b"'SingleAgentEnvRunner' and ID: 'ab' has constructor arguments in the object store and max_restarts > 0.")
    script = ("import os, sys\nfrom ncdpo_rllib.cli import _filter_native_stderr\n_filter_native_stderr()\n"
              f"os.write(2, b'first\\n' + {noise!r} + b'\\nsecond\\n')\nprint('third', file=sys.stderr)\n"
              "sys.stderr.write('last, no newline')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "first\nsecond\nthird\nlast, no newline", proc.stderr


def test_evaluate_the_stochastic_policy_on_request():
    """``ncdpo evaluate --explore`` / ``eval.explore``: the policy PPO optimises (final-step noise
    included), which for NCDPO can differ a lot from the deterministic action."""
    from ncdpo_rllib.experiment.build import build_algo_config
    from ncdpo_rllib.experiment.config import parse_config
    from ncdpo_rllib.experiment.evaluate import evaluate

    pinned = str(Path(__file__).parent.parent / "benchmarks" / "results" / "pretrained" / "locomotion-hopper-k10")
    det = evaluate(pinned, episodes=2, seed=1, track=False)
    sto = evaluate(pinned, episodes=2, seed=1, track=False, explore=True)
    assert (det["explore"], sto["explore"]) == (False, True) and det["return_mean"] != sto["return_mean"]
    assert det == evaluate(pinned, episodes=2, seed=1, track=False)  # the same seed: the same episodes
    exp = parse_config({"env": {"id": "Pendulum-v1"}, "eval": {"every": 1, "explore": True}})
    assert build_algo_config(exp).evaluation_config["explore"] is True


def test_a_checkpoint_whose_learner_part_was_not_finished_is_never_used(tmp_path, tiny_run):
    """A remote Learner writes its own part of a checkpoint and RLlib 2.60 does not check that it
    finished (one killed while saving); ``save_checkpoint`` refuses such a checkpoint, and a reader
    skips one written before that check (its manifest, made from what was on disk, agrees)."""
    from ncdpo_rllib.experiment.checkpoints import unfinished_components
    from ncdpo_rllib.integrity import write_manifest

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)  # checkpoints iter_000001 and final
    final = run_dir / "checkpoints" / "final"
    assert unfinished_components(final) == []
    (final / "learner_group" / "learner" / "state.pkl").unlink()
    (final / "learner_group" / "learner" / "rl_module" / "default_policy" / "module_state.pkl").unlink()
    write_manifest(final)
    assert unfinished_components(final) == ["learner_group/learner", "learner_group/learner/rl_module/default_policy"]
    ev = run_cli(["evaluate", run_dir, "--episodes", "1", "--no-track", "--json"], tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert last_json(ev.stdout)["checkpoint"].endswith("iter_000001")
    assert (f"checkpoint {final} is incomplete: RLlib did not finish writing learner_group/learner" in ev.stderr
            and "using the newest intact one" in ev.stderr), ev.stderr[-2000:]


def test_a_truncated_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, tiny_run):
    """Every checkpoint carries the SHA-256 of its files: a truncated file in the newest one is
    detected when it is read; a run directory then uses the newest intact checkpoint and says so,
    the damaged checkpoint itself is a one-line error."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)  # checkpoints iter_000001 and final
    final = run_dir / "checkpoints" / "final"
    victim = max((p for p in (final / "learner_group").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a write cut short
    _assert_one_line_error(run_cli(["evaluate", final], tmp_path), "is corrupt: learner_group/")
    ev = run_cli(["evaluate", run_dir, "--episodes", "1", "--no-track", "--json"], tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert last_json(ev.stdout)["checkpoint"].endswith("iter_000001")
    assert f"checkpoint {final} is corrupt" in ev.stderr and "using the newest intact one" in ev.stderr
    resumed = run_cli(["train", "--resume", run_dir, "--set", "stop.iterations=3", "--json"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert last_json(resumed.stdout)["iterations"] == 3 and "resumed from" in resumed.stderr and "iteration 1" in resumed.stderr
