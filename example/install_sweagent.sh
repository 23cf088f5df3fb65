#!/usr/bin/env bash
# Install SWE-agent 1.x (not on PyPI) into .venv, editable, so it finds its config/ and tools/.
#   bash example/install_sweagent.sh [SOURCE]
# SOURCE: a SWE-agent checkout (git clone https://github.com/SWE-agent/SWE-agent), or a source
# tarball; default: $SWE_AGENT_SOURCE, else the vendored ../shared/vendor/SWE-agent-*.tar.gz.
# A tarball is unpacked into .swe-agent/ (ignored by git). swe-rex is pinned to 1.4.0, the
# release SWE-agent 1.1.0 was built against. Idempotent; exits 2 when no source is found.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
source=${1:-${SWE_AGENT_SOURCE:-}}
if [ -z "$source" ]; then
  source=$(ls ../shared/vendor/SWE-agent-*.tar.gz 2>/dev/null | head -n 1 || true)
fi
if [ -z "$source" ] || [ ! -e "$source" ]; then
  echo "no SWE-agent source (give a checkout or tarball, or set SWE_AGENT_SOURCE)" >&2
  exit 2
fi
[ -x "$VENV/bin/python" ] || bash example/install.sh
if [ -f "$source" ]; then
  dest=.swe-agent
  stamp="$dest/.from-$(sha256sum "$source" | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    rm -rf "$dest" && mkdir -p "$dest"
    tar -xzf "$source" -C "$dest" --strip-components=1
    touch "$stamp"
  fi
  source=$dest
fi
source=$(cd "$source" && pwd)
[ -f "$source/pyproject.toml" ] && [ -d "$source/sweagent" ] && [ -d "$source/config" ] && [ -d "$source/tools" ] \
  || { echo "$source is not a SWE-agent source tree (pyproject.toml, sweagent/, config/, tools/)" >&2; exit 2; }
mkdir -p "$source/trajectories"
installed=$("$VENV/bin/python" - "$source" <<'PY'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("sweagent")
print(int(spec is not None and spec.origin is not None
          and pathlib.Path(spec.origin).resolve().parent.parent == pathlib.Path(sys.argv[1]).resolve()))
PY
)
if [ "$installed" != 1 ]; then
  log=$(mktemp)
  "$VENV/bin/python" -m pip install -q "swe-rex==1.4.0" -e "$source" >"$log" 2>&1 || { cat "$log" >&2; rm -f "$log"; exit 1; }
  rm -f "$log"
fi
"$VENV/bin/python" -c "from recipe.runners.swe_agent import SWEAgentInstall as I; i = I.locate(); assert i, 'SWE-agent not found after install'; print('SWE-agent at', i.package_dir.parent)"
