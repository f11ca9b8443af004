"""``ncdpo`` command line: thin verbs that parse arguments and call ``ncdpo_rllib.experiment``.

User errors (bad config, missing checkpoint, unknown env) print one line to stderr and
exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shlex
import sys
import threading
import warnings


def _quiet() -> None:
    """Keep RLlib/Ray/gymnasium chatter off the terminal; our progress goes to stderr."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    import logging

    # ray.rllib resets its own logger's level when imported; its deprecation notes (e.g. the
    # RLModuleConfig one every module construction logs) have a logger of their own.
    for name in ("ray", "ray.rllib", "ray._common.deprecation", "ray.tune", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # An EnvRunner lost (its process or node died) is logged there as three ERROR lines with an empty
    # traceback ("NoneType: None"); train's own lines say it instead (how many are healthy, the restart).
    logging.getLogger("ray.rllib.utils.actor_manager").setLevel(logging.CRITICAL)


NATIVE_NOISE = (
    # Ray's C++ core worker, for every EnvRunner actor RLlib creates with restarts enabled (its
    # config travels through the object store); harmless here, and it reads like an error.
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"),
)


def _filter_native_stderr() -> None:
    """Drop ``NATIVE_NOISE`` lines from file descriptor 2, where Ray's C++ code writes directly
    (Python's logging never sees them); everything else passes through unchanged, line by line.
    ``--verbose`` skips this."""
    read_end, write_end = os.pipe()
    terminal = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not any(p.search(line) for p in NATIVE_NOISE))
            if kept:
                os.write(terminal, kept)
        if pending:
            os.write(terminal, pending)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(terminal, 2)  # this process's stderr is the terminal again; the pipe drains
        thread.join(timeout=1.0)

    atexit.register(restore)


