"""Docker sandbox: request construction checked by the docker SDK's own conversion, no engine needed.

``RecordingClient`` stands in for ``docker.DockerClient`` and records what would be
sent, for what an engine cannot show on demand (a start that hangs, an exec that never
returns). The same code against a real engine: ``test_docker_engine.py``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from docker.models.containers import _create_container_args

from core.task import SWETask
from sandbox.docker_sandbox import (
    LABEL_OWNER,
    LABEL_ROLLOUT,
    LABEL_SANDBOX,
    DockerSandboxFactory,
    DockerSettings,
    cgroup_parent_for,
    container_run_kwargs,
    exec_argv,
    owner_id,
)

TASK = SWETask(instance_id="astropy__astropy-12907", repo="astropy/astropy", base_commit="abc", problem_statement="p")


class FakeContainer:
    def __init__(self, kwargs, delay=0.0, exec_delay=0.0):
        self.kwargs = kwargs
        self.labels = kwargs["labels"]
        self.id = kwargs["name"]
        self.removed = self.killed = False
        self.execs = []
        self.exec_delay = exec_delay

    def exec_run(self, argv, workdir=None, demux=False):
        import time

        self.execs.append((argv, workdir))
        time.sleep(self.exec_delay)
        return 0, b"ok\n"

    def kill(self):
        self.killed = True

    def remove(self, force=False):
        assert force
        self.removed = True


class RecordingClient:
    """Records containers.run calls; tracks how many starts overlap."""

    def __init__(self, start_s=0.05, exec_delay=0.0):
        self.created: list[FakeContainer] = []
        self.start_s = start_s
        self.exec_delay = exec_delay
        self.active = self.max_active = 0
        self.containers = self

    def run(self, **kwargs):
        import threading
        import time

        lock = getattr(self, "_lock", None) or threading.Lock()
        self._lock = lock
        with lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.start_s)
        with lock:
            self.active -= 1
        c = FakeContainer(kwargs, exec_delay=self.exec_delay)
        self.created.append(c)
        return c

    def list(self, filters=None, **kwargs):
        assert kwargs == {"all": True}  # stopped containers are leftovers too
        want = dict(f.split("=", 1) for f in filters["label"])
        return [c for c in self.created if not c.removed and all(c.labels.get(k) == v for k, v in want.items())]


def test_run_kwargs_pass_the_sdk_conversion_with_limits_labels_and_cgroup_parent():
    settings = DockerSettings(memory_bytes=2 << 30, cpus=1.5, pids_limit=256)
    kwargs = container_run_kwargs(TASK, "r1", settings, owner="h:1:2.00", cgroup_parent="/swe-rl/swe-rollout-r1")
    assert kwargs["image"] == "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest"
    # The SDK's own conversion (what ContainerCollection.run hands to the API); "version" is the API's.
    create = _create_container_args({**{k: v for k, v in kwargs.items() if k != "detach"}, "version": "1.45"})
    host = create["host_config"]
    assert host["Memory"] == 2 << 30 and host["MemorySwap"] == 2 << 30
    assert host["NanoCpus"] == 1_500_000_000 and host["PidsLimit"] == 256
    assert host["CgroupParent"] == "/swe-rl/swe-rollout-r1"
    assert host["NetworkMode"] == "none" and host["Init"] is True
    assert create["labels"] == {LABEL_SANDBOX: "1", LABEL_ROLLOUT: "r1", LABEL_OWNER: "h:1:2.00"}
    assert create["command"] == ["sleep", "infinity"]


def test_exec_kills_inside_the_container_at_the_timeout():
    argv = exec_argv("pytest -x", 30)
    assert argv[:4] == ["timeout", "-s", "KILL", "30s"] and argv[-1] == "pytest -x"
    # The same wrapper kills a real command (and its shell) at the limit.
    proc = subprocess.run(exec_argv("sleep 30; echo late", 1), capture_output=True, text=True, timeout=20)
    # 137 through docker exec; here `timeout` kills its own process group, itself included (-9).
    assert proc.returncode in (137, -9) and "late" not in proc.stdout


def test_cgroup_parent_is_relative_to_the_mount():
    assert cgroup_parent_for("/sys/fs/cgroup/swe-rl/swe-rollout-x") == "/swe-rl/swe-rollout-x"
    assert cgroup_parent_for(None) is None
    with pytest.raises(ValueError):
        cgroup_parent_for("/tmp/fake/group")


async def test_start_concurrency_cap_and_reaper():
    client = RecordingClient(start_s=0.1)
    factory = DockerSandboxFactory(client, DockerSettings(start_concurrency=2))
    boxes = await asyncio.gather(*(factory.create(TASK, f"r{i}") for i in range(6)))
    assert client.max_active == 2
    assert all(b.container.labels[LABEL_OWNER] == owner_id() for b in boxes)
    # A crashed run's container (dead owner pid) and one of a live process on this host.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import psutil
    import socket

    ghost = client.run(**container_run_kwargs(TASK, "ghost", DockerSettings(), owner=f"{socket.gethostname()}:{dead.pid}:1.00"))
    me = psutil.Process()
    other_live = client.run(**container_run_kwargs(TASK, "live", DockerSettings(), owner=f"{socket.gethostname()}:1:{psutil.Process(1).create_time():.2f}"))
    assert factory.reap() == ["ghost"]  # start-up: only dead owners
    assert ghost.removed and not other_live.removed and not any(b.container.removed for b in boxes)
    await boxes[0].teardown()
    await boxes[0].teardown()
    assert sorted(factory.reap(own=True)) == [f"r{i}" for i in range(1, 6)]  # exit: our own too
    assert me.pid > 0


async def test_command_backstop_kills_the_container_when_exec_hangs():
    client = RecordingClient(start_s=0.0, exec_delay=2.0)
    factory = DockerSandboxFactory(client, DockerSettings(kill_grace_s=0.1))
    box = await factory.create(TASK, "slow")
    res = await box.run("sleep 100", timeout_s=0.2)
    assert res.timed_out and box.container.killed
    argv, workdir = box.container.execs[0]
    assert argv[:4] == ["timeout", "-s", "KILL", "1s"] and workdir == "/testbed"
