"""Cgroup controller writes and the shim's phase-driven decisions, over a fake cgroup2 tree.

The fake (tests/sandbox/fake_cgroupfs.py) stands in for the kernel because this
machine has no writable cgroup2; a real-kernel test runs only when a delegated
cgroup2 directory is named in $SWE_RL_CGROUP_ROOT.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import psutil
import pytest

from fake_cgroupfs import FakeCgroupFS
from sandbox.cgroup import (
    CgroupFS,
    CgroupError,
    CgroupV1Controller,
    CgroupV2Controller,
    MemoryLimits,
    NoopController,
    make_controller,
    parse_pressure,
)
from sandbox.shim import CGROUP_ROOT_ENV, AdmissionTimeout, MemoryPool, MiB, ResourceShim, ShimSettings

GROUP_PREFIX = "swe-rollout-"


@pytest.fixture
def fakefs(tmp_path):
    return FakeCgroupFS(tmp_path / "cg")


def make_shim(fakefs, **overrides) -> ResourceShim:
    settings = ShimSettings(
        enabled=True,
        cgroup_backend="v2",
        cgroup_root=str(fakefs.root),
        pool_bytes=overrides.pop("pool_bytes", 2048 * MiB),
        baseline_bytes=256 * MiB,
        burst_min_bytes=512 * MiB,
        burst_max_bytes=1024 * MiB,
        hard_max_bytes=3072 * MiB,
        monitor_interval_s=3600,  # tests call poll() themselves
        admission_timeout_s=overrides.pop("admission_timeout_s", 5.0),
        **overrides,
    )
    return ResourceShim(settings, CgroupV2Controller(fakefs.root, fs=fakefs))


def test_v2_controller_writes_kernel_format(fakefs):
    ctl = CgroupV2Controller(fakefs.root, fs=fakefs)
    ctl.enable_controllers()
    group = ctl.create("r1")
    assert group == fakefs.root / f"{GROUP_PREFIX}r1"
    ctl.set_memory(group, MemoryLimits(min=100, low=200, high=300, max=-1))
    ctl.set_cpu(group, quota_cores=1.5, weight=50)
    ctl.set_pids(group, 64)
    assert fakefs.writes_to(fakefs.root, "cgroup.subtree_control") == ["+memory +cpu +pids"]
    assert (group / "memory.max").read_text() == "max"
    assert (group / "memory.high").read_text() == "300"
    assert (group / "cpu.max").read_text() == "150000 100000"
    assert (group / "cpu.weight").read_text() == "50"
    assert (group / "pids.max").read_text() == "64"
    with pytest.raises(ValueError):
        ctl.set_cpu(group, weight=0)


def test_lowering_writes_high_before_max_and_raising_max_before_high(fakefs):
    ctl = CgroupV2Controller(fakefs.root, fs=fakefs)
    group = ctl.create("r1")
    ctl.set_memory(group, MemoryLimits(high=1000, max=2000))  # raise from "max"
    ctl.set_memory(group, MemoryLimits(high=500, max=800))  # lower
    ctl.set_memory(group, MemoryLimits(high=3000, max=4000))  # raise
    order = [n for g, n, _ in fakefs.writes if n in ("memory.high", "memory.max")]
    assert order == ["memory.max", "memory.high", "memory.high", "memory.max", "memory.max", "memory.high"]


def test_stats_parse_events_pressure_and_cpu(fakefs):
    ctl = CgroupV2Controller(fakefs.root, fs=fakefs)
    group = ctl.create("r1")
    fakefs.set_usage(group, 5000)
    fakefs.set_usage(group, 1000)
    (group / "memory.events").write_text("low 0\nhigh 7\nmax 2\noom 1\noom_kill 1\n")
    (group / "memory.pressure").write_text(
        "some avg10=1.00 avg60=0.50 avg300=0.10 total=12345\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=678\n"
    )
    (group / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    stats = ctl.stats(group)
    assert (stats.memory_current, stats.memory_peak) == (1000, 5000)
    assert stats.events["high"] == 7 and stats.events["oom_kill"] == 1
    assert (stats.psi_some_total_us, stats.psi_full_total_us) == (12345, 678)
    assert stats.cpu_usage_us == 2_500_000
    assert parse_pressure("garbage") == (None, None)


def test_remove_kills_processes_then_removes_group(fakefs):
    ctl = CgroupV2Controller(fakefs.root, fs=fakefs)
    group = ctl.create("r1")
    proc = subprocess.Popen(["sleep", "300"])
    ctl.add_pid(group, proc.pid)
    assert ctl.procs(group) == [proc.pid]
    ctl.remove(group)
    assert proc.wait(timeout=5) == -9
    assert not group.exists()
    ctl.remove(group)  # already gone: fine
    assert ctl.list_groups() == []


def test_bad_write_is_a_cgroup_error_naming_the_file(fakefs):
    ctl = CgroupV2Controller(fakefs.root, fs=fakefs)
    group = ctl.create("r1")
    with pytest.raises(CgroupError, match="cgroup.procs"):
        ctl.add_pid(group, 2**22 + 12345)  # no such process


class _FakeV1FS(CgroupFS):
    """A fake v1 kernel (files appear on first write); this machine's v1 is host-owned."""

    def write(self, path: Path, value: str) -> None:
        path.write_text(value)


