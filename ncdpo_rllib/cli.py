"""``ncdpo`` command line: thin verbs that parse arguments and call ``ncdpo_rllib.experiment``.

User errors (bad config, missing checkpoint, unknown env) print one line to stderr and
exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


def _quiet() -> None:
    """Keep RLlib/Ray/gymnasium chatter off the terminal; our progress goes to stderr."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    import logging

    for name in ("ray", "ray.rllib", "ray.tune", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _cmd_train(args: argparse.Namespace) -> int:
    from ncdpo_rllib.experiment.checkpoints import load_checkpoint_meta
    from ncdpo_rllib.experiment.config import load_config
    from ncdpo_rllib.experiment.train import train

    if args.config is None and args.resume is None:
        raise_user("train: give a CONFIG file, or --resume CHECKPOINT")
    if args.config is not None:
        exp = load_config(args.config, args.set)
    else:  # resume with the checkpoint's own config (plus --set overrides)
        _, exp, _ = load_checkpoint_meta(args.resume, args.set)
    summary = train(exp, resume=args.resume)
    line = (
        f"done: final return {_fmt(summary['final_return'])}, best {_fmt(summary['best_return'])}, "
        f"{summary['env_steps']:,} env steps in {summary['wall_s']:.0f} s\n"
        f"  checkpoint: {summary['checkpoint']}\n"
        + (
            f"  MLflow run: {summary['mlflow_run_id']} ({summary['mlflow_uri']}); "
            f"UI: mlflow ui --backend-store-uri {summary['mlflow_uri']}"
            if summary["mlflow_run_id"]
            else "  MLflow: disabled"
        )
    )
    print(line, file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ncdpo_rllib.experiment.evaluate import evaluate

    summary = evaluate(args.checkpoint, episodes=args.episodes, seed=args.seed)
    print(
        f"{summary['env']}: return {summary['return_mean']:.2f} +- {summary['return_std']:.2f} "
        f"over {summary['episodes']} episodes (checkpoint {summary['checkpoint']})",
        file=sys.stderr,
        flush=True,
    )
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from ncdpo_rllib.experiment.config import load_config
    from ncdpo_rllib.experiment.pretrain import pretrain

    summary = pretrain(load_config(args.config, args.set))
    print(
        f"done: val loss {summary['val_loss_first']:.4f} -> {summary['val_loss_last']:.4f}"
        + (f", pre-trained return {summary['eval']['return_mean']:.2f}" if summary["eval"] else "")
        + f"\n  checkpoint: {summary['checkpoint']}  (fine-tune with: --set init_from={summary['checkpoint']})",
        file=sys.stderr,
        flush=True,
    )
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


def _cmd_collect(args: argparse.Namespace) -> int:
    from ncdpo_rllib.experiment.collect import collect
    from ncdpo_rllib.experiment.config import load_config

    summary = collect(load_config(args.config, args.set))
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


def _cmd_dataset(args: argparse.Namespace) -> int:
    from ncdpo_rllib.data import describe, import_dataset, load_dataset

    if args.action == "import":
        path = import_dataset(args.src, args.dest, env_id=args.env_id, overwrite=args.overwrite)
        print(describe(load_dataset(path)), file=sys.stderr, flush=True)
    else:
        print(describe(load_dataset(args.path)), flush=True)
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def raise_user(msg: str) -> None:
    from ncdpo_rllib.experiment.errors import UserError

    raise UserError(msg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ncdpo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train NCDPO (or the MLP+PPO baseline) from a YAML experiment file")
    t.add_argument("config", nargs="?", help="experiment YAML (optional with --resume)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set diffusion.denoising_steps=10 (repeatable)")
    t.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint or run directory")
    t.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="mean/std return of a checkpoint on its env (deterministic policy)")
    e.add_argument("checkpoint", help="a checkpoint directory or a run directory")
    e.add_argument("--episodes", type=int, default=10)
    e.add_argument("--seed", type=int, default=12345)
    e.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout")
    e.set_defaults(func=_cmd_evaluate)

    pt = sub.add_parser("pretrain", help="behaviour-clone the diffusion policy on a dataset (pretrain: section)")
    pt.add_argument("config", help="experiment YAML with pretrain.dataset set")
    pt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    pt.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout")
    pt.set_defaults(func=_cmd_pretrain)

    c = sub.add_parser("collect", help="train an MLP-PPO expert and record expert/medium/... datasets")
    c.add_argument("config", help="experiment YAML (algorithm: ppo, collect: section)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    c.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout")
    c.set_defaults(func=_cmd_collect)

    d = sub.add_parser("dataset", help="inspect or import demonstration datasets")
    dsub = d.add_subparsers(dest="action", required=True)
    di = dsub.add_parser("info", help="summary of a dataset directory")
    di.add_argument("path")
    dm = dsub.add_parser("import", help="import a D4RL-layout .hdf5/.npz file as a dataset directory")
    dm.add_argument("src", help="file with observations, actions, rewards, terminals, timeouts")
    dm.add_argument("dest", help="dataset directory to write")
    dm.add_argument("--env-id", required=True, help="the Gymnasium env id the data comes from")
    dm.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=_cmd_dataset)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet()
    from ncdpo_rllib.experiment.errors import UserError

    try:
        return args.func(args)
    except UserError as e:
        print(f"ncdpo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ncdpo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
