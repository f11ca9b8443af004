"""Send ``ncdpo train CONFIG`` to a Ray cluster with ``ray job submit``; follow, query, stop it.

Run through ``cluster/submit.sh`` (it picks the project's Python). Needs only ``ray[default]``.

    cluster/submit.sh CONFIG [--set KEY=VALUE ...] [--no-wait] [...]   submit (waits and streams logs by default)
    cluster/submit.sh logs ID [--follow]                                  a job's output
    cluster/submit.sh status ID                                           one line: ID: STATUS
    cluster/submit.sh stop ID                                             stop a job
    cluster/submit.sh list                                                all jobs of the cluster

The job runs in a temporary copy of the working directory on the cluster, so the helper makes
every output path absolute: ``--set checkpoint.dir=<runs dir>`` and ``MLFLOW_TRACKING_URI``
(a sqlite file given by a relative path becomes absolute). The cluster is ``--address``, else
``$RAY_API_SERVER_ADDRESS`` / ``$RAY_ADDRESS``, else the one ``cluster/local.sh start`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

# Local stores and results never go to the cluster. Anchored at the working dir's root ("/data"),
# because an unanchored "data" would also drop the ncdpo_rllib/data package from the upload.
EXCLUDES = [
    ".git", ".venv", "venv", "__pycache__", "*.egg-info", ".pytest_cache", "MUJOCO_LOG.TXT",
    "/runs", "/mlruns", "/mlartifacts", "/mlflow.db", "/data", "/build", "/dist",
]
SUBCOMMANDS = ("submit", "status", "logs", "stop", "list")


class UsageError(Exception):
    pass


def state_dir() -> Path:
    return Path(os.environ.get("NCDPO_CLUSTER_DIR") or f"/tmp/ncdpo-cluster-{os.getuid()}")


def resolve_address(explicit: Optional[str]) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS (http), else the local cluster.

    Sets the process environment so that both the ray CLI (which lets these variables win over
    --address) and the SDK reach the same cluster, with the local cluster's token when it is
    that one and no auth mode was chosen by the user.
    """
    local_url_file = state_dir() / "dashboard_url"
    local_url = local_url_file.read_text().strip() if local_url_file.is_file() else None
    address = (
        explicit
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or (os.environ.get("RAY_ADDRESS") if "://" in os.environ.get("RAY_ADDRESS", "") else None)
        or local_url
    )
    if not address:
        raise UsageError(
            f"no cluster: start one with `cluster/local.sh start` (state {state_dir()}), "
            "or pass --address http://HEAD:8265"
        )
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    os.environ.pop("RAY_ADDRESS", None)
    if address == local_url and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(state_dir() / "auth_token")
        os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the path
    return address


def ray_cli() -> str:
    sibling = Path(sys.executable).parent / "ray"
    found = str(sibling) if sibling.exists() else shutil.which("ray")
    if not found:
        raise UsageError("no 'ray' command (install ray[default])")
    return found