def test_v1_fallback_layout(tmp_path):
    root = tmp_path / "v1"
    for hier in ("memory", "cpu", "pids"):
        (root / hier).mkdir(parents=True)
    ctl = make_controller("auto", str(root), fs=_FakeV1FS())
    assert isinstance(ctl, CgroupV1Controller)
    group = ctl.create("r1")
    ctl.set_memory(group, MemoryLimits(high=100, max=200))
    ctl.set_cpu(group, quota_cores=0.5, weight=100)
    ctl.set_pids(group, 10)
    mem = root / "memory" / "swe-rl" / f"{GROUP_PREFIX}r1"
    assert (mem / "memory.limit_in_bytes").read_text() == "200"
    assert (mem / "memory.soft_limit_in_bytes").read_text() == "100"
    cpu = root / "cpu" / "swe-rl" / f"{GROUP_PREFIX}r1"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "50000" and (cpu / "cpu.shares").read_text() == "1024"
    assert (root / "pids" / "swe-rl" / f"{GROUP_PREFIX}r1" / "pids.max").read_text() == "10"
    assert [f.parent.parent.parent.name for f in ctl.procs_files(group)] == ["memory", "cpu", "pids"]


def test_auto_without_root_is_noop_and_bad_backend_is_rejected(tmp_path):
    assert isinstance(make_controller("auto", None), NoopController)
    assert isinstance(make_controller("auto", str(tmp_path)), NoopController)  # neither v1 nor v2
    with pytest.raises(ValueError, match="backend"):
        make_controller("v3", str(tmp_path))
    with pytest.raises(ValueError, match="root"):
        make_controller("v2", None)


async def test_disabled_shim_is_a_noop():
    shim = ResourceShim.from_settings(None)
    async with shim.rollout("r1") as lease:
        assert lease.cgroup_path is None
        lease.on_phase("tool")
        lease.on_phase("inference")
        assert lease.wrap_argv(["true"]) == ["true"]
    assert shim.pool.used == 0