def _report(args: argparse.Namespace, message: str, summary: dict) -> int:
    """Every command's ending: the human line(s) on stderr, the JSON summary on stdout with --json."""
    print(message, file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


def _experiment(args: argparse.Namespace, from_run):
    """The experiment of a resumable command: its CONFIG files with --set, or with --resume and no
    CONFIG, the run's own config (``from_run(run_dir, sets)``) with --set."""
    from ncdpo_rllib.experiment.config import load_config

    if not args.config and args.resume is None:
        raise_user(f"{args.command}: give a CONFIG file, or --resume RUN_DIR")
    return load_config(args.config, args.set) if args.config else from_run(args.resume, args.set)


def _run_config(run: str, sets: list[str]):
    """A training run's own config (its newest intact checkpoint's), with --set on top."""
    from ncdpo_rllib.experiment.checkpoints import load_checkpoint_meta

    return load_checkpoint_meta(run, sets)[1]


def _cmd_train(args: argparse.Namespace) -> int:
    from ncdpo_rllib.experiment.train import train

    summary = train(_experiment(args, _run_config), resume=args.resume)
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
    return _report(args, line, summary)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ncdpo_rllib.experiment.evaluate import evaluate

    summary = evaluate(args.checkpoint, episodes=args.episodes, seed=args.seed, track=not args.no_track,
                       video=args.video, video_dir=args.video_dir, explore=args.explore)
    return _report(
        args,
        f"{summary['env']}: return {summary['return_mean']:.2f} +- {summary['return_std']:.2f} "
        + (f"success rate {summary['success_rate']:.2f} " if "success_rate" in summary else "")
        + f"over {summary['episodes']} episodes of the {'stochastic' if summary['explore'] else 'deterministic'} "
        f"policy (checkpoint {summary['checkpoint']})"
        + (f"\n  videos: {', '.join(summary['videos'])}" if summary.get("videos") else ""),
        summary,
    )


def _cmd_export(args: argparse.Namespace) -> int:
    from ncdpo_rllib.experiment.export import export

    summary = export(args.checkpoint, args.format, args.out)
    return _report(args, f"exported {summary['env']} ({summary['algorithm']}) to {summary['file']} "
                         f"({summary['format']}, {summary['bytes'] / 1e6:.2f} MB); run it with "
                         f"ncdpo_rllib.load_policy({summary['file']!r})", summary)


def _cmd_replay(args: argparse.Namespace) -> int:
    from ncdpo_rllib.experiment.tracking import replay

    summary = replay(args.file, args.tracking_uri)
    return _report(args, f"logged {summary['metrics']} metric values and {summary['artifacts']} artifact(s) to MLflow "
                         f"run {summary['run_id']} at {summary['mlflow_uri']}, status {summary['status']}", summary)


def _cmd_mlflow_auth(args: argparse.Namespace) -> int:
    from ncdpo_rllib.experiment.tracking import server_auth

    s = server_auth(args.dir, args.credentials)
    return _report(args, f"MLflow basic-auth credentials (user {s['username']}, files mode 600):\n"
                         f"  server:  set -a; . {s['server_env']}; set +a; mlflow server --app-name basic-auth ...\n"
                         f"  clients: {s['credentials']} (MLflow reads ~/.mlflow/credentials; or set "
                         "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from it)", s)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from ncdpo_rllib.experiment.pretrain import pretrain, resume_config

    summary = pretrain(_experiment(args, resume_config), resume=args.resume)
    return _report(
        args,
        f"done: val loss {summary['val_loss_first']:.4f} -> {summary['val_loss_last']:.4f}"
        + (f", pre-trained return {summary['eval']['return_mean']:.2f}" if summary["eval"] else "")
        + f"\n  checkpoint: {summary['checkpoint']}  (fine-tune with: --set init_from={summary['checkpoint']})",
        summary,
    )


def _cmd_collect(args: argparse.Namespace) -> int:
    from ncdpo_rllib.experiment.collect import collect

    summary = collect(_experiment(args, _run_config), resume=args.resume)
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


def _cmd_dataset(args: argparse.Namespace) -> int:
    from ncdpo_rllib.data import describe, import_dataset, import_robomimic, load_dataset
    from ncdpo_rllib.errors import UserError

    if args.action == "import" and args.format == "robomimic":
        from ncdpo_rllib.tasks.robosuite_tasks import state_keys

        path = import_robomimic(args.src, args.dest, state_keys(args.obs_keys), filter_key=args.filter,
                                env_id=args.env_id, overwrite=args.overwrite)
        print(describe(load_dataset(path)), file=sys.stderr, flush=True)
    elif args.action == "import":
        if not args.env_id or args.obs_keys or args.filter:
            raise UserError("dataset import of a D4RL-layout file: give --env-id (the Gymnasium env id); --obs-keys "
                            "and --filter are for --format robomimic")
        path = import_dataset(args.src, args.dest, env_id=args.env_id, overwrite=args.overwrite)
        print(describe(load_dataset(path)), file=sys.stderr, flush=True)
    else:
        print(describe(load_dataset(args.path)), flush=True)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import shlex

    from ncdpo_rllib.experiment.compare import DEFAULT_GROUP_BY, compare

    result = compare(
        args.experiment, args.out, filter_string=args.filter, run_ids=args.runs or (),
        group_by=args.group_by or DEFAULT_GROUP_BY, metric=args.metric, threshold=args.threshold,
        tracking_uri=args.tracking_uri, command="ncdpo " + shlex.join(sys.argv[1:]),
        aggregate_over=args.aggregate, task_key=args.task_key, score=args.score,
        score_ranges=_score_ranges(args.score_range),
    )
    for note in result["notes"]:
        print(f"  note: {note}", file=sys.stderr)
    print(
        f"compared {sum(map(len, result['groups'].values()))} runs in {len(result['groups'])} groups\n"
        f"  report: {result['files']['report']}\n"
        f"  MLflow comparison run: {result['mlflow_run_id']} ({result['mlflow_uri']})",
        file=sys.stderr, flush=True,
    )
    if result["aggregate"]:
        print(open(result["files"]["aggregate_md"]).read(), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "bands"}), flush=True)
    return 0


def _score_ranges(items: list[str]) -> dict[str, tuple[float, float]]:
    """``TASK=LOW:HIGH`` strings -> {task: (low, high)}."""
    out = {}
    for item in items or []:
        task, _, rng = item.partition("=")
        try:
            low, high = (float(v) for v in rng.split(":"))
        except ValueError:
            raise_user(f"--score-range {item!r}: expected TASK=LOW:HIGH, e.g. Hopper-v5=0:3080")
        if high <= low:
            raise_user(f"--score-range {item!r}: HIGH must be above LOW")
        out[task] = (low, high)
    return out


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ncdpo_rllib.experiment.sweep import sweep

    summary = sweep(args.config, args.grid, args.seeds, args.set, name=args.name, resume=args.resume,
                    compare_out=args.compare_out, command=shlex.join(["ncdpo", *sys.argv[1:]]))
    return _report(
        args,
        f"sweep {summary['name']}: {summary['points']} points ({summary['ran']} run now), "
        f"{len(summary['children'])} child runs under MLflow parent run {summary['parent_run_id']} "
        f"({summary['mlflow_uri']})\n  comparison: {summary['comparison'] or 'none (no finished runs)'}",
        summary,
    )


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def raise_user(msg: str) -> None:
    from ncdpo_rllib.errors import UserError

    raise UserError(msg)


