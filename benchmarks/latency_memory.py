"""Latency and memory profile vs K: action-inference latency, learner update time, memory.

    python benchmarks/latency_memory.py --env Hopper-v5 --ks 5 10 20 --hidden 256 256 --action-chunk 4

Per K, in its own process (torch on 1 thread):
- inference latency: ``forward_inference`` on one observation (what a deployed policy pays
  per action), and ``forward_exploration`` on a batch of 8 (one rollout step of 8 envs);
  median and p95 over 300 calls after a warm-up; the same deterministic action from the file
  ``ncdpo export`` writes (TorchScript and ONNX, batch 1, through ``load_policy``, noise drawn);
- learner: ms per 128-sample minibatch update (one epoch over a sampled batch), the tensors
  autograd saves for the backward pass per minibatch, and the process's peak RSS (on a GPU,
  ``torch.cuda.max_memory_allocated`` too).
Logged as one MLflow run (tag ``stage=profile``, metrics with ``step`` = K, so
``ncdpo compare`` shows them in its report), printed, and written to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import learner_cost, machine, markdown_table, runner_and_learner, write_section  # noqa: E402

MINIBATCH, BATCH = 128, 2000


def _latency_ms(fn, calls: int = 300) -> tuple[float, float]:
    for _ in range(20):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return float(np.median(times)), float(np.percentile(times, 95))


def measure(env_id: str, k: int, hidden, chunk: int, checkpointing: bool) -> dict:
    import torch
    from ray.rllib.core.columns import Columns

    runner, learner = runner_and_learner(env_id, batch=BATCH, minibatch=MINIBATCH, chunk=chunk, denoising_steps=k,
                                         grad_checkpointing=checkpointing, hidden=hidden)
    module = learner.module["default_policy"]
    obs_dim = runner.env.single_observation_space.shape[0]
    with torch.no_grad():
        one = {Columns.OBS: torch.zeros(1, obs_dim)}
        eight = {Columns.OBS: torch.zeros(8, obs_dim)}
        infer = _latency_ms(lambda: module.forward_inference(one))
        explore = _latency_ms(lambda: module.forward_exploration(eight))
    exported = {} if checkpointing else exported_latency(module, runner, chunk)
    episodes = runner.sample(num_timesteps=BATCH)
    steps = sum(len(e) for e in episodes)
    update_s, saved_bytes = learner_cost(learner, episodes, MINIBATCH, runner.sample(num_timesteps=400))
    minibatches = -(-steps // MINIBATCH)
    out = {
        "inference_ms": infer[0], "inference_p95_ms": infer[1],
        "explore8_ms": explore[0], "explore8_p95_ms": explore[1],
        "update_ms_per_minibatch": 1000 * update_s / minibatches,
        "saved_mb_per_minibatch": saved_bytes / minibatches / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **exported,
    }
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def exported_latency(module, runner, chunk: int) -> dict:
    """Median / p95 ms of one action from the exported file (TorchScript, ONNX), batch 1."""
    import tempfile

    import torch

    from ncdpo_rllib import load_policy
    from ncdpo_rllib.experiment.export import ExportedPolicy, write_onnx, write_torchscript

    policy = ExportedPolicy(module, obs_filter=None, action_space=runner.env.single_action_space,
                            normalize_actions=True, clip_actions=False, chunk=chunk)
    shape = runner.env.single_observation_space.shape
    meta = {"obs_shape": list(shape), "noise_shape": list(module.actor.noise_shape)}
    obs, noise = torch.zeros(2, *shape), torch.randn(2, *meta["noise_shape"])
    out = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name, write, suffix in (("torchscript", write_torchscript, ".pt"), ("onnx", write_onnx, ".onnx")):
            path = Path(tmp) / f"policy{suffix}"
            write(policy, obs, noise, meta, path)
            loaded, one = load_policy(path), np.zeros(shape, np.float32)
            out[f"export_{name}_ms"], out[f"export_{name}_p95_ms"] = _latency_ms(lambda: loaded(one))
    return out


def log_to_mlflow(experiment: str, args, results: dict[str, dict]) -> str:
    from mlflow.entities import Metric

    from ncdpo_rllib.experiment.tracking import (environment_tags, experiment_id, log_params, mlflow_client,
                                                 resolve_tracking_uri)

    client = mlflow_client(resolve_tracking_uri(args.tracking_uri))
    run = client.create_run(experiment_id(client, experiment), run_name=f"profile-{args.env}", tags={
        "stage": "profile", "env": args.env, "algorithm": "ncdpo", **environment_tags()})
    now = int(time.time() * 1000)
    metrics = [Metric(f"profile/{name}{'_ckpt' if key.endswith(':ckpt') else ''}", value, now, int(key.split(":")[0]))
               for key, r in results.items() for name, value in r.items()]
    client.log_batch(run.info.run_id, metrics=metrics)
    log_params(client, run.info.run_id, {"env": args.env, "ks": args.ks, "hidden": args.hidden,
                                         "action_chunk": args.action_chunk, "minibatch": MINIBATCH})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="Pendulum-v1")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20])
    p.add_argument("--hidden", type=int, nargs="+")
    p.add_argument("--action-chunk", type=int, default=1)
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: profile-<env>)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return

    results, rows = {}, []
    for k in args.ks:
        for ckpt in (False, True):
            spec = {"env_id": args.env, "k": k, "hidden": args.hidden, "chunk": args.action_chunk, "checkpointing": ckpt}
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[f"{k}:ckpt" if ckpt else f"{k}"] = r
            exported = (f"{r['export_torchscript_ms']:.2f} ({r['export_torchscript_p95_ms']:.2f})",
                        f"{r['export_onnx_ms']:.2f} ({r['export_onnx_p95_ms']:.2f})") if not ckpt else ("-", "-")
            rows.append([k, "on" if ckpt else "off", f"{r['inference_ms']:.2f} ({r['inference_p95_ms']:.2f})", *exported,
                         f"{r['explore8_ms']:.2f}", f"{r['update_ms_per_minibatch']:.1f}",
                         f"{r['saved_mb_per_minibatch']:.2f}", f"{r['peak_rss_mb']:.0f}"])
            print(rows[-1], flush=True)
    run_id = log_to_mlflow(args.experiment or f"profile-{args.env}", args, results)
    table = markdown_table(["K", "grad checkpointing", "inference ms, 1 obs: median (p95)",
                            "exported TorchScript ms, 1 obs", "exported ONNX ms, 1 obs", "exploration ms, 8 obs",
                            "learner ms / minibatch", "saved for backward MB / minibatch", "peak RSS MB"], rows)
    print(table)
    arch = f"denoiser {args.hidden or 'default'}, action chunk Ta={args.action_chunk}"
    body = (f"{args.env}, NCDPO, {arch}; torch on 1 thread; {machine()}. Latency: median (p95) of 300 "
            f"calls after a warm-up. Learner: one epoch over a {BATCH}-step batch in minibatches of "
            f"{MINIBATCH}. Logged as MLflow run {run_id} (experiment `{args.experiment or 'profile-' + args.env}`, "
            "tag stage=profile, step = K).\n\n" + table)
    write_section(f"profile:{args.env}", f"Latency and memory vs K: {args.env}", body)


if __name__ == "__main__":
    main()
