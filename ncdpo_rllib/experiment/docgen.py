"""Generate docs/configuration.md from the config dataclasses (the single typed source).

    python -m ncdpo_rllib.experiment.docgen > docs/configuration.md

A test checks that the committed file matches, so the reference cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect

from ncdpo_rllib.diffusion import config as diffusion_config
from ncdpo_rllib.tasks import config as task_config

from . import config as experiment_config

SECTIONS = [
    ("(top level)", experiment_config, "ExperimentConfig"),
    ("env", task_config, "EnvConfig"),
    ("encoder", task_config, "EncoderConfig"),
    ("multi_agent", task_config, "MultiAgentConfig"),
    ("stop", experiment_config, "StopConfig"),
    ("diffusion", diffusion_config, "DiffusionConfig"),
    ("ppo", experiment_config, "PPOSection"),
    ("appo", experiment_config, "APPOSection"),
    ("resources", experiment_config, "ResourcesConfig"),
    ("tracking", experiment_config, "TrackingConfig"),
    ("checkpoint", experiment_config, "CheckpointConfig"),
    ("eval", experiment_config, "EvalConfig"),
    ("pretrain", experiment_config, "PretrainConfig"),
    ("collect", experiment_config, "CollectConfig"),
]

NESTED = {"env", "encoder", "multi_agent", "stop", "diffusion", "ppo", "appo", "resources", "tracking", "checkpoint", "eval", "pretrain", "collect"}

METRICS = """\
## Metrics

Logged to MLflow once per iteration with `step` = env steps so far:

| name | meaning |
|---|---|
| `return_mean`, `return_min`, `return_max` | episode return over the episodes that ended in this iteration |
| `episode_len_mean` | their mean length |
| `return_mean_smoothed` | RLlib's `episode_return_mean` (smoothed over the last 100 episodes) |
| `episodes` | episodes that ended in this iteration |
| `env_steps`, `iteration`, `wall_s` | totals so far (`wall_s`: training seconds, for wall-clock curves) |
| `time_iter_s`, `env_steps_per_s` | this iteration's duration and throughput |
| `time_sampling_s`, `time_learner_s` | of which: collecting the batch (env runners), and the learner update (all epochs and minibatches, GAE included) |
| `learner/<module>/policy_loss`, `vf_loss`, `entropy` | loss terms (mean over minibatches) |
| `learner/<module>/ratio_mean`, `ratio_max` | PPO ratio on unmasked rows (mean, max over the iteration) |
| `learner/<module>/clip_fraction`, `approx_kl` | share of rows with \\|ratio-1\\| > clip; Schulman's k3 KL estimate |
| `learner/<module>/kl_stop_fraction` | share of minibatches skipped by the target-KL early stop |
| `learner/<module>/final_std` | final-step std (normalised action units) |
| `learner/<module>/vf_explained_var` | explained variance of the critic |
| `learner/<module>/grad_norm_actor`, `grad_norm_critic` | global gradient norms before clipping |
| `learner/<module>/grad_norm_step_first`, `_mid`, `_last` | norm of d(loss)/d(output of the first, middle, last denoising step): does the gradient survive K steps? |
| `learner/<module>/nonfinite_updates_skipped` | optimizer steps skipped for NaN/inf gradients |
| `learner/<module>/actor_frozen` | 1 while the critic warm-up keeps the actor fixed |
| `learner/<module>/kl_to_reference` | KL to the reference (pre-trained) policy, when `ppo.kl_to_reference` > 0 |
| `learner/<module>/diff_num_grad_updates_vs_sampler_policy` | staleness (RLlib's own metric): learner updates since the weights that sampled the batch, counting the update in progress (1 = sampled with the newest weights; the synchronous path shows 1) |
| `learner/<module>/learner_queue_size` | ncdpo-appo: entries waiting in the learner's queue when a batch is trained (APPO's circular buffer: a batch counts once per remaining reuse) |
| `learner/<module>/trained_rows_total` | ncdpo-appo: rows (x epochs, x reuse) the learner trained since its process started |
| `env_steps_dropped` | ncdpo-appo, appo with remote learners: env steps sampled this iteration that RLlib dropped because every learner had `resources.learner_requests_in_flight` batches outstanding |
| `learner/<module>/mean_IS`, `var_IS` | ncdpo-appo, appo: APPO's importance weights pi_target / mu (behaviour), mean and variance |
| `agent_return_mean/<agent>`, `policy_return_mean/<policy>` | multi-agent: RLlib's per-agent and per-policy episode returns (smoothed over the last 100 episodes; `return_mean` is the team return, summed over agents, of this iteration's episodes) |
| `success_rate`, `eval_success_rate` | Meta-World: share of this iteration's (evaluation) episodes in which `info["success"]` was set at any step |
| `eval_return_mean` | mean return of the evaluation episodes (deterministic policy), on the iterations that ran an evaluation (every `eval.every`) |

