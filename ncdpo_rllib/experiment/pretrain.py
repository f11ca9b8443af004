"""``ncdpo pretrain``: DDPM behaviour cloning of the diffusion RLModule on a dataset.

The module is the very one fine-tuning uses (same class, same model_config), so the
checkpoint loads into ``ncdpo train`` with ``init_from``. Conventions:

- pairs (last To observations, next Ta actions) from ``ncdpo_rllib.data.make_windows``,
  the same ones the env wrapper uses when the policy acts;
- actions in the policy's units: the env's action bounds mapped to [-1, 1] (what RLlib's
  ``normalize_actions`` undoes when the policy acts);
- observations normalised by the training split's mean/std, stored in the module's
  ``obs_shift``/``obs_scale`` buffers (so the checkpoint carries its normaliser);
- the loss of ``DiffusionPolicy.bc_loss`` (target: epsilon or x0, per ``diffusion.prediction``),
  AdamW with warm-up + cosine decay, EMA weights (what is validated, saved and evaluated).

Resumable: at every validation (``pretrain.log_every``) and on a first SIGINT / SIGTERM, the whole
training state (weights, EMA, optimizer, schedule, random generators, loss history) goes to
``<run dir>/resume.pt``; ``ncdpo pretrain --resume <run dir>`` continues the same MLflow run from it
and ends with the weights an uninterrupted run would have had.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from ncdpo_rllib.errors import CheckpointError, ConfigError, TrainingInterrupted, one_line
from ncdpo_rllib.integrity import NoSpace, no_space_message, out_of_space, staged, write_atomic, write_manifest

from .config import ExperimentConfig, load_config
from .loader import changed_keys
from .pretrained import CONFIG, META, MODULE, PRETRAINED, WEIGHTS, save_weights
from .stopping import StopRequest, interruptible
from .tracking import Tracker, metric_history

RESUME = "resume.pt"
"""<run dir>/resume.pt: the state an interrupted pre-training continues from (plain tensors and numbers,
loaded with ``weights_only=True``); removed once the pre-trained checkpoint is written."""
RESUME_KEYS = frozenset({"step", "history", "running", "wall_s", "pairs", "actor", "ema", "optimizer", "schedule",
                         "generator", "torch_rng", "mlflow_run_id", "mlflow_uri"})
RESUMABLE_KEYS = ("pretrain.eval_episodes", "tracking.flush_timeout_s")
"""The only keys ``--resume`` may change: everything else defines the run being continued."""


def module_spec(exp: ExperimentConfig):
    """The RLModuleSpec fine-tuning builds, with this experiment's (chunked) spaces."""
    from ncdpo_rllib.tasks.envs import make_env

    from .build import build_algo_config

    env = make_env(exp.env)
    spec = build_algo_config(exp).get_default_rl_module_spec()
    spec.observation_space, spec.action_space = env.observation_space, env.action_space
    env.close()
    return spec


def _split(dataset, val_fraction: float, seed: int):
    from ncdpo_rllib.data import Dataset

    n = len(dataset.episodes)
    if n < 2:
        raise ConfigError(f"dataset {dataset.path}: {n} episode(s); pre-training needs at least 2 (one held out)")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    pick = lambda idx: Dataset(env_id=dataset.env_id, episodes=[dataset.episodes[i] for i in idx],
                               metadata=dataset.metadata, path=dataset.path)
    return pick(order[n_val:]), pick(order[:n_val])


def _load(path: str, exp: ExperimentConfig):
    """A dataset directory, or (robosuite tasks) a robomimic HDF5 file read with the env's keys."""
    from ncdpo_rllib.data import load_dataset
    from ncdpo_rllib.data.robomimic import is_robomimic_file, load_robomimic

    if exp.env.kind == "robosuite" and is_robomimic_file(path):
        from ncdpo_rllib.tasks.robosuite_tasks import robomimic_keys

        return load_robomimic(path, robomimic_keys(exp.env))
    return load_dataset(path)


