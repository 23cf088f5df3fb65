"""The resource shim moving real containers' limits through a real Docker engine (cgroup v1 here).

Each test starts the base image's container the way a Docker rollout does (limit and
``--oom-kill-disable`` from the lease), binds it to a lease (``bind_container_limits``) and runs
real memory bursts in it with ``docker exec``. What the kernel does is read back from the
container's own memory cgroup (``oom_kill``) and from the engine (``HostConfig.Memory``).
Skipped without an engine unless ``SWE_RL_REQUIRE_DOCKER=1`` (CI).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from sandbox.docker_limits import ContainerMemory, bind_container_limits
from sandbox.docker_sandbox import LABEL_SANDBOX, docker_engine_available
from sandbox.shim import MiB, ResourceShim, ShimSettings

BASE_IMAGE = os.environ.get("SWE_RL_BASE_IMAGE", "swe-rl-base:bookworm")  # the `client` fixture's (conftest)
ENGINE, WHY = docker_engine_available()
if not ENGINE and os.environ.get("SWE_RL_REQUIRE_DOCKER") == "1":
    raise RuntimeError(f"SWE_RL_REQUIRE_DOCKER=1 but {WHY}")

pytestmark = [pytest.mark.docker, pytest.mark.skipif(not ENGINE, reason=WHY)]


def _shim(**overrides) -> ResourceShim:
    settings = dict(enabled=True, pool_bytes=1024 * MiB, baseline_bytes=32 * MiB, burst_min_bytes=64 * MiB,
                    burst_max_bytes=512 * MiB, hard_max_bytes=768 * MiB, monitor_interval_s=0.05)
    return ResourceShim(ShimSettings(**{**settings, **overrides}), sandbox_backend="docker")


async def _container(client, lease, hard_max: int):
    container = await asyncio.to_thread(
        client.containers.run, BASE_IMAGE, ["sleep", "infinity"], detach=True, init=True, network_mode="none",
        labels={LABEL_SANDBOX: "1", "swe-rl.test": "shim"},
        mem_limit=lease.container_limit_bytes(hard_max), memswap_limit=lease.container_limit_bytes(hard_max),
        oom_kill_disable=lease.pauses_at_limit)
    await bind_container_limits(lease, container, hard_max)
    return container


def _burst(mib: int, hold_s: float = 0.5) -> list[str]:
    # Killed inside at 60 s: a burst left asleep at its limit fails the test instead of hanging it.
    return ["timeout", "-s", "KILL", "60", "python3", "-c",
            f"import time; b = bytearray({mib} << 20); time.sleep({hold_s}); print('survived')"]


async def _exec(container, argv) -> tuple[int, str]:
    code, out = await asyncio.to_thread(container.exec_run, argv)
    return code, out.decode(errors="replace")


async def _settled(lease, timeout_s: float = 5.0) -> None:
    """Until the lease's last decided limit is the one the engine has."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if lease.summary.limit_changes and lease.summary.limit_changes[-1].requested_bytes == lease.summary.decisions[-1][2]:
            return
        await asyncio.sleep(0.05)


def _engine_limit(container) -> int:
    container.reload()
    return int(container.attrs["HostConfig"]["Memory"])


async def test_a_tool_burst_gets_its_memory_and_the_limit_comes_back_down(client):
    shim = _shim()
    async with shim.rollout("shim-burst") as lease:
        container = await _container(client, lease, 768 * MiB)
        try:
            assert _engine_limit(container) == 32 * MiB  # the baseline while the model thinks
            lease.on_phase("tool")
            code, out = await _exec(container, _burst(300))
            # Far past the first grant (32 + 64 MiB): the container slept at its limit and the
            # monitor grew it, instead of the kernel killing the command.
            assert code == 0 and "survived" in out, out
            lease.on_phase("inference")
            await _settled(lease)
            assert _engine_limit(container) < 100 * MiB
            memory = ContainerMemory(container)
            assert memory.oom_kills() == 0
            assert memory.peak() >= 300 * MiB  # the burst really was in the container
            changes = lease.summary.limit_changes
            assert max(c.applied_bytes for c in changes) >= 300 * MiB
            assert all(c.latency_s >= 0 for c in changes)
            assert shim.pool.reserved["shim-burst"] < 100 * MiB  # the grant went back to the pool
        finally:
            await asyncio.to_thread(container.remove, force=True)
    assert "shim-burst" not in shim.pool.reserved


