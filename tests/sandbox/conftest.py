"""Fixtures of the sandbox tests that meet a real Docker engine (``test_docker_engine``, ``test_shim_docker``)."""

from __future__ import annotations

import os

import pytest

BASE_IMAGE = os.environ.get("SWE_RL_BASE_IMAGE", "swe-rl-base:bookworm")


@pytest.fixture(scope="module")
def client():
    """A docker SDK client of the local engine with the base image built (else skipped, or an
    error under ``SWE_RL_REQUIRE_DOCKER=1``)."""
    import docker

    client = docker.from_env()
    try:
        client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        if os.environ.get("SWE_RL_REQUIRE_DOCKER") == "1":
            raise
        pytest.skip(f"{BASE_IMAGE} not built (bash example/docker_engine.sh start)")
    yield client
    client.close()