async def test_full_rollout_limits_follow_phases(fakefs):
    """Admission, baseline, burst before the tool, learned grant, release after, cleanup."""
    shim = make_shim(fakefs)
    async with shim.rollout("a") as lease:
        group = lease.cgroup_path
        assert group is not None and group.exists()
        # Baseline reserved and protected; hard cap set once.
        assert (group / "memory.min").read_text() == str(256 * MiB)
        assert (group / "memory.high").read_text() == str(256 * MiB)
        assert (group / "memory.max").read_text() == str(3072 * MiB)
        assert (group / "pids.max").read_text() == "4096"
        assert shim.pool.reserved == {"a": 256 * MiB}

        # The agent process is placed in the group from its first instruction.
        proc = subprocess.run(lease.wrap_argv(["sh", "-c", "echo $$"]), capture_output=True, text=True, check=True)
        assert (group / "cgroup.procs").read_text().strip() == proc.stdout.strip()
        (group / "cgroup.procs").write_text("")  # it exited

        fakefs.set_usage(group, 200 * MiB)
        lease.on_phase("tool")  # a response left: the tool is about to run
        assert (group / "memory.high").read_text() == str((256 + 512) * MiB)
        assert shim.pool.used == (256 + 512) * MiB

        # The tool grows to its grant: poll() doubles it (pool has room) instead of an OOM.
        fakefs.set_usage(group, 700 * MiB)
        lease.poll()
        assert (group / "memory.high").read_text() == str((256 + 1024) * MiB)

        fakefs.set_usage(group, 300 * MiB)  # the tool ended; 300 MiB stay (a retry loop's leftovers)
        lease.on_phase("inference")
        assert (group / "memory.high").read_text() == str(300 * MiB)  # never below current usage
        assert shim.pool.reserved == {"a": 300 * MiB}

        # The next tool gets a grant learned from the last one (700 MiB * 1.25 - 300 MiB, at least 512).
        lease.on_phase("tool")
        assert lease.grant == 575 * MiB
        assert (group / "memory.high").read_text() == str((300 + 575) * MiB)
        lease.on_phase("tool")  # repeated event: no new decision
        assert lease.grant == 575 * MiB
        fakefs.set_usage(group, 100 * MiB)
        lease.on_phase("inference")
        assert (group / "memory.high").read_text() == str(256 * MiB)

    assert not group.exists()
    assert shim.pool.used == 0
    calls = lease.summary.tool_calls
    assert len(calls) == 2 and calls[0].peak_bytes == 700 * MiB and calls[0].grant_bytes == 1024 * MiB
    events = [e for _, e, _ in lease.summary.decisions]
    assert events == ["admit", "tool:granted", "grow:granted", "inference", "tool:granted", "inference"]


async def test_burst_exceeding_the_pool_is_queued_and_throttled_not_killed(fakefs):
    """Two rollouts share a pool that holds one burst: the second tool waits (FIFO) under memory.high."""
    shim = make_shim(fakefs, pool_bytes=1200 * MiB)
    async with shim.rollout("a") as a, shim.rollout("b") as b:
        ga, gb = a.cgroup_path, b.cgroup_path
        a.on_phase("tool")
        assert shim.pool.used == (256 + 256 + 512) * MiB
        fakefs.set_usage(gb, 250 * MiB)
        b.on_phase("tool")  # 512 MiB more does not fit: queued
        assert shim.pool.queued == 1
        # b keeps running throttled at its reservation; memory.max (the OOM limit) is untouched.
        assert (gb / "memory.high").read_text() == str(256 * MiB)
        assert (gb / "memory.max").read_text() == str(3072 * MiB)
        assert b.grant == 0
        # a's grow request queues behind b (strict FIFO) rather than starving it.
        fakefs.set_usage(ga, 760 * MiB)
        a.poll()
        assert shim.pool.queued == 2
        fakefs.set_usage(ga, 200 * MiB)
        a.on_phase("inference")  # a's tool ends: its grant goes to b
        assert b.grant == 512 * MiB
        assert (gb / "memory.high").read_text() == str((256 + 512) * MiB)
        assert shim.pool.queued == 0 and shim.pool.used <= shim.pool.capacity
        b.on_phase("inference")
        assert b.summary.tool_calls[0].queued_s > 0
        assert [e for _, e, _ in b.summary.decisions] == ["admit", "tool:queued", "tool:granted", "inference"]
        # a's cancelled grow left nothing reserved behind.
        assert shim.pool.reserved == {"a": 256 * MiB, "b": 256 * MiB}
    assert fakefs.root.joinpath(f"{GROUP_PREFIX}a").exists() is False
    assert shim.pool.used == 0


async def test_admission_waits_for_baseline_and_times_out(fakefs):
    shim = make_shim(fakefs, pool_bytes=800 * MiB, admission_timeout_s=0.2)
    order = []
    async with shim.rollout("a") as a:
        a.on_phase("tool")  # 256 + 512 of 800 used

        async def second():
            async with shim.rollout("b"):
                order.append("b admitted")

        job = asyncio.create_task(second())
        await asyncio.sleep(0.05)
        assert order == [] and shim.pool.queued == 1
        a.on_phase("inference")  # releases the grant: b fits
        await asyncio.wait_for(job, 5)
        assert order == ["b admitted"]
        a.on_phase("tool")
        with pytest.raises(AdmissionTimeout):
            async with shim.rollout("c"):
                pass
        assert shim.pool.queued == 0 and "c" not in shim.pool.reserved