async def test_past_the_hard_cap_the_shim_kills_the_command_and_the_container_lives_on(client):
    shim = _shim(hard_max_bytes=768 * MiB)
    async with shim.rollout("shim-cap") as lease:
        container = await _container(client, lease, 256 * MiB)  # the container's own cap is lower
        try:
            lease.on_phase("tool")
            code, out = await _exec(container, _burst(600))
            assert code == 137 and "survived" not in out
            assert lease.summary.memory_kills == 1
            assert ContainerMemory(container).oom_kills() == 0  # the shim's kill, not the kernel's
            code, out = await _exec(container, _burst(100))
            assert code == 0 and "survived" in out
            # A hog the command leaves behind (reparented to the container's init) is no safer.
            hog = "python3 -c 'import time; b = bytearray(600 << 20); time.sleep(120)' >/dev/null 2>&1 &"
            assert (await _exec(container, ["sh", "-c", hog]))[0] == 0
            deadline = time.monotonic() + 30
            while lease.summary.memory_kills < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert lease.summary.memory_kills == 2
            code, out = await _exec(container, _burst(100))
            assert code == 0 and "survived" in out
        finally:
            await asyncio.to_thread(container.remove, force=True)
    assert lease.summary.to_dict()["memory_kills"] == 2


async def test_the_static_baseline_keeps_its_limit_and_the_kernel_oom_kills(client):
    shim = _shim(policy="static", baseline_bytes=64 * MiB)
    async with shim.rollout("shim-static") as lease:
        assert not lease.pauses_at_limit
        container = await _container(client, lease, 768 * MiB)
        try:
            lease.on_phase("tool")
            code, _ = await _exec(container, _burst(200))
            assert code == 137
            assert ContainerMemory(container).oom_kills() == 1
            assert _engine_limit(container) == 64 * MiB and lease.summary.limit_changes == []
        finally:
            await asyncio.to_thread(container.remove, force=True)


async def test_a_short_pool_queues_the_second_burst_until_the_first_tool_ends(client):
    # Two baselines and room for about one 250 MiB burst.
    shim = _shim(pool_bytes=2 * 32 * MiB + 320 * MiB)
    async with shim.rollout("shim-a") as a, shim.rollout("shim-b") as b:
        ca = await _container(client, a, 768 * MiB)
        cb = await _container(client, b, 768 * MiB)
        try:
            a.on_phase("tool")
            first = asyncio.ensure_future(_exec(ca, _burst(250, hold_s=4)))
            deadline = time.monotonic() + 30
            while a._usage() < 240 * MiB and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert a._usage() >= 240 * MiB
            b.on_phase("tool")
            second = asyncio.ensure_future(_exec(cb, _burst(200)))
            deadline = time.monotonic() + 30
            while b._waiter is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert b._waiter is not None  # b asked the pool for more and waits, asleep at its limit
            assert not second.done()
            assert (await first)[0] == 0
            a.on_phase("inference")  # a's grant goes back: b's request is served
            code, out = await asyncio.wait_for(second, 60)
            assert code == 0 and "survived" in out
            assert b.summary.queued_s > 0 and b.summary.paused_s > 0
            assert ContainerMemory(ca).oom_kills() == ContainerMemory(cb).oom_kills() == 0
        finally:
            for c in (ca, cb):
                await asyncio.to_thread(c.remove, force=True)