With `env.action_chunk` > 1, `env_steps` counts the base env's steps (a chunk cut by the
episode's end counts the steps it executed), not policy steps; `episode_len_mean` and
`ppo.train_batch_size` count policy steps (chunks).

`ncdpo pretrain` logs `pretrain/train_loss`, `pretrain/val_loss` (EMA weights, fixed noise),
`pretrain/lr` and `wall_s` with `step` = gradient steps, and `pretrain/eval_return_mean`,
`pretrain/eval_return_std` at the end.

`ncdpo evaluate` logs its own run (tag `stage: evaluate`, the checkpoint's config as params,
`source_run_id` = the training run) with `eval/return_mean`, `eval/return_std`,
`eval/return_min`, `eval/return_max`, `eval/episodes` (multi-agent: the team return, and
`eval/agent_return_mean/<agent>`) at `step` = the checkpoint's env steps.
`ncdpo collect` logs a run tagged `stage: collect` (the expert's training run is its own
`stage: train` run) with `collect/expert_return`, `collect/medium_return` and, per dataset
level, `dataset/<level>/episodes`, `steps`, `return_mean`, `return_std`; the summary is its
`collect.json` artifact.

The MLP baselines log RLlib's PPO (APPO) learner keys under `learner/<module>/` instead.
On the asynchronous path (ncdpo-appo, appo) the learner trains in its own thread while the
runners sample: `time_learner_s` is not measured there. An iteration ends once
`ppo.train_batch_size` env steps were sampled, as on the synchronous path.
"""


def _default(f: dataclasses.Field) -> str:
    """A field's default as the YAML a user would write ((section) for a nested one)."""
    if f.default_factory is not dataclasses.MISSING:
        if dataclasses.is_dataclass(f.default_factory):
            return "(section)"
        value = f.default_factory()
    elif f.default is dataclasses.MISSING:
        return ""
    else:
        value = f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value
    return repr(list(value) if isinstance(value, tuple) else value)


def _fields(module, class_name: str) -> list[tuple[str, str, str, str]]:
    """(name, type, default, doc) for each field: the type and doc read from the source (the
    docstring under each field), the default from the dataclass itself (it may come from
    ``ncdpo_rllib.rl.defaults``)."""
    tree = ast.parse(inspect.getsource(module))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    defaults = {f.name: _default(f) for f in dataclasses.fields(getattr(module, class_name))}
    out = []
    body = cls.body
    for i, node in enumerate(body):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        doc = ""
        nxt = body[i + 1] if i + 1 < len(body) else None
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            doc = " ".join(nxt.value.value.split())
        out.append((node.target.id, ast.unparse(node.annotation), defaults[node.target.id], doc))
    return out


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `ncdpo_rllib/experiment/config.py`, `ncdpo_rllib/tasks/config.py` and",
        "`ncdpo_rllib/diffusion/config.py` by",
        "`python -m ncdpo_rllib.experiment.docgen > docs/configuration.md` (a test keeps it current).",
        "",
        "An experiment is one YAML file; every key is optional. `ncdpo train FILE --set a.b=value`",
        "overrides any key. Unknown keys and wrong types are one-line errors.",
        "",
        "Files compose: `include: other.yaml` (or a list; paths relative to the including file) merges",
        "the included files in order and this file's keys on top, section by section; `ncdpo train A.yaml",
        "B.yaml` does the same with the files given (a task file, then a recipe from `configs/recipes/`).",
        "",
    ]
    for section, module, class_name in SECTIONS:
        lines += [f"## `{section}`" if section in NESTED else f"## {section}", ""]
        doc = inspect.getdoc(getattr(module, class_name)) or ""
        if doc and not doc.startswith(f"{class_name}("):  # skip dataclass's generated signature
            lines += [doc.split("\n\n")[0].replace("\n", " "), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, tp, default, fdoc in _fields(module, class_name):
            if section not in NESTED and name in NESTED:
                fdoc = fdoc or f"see [`{name}`](#{name})"
            lines.append(f"| `{name}` | `{tp}` | `{default}` | {fdoc} |")
        lines.append("")
    lines.append(METRICS)
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