def absolute_tracking_uri(uri: str, base: Path) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db; other URIs unchanged."""
    m = re.match(r"^sqlite:///(?!/)(.+)$", uri)
    if m:
        return f"sqlite:///{os.path.abspath(base / m.group(1))}"
    return uri


def absolute_inputs(config: Optional[Path], sets: list[str], base: Path) -> list[str]:
    """--set overrides that make the config's relative paths absolute, as `ncdpo train` run in
    `base` would read them: init_from (a pre-trained checkpoint), a sqlite tracking.uri, and a
    checkpoint.dir given with --set."""
    import yaml

    try:
        data = (yaml.safe_load(config.read_text()) or {}) if config else {}
    except yaml.YAMLError:
        data = {}  # `ncdpo train` reports it, with the line
    data = data if isinstance(data, dict) else {}
    given = dict(kv.split("=", 1) for kv in sets if "=" in kv)
    out = []
    ckpt = given.get("checkpoint.dir")
    if ckpt and not os.path.isabs(ckpt):
        out.append(f"checkpoint.dir={os.path.abspath(base / ckpt)}")
    init = given.get("init_from", data.get("init_from"))
    if init and str(init) not in ("null", "~") and not os.path.isabs(str(init)):
        out.append(f"init_from={os.path.abspath(base / str(init))}")
    uri = given.get("tracking.uri", (data.get("tracking") or {}).get("uri"))
    if uri and absolute_tracking_uri(str(uri), base) != str(uri):
        out.append(f"tracking.uri={absolute_tracking_uri(str(uri), base)}")
    return out


def submission_id_for(config: Optional[str]) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", Path(config).stem.lower()).strip("-") if config else "resume"
    return f"ncdpo-{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def build_submit(args: argparse.Namespace) -> tuple[list[str], str]:
    """The `ray job submit` argv and its submission id (no cluster needed: --dry-run prints it)."""
    cwd = Path.cwd()
    working_dir = Path(args.working_dir).resolve()
    if not working_dir.is_dir():
        raise UsageError(f"working dir {working_dir} is not a directory")
    entry = ["ncdpo", "train"]
    config = None
    if args.config:
        config = Path(args.config).resolve()
        if not config.is_file():
            raise UsageError(f"config file {args.config!r} not found")
        try:
            rel = config.relative_to(working_dir)
        except ValueError:
            raise UsageError(
                f"config {config} is outside the working dir {working_dir}: the job only sees the "
                "uploaded working dir (copy the file into it, or pass --working-dir)"
            ) from None
        entry.append(str(rel))
    elif not args.resume:
        raise UsageError("give a CONFIG file (inside the working dir), or --resume RUN_DIR")
    # abspath, not resolve(): these name paths on the cluster, where local symlinks mean nothing.
    runs_dir = os.path.abspath(args.runs_dir or os.environ.get("NCDPO_RUNS_DIR") or working_dir / "runs")
    entry += ["--set", f"checkpoint.dir={runs_dir}"]
    for kv in args.set + absolute_inputs(config, args.set, cwd):
        entry += ["--set", kv]
    if args.resume:
        entry += ["--resume", os.path.abspath(args.resume)]
    if args.json:
        entry.append("--json")
    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{working_dir / 'mlflow.db'}"
    runtime_env = {
        "excludes": EXCLUDES + list(args.exclude),
        "env_vars": {"MLFLOW_TRACKING_URI": absolute_tracking_uri(uri, cwd)},
    }
    sid = args.submission_id or submission_id_for(args.config)
    argv = [
        ray_cli(), "job", "submit",
        "--address", args.address_resolved,
        "--submission-id", sid,
        "--working-dir", str(working_dir),
        "--runtime-env-json", json.dumps(runtime_env),
    ]
    if args.no_wait:
        argv.append("--no-wait")
    if args.entrypoint_num_cpus is not None:
        argv += ["--entrypoint-num-cpus", str(args.entrypoint_num_cpus)]
    if args.entrypoint_num_gpus is not None:
        argv += ["--entrypoint-num-gpus", str(args.entrypoint_num_gpus)]
    return argv + ["--", *entry], sid


def job_client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        args.address_resolved = resolve_address(args.address)
    except UsageError:
        if not args.dry_run:
            raise
        args.address_resolved = "http://HEAD:8265"
    argv, sid = build_submit(args)
    print("+ " + " ".join(_quote(a) for a in argv), file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    entry = argv[argv.index("--") + 1:]
    runs = [a.split("=", 1)[1] for a in entry if a.startswith("checkpoint.dir=")][-1]  # the last --set wins
    uri = json.loads(argv[argv.index("--runtime-env-json") + 1])["env_vars"]["MLFLOW_TRACKING_URI"]
    print(f"submission id: {sid}  (checkpoints: {runs}, MLflow: {uri}; paths as seen by the head)",
          file=sys.stderr, flush=True)
    try:
        rc = subprocess.call(argv)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. Stop it with: cluster/submit.sh stop {sid}", file=sys.stderr)
        return 130
    if args.no_wait:
        if rc == 0:
            print(sid, flush=True)  # last stdout line: the id, for scripts
        return rc
    try:
        status = _name(job_client(args.address_resolved).get_job_status(sid))
    except Exception as e:  # the submission itself failed (bad address, auth, ...)
        print(f"cluster/submit.sh: no status for {sid}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return rc or 1
    print(f"{sid}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def cmd_status(args: argparse.Namespace) -> int:
    info = job_client(resolve_address(args.address)).get_job_info(args.job_id)
    status = _name(info.status)
    print(f"{args.job_id}: {status}" + (f" ({info.message})" if info.message else ""), flush=True)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    address = resolve_address(args.address)
    argv = [ray_cli(), "job", "logs", "--address", address, args.job_id] + (["--follow"] if args.follow else [])
    try:
        return subprocess.call(argv)
    except KeyboardInterrupt:
        return 130


def cmd_stop(args: argparse.Namespace) -> int:
    address = resolve_address(args.address)
    return subprocess.call([ray_cli(), "job", "stop", "--address", address, args.job_id])


def cmd_list(args: argparse.Namespace) -> int:
    jobs = job_client(resolve_address(args.address)).list_jobs()
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        status = _name(job.status)
        print(f"{job.submission_id or job.job_id}\t{status}\t{job.entrypoint}", flush=True)
    return 0


def _name(status) -> str:
    return str(getattr(status, "value", status)).split(".")[-1]


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cluster/submit.sh",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    address_help = "job server URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, else cluster/local.sh's)"

    s = sub.add_parser("submit", help="submit `ncdpo train CONFIG` (the default subcommand)")
    s.add_argument("config", nargs="?", help="experiment YAML inside the working dir")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to ncdpo train")
    s.add_argument("--resume", metavar="RUN_DIR", help="passed to ncdpo train (made absolute)")
    s.add_argument("--json", action="store_true", help="passed to ncdpo train")
    s.add_argument("--no-wait", action="store_true", help="return after submitting; print the id")
    s.add_argument("--submission-id", help="job id (default ncdpo-<config>-<time>-<rand>)")
    s.add_argument("--working-dir", default=".", help="uploaded to the cluster (default: .)")
    s.add_argument("--runs-dir", help="absolute checkpoint.dir for the job (default $NCDPO_RUNS_DIR, else <working dir>/runs)")
    s.add_argument("--mlflow-uri", help="MLFLOW_TRACKING_URI for the job (default $MLFLOW_TRACKING_URI, else sqlite:///<working dir>/mlflow.db)")
    s.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="another upload exclude")
    s.add_argument("--entrypoint-num-cpus", type=float)
    s.add_argument("--entrypoint-num-gpus", type=float)
    s.add_argument("--dry-run", action="store_true", help="print the `ray job submit` command only")
    s.add_argument("--address", help=address_help)
    s.set_defaults(func=cmd_submit)

    for name, func, helptext in (
        ("status", cmd_status, "print ID: STATUS"),
        ("logs", cmd_logs, "print a job's output"),
        ("stop", cmd_stop, "stop a job"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("job_id")
        p.add_argument("--address", help=address_help)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        p.set_defaults(func=func)
    p = sub.add_parser("list", help="all jobs: id, status, entrypoint")
    p.add_argument("--address", help=address_help)
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `submit` is the default: `cluster/submit.sh CONFIG ...`
    if not argv or argv[0] not in SUBCOMMANDS + ("-h", "--help"):
        argv = ["submit"] + argv
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"cluster/submit.sh: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
