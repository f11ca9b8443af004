"""Throughput and learner memory: NCDPO (and DPPO) at K = 1, 5, 10, 20 vs RLlib's MLP PPO.

    python benchmarks/throughput.py --env Pendulum-v1 --ks 1 5 10 20
    python benchmarks/throughput.py --env Hopper-v5 --ks 5 10 20 --algorithms ncdpo dppo \
        --hidden 256 256 --action-chunk 4       # the fine-tuning configs' architecture

- rollout env steps/s: one in-process EnvRunner with 8 vector envs, exploration forward
  (K denoiser calls per env step for NCDPO), after a warm-up; the best of 5 rounds of 4000 steps;
- learner samples/s: one update epoch over a 4000-step batch, minibatches of 128; the best of 5;
- learner memory: bytes of the tensors autograd keeps for the backward pass, per minibatch
  (what backprop through K steps costs, device-independent; measured with
  torch.autograd.graph.saved_tensors_hooks), with and without gradient checkpointing;
- each NCDPO/DPPO configuration eager and with ``diffusion.compile`` (``--compile MODE``, ``none`` to
  skip), the eager row being the comparison; the warm-up calls compile;
- ``--before REV``: NCDPO (eager) once more with the library as it was at git revision REV, in the
  same run (a before/after table on one machine on one day).
Each configuration runs in its own subprocess; all of them are started and warmed up first, then
their timed rounds are interleaved (round r of every configuration, one at a time, before round
r + 1 of any): a machine whose speed drifts over minutes (this one's did by +-20%) then slows every
row alike, instead of the rows that happen to run last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    LIBRARY_ENV, library_at, markdown_table, runner_and_learner, saved_for_backward, use_library_from_env,
    write_section)

use_library_from_env()

BATCH, MINIBATCH = 4000, 128
REPEATS = 5
"""Each rate is the best of this many rounds (one sampling round, one update epoch)."""


MARK = "@@throughput "
"""Prefix of the lines a serving child writes for the parent (RLlib may print on stdout too)."""


def serve(env_id: str, algorithm: str, k: int, checkpointing: bool, hidden=None, chunk: int = 1,
          compile_mode=None) -> None:
    """A child process: build runner + learner, warm up (compiling, with compile), measure the
    autograd memory of one update, then answer each ``round`` line on stdin with the seconds of one
    sampling round and one update epoch, until stdin closes."""
    runner, learner = runner_and_learner(env_id, algorithm, batch=BATCH, minibatch=MINIBATCH, chunk=chunk,
                                         denoising_steps=k, grad_checkpointing=checkpointing, compile=compile_mode,
                                         hidden=hidden)
    runner.sample(num_timesteps=800)  # warm-up (and, with compile, the rollout chain's compilation)
    episodes = runner.sample(num_timesteps=BATCH)
    learner.update(episodes=runner.sample(num_timesteps=800), num_epochs=1, minibatch_size=MINIBATCH)
    saved = saved_for_backward(lambda: learner.update(episodes=episodes, num_epochs=1, minibatch_size=MINIBATCH))
    print(MARK + json.dumps({"saved_bytes": saved}), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        t0 = time.perf_counter()
        episodes = runner.sample(num_timesteps=BATCH)
        sample_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        learner.update(episodes=episodes, num_epochs=1, minibatch_size=MINIBATCH)
        print(MARK + json.dumps({"sample_s": sample_s, "update_s": time.perf_counter() - t0,
                                 "steps": sum(len(e) for e in episodes)}), flush=True)


class Child:
    """One configuration served by its own process (``serve``)."""

    def __init__(self, spec: dict, env: dict | None):
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.log.seek(0)
        raise SystemExit(f"a throughput child exited ({self.proc.wait()}):\n{self.log.read()[-3000:]}")

    def round(self) -> dict:
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def measure_interleaved(specs: list[tuple[dict, dict | None]]) -> list[dict]:
    """Per configuration: env steps/s and learner samples/s (each the best of REPEATS rounds, the
    rounds interleaved across configurations), ms per minibatch and MB saved for backward."""
    children = [Child(spec, env) for spec, env in specs]
    try:
        saved = [c.read()["saved_bytes"] for c in children]  # all built and warmed up
        rounds = [[] for _ in children]
        for _ in range(REPEATS):
            for i, c in enumerate(children):
                rounds[i].append(c.round())
    finally:
        for c in children:
            c.close()
    out = []
    for (spec, _), rs, saved_bytes in zip(specs, rounds, saved):
        sample_rate = max(r["steps"] / r["sample_s"] for r in rs)
        update_rate = max(r["steps"] / r["update_s"] for r in rs)
        minibatches = -(-rs[0]["steps"] // MINIBATCH)
        out.append({
            "env_steps_per_s": sample_rate * spec["chunk"],  # base-env steps (a chunk executes Ta of them)
            "learner_samples_per_s": update_rate,
            "ms_per_minibatch": 1000 * rs[0]["steps"] / update_rate / minibatches,
            "saved_mb_per_minibatch": saved_bytes / minibatches / 2**20,
        })
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="Pendulum-v1")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20])
    p.add_argument("--algorithms", nargs="+", default=["ncdpo"], choices=["ncdpo", "dppo"])
    p.add_argument("--hidden", type=int, nargs="+", help="denoiser MLP sizes (default: the library's)")
    p.add_argument("--action-chunk", type=int, default=1, help="Ta (the policy's action is Ta x D)")
    p.add_argument("--compile", default="default", help="torch.compile mode of the compiled rows ('none': no such rows)")
    p.add_argument("--before", metavar="REV",
                   help="also measure NCDPO (eager) with the library at this git revision, in the same run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        serve(**json.loads(args.child))
        return

    # (algorithm, K, grad checkpointing, compile mode, library revision): the eager rows are the comparison
    # for the compiled ones; the revision rows (--before) for both.
    compiled = [] if args.compile == "none" else [(False, args.compile)]
    configs = [("ppo", 0, False, None, None)] + [
        (a, k, c, m, None) for a in args.algorithms for k in args.ks
        for c, m in ([(False, None), (True, None)] if a == "ncdpo" else [(False, None)]) + compiled
    ] + ([("ncdpo", k, False, None, args.before) for k in args.ks] if args.before else [])
    specs = [({"env_id": args.env, "algorithm": algorithm, "k": k, "checkpointing": ckpt, "hidden": args.hidden,
               "chunk": args.action_chunk, "compile_mode": mode},
              {**os.environ, LIBRARY_ENV: str(library_at(rev))} if rev else None)
             for algorithm, k, ckpt, mode, rev in configs]
    rows = []
    for (algorithm, k, ckpt, mode, rev), r in zip(configs, measure_interleaved(specs)):
        name = "MLP PPO" if algorithm == "ppo" else f"{algorithm.upper()} K={k}" + (f" (library at {rev})" if rev else "")
        # autograd's saved-tensor hooks do not see inside a compiled graph: no memory figure there
        memory = "-" if mode else f"{r['saved_mb_per_minibatch']:.2f}"
        rows.append([name, "-" if algorithm == "ppo" else (f"compiled ({mode})" if mode else "eager"),
                     "-" if algorithm != "ncdpo" else ("on" if ckpt else "off"),
                     f"{r['env_steps_per_s']:,.0f}", f"{r['learner_samples_per_s']:,.0f}",
                     f"{r['ms_per_minibatch']:.1f}", memory])
        print(rows[-1], flush=True)
    table = markdown_table(
        ["policy", "chain", "grad checkpointing", "rollout env steps/s (1 runner x 8 envs)",
         f"learner samples/s (minibatch {MINIBATCH})", "ms / minibatch", "saved for backward (MB / minibatch)"], rows)
    print(table)
    arch = (f"denoiser {args.hidden or 'default [128, 128]'}, action chunk Ta={args.action_chunk}; "
            if args.hidden or args.action_chunk > 1 else "")
    body = (
        f"{args.env}; {arch}one in-process EnvRunner, 8 vector envs, exploration forward; learner: one "
        f"epoch over a {BATCH}-step batch in minibatches of {MINIBATCH}, torch on 1 thread. 'Saved for "
        "backward' sums the tensors autograd keeps between forward and backward in one minibatch "
        "(the memory that backprop through the K-step chain costs, device-independent; the MLP PPO "
        "row is the baseline). DPPO scores the stored chain in one batched denoiser call (no "
        "backprop through the chain), so its memory does not grow with the chain's depth the same "
        "way. Compiled rows: `diffusion.compile`, timed after warm-up calls that compile (compilation "
        "not included).\n\n" + table
    )
    suffix = f":{args.env}" + (":finetune-arch" if arch else "")
    write_section(f"throughput{suffix}", f"Throughput and learner memory vs K: {args.env}"
                  + (" (fine-tuning architecture)" if arch else ""), body)


if __name__ == "__main__":
    main()