def _check_dataset(dataset, exp: ExperimentConfig):
    import gymnasium as gym

    from ncdpo_rllib.tasks.envs import make_base_env

    base = make_base_env(exp.env)  # Meta-World with pixels: [state, image] per step
    obs_dim, act_space = int(np.prod(base.observation_space.shape)), base.action_space
    base.close()
    if not isinstance(act_space, gym.spaces.Box):
        raise ConfigError(f"pretrain needs a Box action space; {exp.env.id} has {act_space} (behaviour cloning "
                          "of the discrete logit head is not implemented)")
    if dataset.env_id and dataset.env_id != exp.env.id:
        raise ConfigError(
            f"dataset {dataset.path} was recorded on {dataset.env_id}, the config's env.id is {exp.env.id}; "
            "use a dataset of this env"
        )
    if exp.env.pixels and dataset.obs_dim != obs_dim:
        raise ConfigError(
            f"dataset {dataset.path}: observations have {dataset.obs_dim} values per step, {exp.env.id} with "
            f"env.observation: {exp.env.observation}, env.image_size: {exp.env.image_size} and "
            f"{len(exp.env.cameras)} camera(s) has {obs_dim}; record the dataset with the same image_size and "
            "cameras (ncdpo collect with this env section)"
        )
    camera = dataset.metadata.get("camera")
    cameras = dataset.metadata.get("cameras") or ([camera] if camera else None)
    if exp.env.pixels and cameras and list(cameras) != exp.env.cameras:
        raise ConfigError(f"dataset {dataset.path} was rendered from camera(s) {', '.join(cameras)}, the config's "
                          f"env.camera and env.extra_cameras are {', '.join(exp.env.cameras)}; make them equal")
    if dataset.obs_dim != obs_dim or dataset.action_dim != int(np.prod(act_space.shape)):
        raise ConfigError(
            f"dataset {dataset.path}: observation/action dims {dataset.obs_dim}/{dataset.action_dim} "
            f"do not match {exp.env.id}'s {obs_dim}/{int(np.prod(act_space.shape))}"
        )
    return act_space


def _to_unit(actions: np.ndarray, act_space, chunk: int) -> np.ndarray:
    low = np.tile(act_space.low.ravel(), chunk).astype(np.float32)
    high = np.tile(act_space.high.ravel(), chunk).astype(np.float32)
    return np.clip(2 * (actions - low) / (high - low) - 1, -1, 1).astype(np.float32)


def _lr_lambda(total: int):
    warm = max(1, total // 100)
    return lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


@torch.no_grad()
def _val_loss(actor, cond: torch.Tensor, act: torch.Tensor, norm, batch: int = 1024) -> float:
    """Mean BC loss over the whole split, with fixed noise (comparable across calls)."""
    gen = torch.Generator().manual_seed(0)
    total, n = 0.0, 0
    for i in range(0, len(cond), batch):
        c, a = norm(cond[i : i + batch]), act[i : i + batch]
        total += float(actor.bc_loss(c, a, generator=gen)) * len(c)
        n += len(c)
    return total / n


def _run_dir(exp: ExperimentConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = exp.tracking.run_name or f"pretrain-{exp.env.id}-s{exp.seed}-{stamp}"
    run_dir = (Path(exp.checkpoint.dir) / name).resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} already exists: choose another tracking.run_name")
    return run_dir


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The config an interrupted pre-training run was started with (its <run dir>/experiment.yaml),
    with ``--set`` overrides on top."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"--resume {run_dir}: no {CONFIG} there; give the directory `ncdpo pretrain` named "
                              "as its run dir")
    return load_config(path, overrides)


