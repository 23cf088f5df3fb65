"""A running container's memory limit as the resource shim's lever: changed through the engine,
read from the host.

The shim (``sandbox.shim.RolloutLease.bind``) moves a Docker sandbox's limit with the agent's
phase. The limit is written the way the engine's own users write it -- ``docker update
--memory M --memory-swap M`` (``container.update``; the engine orders the two cgroup v1 files,
memory+swap first when raising) -- never by writing cgroup files ourselves. The container's
usage and OOM state are read (read-only) from its memory cgroup on the host, found through
``/proc/<init pid>/cgroup``: one small file read per poll instead of an engine round trip
(``docker stats`` takes ~1 s per answer).

Kernel facts this relies on (Documentation/admin-guide/cgroup-v1/memory.rst, checked on this
machine's docker 20.10 + cgroup v1): a container created with ``--oom-kill-disable`` whose
usage reaches ``memory.limit_in_bytes`` has its allocating tasks put to sleep
(``memory.oom_control``: ``under_oom 1``) instead of killed; raising the limit wakes them;
SIGKILL still ends them. Lowering the limit below usage makes the kernel reclaim first and the
write fail (EBUSY) if it cannot. On cgroup v2 the engine sets ``memory.max`` and ignores
``--oom-kill-disable``, so a late raise there is an OOM kill (docs/resource_shim.md).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

from sandbox.cgroup import parse_flat_keyed

logger = logging.getLogger(__name__)

CGROUP_MOUNT = "/sys/fs/cgroup"


def memory_cgroup_dir(pid: int, mount: str = CGROUP_MOUNT) -> tuple[Path, int]:
    """The host directory of ``pid``'s memory cgroup and the cgroup version (1 or 2).

    Raises:
        FileNotFoundError: ``pid`` has no memory cgroup line, or its directory is not under ``mount``.
    """
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            found = Path(mount) / "memory" / path.lstrip("/")
            if found.is_dir():
                return found, 1
    for line in lines:
        if line.startswith("0::"):
            found = Path(mount) / line[3:].lstrip("/")
            if (found / "memory.current").exists():
                return found, 2
    raise FileNotFoundError(f"no memory cgroup of pid {pid} under {mount}: {lines}")


class ContainerMemory:
    """The memory of one running container (``docker`` SDK object), for the resource shim
    (a ``sandbox.shim.LimitTarget``).

    Blocking (an engine call or a small file read); the shim calls it from worker threads
    (``slow``: its limit writes go through the lease's writer thread).

    Raises (constructor):
        RuntimeError: the container is not running (no init pid).
        FileNotFoundError: its memory cgroup is not visible on this host (a remote engine).
    """

    def __init__(self, container: Any, *, mount: str = CGROUP_MOUNT):
        container.reload()
        pid = int((container.attrs.get("State") or {}).get("Pid") or 0)
        if pid <= 0:
            raise RuntimeError(f"container {container.name} is not running")
        self.container = container
        self.init_pid = pid
        self.dir, self.version = memory_cgroup_dir(pid, mount)
        if container.id not in str(self.dir):
            # A trainer in its own pid or cgroup namespace sees another process under that pid.
            raise FileNotFoundError(f"the cgroup of pid {pid} ({self.dir}) is not container {container.id[:12]}'s")
        self.limit_bytes = int((container.attrs.get("HostConfig") or {}).get("Memory") or 0)
        # The container's own processes, now (init and its keep-alive child): everything else in it
        # is a command or what a command left behind (orphans are reparented to init later).
        self.keep_pids = {pid}
        try:
            self.keep_pids |= {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
        except OSError:
            pass

    slow = True

    def _read(self, name: str) -> str:
        return (self.dir / name).read_text()

    def usage(self) -> int:
        """The container's working set, bytes: what is charged to it (v1 ``memory.usage_in_bytes``,
        v2 ``memory.current``) less its inactive page cache (``total_inactive_file`` /
        ``inactive_file`` of ``memory.stat``), which the kernel reclaims before any limit bites --
        the figure ``docker stats`` shows. 0 once the container is gone."""
        try:
            charged = int(self._read("memory.usage_in_bytes" if self.version == 1 else "memory.current"))
            stat = self._read("memory.stat")
        except (OSError, ValueError):
            return 0
        inactive = parse_flat_keyed(stat).get("total_inactive_file" if self.version == 1 else "inactive_file", 0)
        return max(0, charged - inactive)

    def peak(self) -> int:
        """Highest bytes charged since the container started (v1 ``memory.max_usage_in_bytes``,
        v2 ``memory.peak`` where the kernel has it); 0 when unknown."""
        try:
            return int(self._read("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"))
        except (OSError, ValueError):
            return 0

    def _events(self) -> dict[str, int]:
        try:
            return parse_flat_keyed(self._read("memory.oom_control" if self.version == 1 else "memory.events"))
        except OSError:
            return {}

    def under_oom(self) -> bool:
        """Whether tasks sleep at the limit (v1 with ``--oom-kill-disable``: ``under_oom 1``)."""
        return self._events().get("under_oom", 0) == 1

    def oom_kills(self) -> int:
        """The kernel's OOM kills in the container so far (``oom_kill``)."""
        return self._events().get("oom_kill", 0)

    def set_limit(self, nbytes: int) -> int:
        """Set the memory limit (memory and memory+swap: no swap) to ``nbytes``; returns the limit
        now in force. A limit under usage the kernel cannot reclaim to is refused by the engine: the
        limit is then set to the usage it reported, so it never lands below what is held.

        Raises:
            docker.errors.APIError: the engine refused a limit at or above usage too.
        """
        import docker

        nbytes = int(nbytes)
        try:
            self.container.update(mem_limit=nbytes, memswap_limit=nbytes)
        except docker.errors.NotFound:
            return self.limit_bytes
        except docker.errors.APIError as exc:
            if "marked for removal" in str(exc) or "is not running" in str(exc):
                return self.limit_bytes  # the sandbox is being torn down: nothing left to limit
            floor = max(nbytes, int(self.usage() * 1.05) + (1 << 20))
            if floor == nbytes:
                raise
            self.container.update(mem_limit=floor, memswap_limit=floor)
            nbytes = floor
        self.limit_bytes = nbytes
        return nbytes

    def kill_commands(self) -> int:
        """SIGKILL every process in the container but its init and keep-alive ``sleep`` (``keep_pids``,
        taken when it started): the commands ``docker exec`` started and whatever they left running,
        orphans included. Returns how many. Used at the hard cap, where a container without the
        OOM killer would otherwise sleep until its command's timeout. A trainer that may not signal
        them kills the container instead."""
        try:
            pids = [int(p) for p in self._read("cgroup.procs").split()]
        except OSError:
            return 0
        killed = 0
        for pid in pids:
            if pid in self.keep_pids:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
            except PermissionError:
                # A trainer that is not root cannot signal the container's uid: end the container.
                logger.warning("container %s: cannot kill pid %d at the hard cap; killing the container",
                               self.container.name, pid)
                self.container.kill()
                return killed + 1
        return killed


async def bind_container_limits(lease: Any, container: Any, hard_max_bytes: int) -> None:
    """Hand a Docker sandbox's container to its resource-shim lease (``RolloutLease.bind``), with
    the container's own limit (``hard_max_bytes``) as the hard cap.

    Raises:
        RuntimeError: the container's memory cgroup is not readable here (a remote engine, a
            trainer in its own namespaces): the shim cannot follow it (``shim.enabled: auto`` is
            off for such engines).
    """
    import asyncio

    if not lease.active:
        return
    try:
        target = await asyncio.to_thread(ContainerMemory, container)
    except (OSError, RuntimeError) as exc:
        # Created without the OOM killer, such a container would sleep at a limit nobody raises.
        raise RuntimeError(
            f"rollout {lease.rollout_id}: the resource shim cannot read this container's memory cgroup "
            f"here ({exc}); set swe_agent.sandbox.shim.enabled=false for a remote or namespaced engine") from exc
    await lease.bind(target, hard_max_bytes=hard_max_bytes)