def _config_command(sub, name: str, func, help: str, config_help: str,
                    resume_help: str | None = None) -> argparse.ArgumentParser:
    """A subcommand that reads experiment YAML(s): CONFIG..., --set KEY=VALUE, --json; with
    ``resume_help``, also --resume (CONFIG is then optional: the run's own config is used)."""
    parser = sub.add_parser(name, help=help)
    parser.add_argument("config", nargs="*" if resume_help else "+",
                        help=config_help + ("; optional with --resume" if resume_help else ""))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set diffusion.denoising_steps=10 (repeatable)")
    if resume_help:
        parser.add_argument("--resume", metavar="RUN_DIR", help=resume_help)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout")
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ncdpo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("--verbose", action="store_true",
                         help="show Ray's and RLlib's own log output (start-up notes, warnings) as well")
    add_parser = sub.add_parser
    sub.add_parser = lambda name, **kwargs: add_parser(name, parents=[verbose], **kwargs)  # every verb takes --verbose

    _config_command(sub, "train", _cmd_train, "train NCDPO (or the MLP+PPO baseline) from a YAML experiment file",
                    "experiment YAML; several are merged in order, later ones on top (a task file, then a recipe)",
                    "continue from a checkpoint or a run directory (after Ctrl-C, a crash or a lost node)")

    e = sub.add_parser("evaluate", help="mean/std return of a checkpoint on its env (deterministic policy)")
    e.add_argument("checkpoint", help="a checkpoint directory or a run directory")
    e.add_argument("--episodes", type=int, default=10)
    e.add_argument("--seed", type=int, default=12345)
    e.add_argument("--no-track", action="store_true",
                   help="do not log an MLflow run (default: one run tagged stage=evaluate in the checkpoint's store)")
    e.add_argument("--explore", action="store_true",
                   help="evaluate the stochastic policy (what PPO optimises) instead of the deterministic one")
    e.add_argument("--video", type=int, default=0, metavar="N",
                   help="record the first N episodes as MP4 (logged with the evaluation's MLflow run)")
    e.add_argument("--video-dir", metavar="DIR",
                   help="where the videos go (default: <run dir>/videos/evaluate-<checkpoint>-seed<seed>/)")
    e.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout")
    e.set_defaults(func=_cmd_evaluate)

    x = sub.add_parser("export", help="the deterministic policy as one TorchScript or ONNX file (no Ray needed to run it)")
    x.add_argument("checkpoint", help="a checkpoint, a run directory or a pre-trained policy")
    x.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    x.add_argument("--out", required=True, metavar="FILE", help="the file to write (.pt for torchscript, .onnx)")
    x.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout")
    x.set_defaults(func=_cmd_export)

    _config_command(sub, "pretrain", _cmd_pretrain, "behaviour-clone the diffusion policy on a dataset (pretrain: section)",
                    "experiment YAML(s) with pretrain.dataset set (merged in order)",
                    "continue the interrupted pre-training in this run directory (its resume.pt)")
    _config_command(sub, "collect", _cmd_collect, "train an MLP-PPO expert and record expert/medium/... datasets",
                    "experiment YAML(s) (algorithm: ppo, collect: section; merged in order)",
                    "continue the interrupted collection whose expert trains (or trained) in this run directory")

    cp = sub.add_parser("compare", help="group MLflow runs, aggregate seeds, write curves + table + HTML report")
    cp.add_argument("--experiment", metavar="NAME", help="MLflow experiment to select runs from")
    cp.add_argument("--filter", metavar="FILTER", help="MLflow filter string, e.g. \"params.algorithm = 'ncdpo'\"")
    cp.add_argument("--runs", nargs="+", metavar="ID", help="these run ids (within --experiment if given)")
    cp.add_argument("--group-by", nargs="+", metavar="KEY",
                    help="tags or params to group by (tag first, then param; default: algorithm denoising_steps)")
    cp.add_argument("--metric", default="return_mean", help="metric to plot and tabulate (default: return_mean)")
    cp.add_argument("--threshold", type=float, help="report env steps and wall-clock to reach this metric value")
    cp.add_argument("--out", default="comparison", help="output directory (default: ./comparison)")
    cp.add_argument("--aggregate", choices=["iqm"],
                    help="rliable statistics over tasks x runs: IQM and mean with 95%% stratified-bootstrap "
                         "intervals, probability of improvement between groups, performance profiles")
    cp.add_argument("--task-key", metavar="KEY", help="with --aggregate: the tag or param that tells tasks apart (e.g. env)")
    cp.add_argument("--score", choices=["final", "best"], default="final",
                    help="with --aggregate: each run's score, the metric's final or best value (default: final)")
    cp.add_argument("--score-range", action="append", default=[], metavar="TASK=LOW:HIGH",
                    help="with --aggregate: normalise TASK's scores to (score - LOW) / (HIGH - LOW) (repeatable)")
    cp.add_argument("--tracking-uri", metavar="URI",
                    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlflow.db)")
    cp.add_argument("--json", action="store_true", help="print the result as one JSON line on stdout")
    cp.set_defaults(func=_cmd_compare)

    sw = _config_command(sub, "sweep", _cmd_sweep, "a grid (seeds x config keys) of train runs on Ray Tune, one MLflow "
                         "parent run", "experiment YAML(s), merged in order")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a config key and its values (parsed as YAML like --set; repeatable)")
    sw.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="seeds (default: the config's seed)")
    sw.add_argument("--name", help="sweep name: MLflow parent run name and <checkpoint.dir>/<name>/ "
                                   "(default: sweep-<algorithm>-<env>-<time>)")
    sw.add_argument("--resume", action="store_true",
                    help="continue the sweep --name: skip finished points, continue unfinished ones")
    sw.add_argument("--compare-out", metavar="DIR",
                    help="comparison report directory (default: <checkpoint.dir>/<name>/comparison)")

    rp = sub.add_parser("replay", help="log the metrics a run could not (tracking server away at its end) to its MLflow run")
    rp.add_argument("file", help="the unlogged-<run id>.jsonl the run wrote into its run directory")
    rp.add_argument("--tracking-uri", metavar="URI", help="log there instead of the store the run used")
    rp.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout")
    rp.set_defaults(func=_cmd_replay)

    au = sub.add_parser("mlflow-auth", help="credentials for a tracking server only its users can reach "
                                            "(mlflow server --app-name basic-auth)")
    au.add_argument("dir", help="where the server's auth files go (made once, kept on rerun; mode 600)")
    au.add_argument("--credentials", metavar="FILE",
                    help="write the client credentials there instead of DIR/credentials, e.g. ~/.mlflow/credentials")
    au.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout")
    au.set_defaults(func=_cmd_mlflow_auth)

    d = sub.add_parser("dataset", help="inspect or import demonstration datasets")
    dsub = d.add_subparsers(dest="action", required=True)
    di = dsub.add_parser("info", help="summary of a dataset directory")
    di.add_argument("path")
    dm = dsub.add_parser("import", help="import a D4RL-layout .hdf5/.npz file or a robomimic .hdf5 file as a "
                                        "dataset directory")
    dm.add_argument("src", help="d4rl: a file with observations, actions, rewards, terminals, timeouts; "
                                "robomimic: data/demo_<i>/(obs/<key>, actions, rewards, dones)")
    dm.add_argument("dest", help="dataset directory to write")
    dm.add_argument("--format", choices=["d4rl", "robomimic"], default="d4rl")
    dm.add_argument("--env-id", help="d4rl (required): the Gymnasium env id the data comes from; robomimic "
                                     "(optional): check that the file was recorded on this robosuite task")
    dm.add_argument("--obs-keys", nargs="+", metavar="KEY",
                    help="robomimic: observation keys, in order (default robot0_eef_pos robot0_eef_quat "
                         "robot0_gripper_qpos object; one image key such as agentview_image may come last)")
    dm.add_argument("--filter", metavar="MASK", help="robomimic: import the demos of mask/<MASK> only (e.g. train)")
    dm.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=_cmd_dataset)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet()
        _filter_native_stderr()
    from ncdpo_rllib.errors import TrainingInterrupted, UserError

    try:
        return args.func(args)
    except UserError as e:
        print(f"ncdpo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # the first SIGINT/SIGTERM: checkpointed, resumable
        print(f"ncdpo {args.command}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"ncdpo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