def _load_resume(run_dir: str | Path, exp: ExperimentConfig) -> tuple[Path, dict]:
    run_dir = Path(run_dir).resolve()
    path, done = run_dir / RESUME, run_dir / PRETRAINED
    if done.is_dir():
        raise CheckpointError(f"--resume {run_dir}: pre-training finished there (its policy: {done}); nothing to resume")
    if not path.is_file():
        raise CheckpointError(f"--resume {run_dir}: no {RESUME} there, so no interrupted pre-training to continue; "
                              "start a new one")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(saved, dict) and RESUME_KEYS <= saved.keys(), "some of its entries are missing"
    except Exception as e:
        raise CheckpointError(f"--resume: {path} is unreadable ({one_line(e, 100, with_type=True)}): truncated or "
                              "corrupt; pre-train again") from None
    changed = [k for k in changed_keys(resume_config(run_dir).to_dict(), exp.to_dict()) if k not in RESUMABLE_KEYS]
    if changed:
        raise ConfigError(f"--resume: the config changes {', '.join(changed)} from the run's ({run_dir / CONFIG}); "
                          "a resumed pre-training continues the same run: start a new one instead")
    return run_dir, saved


def _backfill(tracker: Tracker, history: list[dict]) -> None:
    """Log the validations resume.pt holds that MLflow never got (the process died between saving one
    and logging it)."""
    if not tracker.enabled:
        return
    try:
        logged = {step for step, _ in metric_history(tracker.client, tracker.run_id, "pretrain/val_loss")}
    except Exception:  # the store is away: the Tracker's own outage handling covers what follows
        return
    for h in history:
        if h["step"] not in logged:
            tracker.log_metrics({f"pretrain/{k}": v for k, v in h.items() if k != "step"}, step=h["step"])


