"""Scaling with Ray actors: env steps/s vs number of EnvRunners, learner samples/s vs Learners.

    python benchmarks/scaling.py --config configs/halfcheetah_ncdpo.yaml --runners 0 1 2 --learners 0 1 2

Each layout is a real NCDPO algorithm on local Ray (``ncdpo train``'s build path); it runs
``--iterations`` training iterations and reports the mean of RLlib's own timers over all but
the first (warm-up): ``env_runner_sampling_timer`` (sampling, with weight sync excluded) and
``learner_update_timer``. Runner layouts use one local learner; learner layouts use one
remote EnvRunner. On a 2-core machine more actors than cores only adds contention: the table
says how much, a bigger machine or a GPU learner shows the scaling.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import markdown_table, write_section  # noqa: E402
from ncdpo_rllib.experiment.config import load_config  # noqa: E402


def measure(args, runners: int, learners: int) -> dict:
    import ray
    from ray.rllib.utils.metrics import ENV_RUNNER_SAMPLING_TIMER, LEARNER_UPDATE_TIMER, TIMERS

    from ncdpo_rllib.experiment.build import build_algo_config

    exp = load_config(args.config, [
        f"resources.env_runners={runners}", f"resources.learners={learners}",
        f"resources.envs_per_runner={args.envs}", "tracking.enabled=false", *args.set,
    ])
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    algo = build_algo_config(exp).build_algo()
    sample_s, learn_s, steps = [], [], []
    try:
        for i in range(args.iterations):
            result = algo.train()
            if i == 0:
                continue
            sample_s.append(result[TIMERS][ENV_RUNNER_SAMPLING_TIMER])
            learn_s.append(result[TIMERS][LEARNER_UPDATE_TIMER])
            steps.append(result["env_runners"]["num_env_steps_sampled"])
    finally:
        algo.stop()
        ray.shutdown()
    n = float(np.mean(steps))
    trained = n * exp.ppo.num_epochs  # every sample passes num_epochs times through the learner
    return {"env_steps_per_s": n / np.mean(sample_s), "learner_samples_per_s": trained / np.mean(learn_s)}


def measure_in_child(args, runners: int, learners: int) -> dict:
    """One fresh process (and Ray instance) per layout."""
    cmd = [sys.executable, __file__, "--config", str(args.config), "--envs", str(args.envs),
           "--iterations", str(args.iterations), "--child", json.dumps([runners, learners])]
    for item in args.set:
        cmd += ["--set", item]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"layout runners={runners} learners={learners} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/halfcheetah_ncdpo.yaml")
    p.add_argument("--runners", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--learners", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--envs", type=int, default=8, help="vector envs per runner")
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args, *json.loads(args.child))))
        return
    exp = load_config(args.config)

    rows = []
    for runners in args.runners:
        r = measure_in_child(args, runners, 0)
        rows.append([f"{runners} EnvRunner(s)" if runners else "sampling in the driver", "local",
                     f"{r['env_steps_per_s']:,.0f}", f"{r['learner_samples_per_s']:,.0f}"])
        print(rows[-1], flush=True)
    for learners in [n for n in args.learners if n > 0]:
        cpus = dataclasses.replace(exp.resources, env_runners=1, learners=learners).cpus_needed
        if cpus > (os.cpu_count() or 1):
            rows.append(["1 EnvRunner", f"{learners} remote", f"not run: needs {cpus} CPUs, this machine has "
                         f"{os.cpu_count()} (Ray would wait for them forever)", "-"])
            print(rows[-1], flush=True)
            continue
        r = measure_in_child(args, 1, learners)
        rows.append(["1 EnvRunner", f"{learners} remote", f"{r['env_steps_per_s']:,.0f}",
                     f"{r['learner_samples_per_s']:,.0f}"])
        print(rows[-1], flush=True)
    table = markdown_table(["sampling", "learner(s)", "env steps/s (sampling timer)",
                            "learner samples/s (update timer, x epochs)"], rows)
    print(table)
    body = (
        f"{exp.env.id}, NCDPO K={exp.diffusion.denoising_steps}, {args.envs} vector envs per runner, "
        f"train batch {exp.ppo.train_batch_size}, mean of iterations 2..{args.iterations} of RLlib's timers. "
        f"This machine has {os.cpu_count()} CPU cores, so 2 runners plus the driver, or 2 learners, "
        "compete for them: the numbers show the overhead of the actor layout here, not the speed-up a "
        "cluster gives. No GPU was available to this project, so the GPU-vs-CPU learner comparison is "
        "not measured (`python benchmarks/throughput.py` on a GPU machine gives it).\n\n" + table
    )
    write_section(f"scaling:{exp.env.id}", f"Scaling with EnvRunners and Learners: {exp.env.id}", body)


if __name__ == "__main__":
    main()
