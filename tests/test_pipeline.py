"""collect -> pretrain -> fine-tune: action chunking, behaviour cloning, init_from, on real envs."""

import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ncdpo_rllib.data import Episode, RecordingWrapper, read_shards, write_dataset
from ncdpo_rllib.experiment.config import parse_config
from ncdpo_rllib.errors import ConfigError, UserError
from ncdpo_rllib.tasks.wrappers import CHUNK_STEPS, ActionChunkObsHistory
from tests.conftest import interrupt_cli, last_json, run_cli

# --- action chunking / observation history --------------------------------------------------


def test_chunk_executes_ta_actions_and_sums_rewards():
    base, ref = gym.make("Pendulum-v1"), gym.make("Pendulum-v1")
    env = ActionChunkObsHistory(base, action_chunk=3, obs_history=2)
    assert env.action_space.shape == (3,) and env.observation_space.shape == (6,)
    obs, _ = env.reset(seed=1)
    o_ref, _ = ref.reset(seed=1)
    np.testing.assert_allclose(obs, np.concatenate([o_ref, o_ref]))  # history padded with o_0
    chunk = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    obs, reward, term, trunc, info = env.step(chunk)
    seen, total = [o_ref], 0.0
    for a in chunk:
        o, r, *_ = ref.step([a])
        seen.append(o)
        total += r
    assert info[CHUNK_STEPS] == 3 and reward == pytest.approx(total)
    np.testing.assert_allclose(obs, np.concatenate([seen[2], seen[3]]))  # the last To env-step observations


def test_wrapper_and_make_windows_agree_on_a_recorded_episode(tmp_path):
    """Pre-training pairs and what the policy sees when acting are built the same way."""
    from ncdpo_rllib.data import make_windows

    Ta, To = 3, 2
    env = ActionChunkObsHistory(RecordingWrapper(gym.make("Pendulum-v1", max_episode_steps=10), tmp_path), Ta, To)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=3)
    seen, chunks = [obs], []
    done = False
    while not done:
        chunk = rng.uniform(-2, 2, Ta).astype(np.float32)
        chunks.append(chunk)
        obs, _, term, trunc, _ = env.step(chunk)
        seen.append(obs)
        done = term or trunc
    (episode,) = read_shards(tmp_path)
    cond, target = make_windows([episode], To, Ta)
    for i, (o, c) in enumerate(zip(seen[:-1], chunks)):  # policy step i starts at env step i * Ta
        np.testing.assert_allclose(cond[i * Ta], o, rtol=1e-6)
        n = min(Ta, len(episode) - i * Ta)  # the last chunk is cut by the time limit
        np.testing.assert_allclose(target[i * Ta][:n], c[:n], rtol=1e-6)


def test_episode_end_inside_a_chunk_ends_the_chunk():
    env = ActionChunkObsHistory(gym.make("Pendulum-v1", max_episode_steps=5), action_chunk=3)
    env.reset(seed=0)
    *_, trunc1, info1 = env.step(np.zeros(3, dtype=np.float32))
    assert not trunc1 and info1[CHUNK_STEPS] == 3
    _, reward, term, trunc, info = env.step(np.zeros(3, dtype=np.float32))
    assert trunc and not term and info[CHUNK_STEPS] == 2  # steps 4 and 5, then the time limit


# --- behaviour cloning on a scripted expert -----------------------------------------------------

PD_GAINS = np.array([1.0, 10.0, 1.0, 1.0])  # stabilises InvertedPendulum-v5 (return 1000/1000)


def scripted_dataset(tmp_path, episodes=12, noise=0.3, seed=0):
    """InvertedPendulum demos of a PD controller with action noise, recorded raw."""
    rng = np.random.default_rng(seed)
    env = RecordingWrapper(gym.make("InvertedPendulum-v5", max_episode_steps=200), tmp_path / "shards")
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done = False
        while not done:
            a = np.clip(PD_GAINS @ obs + noise * rng.standard_normal(), -3, 3)
            obs, _, term, trunc, _ = env.step(np.array([a], dtype=np.float32))
            done = term or trunc
    env.close()
    return write_dataset(tmp_path / "pd", read_shards(tmp_path / "shards"), "InvertedPendulum-v5", {"level": "expert"})


