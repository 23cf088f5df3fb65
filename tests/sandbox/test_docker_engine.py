"""Docker sandboxes on a real engine (``sandbox/docker_sandbox.py`` against dockerd).

The engine and the base image come from ``example/docker_engine.sh start`` (``tests/run.sh``
and CI call it). Without an engine these tests are skipped, unless
``SWE_RL_REQUIRE_DOCKER=1`` (CI sets it): then they fail, so a broken engine set-up cannot
pass as skipped tests.

What is checked for real: container start with the project's labels and limits, a command
killed inside the container at its timeout while the container lives on, no network, a
memory burst past the limit OOM-killed and reported by the engine, the limit moved on a
running container through the engine (the shim's lever), the patch taken from the
container's work tree, and the reaper removing containers of a dead owner.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from core.task import SWETask
from sandbox.docker_sandbox import (
    LABEL_OWNER,
    LABEL_SANDBOX,
    DockerSandboxFactory,
    DockerSettings,
    docker_engine_available,
)

BASE_IMAGE = os.environ.get("SWE_RL_BASE_IMAGE", "swe-rl-base:bookworm")
ENGINE, WHY = docker_engine_available()
if not ENGINE and os.environ.get("SWE_RL_REQUIRE_DOCKER") == "1":
    raise RuntimeError(f"SWE_RL_REQUIRE_DOCKER=1 but {WHY}")

pytestmark = [pytest.mark.docker, pytest.mark.skipif(not ENGINE, reason=WHY)]

MiB = 1 << 20


def _task(name: str) -> SWETask:
    return SWETask(instance_id=f"engine__{name}", repo="local/engine", base_commit="HEAD", problem_statement="p",
                   image_name=BASE_IMAGE)


async def _box(client, name: str, **settings):
    factory = DockerSandboxFactory(client, DockerSettings(workdir="/", **settings))
    return factory, await factory.create(_task(name), f"engine-{name}-{os.getpid()}")


async def test_a_container_has_our_labels_and_limits_and_is_gone_after_teardown(client):
    factory, box = await _box(client, "labels", memory_bytes=256 * MiB, cpus=1.0, pids_limit=64)
    try:
        res = await box.run("echo hi; nproc; cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null "
                            "|| cat /sys/fs/cgroup/memory.max", timeout_s=30)
        assert res.returncode == 0 and res.output.splitlines()[0] == "hi", res.output
        assert int(res.output.splitlines()[-1]) == 256 * MiB
        box.container.reload()
        labels = box.container.labels
        assert labels[LABEL_SANDBOX] == "1" and labels[LABEL_OWNER] == factory.owner
        host = box.container.attrs["HostConfig"]
        assert host["NetworkMode"] == "none" and host["PidsLimit"] == 64 and host["NanoCpus"] == 10**9
    finally:
        await box.teardown()
    assert client.containers.list(all=True, filters={"label": f"{LABEL_OWNER}={factory.owner}"}) == []


async def test_a_command_is_killed_inside_at_its_timeout_and_the_container_lives_on(client):
    _, box = await _box(client, "timeout")
    try:
        res = await box.run("sleep 60", timeout_s=1)
        assert res.timed_out and res.returncode == 137 and res.duration_s < 10
        left = await box.run("for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done | grep -c '^sleep 60 '",
                             timeout_s=10)
        assert left.output.strip() == "0", left.output  # killed inside, not only given up on
        assert (await box.run("echo alive", timeout_s=10)).output.strip() == "alive"
    finally:
        await box.teardown()


async def test_no_network_reaches_out(client):
    _, box = await _box(client, "net")
    try:
        probe = ("python3 -c \"import socket; s = socket.socket(); s.settimeout(3); "
                 "s.connect(('1.1.1.1', 443))\" && echo CONNECTED || echo BLOCKED")
        assert (await box.run(probe, timeout_s=30)).output.strip().endswith("BLOCKED")
        assert "lo" in (await box.run("ls /sys/class/net", timeout_s=10)).output.split()
        assert "eth0" not in (await box.run("ls /sys/class/net", timeout_s=10)).output.split()
    finally:
        await box.teardown()


async def test_a_memory_burst_past_the_limit_is_oom_killed_and_the_limit_moves_through_the_engine(client):
    _, box = await _box(client, "oom", memory_bytes=128 * MiB)
    try:
        burst = "python3 -c \"b = bytearray(512 << 20); print('survived')\""
        res = await box.run(burst, timeout_s=60)
        assert res.returncode == 137 and not res.timed_out and "survived" not in res.output
        # What a rollout record can report: the engine's State.OOMKilled stays false for an exec'd
        # command, the container's memory cgroup counts the kill.
        assert await box.oom_kills() == 1
        # The shim's lever: the limit of a running container, changed through the engine
        # (cgroup v1 needs memory and memory+swap together).
        await asyncio.to_thread(box.container.update, mem_limit=1024 * MiB, memswap_limit=1024 * MiB)
        assert "survived" in (await box.run(burst, timeout_s=60)).output
        assert await box.oom_kills() == 1
    finally:
        await box.teardown()


async def test_the_patch_comes_from_the_containers_work_tree(client):
    factory = DockerSandboxFactory(client, DockerSettings(workdir="/testbed"))
    setup = ("mkdir -p /testbed && cd /testbed && git init -q && git config user.email t@t && git config user.name t"
             " && printf 'x = 1\\n' > a.py && git add -A && git commit -qm base && git rev-parse HEAD")
    box = await factory.create(_task("patch"), f"engine-patch-{os.getpid()}")
    try:
        # The work dir must exist before commands run in it: create it from / first.
        made = await asyncio.to_thread(box.container.exec_run, ["bash", "-c", setup], workdir="/")
        assert made.exit_code == 0, made.output
        box.task = box.task.model_copy(update={"base_commit": made.output.decode().split()[-1]})
        await box.run("printf 'x = 2\\n' > a.py && printf 'new\\n' > b.txt", timeout_s=10)
        patch = await box.extract_patch()
        assert "diff --git a/a.py b/a.py" in patch and "+x = 2" in patch and "b/b.txt" in patch
    finally:
        await box.teardown()


def test_containers_of_a_dead_owner_are_reaped_and_ours_only_at_exit(client):
    # A process that makes a labelled container and dies without removing it (kill -9).
    code = (
        "import asyncio, docker, os, sys; sys.path.insert(0, os.getcwd());"
        "from sandbox.docker_sandbox import DockerSandboxFactory, DockerSettings;"
        "from core.task import SWETask;"
        f"t = SWETask(instance_id='engine__dead', repo='r', base_commit='HEAD', problem_statement='p', image_name={BASE_IMAGE!r});"
        "f = DockerSandboxFactory(docker.from_env(), DockerSettings(workdir='/'));"
        "asyncio.run(f.create(t, 'engine-dead-owner')); os.kill(os.getpid(), 9)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    leftovers = client.containers.list(all=True, filters={"label": f"{LABEL_SANDBOX}=1"})
    assert any(c.name == "swe-rl-engine-dead-owner" for c in leftovers)
    factory = DockerSandboxFactory(client, DockerSettings())
    assert "engine-dead-owner" in factory.reap()  # start-up: dead owners' containers
    assert all(c.name != "swe-rl-engine-dead-owner"
               for c in client.containers.list(all=True, filters={"label": f"{LABEL_SANDBOX}=1"}))
