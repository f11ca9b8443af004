"""Do gradients survive K denoising steps? Read the per-step gradient norms that the
sample-efficiency runs logged to MLflow and tabulate them.

    python benchmarks/grad_flow.py --env Pendulum-v1      # after benchmarks/sample_efficiency.py

For each NCDPO variant: the norm of d(loss)/d(output of the first, middle and last
denoising step), mean over seeds, at a few points of training; 'first/last' is their
ratio (1 = no attenuation through the chain; << 1 = the early steps get little signal).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import markdown_table, write_section  # noqa: E402
from ncdpo_rllib.experiment.tracking import metric_history, mlflow_client, resolve_tracking_uri, search_all_runs  # noqa: E402

KEYS = ("grad_norm_step_first", "grad_norm_step_mid", "grad_norm_step_last")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="Pendulum-v1")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or ./mlflow.db")
    p.add_argument("--points", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0],
                   help="fractions of the run at which to read the norms")
    args = p.parse_args()
    client = mlflow_client(resolve_tracking_uri(args.tracking_uri))
    exp = client.get_experiment_by_name(f"bench-{args.env}")
    if exp is None:
        raise SystemExit(f"no MLflow experiment bench-{args.env}: run benchmarks/sample_efficiency.py first")
    runs = search_all_runs(client, exp.experiment_id, "tags.algorithm = 'ncdpo' and attributes.status = 'FINISHED'")
    # variant -> point -> key -> values over seeds
    table: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for run in runs:
        variant = f"K={run.data.tags['denoising_steps']}"
        for key in KEYS:
            hist = sorted(metric_history(client, run.info.run_id, f"learner/default_policy/{key}"))
            for frac in args.points:
                step, value = hist[min(int(frac * (len(hist) - 1)), len(hist) - 1)]
                table[variant][step if frac == 0 else frac][key].append(value)
    rows = []
    for variant in sorted(table, key=lambda v: int(v.split("=")[1])):
        for point, vals in table[variant].items():
            first, mid, last = (float(np.mean(vals[k])) for k in KEYS)
            label = "first iteration" if isinstance(point, int) else f"{point:.0%} of the run"
            rows.append([variant, label, f"{first:.2e}", f"{mid:.2e}", f"{last:.2e}", f"{first / last:.1e}"])
    table_md = markdown_table(["variant", "when", "first step", "middle step", "last step", "first/last"], rows)
    print(table_md)
    body = (
        f"{args.env}, from the MLflow runs of the sample-efficiency benchmark (mean over seeds). "
        "Norm of the gradient of the PPO loss with respect to the output of each denoising step "
        "(the signal that reaches that step's use of the shared denoiser).\n\n" + table_md
    )
    write_section(f"grad_flow:{args.env}", f"Gradient through the denoising chain: {args.env}", body)


if __name__ == "__main__":
    main()