async def test_cancelled_rollout_kills_its_processes_and_leaves_no_group(fakefs):
    shim = make_shim(fakefs)
    started = asyncio.Event()
    holder = {}

    async def rollout():
        async with shim.rollout("x") as lease:
            proc = subprocess.Popen(["sleep", "300"])
            lease.add_pid(proc.pid)
            holder["proc"], holder["group"] = proc, lease.cgroup_path
            started.set()
            await asyncio.sleep(300)

    job = asyncio.create_task(rollout())
    await started.wait()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert holder["proc"].wait(timeout=5) == -9
    assert not holder["group"].exists()
    assert shim.pool.used == 0


def test_reaper_removes_groups_of_dead_runs(fakefs):
    ctl = CgroupV2Controller(fakefs.root, fs=fakefs)
    stale = ctl.create("crashed")
    proc = subprocess.Popen(["sleep", "300"])
    ctl.add_pid(stale, proc.pid)
    shim = make_shim(fakefs)
    assert shim.reap_stale_groups() == [stale]
    assert proc.wait(timeout=5) == -9 and not stale.exists()


def test_pool_rejects_requests_it_can_never_grant():
    pool = MemoryPool(100)
    with pytest.raises(ValueError, match="exceeds the pool"):
        pool.enqueue("a", 101, lambda: None)


@pytest.mark.skipif(
    not os.environ.get(CGROUP_ROOT_ENV),
    reason=f"no delegated cgroup2 directory: set {CGROUP_ROOT_ENV} to one (never /sys/fs/cgroup itself) to run against the kernel",
)
async def test_real_kernel_group_limits_and_cleanup():
    root = Path(os.environ[CGROUP_ROOT_ENV])
    settings = ShimSettings(enabled=True, cgroup_backend="v2", cgroup_root=str(root), pool_bytes=2048 * MiB)
    shim = ResourceShim(settings)
    shim.controller.enable_controllers()
    async with shim.rollout(f"kernel-{os.getpid()}") as lease:
        proc = await asyncio.create_subprocess_exec(*lease.wrap_argv(["sleep", "300"]))
        await asyncio.sleep(0.2)
        assert proc.pid in shim.controller.procs(lease.cgroup_path)
        lease.on_phase("tool")
        assert int((lease.cgroup_path / "memory.high").read_text()) == settings.baseline_bytes + settings.burst_min_bytes
        group = lease.cgroup_path
    assert await proc.wait() == -9
    assert not group.exists()
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE


async def test_unused_grant_is_returned_inside_a_long_tool(fakefs):
    shim = make_shim(fakefs, shrink_after_s=0.05)
    async with shim.rollout("a") as lease:
        group = lease.cgroup_path
        lease.on_phase("tool")
        fakefs.set_usage(group, 300 * MiB)  # the burst is over; the call goes on
        lease.poll()  # starts the idle clock
        await asyncio.sleep(0.1)
        lease.poll()
        assert (group / "memory.high").read_text() == str(375 * MiB)  # 1.25 x usage, not below it
        assert shim.pool.reserved == {"a": 375 * MiB}
        assert [e for _, e, _ in lease.summary.decisions][-1] == "shrink"


class _Target:
    """An in-memory stand-in for a container's memory (the real one: tests/sandbox/test_shim_docker.py)."""

    def __init__(self, *, slow: bool, write_s: float = 0.0):
        self.slow, self.write_s = slow, write_s
        self.used = 0
        self.writes: list[tuple[int, str]] = []

    def usage(self) -> int:
        return self.used

    def set_limit(self, nbytes: int) -> int:
        import threading
        import time

        time.sleep(self.write_s)
        self.writes.append((nbytes, threading.current_thread().name))
        return nbytes


def _docker_shim(**overrides) -> ResourceShim:
    settings = dict(enabled=True, pool_bytes=2048 * MiB, baseline_bytes=64 * MiB, burst_min_bytes=128 * MiB,
                    hard_max_bytes=1024 * MiB, monitor_interval_s=3600)
    return ResourceShim(ShimSettings(**{**settings, **overrides}), sandbox_backend="docker")


