"""How far does one Adam step move the policy? NCDPO vs DPPO, against the knobs that set it.

    python benchmarks/update_size.py --task button_press --steps 2000 \
        --variant ncdpo: --variant ncdpo:ppo.lr=3e-5 --variant dppo:

Starting from the task's pre-trained checkpoint (``benchmarks/manipulation.py`` makes it), one
batch of rollouts per variant (``--steps`` policy steps of the pre-trained policy with the
variant's exploration settings, in this process) is fed to a fresh learner: a first ``update()`` takes exactly one Adam step on one minibatch
of about ``--minibatch`` rows (whole episode chunks) (critic and actor; no warm-up), a second reports, before stepping,
the approx KL between the policy after that one step and the rollout policy (k3, per row, as
the learner logs it, i.e. in the variant's own log-prob convention). Repeated for ``--repeats`` seeds (different minibatches, same batch). Shows
why NCDPO's first minibatch passes its KL target while DPPO's does not, and which knob
(learning rate, fine-tuned steps, std, gradient clip, log-prob reduction) brings it into range.

A variant is ``ALGO:KEY=VALUE,KEY=VALUE`` over the task file and the algorithm's recipe
(``configs/recipes``). The table goes to docs/benchmarks.md (section update-size:<task>).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, markdown_table, write_section  # noqa: E402
from benchmarks.manipulation import RECIPES, TASKS, config_path, ensure_pretrained  # noqa: E402


def build(exp):
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from ncdpo_rllib.experiment.build import build_algo_config

    cfg = build_algo_config(exp).env_runners(num_env_runners=0, num_envs_per_env_runner=2)
    runner = SingleAgentEnvRunner(config=cfg)
    learner = cfg.build_learner(env=runner.env)
    return cfg, runner, learner


def probe(exp, state: dict, episodes, minibatch: int, seed: int) -> dict:
    import torch

    from ray.rllib.core import DEFAULT_MODULE_ID

    torch.manual_seed(seed)
    _, _, learner = build(exp)
    learner.module[DEFAULT_MODULE_ID].unwrapped().load_pretrained(state)
    # One minibatch of about ``minibatch`` rows (whole episode chunks, chosen by the seed) and one
    # Adam step on it; then the whole batch, as one minibatch: its metrics are logged before it steps.
    order = np.random.default_rng(seed).permutation(len(episodes))
    sub, rows = [], 0
    for i in order:
        if rows >= minibatch:
            break
        sub.append(episodes[i])
        rows += len(episodes[i])
    # (copies: PPO's learner connector appends a bootstrap step to the episodes it is given)
    first = learner.update(episodes=copy.deepcopy(sub), num_epochs=1, minibatch_size=rows + 1000)
    total = sum(len(e) for e in episodes)
    second = learner.update(episodes=copy.deepcopy(episodes), num_epochs=1, minibatch_size=total + 1000)
    peek = lambda r, k: float(r[DEFAULT_MODULE_ID][k].peek())  # noqa: E731
    return {"approx_kl": peek(second, "approx_kl"), "clip_fraction": peek(second, "clip_fraction"),
            "ratio_max": peek(second, "ratio_max"), "grad_norm_actor": peek(first, "grad_norm_actor"),
            "kl_before_step": peek(first, "approx_kl")}


def main() -> None:
    from ncdpo_rllib.experiment.config import load_config
    from ncdpo_rllib.experiment.pretrained import load_module_state

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), default="button_press")
    p.add_argument("--steps", type=int, default=2000, help="policy steps in the probe batch")
    p.add_argument("--minibatch", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variant", action="append", default=[], metavar="ALGO:KEY=V,KEY=V")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "update_size.json")
    args = p.parse_args()
    variants = args.variant or ["ncdpo:", "dppo:"]

    pre = ensure_pretrained(args.task, "state")
    state = load_module_state(Path(pre["checkpoint"]))
    base = [f"init_from={pre['checkpoint']}", "ppo.critic_warmup_iters=0", "resources.env_runners=0"]
    rows, results = [], []
    for variant in variants:
        algo, _, sets = variant.partition(":")
        overrides = [s for s in sets.split(",") if s]
        exp = load_config([config_path(args.task, "state"), RECIPES[algo]], base + overrides)
        # A batch from this variant's own exploration policy (its std, its chain columns).
        from ray.rllib.core import DEFAULT_MODULE_ID

        _, runner, learner = build(exp)
        learner.module[DEFAULT_MODULE_ID].unwrapped().load_pretrained(state)
        runner.module.set_state(learner.module[DEFAULT_MODULE_ID].get_state())
        eps = runner.sample(num_timesteps=args.steps, random_actions=False)
        got = [probe(exp, state, eps, args.minibatch, seed) for seed in range(args.repeats)]
        mean = {k: float(np.mean([g[k] for g in got])) for k in got[0]}
        results.append({"variant": variant, "runs": got, "mean": mean})
        print(f"[update-size] {variant}: {mean}", flush=True)
        target = exp.ppo.target_kl
        rows.append([f"`{variant}`", f"{mean['approx_kl']:.4g}", f"{target if target else '-'}",
                     f"{mean['clip_fraction']:.2f}", f"{mean['ratio_max']:.3g}", f"{mean['grad_norm_actor']:.3g}"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    table = markdown_table(["variant (algo: overrides)", "approx KL after one Adam step", "target_kl",
                            "clip fraction", "ratio max", "actor grad norm (before clip)"], rows)
    print(table)
    write_section(f"update-size:{args.task}", f"One Adam step: how far the policy moves ({TASKS[args.task]}, state)",
                  f"{args.steps} policy steps from the pre-trained policy, minibatch {args.minibatch}, "
                  f"mean of {args.repeats} seeds. The KL is each variant's own (NCDPO: of the final Gaussian, "
                  f"summed or averaged as its logp_reduction says; DPPO: per (env step, denoising step)).\n\n{table}\n")


if __name__ == "__main__":
    main()
