"""The CPU image, built for real and trained in: ``make test-images`` (not part of ``make test``).

No container daemon runs on these machines, so the image is built the daemonless way:

1. a Debian bookworm root file system from ``debootstrap`` (python3, venv, CA certificates),
   imported as a base image with ``buildah`` (no registry needed);
2. ``docker/build.sh cpu --base`` that image (``buildah bud``, chroot isolation, vfs storage,
   this machine's pip configuration handed over read-only);
3. inside the image (``buildah run``): ``ncdpo --help``, ``ncdpo train cluster/smoke.yaml`` (2
   iterations on Pendulum-v1, MLflow in a sqlite file in the working directory) and
   ``ncdpo evaluate`` on its checkpoint.

It prints the image size and the build time, and removes its storage whatever happens. Needs
root, ``buildah`` and ``debootstrap`` (the make target installs them with apt when missing) and
a few GB of free disk. The Debian mirror is the one this machine's apt uses (override with
NCDPO_DEBIAN_MIRROR).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.images, pytest.mark.timeout(3600)]


def _mirror() -> str:
    if os.environ.get("NCDPO_DEBIAN_MIRROR"):
        return os.environ["NCDPO_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for src in sources:
        try:
            text = src.read_text()
        except OSError:
            continue
        # deb822 ("URIs: http://.../debian") or one-line ("deb http://.../debian bookworm main")
        for m in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+/debian)/?\s*$|^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s",
                             text, re.M):
            return m.group(1) or m.group(2)
    return "http://deb.debian.org/debian"


def _run(argv, *, timeout, env=None, cwd=REPO) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{argv} exited {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """buildah's storage in tmp (vfs: no overlay needed), removed afterwards whatever happens."""
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run `make test-images` (it installs it with apt)")
    if os.geteuid() != 0:
        pytest.fail("building images with buildah's chroot isolation needs root")
    root = tmp_path_factory.mktemp("buildah")
    opts = ["--root", str(root / "root"), "--runroot", str(root / "run"), "--storage-driver", "vfs"]
    try:
        yield opts
    finally:
        subprocess.run(["buildah", *opts, "rm", "--all"], capture_output=True, timeout=300)
        subprocess.run(["buildah", *opts, "rmi", "--all", "--force"], capture_output=True, timeout=600)
        subprocess.run(["umount", "-R", str(root)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        assert not root.exists(), f"{root} could not be removed"


@pytest.fixture(scope="module")
def base(storage, tmp_path_factory):
    """A Debian bookworm base image from debootstrap, imported without a registry: (name, seconds)."""
    buildah = ["buildah", *storage]
    tmp = tmp_path_factory.mktemp("base")
    t0 = time.monotonic()
    rootfs = tmp / "rootfs"
    _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
          "bookworm", rootfs, _mirror()], timeout=1200)
    shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True)
    base_tar = tmp / "base.tar"
    with tarfile.open(base_tar, "w") as tar:
        tar.add(rootfs, arcname=".")
    shutil.rmtree(rootfs)
    ctr = _run([*buildah, "from", "scratch"], timeout=120).stdout.strip()
    _run([*buildah, "add", ctr, base_tar, "/"], timeout=600)
    _run([*buildah, "config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
          "--cmd", "/bin/bash", ctr], timeout=60)
    name = "localhost/ncdpo-base:bookworm"
    _run([*buildah, "commit", "--rm", "-q", ctr, name], timeout=600)
    base_tar.unlink()
    return name, time.monotonic() - t0


# cuda: PyPI's CUDA build of torch (several GB; no GPU here, so it trains on the CPU inside):
# `make test-images IMAGES="cpu cuda"`.
FLAVOURS = os.environ.get("NCDPO_TEST_IMAGES", "cpu").split()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_image_builds_and_trains(flavour, storage, base):
    buildah = ["buildah", *storage]
    base_name, base_s = base

    # The image on the debootstrapped base, through the project's build script.
    tag = f"localhost/ncdpo-rllib:test-{flavour}"
    env = {**os.environ, "BUILDAH_OPTS": " ".join(storage)}
    t0 = time.monotonic()
    out = _run(["docker/build.sh", flavour, "--base", base_name, "--tag", tag],
               env=env, timeout=3000).stdout
    build_s = time.monotonic() - t0
    m = re.search(r"^image (\S+) id ([0-9a-f]{12,}) size (.+) build_s (\d+)$", out, re.M)
    assert m, out[-2000:]
    size = m.group(3)
    print(f"\nimage {tag}: {size}; debootstrap base {base_s:.0f} s, docker/build.sh {build_s:.0f} s", flush=True)

    # Inside it, as its user (uid 1000) in its working directory.
    ctr = _run([*buildah, "from", tag], timeout=600).stdout.strip()

    def inside(*cmd, timeout) -> str:  # stdout
        return _run([*buildah, "run", "--isolation", "chroot", ctr, "--", *cmd], timeout=timeout).stdout

    assert "usage: ncdpo" in inside("ncdpo", "--help", timeout=120)
    assert inside("id", "-u", timeout=60).split()[-1] == "1000"
    cuda = inside("python", "-c", "import torch; print(torch.__version__, torch.version.cuda)", timeout=120).split()[-2:]
    assert cuda[0].startswith("2.13.0") and (cuda[1] == "None") == (flavour == "cpu"), cuda
    t0 = time.monotonic()
    r = _run([*buildah, "run", "--isolation", "chroot", ctr, "--", "ncdpo", "train", "cluster/smoke.yaml"], timeout=900)
    train = r.stderr  # the progress lines
    train_s = time.monotonic() - t0
    assert re.search(r"^iter\s+2 \|", train, re.M), train[-3000:]
    ckpts = inside("sh", "-c", "ls -d runs/*/checkpoints/final", timeout=60).split()
    assert len(ckpts) == 1 and ckpts[0].endswith("/checkpoints/final"), ckpts

    # The run's MLflow store (sqlite, in the working directory) has both iterations.
    query = ("import json, mlflow; c = mlflow.MlflowClient('sqlite:///mlflow.db');"
             "e = c.get_experiment_by_name('cluster-smoke'); (r,) = c.search_runs([e.experiment_id]);"
             "print(json.dumps([r.info.status, [m.value for m in c.get_metric_history(r.info.run_id, 'env_steps')]]))")
    status, steps = json.loads(inside("python", "-c", query, timeout=300).strip().splitlines()[-1])
    assert status == "FINISHED" and len(steps) == 2 and 0 < steps[0] < steps[1], (status, steps)
    ev = json.loads(inside("ncdpo", "evaluate", ckpts[-1], "--episodes", "2", "--json",
                           timeout=600).strip().splitlines()[-1])
    assert ev["episodes"] == 2 and math.isfinite(ev["return_mean"]), ev

    _run([*buildah, "rm", ctr], timeout=300)
    _run([*buildah, "rmi", tag], timeout=600)  # vfs keeps a full copy per layer: free it now
    print(f"image {tag}: torch {' '.join(cuda)}; 2-iteration train inside {train_s:.0f} s, evaluate ok")