def test_auto_enables_the_shim_where_it_can_enforce_limits(monkeypatch):
    import sandbox.shim as shim_module

    monkeypatch.setenv(CGROUP_ROOT_ENV, "/from-env")  # only an explicit enabled=true reads it
    monkeypatch.setattr(shim_module, "CGROUP_V1_MEMORY", str(Path(__file__).parent))  # "v1 here"
    assert ShimSettings().resolved_enabled("docker") and not ShimSettings().resolved_enabled("local")
    assert not ShimSettings().resolved_enabled("docker-remote")
    assert ShimSettings(cgroup_root="/x").resolved_enabled("local")
    assert not ShimSettings(enabled=False).resolved_enabled("docker")
    assert ShimSettings(enabled=True).resolved_enabled("local")
    assert ResourceShim(ShimSettings(), sandbox_backend="docker").enabled
    assert not ResourceShim(ShimSettings()).enabled
    monkeypatch.setattr(shim_module, "CGROUP_V1_MEMORY", "/nonexistent")  # cgroup v2: the engine would OOM-kill
    assert not ShimSettings().resolved_enabled("docker")
    with pytest.raises(ValueError, match="policy"):
        ShimSettings(policy="oracle")


async def test_a_slow_targets_writes_leave_the_phase_event_at_once_and_the_newest_wins():
    shim = _docker_shim()
    target = _Target(slow=True, write_s=0.2)
    async with shim.rollout("slow") as lease:
        await lease.bind(target)
        import time

        t = time.monotonic()
        lease.on_phase("tool")
        lease.on_phase("inference")
        lease.on_phase("tool")
        assert time.monotonic() - t < 0.1  # three decisions, no engine round trip waited for
    # Stopped: what was pending is applied, from the writer thread, the last decision last.
    assert target.writes[-1][0] == (64 + 128) * MiB
    assert {name for _, name in target.writes} == {"shim-limit-writer"}
    assert len(target.writes) < 3  # a decision overtaken while a write was in flight is skipped
    assert all(c.latency_s >= 0.2 for c in lease.summary.limit_changes)


async def test_the_static_and_reactive_baselines():
    static = _docker_shim(policy="static", baseline_bytes=300 * MiB)
    async with static.rollout("s") as lease:
        target = _Target(slow=False)
        await lease.bind(target)
        assert lease.container_limit_bytes(1024 * MiB) == 300 * MiB and not lease.pauses_at_limit
        lease.on_phase("tool")
        target.used = 500 * MiB
        lease.poll()
        lease.on_phase("inference")
        assert target.writes == [] and static.pool.reserved["s"] == 300 * MiB

    reactive = _docker_shim(policy="reactive", pool_bytes=512 * MiB)
    async with reactive.rollout("r") as lease:
        target = _Target(slow=False)
        await lease.bind(target)
        target.used = 200 * MiB
        lease.poll()
        assert target.writes[-1][0] == 240 * MiB and reactive.pool.reserved["r"] == 240 * MiB
        target.used = 600 * MiB  # more than the pool: the limit stays where it is (an OOM kill follows)
        lease.poll()
        assert target.writes[-1][0] == 240 * MiB
        target.used = 10 * MiB
        lease.poll()
        assert target.writes[-1][0] == 64 * MiB and reactive.pool.reserved["r"] == 64 * MiB


async def test_a_traced_rollout_replays(tmp_path):
    from sandbox.simulate import load_recorded

    shim = _docker_shim(trace_dir=str(tmp_path))
    async with shim.rollout("traced") as lease:
        target = _Target(slow=False)
        await lease.bind(target)
        for used, phase in [(5, "inference"), (5, "tool"), (300, "tool"), (20, "inference"), (20, "inference")]:
            lease.on_phase(phase)
            target.used = used * MiB
            lease.poll()
            await asyncio.sleep(0.05)  # rows 50 ms apart, as the monitor's
    (trace,) = load_recorded(tmp_path, dt=0.01)
    assert trace.name == "traced" and trace.peak == pytest.approx(300, rel=0.05)
    assert trace.tool.any() and not trace.tool.all()
