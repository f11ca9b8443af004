#!/usr/bin/env bash
# `ncdpo train CONFIG` as a Ray job: cluster/submit.sh CONFIG [--set KEY=VALUE ...] [--no-wait]
# and cluster/submit.sh logs|status|stop ID, cluster/submit.sh list. See cluster/submit.py (--help).
# Uses the project's .venv when there is one (NCDPO_VENV), else python3 with ray[default].
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NCDPO_VENV:-$REPO/.venv}"
if [[ -x "$VENV/bin/python" ]]; then PY="$VENV/bin/python"; else PY="$(command -v python3)"; fi
exec "$PY" "$REPO/cluster/submit.py" "$@"
