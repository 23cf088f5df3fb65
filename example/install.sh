#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install the recipe with its test extras.
# torch goes in first as the CPU build (`torch==2.13.0` resolves to a local CPU wheel on
# our machines); otherwise pip would pull a multi-GB CUDA build for verl's torch requirement.
# Idempotent: a stamp keyed by pyproject.toml skips the pip work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"Python >= 3.11 is required, found {sys.version.split()[0]}")
PY

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
# Debian's git is needed for task repos and sandboxes.
command -v git >/dev/null || { echo "git is required (apt-get install git)" >&2; exit 1; }
# Debian's bubblewrap isolates local sandboxes (no network, read-only host); without it they
# run unisolated and say so.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -q bubblewrap >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1; }) \
    || echo "warning: bubblewrap could not be installed: local sandboxes run unisolated" >&2
fi
