#!/usr/bin/env bash
# Install (idempotent) and run the default test suite; extra arguments go to pytest.
# SWE-agent is installed from its vendored source when it is found (example/install_sweagent.sh).
# A Docker engine and the base image are started for the docker-marked tests when this machine
# can run one (example/docker_engine.sh); an engine this script started is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash example/install.sh
# SWE-agent (not on PyPI) from its source when one is here (the vendored tarball, or SWE_AGENT_SOURCE):
# its real-run tests skip without it, and fail instead with SWE_RL_REQUIRE_SWEAGENT=1 (CI).
if ! bash example/install_sweagent.sh; then
  echo "SWE-agent is not installed: its real-run tests are skipped (SWE_RL_REQUIRE_SWEAGENT=1 makes them fail)" >&2
  [ "${SWE_RL_REQUIRE_SWEAGENT:-0}" = 1 ] && exit 1
fi
engine_was_up=0
bash example/docker_engine.sh status >/dev/null 2>&1 && engine_was_up=1
if bash example/docker_engine.sh start; then
  if [ "$engine_was_up" = 0 ]; then trap 'bash example/docker_engine.sh stop' EXIT; fi
else
  echo "no Docker engine here: the docker-marked tests are skipped (SWE_RL_REQUIRE_DOCKER=1 makes them fail)" >&2
fi
.venv/bin/python -m pytest "$@"
