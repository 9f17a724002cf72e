#!/usr/bin/env bash
# Set salachat up in ./.venv: Python packages, the package itself, the default model.
# Usage: scripts/setup.sh [--test]   (--test adds what the test suite needs)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "salachat needs Python 3.11 or newer (found $("$PY" --version 2>&1))" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first, pinned: where a CPU wheel lies on local disk pip takes it; elsewhere PyPI's build.
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    echo "installing torch …"
    "${PIP[@]}" "torch==2.13.0"
fi
if [ "${1:-}" = "--test" ]; then
    "${PIP[@]}" -e ".[test]"
else
    "${PIP[@]}" -e .
fi
.venv/bin/salachat models pull smollm2
