#!/usr/bin/env bash
# Install (idempotent) and run the default test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash example/install.sh
exec .venv/bin/python -m pytest "$@"
