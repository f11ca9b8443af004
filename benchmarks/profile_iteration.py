"""Where one training iteration's time goes: sampling and the update, part by part, NCDPO at each K
(eager and with ``diffusion.compile``) next to RLlib's MLP PPO.

    python benchmarks/profile_iteration.py --env Pendulum-v1 --ks 5 10
    python benchmarks/profile_iteration.py --env HalfCheetah-v5 --ks 5 10

Each configuration runs in its own process: the in-process EnvRunner (8 vector envs) and local
learner of ``benchmarks/common.runner_and_learner``, a warm-up round (which compiles, for the
compiled rows), then one sampling round of 4000 env steps and one update epoch over them
(minibatches of 128), with wall-clock timers around the parts RLlib calls:

- sampling: the env step (``_try_env_step``), the env-to-module connectors (observation filter),
  the policy's exploration forward, the module-to-env connectors; "RLlib rest" is the sampling
  loop's own work (episodes, bookkeeping);
- update: the learner connector (episodes -> batch, including the critic's value pass and GAE),
  the train forward, the loss, the backward pass (``compute_gradients``), gradient post-processing
  (clipping, checks), the optimizer step; "RLlib rest" is batching, the minibatch loop and metrics.

The timers wrap instance attributes of the runner and learner objects in this process only; the
library is not changed. Seconds per 1000 env steps (sampling) or 1000 samples (update) and the
share of the total are written to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import markdown_table, runner_and_learner, write_section  # noqa: E402

BATCH, MINIBATCH = 4000, 128
SAMPLING = {"_try_env_step": "env step", "_env_to_module": "env-to-module connectors",
            "forward_exploration": "policy forward", "_module_to_env": "module-to-env connectors"}
UPDATE = {"_learner_connector": "learner connector (values, GAE)", "forward_train": "train forward",
          "compute_losses": "loss", "compute_gradients": "backward", "postprocess_gradients": "grad clip + checks",
          "apply_gradients": "optimizer step"}


class Timers:
    """Wall-clock seconds spent in wrapped callables, by name."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        setattr(obj, attr, timed)


def measure(env_id: str, algorithm: str, k: int, compile_mode) -> dict:
    """Runs in a child process: {"sampling": {part: s}, "update": {part: s}, "steps": n}."""
    runner, learner = runner_and_learner(env_id, algorithm, batch=BATCH, minibatch=MINIBATCH,
                                         denoising_steps=k, compile=compile_mode)
    warm = runner.sample(num_timesteps=800)
    learner.update(episodes=warm, num_epochs=1, minibatch_size=MINIBATCH)  # compiles the update, with compile
    timers = Timers()
    for attr, name in SAMPLING.items():
        timers.wrap(runner.module if attr == "forward_exploration" else runner, attr, name)
    for attr, name in UPDATE.items():
        timers.wrap(learner.module if attr == "forward_train" else learner, attr, name)
    t0 = time.perf_counter()
    episodes = runner.sample(num_timesteps=BATCH)
    sample_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    learner.update(episodes=episodes, num_epochs=1, minibatch_size=MINIBATCH)
    update_s = time.perf_counter() - t0
    parts = dict(timers.seconds)
    sampling = {name: parts.get(name, 0.0) for name in SAMPLING.values()}
    update = {name: parts.get(name, 0.0) for name in UPDATE.values()}
    sampling["RLlib rest"] = sample_s - sum(sampling.values())
    update["RLlib rest"] = update_s - sum(update.values())
    return {"sampling": sampling, "update": update, "steps": sum(len(e) for e in episodes)}


def table(results: dict[str, dict], phase: str) -> str:
    names = list(next(iter(results.values()))[phase])
    rows = []
    for label, r in results.items():
        total = sum(r[phase].values())
        per_1000 = 1000 / r["steps"]
        rows.append([label, f"{total * per_1000:.3f}",
                     *(f"{s * per_1000:.3f} ({100 * s / total:.0f}%)" for s in r[phase].values())])
    unit = "env steps" if phase == "sampling" else "samples"
    return markdown_table([f"policy ({phase})", f"total s / 1000 {unit}", *names], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="Pendulum-v1")
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10])
    p.add_argument("--compile", default="default", help="torch.compile mode of the compiled rows ('none': no such rows)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return

    modes = [None] + ([] if args.compile == "none" else [args.compile])
    configs = [("ppo", 0, None)] + [("ncdpo", k, m) for k in args.ks for m in modes]
    results = {}
    for algorithm, k, mode in configs:
        spec = {"env_id": args.env, "algorithm": algorithm, "k": k, "compile_mode": mode}
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                             capture_output=True, text=True, check=True)
        label = "MLP PPO" if algorithm == "ppo" else f"NCDPO K={k}" + (f" compiled ({mode})" if mode else " eager")
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
        print(label, json.dumps(results[label]), flush=True)
    body = (
        f"{args.env}; one in-process EnvRunner with 8 vector envs, a local learner, torch on 1 thread. One "
        f"sampling round of {BATCH} env steps and one update epoch over it (minibatches of {MINIBATCH}), "
        "after a warm-up round (compiled rows: compilation not included). Seconds per 1000 env steps "
        "(sampling) or 1000 samples (update), and the share of the phase.\n\n"
        f"{table(results, 'sampling')}\n\n{table(results, 'update')}\n"
    )
    print(body)
    write_section(f"profile:{args.env}", f"Where the time goes: {args.env}", body)


if __name__ == "__main__":
    main()
