"""The phase-aware resource shim: per-rollout cgroups whose memory limits follow the agent's phase.

Why (seed 001, DESIGN.md "Resource shim"): a coding agent holds a ~185 MB
baseline while the model thinks and bursts to 0.5-4 GB for 1-2 s while a tool
runs; 98.5% of bursts happen inside tool calls. Static limits waste memory
(at peak) or OOM (at mean); user-space controllers reacting to pressure arrive
10-100 ms late. The ModelProxy knows the phase boundaries exactly (a response
leaving = a tool is about to run; the next request arriving = it finished), so
the shim moves limits at the boundary instead:

- **admission**: a rollout starts only when the shared pool can reserve its
  baseline (``baseline_bytes``); otherwise it waits in a FIFO queue
  (``admission_timeout_s``) instead of overcommitting.
- **inference phase**: ``memory.high`` = the reservation = max(baseline, current
  usage) (never below what the group holds: lowering under usage would force a
  reclaim storm); ``memory.min``/``memory.low`` protect the baseline.
- **tool phase** (``on_phase("tool")``, just before the tool runs): a burst grant
  is taken from the pool and ``memory.high`` raised to reservation + grant. The
  grant is learned per rollout (1.25 x the largest tool usage seen so far, between
  ``burst_min_bytes`` and ``burst_max_bytes``). When the pool is short the tool is
  queued for its grant and runs throttled under ``memory.high`` meanwhile -- it is
  slowed, never OOM-killed (``memory.high`` never OOM-kills).
- **growth past the grant**: ``poll()`` (called by the monitor every
  ``monitor_interval_s``) sees usage at the grant and asks the pool for a larger
  one (doubling); while it waits, the group is throttled, not killed.
- **end of tool** (``on_phase("inference")``): the grant is returned, down to
  current usage (retry loops keep memory; that stays reserved).
- ``memory.max`` = ``hard_max_bytes`` for the whole rollout: the only OOM is a
  single rollout exceeding the hard cap.

The limits live on a cgroup of a delegated directory (local sandboxes; ``memory.high``) or on a
Docker sandbox's container (``bind``; the limit through the engine, the container asleep at it
instead of OOM-killed: ``sandbox.docker_limits``).

Usage (the agent loop)::

    shim = ResourceShim.from_settings(settings, sandbox_backend="docker")  # once per worker
    async with shim.rollout(rollout_id) as lease:          # may wait for admission
        proc = spawn(lease.wrap_argv(argv))                 # local: or lease.add_pid(pid)
        await bind_container_limits(lease, container, cap)  # docker: once the container runs
        SessionConfig(..., on_phase=lease.on_phase)
    lease.summary                                           # ShimRolloutSummary

``enabled=None`` (auto, the default) is on for the Docker backend on a local cgroup v1 engine and
for local sandboxes with a ``cgroup_root`` (``ShimSettings.resolved_enabled``); off, every call is
a no-op and ``cgroup_path`` is None.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from sandbox.cgroup import CgroupController, CgroupStats, MemoryLimits, NoopController, make_controller

logger = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
# Environment variable naming a delegated cgroup2 directory (tests and the CLI default).
CGROUP_ROOT_ENV = "SWE_RL_CGROUP_ROOT"
# cgroup v1's memory hierarchy: where a local engine's containers can sleep at their limit.
CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"


POLICIES = ("phase", "static", "reactive")


@dataclass
class ShimSettings:
    """Resource-shim configuration (bytes, seconds, cores).

    ``enabled=None`` (auto) turns the shim on where it can enforce limits: the Docker backend on a
    local cgroup v1 engine (limits through the engine, ``sandbox.docker_limits``) or a configured
    cgroup root; see ``resolved_enabled``. ``pool_bytes=0`` means 80% of the machine's RAM. ``cgroup_root=None``
    takes ``$SWE_RL_CGROUP_ROOT``; without either, local sandboxes get the no-op controller
    (policy decisions and measurements still run, limits are not enforced).

    ``policy``: ``phase`` (the module docstring's policy), or a baseline to compare it with:
    ``static`` (every rollout's limit is ``baseline_bytes`` for its whole life, reserved at
    admission: static limits with admission control) or ``reactive`` (the limit follows usage,
    ``reactive_headroom`` x what the last poll read, never below ``baseline_bytes``, grown from the
    pool when it has room). Only ``phase`` pauses a Docker sandbox at its limit instead of OOM-killing.
    """

    enabled: bool | None = None
    policy: str = "phase"
    cgroup_backend: str = "auto"  # auto | v2 | v1 | none
    cgroup_root: str | None = None
    pool_bytes: int = 0
    baseline_bytes: int = 256 * MiB
    burst_min_bytes: int = 128 * MiB
    burst_max_bytes: int = 4 * GiB
    hard_max_bytes: int = 8 * GiB
    # Multiplier on the largest tool usage seen in this rollout when sizing the next grant.
    burst_learn_factor: float = 1.25
    # policy=reactive: limit = this x the usage last read.
    reactive_headroom: float = 1.2
    # 0 = no cpu.max; the CPU is not the bottleneck (seed 001: 7-13% of a core on average).
    cpu_quota_cores: float = 0.0
    cpu_weight: int = 100
    pids_max: int = 4096
    # How long a rollout may wait for its baseline before AdmissionTimeout, seconds.
    admission_timeout_s: float = 600.0
    # Period of the growth/shrink check (poll), seconds.
    monitor_interval_s: float = 0.05
    # A grant unused (usage < half the limit) this long inside a tool is cut to 1.25x usage; 0 = never.
    shrink_after_s: float = 1.0
    # A directory for one memory trace per rollout (``<rollout_id>.jsonl``: one row per poll, the
    # rows ``sandbox.simulate.load_recorded`` replays); null = none.
    trace_dir: str | None = None

    def __post_init__(self) -> None:
        if self.cgroup_backend not in ("auto", "v2", "v1", "none"):
            raise ValueError(f"shim cgroup_backend {self.cgroup_backend!r}: expected auto, v2, v1 or none")
        if self.policy not in POLICIES:
            raise ValueError(f"shim policy {self.policy!r}: expected one of {', '.join(POLICIES)}")
        for name in ("pool_bytes", "baseline_bytes", "burst_min_bytes", "burst_max_bytes", "hard_max_bytes",
                     "cpu_quota_cores", "admission_timeout_s", "shrink_after_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"shim {name} must be >= 0, got {getattr(self, name)!r}")
        if not self.monitor_interval_s > 0:
            raise ValueError(f"shim monitor_interval_s must be > 0 seconds, got {self.monitor_interval_s!r}")
        if not self.reactive_headroom >= 1.0:
            raise ValueError(f"shim reactive_headroom must be >= 1, got {self.reactive_headroom!r}")

    def resolved_pool_bytes(self) -> int:
        return self.pool_bytes or int(psutil.virtual_memory().total * 0.8)

    def resolved_enabled(self, sandbox_backend: str) -> bool:
        """``enabled``, with None (auto) = on where the shim can enforce limits the way it is
        measured to work: the ``docker`` backend on a local engine with cgroup v1's memory
        controller (a container asleep at its limit instead of OOM-killed; on cgroup v2 the engine
        ignores ``--oom-kill-disable``), or local sandboxes with ``cgroup_root`` set.

        ``sandbox_backend``: ``local``, ``docker`` (a local engine) or ``docker-remote``.
        """
        if self.enabled is not None:
            return bool(self.enabled)
        if sandbox_backend == "docker":
            return os.path.isdir(CGROUP_V1_MEMORY)
        return sandbox_backend == "local" and bool(self.cgroup_root)


@dataclass(frozen=True)
class ShimPolicy:
    """The shim's sizing decisions as pure functions of memory amounts, in one unit.

    The live shim (``RolloutLease``, bytes) and the replay simulator
    (``sandbox.simulate.replay_ours``, MiB) both decide through this class, so what the
    replay predicts is what the shim does. Build it with ``from_settings``.

    Attributes:
        baseline, burst_min, burst_max, hard_max: ``ShimSettings``' ``*_bytes`` in ``unit``.
        learn_factor: ``ShimSettings.burst_learn_factor``.
        monitor_interval_s, shrink_after_s: ``ShimSettings``' periods, seconds.
    """

    baseline: float
    burst_min: float
    burst_max: float
    hard_max: float
    learn_factor: float
    monitor_interval_s: float
    shrink_after_s: float

    # Usage at this share of the limit asks for a larger grant; under the idle share a grant is unused.
    GROW_AT = 0.9
    IDLE_BELOW = 0.5
    SHRINK_TO = 1.25  # an unused grant is cut to this multiple of usage

    @classmethod
    def from_settings(cls, settings: ShimSettings, unit: float = 1) -> ShimPolicy:
        """The policy of ``settings`` with amounts divided by ``unit`` (1 = bytes, ``MiB``...)."""
        return cls(
            baseline=settings.baseline_bytes / unit,
            burst_min=settings.burst_min_bytes / unit,
            burst_max=settings.burst_max_bytes / unit,
            hard_max=settings.hard_max_bytes / unit,
            learn_factor=settings.burst_learn_factor,
            monitor_interval_s=settings.monitor_interval_s,
            shrink_after_s=settings.shrink_after_s,
        )

    def tool_grant(self, largest_tool: float, reservation: float) -> float:
        """The burst grant asked for when a tool starts: ``learn_factor`` x the largest tool
        usage so far above the reservation, clamped to ``[burst_min, burst_max]`` and to
        what ``hard_max`` leaves."""
        want = max(self.burst_min, min(self.burst_max, largest_tool * self.learn_factor - reservation))
        return min(want, self.hard_max - reservation)

    # needs_growth and grant_unused take numbers or numpy arrays (the replay asks for all rollouts at once).

    def needs_growth(self, usage: Any, limit: Any) -> Any:
        """Whether usage is at the limit (the monitor then asks for more)."""
        return usage >= self.GROW_AT * limit

    def growth(self, grant: float, limit: float) -> float:
        """The extra grant asked for at the limit: doubling (at least ``burst_min``), within
        ``hard_max``; <= 0 means none is possible."""
        return min(max(grant, self.burst_min), self.hard_max - limit)

    def grant_unused(self, usage: Any, limit: Any, grant: Any) -> Any:
        """Whether a grant is going unused (the burst is over but the tool call goes on)."""
        return (self.shrink_after_s > 0) & (grant > 0) & (usage < self.IDLE_BELOW * limit)

    def shrunk_grant(self, usage: float, reservation: float) -> float:
        """The grant left after ``shrink_after_s`` unused: ``SHRINK_TO`` x usage."""
        return max(0.0, self.SHRINK_TO * usage - reservation)

    def reservation_after_tool(self, usage: float) -> float:
        """The reservation held while the model thinks: the baseline, never below usage
        (retry loops keep memory between calls; lowering under it would force a reclaim storm)."""
        return max(self.baseline, usage)


class AdmissionTimeout(TimeoutError):
    """The pool could not reserve a rollout's baseline within ``admission_timeout_s``."""


@dataclass
class _Waiter:
    owner: str
    amount: int
    on_grant: Callable[[], None]
    cancelled: bool = False
    granted: bool = False


class MemoryPool:
    """A shared byte budget with FIFO queueing (thread-safe; callbacks run outside the lock).

    ``try_reserve`` succeeds only when nobody is queued ahead (strict FIFO, so a large
    request is not starved by a stream of small ones).
    """

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"pool capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.reserved: dict[str, int] = {}
        self._queue: deque[_Waiter] = deque()
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return sum(self.reserved.values())

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def queued(self) -> int:
        return sum(1 for w in self._queue if not w.cancelled)

    def try_reserve(self, owner: str, amount: int) -> bool:
        """Add ``amount`` bytes to ``owner``'s reservation if it fits now and nobody waits."""
        with self._lock:
            if self._queue or amount > self.free:
                return False
            self.reserved[owner] = self.reserved.get(owner, 0) + amount
            return True

    def enqueue(self, owner: str, amount: int, on_grant: Callable[[], None]) -> _Waiter:
        """Queue a request; ``on_grant()`` runs once the bytes are reserved for ``owner``.

        Raises:
            ValueError: ``amount`` exceeds the whole pool (it could never be granted).
        """
        if amount > self.capacity:
            raise ValueError(f"{owner}: request of {amount} B exceeds the pool ({self.capacity} B)")
        waiter = _Waiter(owner, amount, on_grant)
        with self._lock:
            self._queue.append(waiter)
        self._serve()
        return waiter

    def cancel(self, waiter: _Waiter) -> None:
        with self._lock:
            waiter.cancelled = True
            with contextlib.suppress(ValueError):
                self._queue.remove(waiter)
        self._serve()

    def set_reservation(self, owner: str, amount: int) -> None:
        """Set ``owner``'s reservation (lowering releases bytes to the queue; raising may overcommit
        only by what the owner already holds in memory -- callers raise through try_reserve/enqueue)."""
        with self._lock:
            if amount <= 0:
                self.reserved.pop(owner, None)
            else:
                self.reserved[owner] = amount
        self._serve()

    def release_all(self, owner: str) -> None:
        with self._lock:
            self.reserved.pop(owner, None)
            for w in list(self._queue):
                if w.owner == owner:
                    w.cancelled = True
                    self._queue.remove(w)
        self._serve()

    def _serve(self) -> None:
        granted: list[_Waiter] = []
        with self._lock:
            while self._queue:
                head = self._queue[0]
                if head.cancelled:
                    self._queue.popleft()
                    continue
                if head.amount > self.capacity - sum(self.reserved.values()):
                    break
                self._queue.popleft()
                self.reserved[head.owner] = self.reserved.get(head.owner, 0) + head.amount
                head.granted = True
                granted.append(head)
        for w in granted:
            try:
                w.on_grant()
            except Exception:  # a grant callback must not break the pool for others
                logger.exception("grant callback of %s failed", w.owner)


@dataclass
class ToolCallStats:
    """One tool call as the shim saw it (bytes, seconds)."""

    start_s: float
    end_s: float | None = None
    grant_bytes: int = 0
    peak_bytes: int = 0
    queued_s: float = 0.0


@dataclass
class LimitChange:
    """One limit the shim set: what was decided (``event``, ``decided_s``, ``requested_bytes``) and
    when the kernel had it (``applied_s``, ``applied_bytes``); monotonic seconds. For a Docker
    sandbox ``applied_s - decided_s`` is the engine's round trip (``docker update``)."""

    event: str
    decided_s: float
    applied_s: float
    requested_bytes: int
    applied_bytes: int

    @property
    def latency_s(self) -> float:
        return self.applied_s - self.decided_s


@dataclass
class ShimRolloutSummary:
    """What the shim did for one rollout (bytes, seconds).

    ``decisions`` is the ordered log of ``(monotonic time, event, limit bytes)``; ``limit_changes``
    the limits written, with their latency; ``memory_kills`` the commands the shim killed at
    ``hard_max_bytes`` (a paused Docker sandbox has no OOM killer); ``paused_s`` the time polls found
    it asleep at its limit (waiting for a grant); ``peak_usage_bytes`` the
    highest usage a poll read; ``samples`` ``(monotonic time, usage, limit, phase)`` per poll
    when ``trace_dir`` is set.
    """

    rollout_id: str
    policy: str = "phase"
    admission_wait_s: float = 0.0
    tool_calls: list[ToolCallStats] = field(default_factory=list)
    queued_s: float = 0.0
    final_stats: CgroupStats | None = None
    decisions: list[tuple[float, str, int]] = field(default_factory=list)
    limit_changes: list[LimitChange] = field(default_factory=list)
    memory_kills: int = 0
    peak_usage_bytes: int = 0
    paused_s: float = 0.0  # polls that found the sandbox asleep at its limit x the poll period
    admitted_s: float = 0.0  # monotonic
    released_s: float = 0.0
    admitted_at: float = 0.0  # wall clock (time.time()), for lining rollouts up across a run
    released_at: float = 0.0
    samples: list[tuple[float, int, int, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The rollout record's ``shim`` entry (JSON-ready; bytes and seconds)."""
        lat = sorted(c.latency_s for c in self.limit_changes)
        return {
            "policy": self.policy,
            "admission_wait_s": round(self.admission_wait_s, 4),
            "queued_s": round(self.queued_s, 4),
            "paused_s": round(self.paused_s, 3),
            "tool_calls": len(self.tool_calls),
            "limit_changes": len(self.limit_changes),
            "limit_latency_p50_s": round(lat[len(lat) // 2], 4) if lat else None,
            "limit_latency_max_s": round(lat[-1], 4) if lat else None,
            "memory_kills": self.memory_kills,
            "peak_usage_bytes": self.peak_usage_bytes,
            "lease_s": round(max(0.0, self.released_s - self.admitted_s), 3),
            "admitted_at": round(self.admitted_at, 3),
            "released_at": round(self.released_at, 3),
        }


class LimitTarget(Protocol):
    """What a lease moves: a cgroup's ``memory.high`` or a container's limit (``sandbox.docker_limits``).

    ``slow`` targets (an engine round trip) are written from the lease's own writer thread, so
    phase events never wait for them."""

    slow: bool

    def usage(self) -> int: ...
    def set_limit(self, nbytes: int) -> int: ...


class _CgroupTarget:
    """A group of the shim's cgroup controller: the phase limit is ``memory.high`` (microsecond writes)."""

    slow = False

    def __init__(self, controller: CgroupController, group: Path):
        self.controller, self.group = controller, group

    def usage(self) -> int:
        return self.controller.stats(self.group).memory_current or 0

    def set_limit(self, nbytes: int) -> int:
        self.controller.set_memory(self.group, MemoryLimits(high=nbytes))
        return nbytes


class _LimitWriter:
    """One thread per slow target applying the newest decided limit (older ones are skipped:
    only the last decision matters), recording each write's latency."""

    def __init__(self, target: LimitTarget, record: Callable[[LimitChange], None]):
        self._target, self._record = target, record
        self._want: tuple[str, float, int] | None = None
        self._cond = threading.Condition()
        self._stopped = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="shim-limit-writer", daemon=True)
        self._thread.start()

    def submit(self, event: str, decided_s: float, nbytes: int) -> None:
        with self._cond:
            self._want = (event, decided_s, nbytes)
            self._busy = True
            self._cond.notify()

    @property
    def pending(self) -> bool:
        """Whether a decided limit has not reached the target yet."""
        return self._busy

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._want is None and not self._stopped:
                    self._cond.wait()
                if self._want is None:
                    return
                event, decided, nbytes = self._want
                self._want = None
            try:
                applied = self._target.set_limit(nbytes)
            except Exception as exc:
                logger.warning("shim: limit %d B (%s) not applied: %s", nbytes, event, exc)
                continue
            finally:
                with self._cond:
                    self._busy = self._want is not None
            self._record(LimitChange(event, decided, time.monotonic(), nbytes, int(applied)))

    def close(self, timeout_s: float = 10.0) -> None:
        """Apply what is pending, then stop (blocking)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout_s)


class RolloutLease:
    """One admitted rollout's limits, moved with its phase (see module docstring).

    The limits live on a cgroup of the shim's controller (``cgroup_path``, from admission) or on
    a target bound once it exists (``bind``: a Docker sandbox's container).

    Attributes:
        rollout_id: the rollout's id.
        cgroup_path: the group directory (write pids to its ``cgroup.procs``); None without cgroups.
        summary: the decisions and per-tool-call numbers so far.
    """

    def __init__(self, shim: ResourceShim, rollout_id: str, group: Path | None):
        self.shim = shim
        self.settings = shim.settings
        self.policy = shim.policy
        self.rollout_id = rollout_id
        self.cgroup_path = group
        self.summary = ShimRolloutSummary(rollout_id=rollout_id, policy=self.settings.policy)
        self.phase = "inference"
        self.reservation = self.settings.baseline_bytes  # held in the pool besides the grant
        self.grant = 0
        self.largest_tool_bytes = 0
        self._waiter = None
        self._idle_since: float | None = None
        self._epoch = 0  # phase boundaries so far; a grant for an older phase is returned
        self._queued_since: float | None = None
        self._lock = threading.RLock()
        self._closed = False
        self._target: LimitTarget | None = None
        self._writer: _LimitWriter | None = None
        self._at_cap_polls = 0
        self._monitor: asyncio.Task | None = None
        if group is not None:
            self._target = _CgroupTarget(shim.controller, group)

    # -- what a sandbox is created with --------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether this lease moves limits (the shim is on)."""
        return self.shim.enabled

    def container_limit_bytes(self, default: int) -> int:
        """The memory limit a Docker sandbox starts with: the reservation (phase, reactive), the
        static limit, or ``default`` when the shim is off."""
        return min(int(self.reservation), int(default)) if self.active else int(default)

    @property
    def pauses_at_limit(self) -> bool:
        """Whether the sandbox should sleep at its limit instead of OOM-killing (``--oom-kill-disable``):
        the phase policy raises the limit (or queues for it) when a tool reaches it."""
        return self.active and self.settings.policy == "phase"

    async def bind(self, target: LimitTarget, hard_max_bytes: int | None = None) -> None:
        """Move ``target``'s limit from now on (a sandbox that exists only after admission); starts
        the monitor. ``hard_max_bytes``: a lower hard cap than the settings' (the sandbox's own)."""
        if not self.active or self._closed:
            return
        with self._lock:
            self._target = target
            if hard_max_bytes is not None:
                self._hard_max = min(self.settings.hard_max_bytes, int(hard_max_bytes))
            if getattr(target, "slow", False):
                self._writer = _LimitWriter(target, self._record_change)
        self._start_monitor()

    @property
    def hard_max(self) -> int:
        return getattr(self, "_hard_max", self.settings.hard_max_bytes)

    def _start_monitor(self) -> None:
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._monitor_loop())

    async def _monitor_loop(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self.settings.monitor_interval_s)
            # A usage read is one small file: cheap, but kept off the event loop anyway.
            try:
                await asyncio.to_thread(self.poll)
            except Exception:  # one bad read or kill must not leave the sandbox unwatched
                failures += 1
                if failures in (1, 100):
                    logger.exception("rollout %s: shim poll failed (%d so far)", self.rollout_id, failures)

    async def _stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._monitor
        self.close()
        if self._writer is not None:
            await asyncio.to_thread(self._writer.close)

    # -- process placement ---------------------------------------------------------------------

    def add_pid(self, pid: int) -> None:
        """Move ``pid`` into the rollout's group (no-op without cgroups)."""
        if self.cgroup_path is not None:
            self.shim.controller.add_pid(self.cgroup_path, pid)

    def wrap_argv(self, argv: list[str]) -> list[str]:
        """``argv`` started inside the group from its first instruction (no fork escapes before the move)."""
        if self.cgroup_path is None:
            return list(argv)
        files = " ".join(shlex.quote(str(f)) for f in self.shim.controller.procs_files(self.cgroup_path))
        return ["sh", "-c", f'for f in {files}; do echo $$ > "$f" || exit 125; done; exec "$@"', "sh", *argv]

    # -- phase events ----------------------------------------------------------------------------

    def on_phase(self, phase: str) -> None:
        """The proxy's hook: ``"tool"`` when a response leaves, ``"inference"`` when a request arrives.

        Quick (pool bookkeeping, plus a few small file writes or a hand-off to the writer thread);
        never raises (errors are logged). Only the phase policy acts on it.
        """
        try:
            with self._lock:
                if self._closed or phase == self.phase:
                    return
                self.phase = phase
                self._epoch += 1
                if self.settings.policy != "phase":
                    return
                if phase == "tool":
                    self._start_tool()
                elif phase == "inference":
                    self._end_tool()
                else:
                    logger.warning("rollout %s: unknown phase %r", self.rollout_id, phase)
        except Exception:
            logger.exception("rollout %s: shim decision for phase %r failed", self.rollout_id, phase)

    def poll(self) -> None:
        """Read usage and act on it (called every ``monitor_interval_s``): the phase policy grows a
        grant at its limit and shrinks an unused one; the reactive policy follows usage; a sandbox
        that sleeps at the hard cap has its commands killed.

        Runs in both phases: a tool that outgrows its grant, or a baseline that grew
        (retry loops keep memory), asks the pool for more instead of staying throttled.
        """
        with self._lock:
            if self._closed or self._target is None:
                return
            usage = self._usage()
            limit = self.reservation + self.grant
            now = time.monotonic()
            self.summary.peak_usage_bytes = max(self.summary.peak_usage_bytes, usage)
            if self.settings.trace_dir:
                self.summary.samples.append((now, usage, min(limit, self.hard_max), self.phase))
            if self.phase == "tool" and self.summary.tool_calls:
                call = self.summary.tool_calls[-1]
                call.peak_bytes = max(call.peak_bytes, usage)
            paused = getattr(self._target, "under_oom", lambda: False)()
            if paused:
                # Tasks sleep at the limit: tool time lost until a grant (or the hard-cap kill) arrives.
                self.summary.paused_s += self.settings.monitor_interval_s
            applied = getattr(self._target, "limit_bytes", limit)
            pending = self._writer is not None and self._writer.pending
            if paused and not pending and applied >= self.hard_max:
                # Asleep at the cap the kernel has, twice in a row (not a raise still on its way):
                # with the OOM killer off, end the commands as it would have.
                self._at_cap_polls += 1
                if self._at_cap_polls >= 2:
                    self._at_cap_polls = 0
                    if self._target.kill_commands():
                        self.summary.memory_kills += 1
                        self._log("hard_max:killed", limit)
                return
            self._at_cap_polls = 0
            if self.settings.policy == "reactive":
                self._follow_usage(usage, limit)
                return
            if self.settings.policy != "phase" or self._waiter is not None:
                return
            if self.policy.grant_unused(usage, limit, self.grant):
                # The burst is over but the call goes on: return the unused grant.
                self._idle_since = self._idle_since or now
                if now - self._idle_since >= self.policy.shrink_after_s:
                    self.grant = int(self.policy.shrunk_grant(usage, self.reservation))
                    self.shim.pool.set_reservation(self.rollout_id, self.reservation + self.grant)
                    self._apply_high(self.reservation + self.grant, "shrink")
                    self._idle_since = None
                return
            self._idle_since = None
            if self._writer is not None and self._writer.pending:
                return  # a raise is on its way: asleep at the old limit is not a reason to ask again
            if not (paused or self.policy.needs_growth(usage, limit)):
                return
            extra = int(min(self.policy.growth(self.grant, limit), self.hard_max - limit))
            if extra <= 0:
                return
            self._request(extra, "grow")

    def _follow_usage(self, usage: int, limit: int) -> None:
        """The reactive baseline: limit = headroom x usage (at least the baseline), from the pool."""
        want = max(self.settings.baseline_bytes, int(self.settings.reactive_headroom * usage))
        want = min(want, self.hard_max)
        if want > limit:
            if self.shim.pool.try_reserve(self.rollout_id, want - limit):
                self.reservation = want
                self._apply_high(want, "react:grow")
        elif want < 0.8 * limit:  # hysteresis: no write per poll for small moves
            self.reservation = want
            self.shim.pool.set_reservation(self.rollout_id, want)
            self._apply_high(want, "react:shrink")

    def _start_tool(self) -> None:
        if self._waiter is not None:  # a growth asked for while the model thought: superseded
            self.shim.pool.cancel(self._waiter)
            self._waiter = None
        self.summary.tool_calls.append(ToolCallStats(start_s=time.monotonic()))
        grant = int(min(self.policy.tool_grant(self.largest_tool_bytes, self.reservation),
                        self.hard_max - self.reservation))
        if grant > 0:
            self._request(grant, "tool")

    def _request(self, amount: int, why: str) -> None:
        pool = self.shim.pool
        if pool.try_reserve(self.rollout_id, amount):
            self._granted(amount, why)
            return
        # Short pool: keep running under the current limit (throttled or paused, not killed) and
        # wait for the bytes in FIFO order.
        self._queued_since = time.monotonic()
        self._log(f"{why}:queued", self.reservation + self.grant)
        epoch = self._epoch
        waiter = pool.enqueue(self.rollout_id, amount, lambda: self._on_granted(amount, why, epoch))
        if not waiter.granted:  # enqueue may serve it at once (bytes freed meanwhile): then it is done
            self._waiter = waiter

    def _on_granted(self, amount: int, why: str, epoch: int) -> None:
        with self._lock:
            self._waiter = None
            if self._closed or epoch != self._epoch:
                # The phase changed (or the rollout ended) before the grant arrived: give back this
                # grant only (what the lease holds now stays reserved).
                if not self._closed:
                    self.shim.pool.set_reservation(self.rollout_id, self.reservation + self.grant)
                return
            self._granted(amount, why)

    def _stop_queue_clock(self) -> None:
        """Charge the time since the request was queued to the rollout and its current tool call."""
        if self._queued_since is not None:
            waited = time.monotonic() - self._queued_since
            self.summary.queued_s += waited
            if self.summary.tool_calls:
                self.summary.tool_calls[-1].queued_s += waited
            self._queued_since = None

    def _granted(self, amount: int, why: str) -> None:
        self._stop_queue_clock()
        self.grant += amount
        if self.summary.tool_calls:
            self.summary.tool_calls[-1].grant_bytes = self.grant
        self._apply_high(self.reservation + self.grant, f"{why}:granted")

    def _end_tool(self) -> None:
        if self._waiter is not None:
            self.shim.pool.cancel(self._waiter)
            self._waiter = None
        self._stop_queue_clock()
        self._idle_since = None
        usage = self._usage()
        if self.summary.tool_calls:
            call = self.summary.tool_calls[-1]
            call.end_s = time.monotonic()
            call.peak_bytes = max(call.peak_bytes, usage)
            self.largest_tool_bytes = max(self.largest_tool_bytes, call.peak_bytes)
        self.reservation = int(self.policy.reservation_after_tool(usage))
        self.grant = 0
        self.shim.pool.set_reservation(self.rollout_id, self.reservation)
        self._apply_high(self.reservation, "inference")

    def _apply_high(self, high: int, event: str) -> None:
        high = min(high, self.hard_max)
        self._log(event, high)
        if self._target is None:
            return
        now = time.monotonic()
        if self._writer is not None:
            self._writer.submit(event, now, high)
        else:
            applied = self._target.set_limit(high)
            self._record_change(LimitChange(event, now, time.monotonic(), high, int(applied)))

    def _record_change(self, change: LimitChange) -> None:
        self.summary.limit_changes.append(change)

    def _usage(self) -> int:
        if self._target is None:
            return 0
        return int(self._target.usage())

    def _log(self, event: str, high: int) -> None:
        self.summary.decisions.append((time.monotonic(), event, int(high)))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._waiter is not None:
                self.shim.pool.cancel(self._waiter)
                self._waiter = None
            self._closed = True

    def write_trace(self, directory: str | os.PathLike[str]) -> Path | None:
        """Write ``summary.samples`` as ``<directory>/<rollout_id>.jsonl`` (rows of ``t`` seconds
        from admission, ``rss``/``sandbox_rss`` usage bytes, ``limit`` bytes, ``phase``), the format
        ``sandbox.simulate.load_recorded`` replays, and ``at``, wall-clock seconds); None when there
        is no sample. Blocking."""
        if not self.summary.samples:
            return None
        path = Path(directory) / f"{self.rollout_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        t0, wall0 = self.summary.admitted_s, self.summary.admitted_at
        rows = (json.dumps({"t": round(t - t0, 4), "at": round(wall0 + t - t0, 4), "rss": u, "sandbox_rss": u,
                            "limit": lim, "phase": ph})
                for t, u, lim, ph in self.summary.samples)
        path.write_text("\n".join(rows) + "\n")
        return path


class ResourceShim:
    """Admission, pool and per-rollout leases over one cgroup controller (see module docstring).

    Args:
        settings: its configuration; ``enabled=None`` resolves through ``sandbox_backend``
            (``ShimSettings.resolved_enabled``).
        sandbox_backend: the sandboxes' backend (``local`` | ``docker``).
    """

    def __init__(self, settings: ShimSettings, controller: CgroupController | None = None, *,
                 sandbox_backend: str = "local"):
        self.settings = settings
        self.policy = ShimPolicy.from_settings(settings)
        self._enabled = settings.resolved_enabled(sandbox_backend)
        if self._enabled and sandbox_backend != "docker":
            root = settings.cgroup_root or os.environ.get(CGROUP_ROOT_ENV) or None
            self.controller = controller or make_controller(settings.cgroup_backend, root)
        else:
            self.controller = controller if (controller is not None and self._enabled) else NoopController()
        self.pool = MemoryPool(settings.resolved_pool_bytes())
        if self._enabled and settings.baseline_bytes + settings.burst_min_bytes > self.pool.capacity:
            raise ValueError("shim pool cannot hold one rollout's baseline plus its minimum burst")
        self.leases: dict[str, RolloutLease] = {}

    @classmethod
    def from_settings(cls, settings: ShimSettings | dict | None, *, sandbox_backend: str = "local") -> ResourceShim:
        """Build from a ``ShimSettings``, a plain dict of its fields, or None (auto).

        Raises:
            TypeError: an unknown field name in the dict.
        """
        if settings is None:
            settings = ShimSettings()
        elif isinstance(settings, dict):
            settings = ShimSettings(**settings)
        return cls(settings, sandbox_backend=sandbox_backend)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @contextlib.asynccontextmanager
    async def rollout(self, rollout_id: str) -> AsyncIterator[RolloutLease]:
        """Admit a rollout (waiting for its baseline), create and limit its group; undo all on exit.

        On exit (normal, exception or cancellation) the group's processes are killed,
        the group removed, the rollout's pool bytes released and, with ``trace_dir``, its trace
        written.

        Raises:
            AdmissionTimeout: the baseline could not be reserved in ``admission_timeout_s``.
        """
        s = self.settings
        if not self._enabled:
            lease = RolloutLease(self, rollout_id, None)
            lease._closed = True
            yield lease
            return
        start = time.monotonic()
        await self._admit(rollout_id)
        lease: RolloutLease | None = None
        try:
            group = await asyncio.to_thread(self._create_group, rollout_id)
            lease = RolloutLease(self, rollout_id, group)
            lease.summary.admitted_s = time.monotonic()
            lease.summary.admitted_at = time.time()
            lease.summary.admission_wait_s = lease.summary.admitted_s - start
            lease._log("admit", s.baseline_bytes)
            self.leases[rollout_id] = lease
            if group is not None:
                lease._start_monitor()
            yield lease
        finally:
            if lease is not None:
                await asyncio.shield(lease._stop())
                lease.summary.released_s = time.monotonic()
                lease.summary.released_at = time.time()
                self.leases.pop(rollout_id, None)
                await asyncio.shield(asyncio.to_thread(self._finish, lease))
            self.pool.release_all(rollout_id)

    async def _admit(self, rollout_id: str) -> None:
        s = self.settings
        if self.pool.try_reserve(rollout_id, s.baseline_bytes):
            return
        loop = asyncio.get_running_loop()
        granted = loop.create_future()

        def on_grant() -> None:
            loop.call_soon_threadsafe(lambda: granted.done() or granted.set_result(None))

        waiter = self.pool.enqueue(rollout_id, s.baseline_bytes, on_grant)
        try:
            await asyncio.wait_for(asyncio.shield(granted), timeout=s.admission_timeout_s)
        except asyncio.TimeoutError:
            self.pool.cancel(waiter)
            self.pool.release_all(rollout_id)
            raise AdmissionTimeout(
                f"rollout {rollout_id}: no {s.baseline_bytes} B free in the pool after {s.admission_timeout_s} s"
            ) from None
        except BaseException:
            self.pool.cancel(waiter)
            self.pool.release_all(rollout_id)
            raise

    def _create_group(self, rollout_id: str) -> Path | None:
        s = self.settings
        group = self.controller.create(rollout_id)
        if group is None:
            return None
        self.controller.set_memory(
            group, MemoryLimits(min=s.baseline_bytes, low=s.baseline_bytes, high=s.baseline_bytes, max=s.hard_max_bytes)
        )
        self.controller.set_cpu(group, quota_cores=s.cpu_quota_cores, weight=s.cpu_weight)
        self.controller.set_pids(group, s.pids_max)
        return group

    def _finish(self, lease: RolloutLease) -> None:
        if self.settings.trace_dir:
            try:
                lease.write_trace(self.settings.trace_dir)
            except OSError as exc:
                logger.warning("rollout %s: trace not written: %s", lease.rollout_id, exc)
        if lease.cgroup_path is None:
            return
        try:
            lease.summary.final_stats = self.controller.stats(lease.cgroup_path)
        finally:
            self.controller.remove(lease.cgroup_path)

    def reap_stale_groups(self, live_rollout_ids: set[str] | None = None) -> list[Path]:
        """Remove our groups not belonging to a live lease (left by a crashed run); returns them."""
        live = set(self.leases) | (live_rollout_ids or set())
        removed = []
        for group in self.controller.list_groups():
            rid = group.name.removeprefix(getattr(self.controller, "prefix", ""))
            if rid in live:
                continue
            self.controller.remove(group)
            removed.append(group)
        return removed
