#!/usr/bin/env bash
# Build the project's images: with docker when a daemon answers, else with buildah (daemonless).
#
#   docker/build.sh [cpu|cuda] [--base IMAGE] [--tag TAG] [--torch-index URL] [--engine docker|buildah]
#
#   cpu | cuda          which docker/Dockerfile.* (default cpu)
#   --base IMAGE        the base image of both stages (default: the Dockerfile's, python:3.11-slim-bookworm)
#   --tag TAG           image name (default ncdpo-rllib:<version>-<flavour>)
#   --torch-index URL   where torch comes from; default: pip's own configuration when it holds a
#                       local CPU wheel of the pinned torch (cpu), else the Dockerfile's default
#   --engine E          force docker or buildah
#   --no-host-pip       build with the image's pip defaults (PyPI), not this machine's configuration
#
# This machine's pip configuration (config files, PIP_* variables: indexes, a CA bundle,
# constraints, find-links) is handed to the build read-only: merged into one file passed as the
# build secret `pipconf`, and, with buildah, every local file or directory it names mounted at
# the same path for the RUN steps (docker's builder cannot mount host paths: local entries are
# dropped there, and a warning names them). Nothing of it is written into the image or the repo.
#
# Environment: PYTHON (whose pip configuration, default python3), BUILDAH_OPTS (buildah's global
# options, default "--storage-driver vfs"), BUILDAH_ISOLATION (default chroot: no daemon, no
# user namespaces needed; runs as root).
# Prints the image id, size and build time last: "image TAG id ID size SIZE build_s N".
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "build.sh: $*" >&2; exit 2; }

flavour=cpu base="" tag="" torch_index="unset" engine="" host_pip=1
while [ $# -gt 0 ]; do
    case "$1" in
        cpu|cuda) flavour=$1 ;;
        --base) base=${2:?--base needs an image}; shift ;;
        --tag) tag=${2:?--tag needs a name}; shift ;;
        --torch-index) torch_index=${2?--torch-index needs a URL}; shift ;;
        --engine) engine=${2:?--engine needs docker or buildah}; shift ;;
        --no-host-pip) host_pip=0 ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see docker/build.sh --help)" ;;
    esac
    shift
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
tag=${tag:-ncdpo-rllib:$version-$flavour}
dockerfile=docker/Dockerfile.$flavour

if [ -z "$engine" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
    elif command -v buildah >/dev/null; then engine=buildah
    else die "no docker daemon answers and buildah is not installed (apt-get install buildah)"; fi
fi
case "$engine" in docker|buildah) ;; *) die "--engine must be docker or buildah, not '$engine'" ;; esac

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
args=(-f "$dockerfile" -t "$tag")
[ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
torch_wheel=""
if [ "$host_pip" = 1 ]; then
    local_flag=()
    [ "$engine" = docker ] && local_flag=(--no-local)
    listing=$("${PYTHON:-python3}" docker/pip_config.py "$stage" "${local_flag[@]}")
    args+=(--secret "id=pipconf,src=$stage/pip.conf")
    while read -r kind path; do
        case "$kind" in
            mount) args+=(-v "$path:$path:ro") ;;
            torch-wheel) torch_wheel=$path ;;
        esac
    done <<< "$listing"
fi
if [ "$torch_index" = unset ] && [ "$flavour" = cpu ] && [ -n "$torch_wheel" ]; then
    torch_index=""   # the configuration's find-links has the CPU wheel: let pip take it from there
    echo "build.sh: torch from $torch_wheel (this machine's pip configuration)"
fi
[ "$torch_index" != unset ] && args+=(--build-arg "TORCH_INDEX_URL=$torch_index")

echo "build.sh: building $tag from $dockerfile with $engine${base:+ on $base}"
t0=$(date +%s)
if [ "$engine" = docker ]; then
    DOCKER_BUILDKIT=1 docker build "${args[@]}" .
    id=$(docker image inspect --format '{{.Id}}' "$tag")
    size=$(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1 / 1e9}')
else
    buildah_() { buildah ${BUILDAH_OPTS:---storage-driver vfs} "$@"; }  # BUILDAH_OPTS: a list of options
    buildah_ bud --isolation "${BUILDAH_ISOLATION:-chroot}" "${args[@]}" .
    id=$(buildah_ inspect --type image --format '{{.FromImageID}}' "$tag")
    size=$(buildah_ images --noheading --format '{{.Size}}' "$tag" | head -1)
fi
echo "image $tag id ${id#sha256:} size $size build_s $(( $(date +%s) - t0 ))"
