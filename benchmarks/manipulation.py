"""Manipulation (Meta-World, robosuite) from state and from pixels: pre-trained success, then NCDPO vs DPPO.

    python benchmarks/manipulation.py --obs state --seeds 0 1 2 --steps 300000
    python benchmarks/manipulation.py --tasks reach button_press --obs pixels --seeds 0 1 2 \
        --steps 100000 --section metaworld-recipes-pixels
    python benchmarks/manipulation.py --family robosuite --tasks lift --obs state --seeds 0 1 2 --steps 48000

(one budget per call: state and pixels each get their own section.)

Each algorithm runs its recipe (``--recipe ALGO=PATH``; default ``configs/recipes/<algo>_*.yaml``:
NCDPO's frozen defaults and DPPO as its reference does it) composed over the task file.

Per task and observation (``configs/<family>_<task>[_pixels].yaml``; each stage is reused
when its output exists, so an interrupted benchmark resumes):
1. the degraded scripted dataset (``ncdpo collect``) into data/<task>/scripted[-pixels64];
2. behaviour cloning (seed 0) and its deterministic success rate (``pretrain.eval_episodes``);
3. per algorithm and seed, ``ncdpo train`` from that checkpoint for ``--steps`` env steps,
   evaluating the deterministic policy every ``eval.every`` iterations, with the algorithm's
   recipe over the task file.

Results go to benchmarks/results/metaworld_recipes.json (robosuite: robosuite.json); the table (success rates, wall-clock,
sampling env steps/s with pixels vs state), the rliable aggregate over the test tasks and a PNG of
evaluation success vs env steps and vs wall-clock go into docs/benchmarks.md. (Not named
metaworld.py: the script's directory comes first on sys.path and would shadow the metaworld package.)

Several processes may share the results file and the pinned checkpoints (they take turns under a
lock), e.g. one per seed on a bigger machine, then once more with every seed for the report:

    for s in 0 1 2; do python benchmarks/manipulation.py --obs state --seeds $s & done; wait
    python benchmarks/manipulation.py --obs state --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    IMAGES, ROOT, markdown_table, pinned_pretrained, plot_runs, run_cells, save_figure, train_with_curve, write_section)
from ncdpo_rllib.experiment.config import load_config  # noqa: E402

FAMILIES = {  # family -> (its tasks: short name -> env id, its title, results file, docs section, dev task)
    "metaworld": ({"reach": "reach-v3", "button_press": "button-press-topdown-v3", "drawer_open": "drawer-open-v3",
                   "door_open": "door-open-v3", "pick_place": "pick-place-v3"},
                  "Meta-World", "metaworld_recipes.json", "metaworld-recipes", "button_press"),
    "robosuite": ({"lift": "Lift", "can": "PickPlaceCan"}, "robosuite", "robosuite.json", "robosuite", None),
}
RECIPES = {"ncdpo": ROOT / "configs" / "recipes" / "ncdpo_finetune.yaml",
           "dppo": ROOT / "configs" / "recipes" / "dppo_finetune.yaml"}
LEARNER = "learner/default_policy/"  # the learner's metrics, as train() names them


FAMILY, TASKS = "metaworld", FAMILIES["metaworld"][0]  # main() sets them from --family


def config_path(task: str, obs: str) -> Path:
    return ROOT / "configs" / f"{FAMILY}_{task}{'_pixels' if obs == 'pixels' else ''}.yaml"


def ensure_pretrained(task: str, obs: str) -> dict:
    """Dataset, then the seed-0 pre-trained checkpoint; both reused when present (the pinned
    checkpoint in benchmarks/results/pretrained/ first)."""

    def make() -> Path:
        from ncdpo_rllib.experiment.collect import collect, scripted_level
        from ncdpo_rllib.experiment.pretrain import pretrain

        data = ROOT / "data"
        exp = load_config(config_path(task, obs), [f"collect.out={data}"])
        dataset = data / exp.env.id / scripted_level(exp)
        if not dataset.is_dir():
            print(f"[bench] collecting {dataset}", flush=True)
            collect(exp)
        meta_file = ROOT / "runs" / "bench" / f"{FAMILY}-{task}-{obs}" / "pretrain" / "pretrained" / "pretrain.json"
        if not meta_file.is_file():
            shutil.rmtree(meta_file.parent.parent, ignore_errors=True)
            print(f"[bench] pre-training {task} ({obs}) on {dataset}", flush=True)
            pretrain(load_config(config_path(task, obs), [
                f"pretrain.dataset={dataset}", f"checkpoint.dir={meta_file.parent.parent.parent}",
                "tracking.run_name=pretrain", f"tracking.experiment=bench-{FAMILY}-{task}-{obs}"]))
        return meta_file.parent

    return _pretrained_summary(pinned_pretrained(f"{FAMILY}-{task}-{obs}", make) / "pretrain.json")


def _pretrained_summary(meta_file: Path) -> dict:
    meta = json.loads(meta_file.read_text())
    ds = meta["dataset_metadata"]
    return {"checkpoint": str(meta_file.parent), "eval": meta["eval"], "bc_wall_s": meta["wall_s"],
            "dataset_success": ds["success_rate"], "dataset_episodes": len(ds["episode_success"])}


CURVE_METRICS = {"success": "success_rate", "eval_success": "eval_success_rate", "eval_return": "eval_return_mean",
                 "sampling_s": "time_sampling_s", "learner_s": "time_learner_s",
                 **{key: f"{LEARNER}{key}" for key in ("approx_kl", "kl_stop_fraction", "clip_fraction", "actor_frozen")}}


def run_one(args, task: str, obs: str, algo: str, seed: int, pretrained: dict) -> dict:
    root = ROOT / "runs" / "bench" / f"{FAMILY}-{task}-{obs}"
    name = f"{algo}-s{seed}"
    shutil.rmtree(root / name, ignore_errors=True)
    overrides = [f"seed={seed}", f"init_from={pretrained['checkpoint']}",
                 f"stop.env_steps={args.steps}", "stop.iterations=null", "checkpoint.every=0",
                 f"checkpoint.dir={root}", f"tracking.run_name={name}",
                 f"tracking.experiment=bench-{FAMILY}-{task}-{obs}", *args.set]
    exp = load_config([config_path(task, obs), args.recipes[algo]], overrides)
    assert exp.algorithm == algo, f"{args.recipes[algo]} sets algorithm: {exp.algorithm}, not {algo}"
    summary, curve = train_with_curve(exp, CURVE_METRICS)
    return {"task": task, "obs": obs, "algo": algo, "seed": seed, "steps": args.steps, "curve": curve,
            "mlflow_run_id": summary["mlflow_run_id"]}


def last_eval(run: dict) -> float:
    vals = [v for v in run["curve"]["eval_success"] if not np.isnan(v)]
    return float(vals[-1]) if vals else float("nan")


def last_eval_steps(runs: list[dict]) -> int:
    """Env steps of the last evaluation (the budget is reached mid-way between evaluations)."""
    c = runs[0]["curve"] if runs else {"env_steps": [0], "eval_success": [0.0]}
    return max([s for s, v in zip(c["env_steps"], c["eval_success"]) if not np.isnan(v)], default=0)


def sampling_rate(runs: list[dict]) -> float:
    """Env steps per second of sampling (rollouts only, no learner), over all iterations."""
    steps = sum(r["curve"]["env_steps"][-1] for r in runs)
    return steps / sum(np.nansum(r["curve"]["sampling_s"]) for r in runs)


def fmt(vals) -> str:
    vals = np.asarray(vals, dtype=float)
    return f"{np.nanmean(vals):.2f} ± {np.nanstd(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"


def timed_note(args) -> str:
    return f" (seeds {', '.join(map(str, args.timing_seeds))})" if args.timing_seeds else ""


def summarise(args, runs: list[dict], pretrained: dict) -> str:
    header = ["task", "obs", "dataset success", "pre-trained success",
              *[f"{a.upper()} success @ {last_eval_steps(runs) / 1000:.0f}k" for a in args.algos],
              "seeds", *[h + timed_note(args) for h in ("wall s / run", "sampling env steps/s", "learner s / iter")]]
    rows = []
    for (task, obs), pre in pretrained.items():
        mine = [r for r in runs if r["task"] == task and r["obs"] == obs]
        cells = []
        for algo in args.algos:
            ar = [r for r in mine if r["algo"] == algo]
            cells.append(fmt([last_eval(r) for r in ar]) if ar else "-")
        seeds = sorted({r["seed"] for r in mine})
        timed = [r for r in mine if args.timing_seeds is None or r["seed"] in args.timing_seeds]
        wall = np.mean([r["curve"]["wall_s"][-1] for r in timed]) if timed else float("nan")
        learner = np.nanmean([v for r in timed for v in r["curve"]["learner_s"]]) if timed else float("nan")
        rows.append([TASKS[task], obs, f"{pre['dataset_success']:.2f} ({pre['dataset_episodes']} ep.)",
                     f"{pre['eval']['success_rate']:.2f}", *cells, len(seeds), f"{wall:.0f}",
                     f"{sampling_rate(timed):.0f}" if timed else "-", f"{learner:.2f}"])
    return markdown_table(header, rows)


def aggregate_section(args, runs: list[dict], pretrained: dict) -> str:
    """rliable's IQM / probability of improvement over the test tasks x seeds (``--dev-task`` left
    out: the defaults were chosen on it), per observation kind; the pre-trained policy as the floor."""
    from ncdpo_rllib.experiment.aggregate import aggregate_markdown, aggregate_scores, plot_aggregate, score_matrix

    parts = []
    for obs in args.obs:
        tasks = [t for (t, o) in pretrained if o == obs and t != args.dev_task]
        scores = {"pre-trained": {t: [pretrained[(t, obs)]["eval"]["success_rate"]] for t in tasks}}
        for algo in args.algos:
            scores[algo] = {t: [last_eval(r) for r in runs if (r["task"], r["obs"], r["algo"]) == (t, obs, algo)]
                            for t in tasks}
        if not tasks or any(not v for algo in args.algos for v in scores[algo].values()):
            continue
        matrices = {name: score_matrix(by_task)[0] for name, by_task in scores.items()}
        agg = aggregate_scores(matrices)
        image = IMAGES / f"{FAMILY}_aggregate_{obs}.png"
        plot_aggregate(agg, "final success rate", image)
        one_seed = " With one run per task the stratified bootstrap has nothing to resample: the intervals are points." \
            if all(m.shape[0] == 1 for m in matrices.values()) else ""
        parts.append(f"**Aggregate, {obs}** (test tasks: {', '.join(TASKS[t] for t in tasks)}; final deterministic "
                     f"success rate; pre-trained: one behaviour-cloning run per task; bands in the plot: min..max "
                     f"over seeds.{one_seed})\n\n"
                     f"{aggregate_markdown(agg, 'final success')}\n\n"
                     f"![aggregate]({image.relative_to(ROOT / 'docs')})\n")
    return "\n".join(parts)


def plot(args, runs: list[dict], pretrained: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(pretrained)
    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 6.8), squeeze=False)
    for col, (task, obs) in enumerate(keys):
        for algo in args.algos:
            ar = [r for r in runs if r["task"] == task and r["obs"] == obs and r["algo"] == algo]
            if not ar:
                continue
            plot_runs((axes[0][col], axes[1][col]), ar, "eval_success", f"{algo} ({len(ar)} seeds)",
                      start=pretrained[(task, obs)]["eval"]["success_rate"])
        for row, xlabel in enumerate(("env steps", "wall-clock s (mean over seeds)")):
            ax = axes[row][col]
            ax.set_title(f"{TASKS[task]} ({obs})", fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
    for row in range(2):
        axes[row][0].set_ylabel("eval success (20 ep.)")
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, args.section)


def main() -> None:
    global FAMILY, TASKS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="metaworld",
                   help="the task family: configs/<family>_<task>[_pixels].yaml")
    p.add_argument("--tasks", nargs="+", choices=sorted(t for f in FAMILIES.values() for t in f[0]),
                   help="tasks of the family (default: all of them)")
    p.add_argument("--obs", nargs="+", choices=["state", "pixels"], default=["state", "pixels"])
    p.add_argument("--algos", nargs="+", choices=["ncdpo", "dppo"], default=["ncdpo", "dppo"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100_000, help="env-step budget of every fine-tuning run")
    p.add_argument("--recipe", action="append", default=[], metavar="ALGO=PATH",
                   help="the recipe composed over each task file for ALGO (default: " +
                        ", ".join(f"{a}={v.relative_to(ROOT)}" for a, v in RECIPES.items()) + ")")
    p.add_argument("--set", action="append", default=[], help="extra override for every fine-tuning run")
    p.add_argument("--fresh", action="store_true", help="discard saved run results")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the section from the saved runs (a missing run is left out and said)")
    p.add_argument("--dev-task", help="the task the defaults were tuned on: left out of the aggregate "
                   "(default: the family's, Meta-World's button_press)")
    p.add_argument("--section", help="docs/benchmarks.md section to (re)write (default: the family's)")
    p.add_argument("--results", type=Path, help="run results JSON, resumable (default: the family's, in "
                   "benchmarks/results/)")
    p.add_argument("--timing-seeds", type=int, nargs="+", help="seeds whose runs the time columns average "
                   "(default: all; leave out runs that shared the CPU with other work)")
    args = p.parse_args()
    FAMILY = args.family
    TASKS, title, results, section, dev_task = FAMILIES[FAMILY]
    args.tasks = args.tasks or list(TASKS)
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown:
        p.error(f"--tasks {' '.join(unknown)}: not {title} tasks; choose from {', '.join(TASKS)}")
    args.results = args.results or ROOT / "benchmarks" / "results" / results
    args.section = args.section or section
    args.dev_task = args.dev_task or dev_task
    args.recipes = dict(RECIPES)
    for item in args.recipe:
        algo, _, path = item.partition("=")
        args.recipes[algo] = Path(path).resolve()
    recipe_text = {a: args.recipes[a].read_text() for a in args.algos}

    pretrained = {(t, o): ensure_pretrained(t, o) for t in args.tasks for o in args.obs}
    for key, pre in pretrained.items():
        print(f"[bench] pre-trained {key}: {pre['eval']} (dataset success {pre['dataset_success']:.2f})", flush=True)
    cells = ((f"{task} {obs} {algo} seed {seed} ({args.steps:,} env steps)",
              {"task": task, "obs": obs, "algo": algo, "seed": seed, "steps": args.steps, "set": args.set,
               "recipe": recipe_text[algo]},
              functools.partial(run_one, args, task, obs, algo, seed, pretrained[(task, obs)]))
             for seed in args.seeds for task, obs in pretrained for algo in args.algos)
    runs = run_cells(args.results, cells, fresh=args.fresh, report_only=args.report_only)
    table = summarise(args, runs, pretrained)
    print(table)
    image = plot(args, runs, pretrained)
    agg = aggregate_section(args, runs, pretrained)
    print(agg)
    recipes = ", ".join(f"{a}: `{args.recipes[a].relative_to(ROOT)}`" for a in args.algos)
    write_section(args.section, f"{title} from {' and '.join(args.obs)}: NCDPO vs DPPO fine-tuning (recipes)",
                  f"Recipes over each task file: {recipes}.\n\n{table}\n\n{agg}\n\n"
                  f"![success vs env steps and wall-clock]({image.relative_to(ROOT / 'docs')})\n")


if __name__ == "__main__":
    main()