def bc_config(tmp_path, dataset, **over):
    data = {
        "env": {"id": "InvertedPendulum-v5", "kwargs": {"max_episode_steps": 200}, "action_chunk": 2},
        "diffusion": {"denoising_steps": 10, "prediction": "epsilon", "schedule": "cosine", "hidden": [64, 64],
                      "init_std": 0.1},
        "ppo": {"train_batch_size": 400, "minibatch_size": 200, "num_epochs": 1, "critic_hidden": [32]},
        "resources": {"env_runners": 0, "envs_per_runner": 2},
        "pretrain": {"dataset": str(dataset), "gradient_steps": 1500, "log_every": 500, "eval_episodes": 3,
                     "lr": 3e-3},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "bc"},
        "checkpoint": {"dir": str(tmp_path / "runs")},
        **over,
    }
    return parse_config(data)


def test_pretraining_lowers_the_validation_loss_and_beats_random(tmp_path):
    from ncdpo_rllib.experiment.pretrain import pretrain

    logs = []
    summary = pretrain(bc_config(tmp_path, scripted_dataset(tmp_path)), log=logs.append)
    assert summary["val_loss_last"] < 0.5 * summary["val_loss_first"]
    # Random actions keep the pole up for ~5 steps (measured: 2-8); the PD expert for 200.
    assert summary["eval"]["return_mean"] > 50, summary
    assert any("val loss" in line for line in logs)  # progress output
    ckpt = summary["checkpoint"]
    run = MlflowClient(summary["mlflow_uri"]).get_run(summary["mlflow_run_id"])
    assert run.data.tags["stage"] == "pretrain" and run.info.status == "FINISHED"
    hist = MlflowClient(summary["mlflow_uri"]).get_metric_history(run.info.run_id, "pretrain/val_loss")
    assert [m.step for m in hist] == [0, 500, 1000, 1500]

    # The normaliser lives in the module state: a plain RLModule restore carries it.
    from ray.rllib.core.rl_module.rl_module import RLModule

    module = RLModule.from_checkpoint(f"{ckpt}/module")
    assert not torch.allclose(module.obs_scale, torch.ones_like(module.obs_scale))
    assert module.obs_shift.shape == (4,)
    check_pretrained_weights_load_without_pickles(Path(ckpt), module.get_state(), tmp_path)