def _save_resume(run_dir: Path, state: dict) -> None:
    """resume.pt, atomically: an abort mid-write leaves the previous one."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        write_atomic(run_dir / RESUME, buf.getvalue())
    except OSError as e:
        if not out_of_space(e):
            raise
        raise CheckpointError(f"{no_space_message('pre-training progress', run_dir / RESUME, buf.tell())}; free "
                              f"space, then continue with: ncdpo pretrain --resume {run_dir}") from None


def pretrain(exp: ExperimentConfig, *, resume: str | Path | None = None,
             log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Behaviour-clone the policy on ``pretrain.dataset``; ``resume``: continue the interrupted run
    in that run directory (``exp`` must be its config, see :func:`resume_config`)."""
    from ncdpo_rllib.data import make_windows

    from .build import check_experiment

    p, env = exp.pretrain, exp.env
    if not exp.diffusion_policy:
        raise ConfigError("pretrain trains the diffusion policy: set algorithm: ncdpo (or dppo, ncdpo-appo)")
    if exp.env.kind == "pettingzoo":
        raise ConfigError("pretrain clones single-agent datasets: env.kind must be gymnasium, metaworld or robosuite")
    if p.dataset is None:
        raise ConfigError("pretrain.dataset is not set: give a dataset directory (see `ncdpo collect`)")
    check_experiment(exp)
    run_dir, saved = _load_resume(resume, exp) if resume is not None else (_run_dir(exp), None)
    dataset = _load(p.dataset, exp)
    act_space = _check_dataset(dataset, exp)

    torch.manual_seed(exp.seed)
    train_ds, val_ds = _split(dataset, p.val_fraction, exp.seed)
    cond_tr, act_tr = make_windows(train_ds, env.obs_history, env.action_chunk)
    cond_va, act_va = make_windows(val_ds, env.obs_history, env.action_chunk)
    act_tr, act_va = (_to_unit(a, act_space, env.action_chunk) for a in (act_tr, act_va))
    # Statistics over the training pairs' newest observation (every step of every training
    # episode once). Floor the scale: a near-constant dimension (e.g. a contact flag) must not
    # amplify later deviations by orders of magnitude. Pixel entries are left as they are by
    # set_obs_normalizer.
    obs = cond_tr[:, (env.obs_history - 1) * (cond_tr.shape[1] // env.obs_history) :]
    shift, scale = obs.mean(0), np.maximum(obs.std(0), 1e-2)

    module = module_spec(exp).build()
    module.set_obs_normalizer(np.tile(shift, env.obs_history), np.tile(scale, env.obs_history))
    # Normalised per minibatch: a pixel dataset is not copied whole.
    norm = lambda c: module._cond({"obs": c})  # noqa: E731
    cond_tr, cond_va = torch.as_tensor(cond_tr), torch.as_tensor(cond_va)
    act_tr, act_va = torch.as_tensor(act_tr), torch.as_tensor(act_va)

    actor = module.actor
    params = [prm for name, prm in actor.named_parameters() if name != "log_std"]
    opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(p.gradient_steps))
    ema = copy.deepcopy(actor).requires_grad_(False)
    gen = torch.Generator().manual_seed(exp.seed)
    step, history, running, wall_s = 0, [], [], 0.0
    if saved is not None:
        actor.load_state_dict(saved["actor"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["schedule"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])  # the image encoder's random shifts
        step, history, running, wall_s = saved["step"], saved["history"], saved["running"], saved["wall_s"]
        if saved["pairs"] != len(cond_tr):
            raise ConfigError(f"--resume: the dataset {p.dataset} changed since the run began ({saved['pairs']:,} "
                              f"training pairs then, {len(cond_tr):,} now); start a new run")

    def progress() -> dict:
        return {"step": step, "history": history, "running": running, "wall_s": time.perf_counter() - t0,
                "pairs": len(cond_tr),
                "actor": actor.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "schedule": sched.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                "mlflow_run_id": tracker.run_id, "mlflow_uri": tracker.uri}

    tracker = Tracker(exp, run_id=saved and saved["mlflow_run_id"], uri=saved and saved["mlflow_uri"],
                      tags={"stage": "pretrain", "dataset": str(p.dataset)}, log=log, spill_dir=run_dir)
    status, stop = "FAILED", StopRequest(log, "gradient step")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if saved is None:
            write_atomic(run_dir / CONFIG, exp.to_yaml())  # what --resume continues with
        log(
            f"pretrain {exp.env.id} on {dataset.path} ({len(train_ds.episodes)} train / {len(val_ds.episodes)} "
            f"val episodes, {len(cond_tr):,} pairs, Ta={env.action_chunk}, To={env.obs_history}) | run dir {run_dir}"
            + (f" | MLflow run {tracker.run_id}" if tracker.enabled else "")
        )
        if saved is None:
            history.append({"step": 0, "val_loss": _val_loss(ema, cond_va, act_va, norm)})
            tracker.log_metrics({"pretrain/val_loss": history[0]["val_loss"]}, step=0)
        else:
            log(f"resumed from {run_dir / RESUME} at gradient step {step:,}")
            _backfill(tracker, history)
        t0 = time.perf_counter() - wall_s
        with stop:
            while step < p.gradient_steps and stop.signal is None:
                step += 1
                idx = torch.randint(0, len(cond_tr), (p.batch_size,), generator=gen)
                with module.shifting():  # random-shift augmentation of images (no-op for state)
                    loss = actor.bc_loss(norm(cond_tr[idx]), act_tr[idx], generator=gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                _ema_update(ema, actor, min(p.ema_decay, (1 + step) / (10 + step)))
                running.append(loss.item())
                if step % p.log_every == 0 or step == p.gradient_steps:
                    val = _val_loss(ema, cond_va, act_va, norm)
                    train_loss = float(np.mean(running))
                    running = []
                    elapsed = time.perf_counter() - t0
                    history.append({"step": step, "train_loss": train_loss, "val_loss": val})
                    if step < p.gradient_steps:  # saved before MLflow has the step: a resume logs none twice
                        _save_resume(run_dir, progress())
                    tracker.log_metrics(
                        {"pretrain/train_loss": train_loss, "pretrain/val_loss": val,
                         "pretrain/lr": sched.get_last_lr()[0], "wall_s": elapsed},
                        step=step,
                    )
                    eta = elapsed / step * (p.gradient_steps - step)
                    log(f"step {step:7,d}/{p.gradient_steps:,} | train loss {train_loss:.4f} | val loss {val:.4f} "
                        f"| {step / elapsed:6.0f} steps/s | eta {eta:5.0f} s")
            if stop.signal is not None and step < p.gradient_steps:
                if step % p.log_every:  # not saved at this step yet
                    _save_resume(run_dir, progress())
                status = "KILLED"
                raise TrainingInterrupted(
                    f"stopped by {stop.signal} after gradient step {step:,} of {p.gradient_steps:,}; progress saved "
                    f"in {run_dir / RESUME}; continue with: ncdpo pretrain --resume {run_dir}")

            actor.load_state_dict(ema.state_dict())  # the EMA weights are the pre-trained policy
            state = module.get_state()
            meta = {
                "dataset": str(Path(p.dataset).resolve()),
                "dataset_metadata": dataset.metadata,
                "env": exp.env.id,
                "pairs": {"train": len(cond_tr), "val": len(cond_va)},
                "val_loss_first": history[0]["val_loss"],
                "val_loss_last": history[-1]["val_loss"],
                "history": history,
                "wall_s": round(time.perf_counter() - t0, 2),
            }
            meta["mlflow_run_id"], meta["mlflow_uri"] = tracker.run_id, tracker.uri
            ckpt = _save(run_dir, module, exp, meta)  # a first signal waits for it; then nothing to lose
        evaluated = False
        if p.eval_episodes and stop.signal is None:
            from .evaluate import evaluate_module

            try:
                with interruptible():  # no safe point inside: a signal abandons the evaluation
                    returns, success_rate = evaluate_module(exp, state, p.eval_episodes)
                evaluated = True
            except KeyboardInterrupt:
                stop.signal = "a signal during the evaluation"
        if evaluated:
            meta["eval"] = {"episodes": len(returns), "return_mean": float(returns.mean()),
                            "return_std": float(returns.std()), "success_rate": success_rate}
            write_atomic(ckpt / META, json.dumps(meta, indent=2, default=str))
            write_manifest(ckpt)  # the evaluation is part of pretrain.json now
            tracker.log_metrics({"pretrain/eval_return_mean": float(returns.mean()),
                                 "pretrain/eval_return_std": float(returns.std()),
                                 "pretrain/eval_success_rate": success_rate}, step=p.gradient_steps)
            log(f"pre-trained policy: return {returns.mean():.2f} +- {returns.std():.2f} over {len(returns)} episodes"
                + (f", success rate {success_rate:.2f}" if success_rate is not None else ""))
        elif p.eval_episodes:
            log(f"{stop.signal}: evaluation skipped; the pre-trained checkpoint {ckpt} is complete "
                f"(evaluate it with: ncdpo evaluate {ckpt})")
        tracker.log_artifacts(ckpt, "pretrained")
        (run_dir / RESUME).unlink(missing_ok=True)
        status = "FINISHED"
    except KeyboardInterrupt:  # a second signal: resume.pt is the last complete save
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)
    return {"checkpoint": str(ckpt), "run_dir": str(run_dir), "val_loss_first": meta["val_loss_first"],
            "val_loss_last": meta["val_loss_last"], "eval": meta.get("eval"),
            "mlflow_run_id": tracker.run_id, "mlflow_uri": tracker.uri}


def _save(run_dir: Path, module, exp: ExperimentConfig, meta: dict) -> Path:
    final = run_dir / PRETRAINED
    tmp = run_dir / f".tmp-{PRETRAINED}"
    try:
        with staged(tmp):
            module.save_to_path(str((tmp / MODULE).resolve()))
            save_weights(module.get_state(), tmp / WEIGHTS)
            (tmp / CONFIG).write_text(exp.to_yaml())
            (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
            write_manifest(tmp)
    except NoSpace as e:
        needed = max(e.written, 2 * sum(p.numel() * p.element_size() for p in module.parameters()))
        raise CheckpointError(f"{no_space_message('pre-trained checkpoint', final, needed)}; free space or set "
                              "checkpoint.dir elsewhere, then pre-train again") from None
    os.replace(tmp, final)
    return final