@pytest.mark.slow
def test_interrupted_pretraining_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """A first SIGINT mid pre-training: the step finishes, resume.pt is written, the MLflow run is KILLED,
    the last line gives the --resume command, exit 130. ``pretrain --resume`` then continues the same run
    (every validation step logged once) and ends with exactly the weights of a run never interrupted."""
    from ncdpo_rllib.experiment.pretrain import RESUME

    exp = bc_config(tmp_path, scripted_dataset(tmp_path), env={"id": "InvertedPendulum-v5", "action_chunk": 2})
    data = exp.to_dict()
    data["pretrain"] |= {"gradient_steps": 3000, "log_every": 100, "eval_episodes": 0}
    (tmp_path / "bc.yaml").write_text(parse_config(data).to_yaml())
    uri = data["tracking"]["uri"]
    code, _, rest = interrupt_cli(["pretrain", "bc.yaml", "--set", "tracking.run_name=cut"], tmp_path, "step     200/")
    run_dir = tmp_path / "runs" / "cut"
    last = rest.strip().splitlines()[-1]
    assert code == 130 and "Traceback" not in rest, rest[-3000:]
    assert last.startswith("ncdpo pretrain: stopped by SIGINT after gradient step ") and last.endswith(
        f"continue with: ncdpo pretrain --resume {run_dir}"), last
    assert (run_dir / RESUME).is_file() and not (run_dir / "pretrained").exists()
    client = MlflowClient(uri)
    (run,) = client.search_runs(client.get_experiment_by_name("bc").experiment_id)
    assert run.info.status == "KILLED"

    resumed = run_cli(["pretrain", "--resume", run_dir, "--json"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and not (run_dir / RESUME).exists()
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "pretrain/val_loss")]
    assert sorted(steps) == list(range(0, 3001, 100)), steps  # no gap, no duplicate

    whole = run_cli(["pretrain", "bc.yaml", "--set", "tracking.run_name=whole", "--set", "tracking.enabled=false"],
                    tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = torch.load(run_dir / "pretrained" / "weights.pt", weights_only=True)
    ref = torch.load(tmp_path / "runs" / "whole" / "pretrained" / "weights.pt", weights_only=True)
    assert cut.keys() == ref.keys() and all(torch.equal(cut[k], ref[k]) for k in ref)


def test_pretrain_resume_refuses_what_it_cannot_continue(tmp_path):
    """--resume of a directory with nothing to continue, a corrupt resume.pt or a changed config: one line each."""
    from ncdpo_rllib.experiment.pretrain import RESUME, RESUME_KEYS

    bc = tmp_path / "bc.yaml"
    bc.write_text(bc_config(tmp_path, scripted_dataset(tmp_path)).to_yaml())
    (tmp_path / "runs" / "r").mkdir(parents=True)
    out = run_cli(["pretrain", "--resume", tmp_path / "runs" / "r"], tmp_path)
    assert out.returncode == 2 and "no experiment.yaml there" in out.stderr and "Traceback" not in out.stderr
    shutil.copy(bc, tmp_path / "runs" / "r" / "experiment.yaml")
    out = run_cli(["pretrain", "--resume", tmp_path / "runs" / "r"], tmp_path)
    assert out.returncode == 2 and "no resume.pt there" in out.stderr, out.stderr[-2000:]
    (tmp_path / "runs" / "r" / RESUME).write_bytes(b"PK\x03\x04 not a whole zip")
    out = run_cli(["pretrain", "--resume", tmp_path / "runs" / "r"], tmp_path)
    assert out.returncode == 2 and "resume.pt is unreadable" in out.stderr and "pre-train again" in out.stderr
    torch.save(dict.fromkeys(RESUME_KEYS, 0), tmp_path / "runs" / "r" / RESUME)
    out = run_cli(["pretrain", bc, "--set", "pretrain.lr=0.5", "--resume", tmp_path / "runs" / "r"], tmp_path)
    assert out.returncode == 2 and "changes pretrain.lr" in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1
    (tmp_path / "runs" / "r" / "pretrained").mkdir()
    out = run_cli(["pretrain", "--resume", tmp_path / "runs" / "r"], tmp_path)
    assert out.returncode == 2 and "pre-training finished there" in out.stderr, out.stderr[-2000:]


class _Planted:
    """A pickle that runs code when unpickled (creates the file it names)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def check_pretrained_weights_load_without_pickles(ckpt: Path, expected: dict, tmp_path: Path) -> None:
    """ncdpo reads a pre-trained policy from weights.pt with torch.load(weights_only=True): code planted in
    the RLlib module pickles (manifest rewritten, as an attacker would) never runs; a damaged weights.pt is
    caught by the manifest."""
    import pickle

    from ncdpo_rllib.errors import CheckpointError
    from ncdpo_rllib.experiment.pretrained import load_module_state, load_pretrained_meta
    from ncdpo_rllib.integrity import write_manifest

    planted = tmp_path / "planted"
    shutil.copytree(ckpt, planted)
    marker = tmp_path / "pickled-code-ran"
    for name in ("module_state.pkl", "class_and_ctor_args.pkl"):
        (planted / "module" / name).write_bytes(pickle.dumps(_Planted(marker)))
    write_manifest(planted)
    path, _, _ = load_pretrained_meta(planted)
    state = load_module_state(path)
    assert not marker.exists()
    assert state.keys() == expected.keys() and all(np.array_equal(state[k], expected[k]) for k in expected)
    weights = planted / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="is corrupt: weights.pt differs"):
        load_pretrained_meta(planted)


def test_pretrain_bad_input_is_one_line(tmp_path):
    from ncdpo_rllib.experiment.pretrain import pretrain

    with pytest.raises(ConfigError, match="pretrain.dataset is not set"):
        pretrain(parse_config({"env": {"id": "InvertedPendulum-v5"}}))
    ds = write_dataset(tmp_path / "pend", [Episode(np.zeros((4, 3), np.float32), np.zeros((3, 1), np.float32),
                                                   np.zeros(3, np.float32), truncated=True)] * 2, "Pendulum-v1")
    with pytest.raises(ConfigError, match="recorded on Pendulum-v1"):
        pretrain(bc_config(tmp_path, ds))
    with pytest.raises(UserError, match="not found|does not exist|no such"):
        pretrain(bc_config(tmp_path, tmp_path / "missing"))


# --- the whole pipeline through the CLI -------------------------------------------------------

COLLECT = """\
algorithm: ppo
env: {id: Pendulum-v1}
stop: {iterations: 3, env_steps: null}
ppo: {train_batch_size: 800, minibatch_size: 200, num_epochs: 2, gamma: 0.95, gae_lambda: 0.1}
resources: {env_runners: 0, envs_per_runner: 4}
tracking: {experiment: pipeline}
collect: {checkpoint_every: 1, steps_per_level: 1000, eval_episodes: 2}
"""

FINETUNE = """\
algorithm: ncdpo
env: {id: Pendulum-v1, action_chunk: 2, obs_history: 2}
diffusion: {denoising_steps: 5, prediction: epsilon, schedule: cosine, hidden: [32, 32], init_std: 0.2}
ppo: {train_batch_size: 400, minibatch_size: 200, num_epochs: 1, critic_hidden: [32], critic_warmup_iters: 2}
resources: {env_runners: 0, envs_per_runner: 2}
stop: {iterations: 2, env_steps: null}
tracking: {experiment: pipeline}
pretrain: {dataset: data/Pendulum-v1/medium-expert, gradient_steps: 300, log_every: 100, eval_episodes: 2}
"""


@pytest.mark.slow
def test_collect_pretrain_finetune_end_to_end(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"}
    (tmp_path / "collect.yaml").write_text(COLLECT)
    (tmp_path / "ft.yaml").write_text(FINETUNE)

    # Ctrl-C while the expert trains: a checkpoint, exit 130, the command that continues.
    code, seen, rest = interrupt_cli(["collect", "collect.yaml"], tmp_path, "iter    1 ", env)
    last = rest.strip().splitlines()[-1] if rest.strip() else seen[-3000:]
    assert code == 130 and " --resume " in last, last
    assert last.startswith("ncdpo collect: stopped by SIGINT after iteration "), last
    run_dir = last.split("ncdpo collect --resume ")[1]
    assert not (tmp_path / "data").exists()  # no dataset before the expert is trained

    collected = run_cli(["collect", "--resume", run_dir, "--json"], tmp_path, env)
    assert collected.returncode == 0, collected.stderr[-3000:]
    assert "resumed from" in collected.stderr
    collect_summary = last_json(collected.stdout)
    datasets = collect_summary["datasets"]
    collect_run = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(collect_summary["mlflow_run_id"])
    assert collect_run.data.tags["stage"] == "collect" and collect_run.info.status == "FINISHED"
    assert collect_run.data.metrics["dataset/medium/episodes"] == datasets["medium"]["episodes"]
    assert collect_run.data.metrics["collect/expert_return"] == collect_summary["expert_return"]
    assert set(datasets) == {"expert", "medium", "medium-replay", "medium-expert"}
    assert datasets["medium-expert"]["steps"] == datasets["medium"]["steps"] + datasets["expert"]["steps"]
    assert "rated" in collected.stderr and "wrote medium-replay" in collected.stderr  # progress output
    info = run_cli(["dataset", "info", "data/Pendulum-v1/medium"], tmp_path, env)
    assert info.returncode == 0 and "Pendulum-v1" in info.stdout

    pre = run_cli(["pretrain", "ft.yaml", "--json"], tmp_path, env)
    assert pre.returncode == 0, pre.stderr[-3000:]
    pretrained = last_json(pre.stdout)["checkpoint"]

    # Fine-tune; the critic warm-up covers both iterations, so the actor must still be the
    # pre-trained one: the same evaluation episodes give the same returns.
    ft = run_cli(["train", "ft.yaml", "--set", f"init_from={pretrained}", "--json"], tmp_path, env)
    assert ft.returncode == 0, ft.stderr[-3000:]
    assert "starting from the pre-trained policy" in ft.stderr
    final = last_json(ft.stdout)["checkpoint"]
    ev_pre = last_json(run_cli(["evaluate", pretrained, "--episodes", "2", "--json"], tmp_path, env).stdout)
    ev_ft = last_json(run_cli(["evaluate", final, "--episodes", "2", "--json"], tmp_path, env).stdout)
    assert ev_ft["return_mean"] == pytest.approx(ev_pre["return_mean"], rel=1e-6)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    ev_run = client.get_run(ev_pre["mlflow_run_id"])  # evaluating a pre-trained checkpoint is tracked too
    assert ev_run.data.tags["stage"] == "evaluate"
    assert ev_run.data.tags["source_run_id"] == last_json(pre.stdout)["mlflow_run_id"]
    run = client.get_run(last_json(ft.stdout)["mlflow_run_id"])
    assert run.data.tags["stage"] == "finetune"
    frozen = client.get_metric_history(run.info.run_id, "learner/default_policy/actor_frozen")
    assert [m.value for m in frozen] == [1.0, 1.0]
    # env steps count base-env steps (2 per policy step with Ta=2), not policy steps.
    steps = [m.value for m in client.get_metric_history(run.info.run_id, "env_steps")]
    assert steps[-1] >= 2 * 2 * 400 - 2 * 2, steps

    # With a remote EnvRunner the first iteration must already sample with the pre-trained
    # weights (RLlib's weight sync is fire-and-forget): the frozen actor's ratio is exactly 1.
    remote = run_cli(["train", "ft.yaml", "--set", f"init_from={pretrained}", "--set", "resources.env_runners=1",
                      "--json"], tmp_path, env)
    assert remote.returncode == 0, remote.stderr[-3000:]
    remote_id = last_json(remote.stdout)["mlflow_run_id"]
    kl = [m.value for m in client.get_metric_history(remote_id, "learner/default_policy/approx_kl")]
    ratio = [m.value for m in client.get_metric_history(remote_id, "learner/default_policy/ratio_mean")]
    assert max(kl) < 1e-6 and ratio == pytest.approx([1.0, 1.0], abs=1e-5), (kl, ratio)

    # A mismatching architecture is refused before anything is written.
    bad = run_cli(["train", "ft.yaml", "--set", f"init_from={pretrained}", "--set", "diffusion.hidden=[16]"],
                  tmp_path, env)
    assert bad.returncode == 2 and "diffusion.hidden" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = run_cli(["train", "ft.yaml", "--set", "init_from=nowhere"], tmp_path, env)
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr


def test_dataset_import_and_info_cli(tmp_path):
    n = 30
    rng = np.random.default_rng(0)
    arrays = {
        "observations": rng.normal(size=(n, 3)).astype(np.float32),
        "actions": rng.uniform(-2, 2, size=(n, 1)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": np.zeros(n, bool),
        "timeouts": np.isin(np.arange(n), [9, 19, 29]),
    }
    np.savez(tmp_path / "d4rl.npz", **arrays)
    ok = run_cli(["dataset", "import", "d4rl.npz", "data/pend", "--env-id", "Pendulum-v1"], tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    info = run_cli(["dataset", "info", "data/pend"], tmp_path)
    assert info.returncode == 0 and "3 episodes" in info.stdout.replace(",", ""), info.stdout
    bad = {k: v for k, v in arrays.items() if k != "rewards"}
    np.savez(tmp_path / "bad.npz", **bad)
    err = run_cli(["dataset", "import", "bad.npz", "data/bad", "--env-id", "Pendulum-v1"], tmp_path)
    assert err.returncode == 2 and "rewards" in err.stderr and "bad.npz" in err.stderr
    assert len(err.stderr.strip().splitlines()) == 1 and not (tmp_path / "data" / "bad").exists()
