"""A Docker sandbox per rollout (docker SDK), for SWE-bench-style tasks with per-task images.

What users of other SWE-RL stacks report (leaked containers, commands running on
after a timeout, sandbox OOMs) is handled here:

- every container is labelled ``swe-rl.sandbox=1``, ``swe-rl.rollout-id`` and
  ``swe-rl.owner`` (``host:pid:start-time`` of the process that made it);
  ``reap_containers`` removes those whose owner process is dead (run it at
  start-up) or all of our own (run it at exit);
- memory/CPU/pids limits at creation, ``cgroup_parent`` into the resource shim's
  group (``RolloutLease.cgroup_path`` relative to the cgroup mount), no network
  by default;
- a start-concurrency cap (``start_concurrency``): image unpacking and container
  start are the expensive part (seed 001: 26.5 s mean start), so a burst of
  rollouts queues instead of thrashing the engine;
- every command runs as ``timeout -s KILL <t> bash -c CMD`` inside the container,
  so the kill happens inside even when the client side gives up; a host-side
  backstop (``timeout + kill_grace_s``) kills the whole container.

All SDK calls are blocking and run in worker threads. ``container_run_kwargs``
is a pure function (tested against the SDK's own argument conversion without an engine).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import psutil

from core.task import SWETask
from core.process import CommandResult
from sandbox.image_tree import ImageTrees
from sandbox.swerex_image import SWEReXImages

logger = logging.getLogger(__name__)

LABEL_SANDBOX = "swe-rl.sandbox"
LABEL_ROLLOUT = "swe-rl.rollout-id"
LABEL_OWNER = "swe-rl.owner"
WORKDIR = "/testbed"  # SWE-bench images keep the repository here


@dataclass
class DockerSettings:
    """Limits and timeouts of Docker sandboxes (bytes, cores, seconds).

    ``image_template`` makes the image name from the task when ``task.image_name`` is empty
    (SWE-bench: ``swebench/sweb.eval.x86_64.{instance_id}:latest`` with ``__`` -> ``_1776_``).
    """

    image_template: str = "swebench/sweb.eval.x86_64.{instance_id}:latest"
    # The image of tasks that bring their repository, not an image (simple, smith): built by
    # example/docker_engine.sh.
    base_image: str = "swe-rl-base:bookworm"
    # The engine's address (e.g. tcp://sandbox-host:2376); null = DOCKER_HOST / the local socket.
    base_url: str | None = None
    memory_bytes: int = 8 << 30
    cpus: float = 2.0
    pids_limit: int = 4096
    network_disabled: bool = True
    start_concurrency: int = 8
    # Kill grace after a command's own timeout before the host kills the container, seconds.
    kill_grace_s: float = 10.0
    # Container start (including the image unpack) limit, seconds.
    start_timeout_s: float = 300.0
    workdir: str = WORKDIR


def owner_id() -> str:
    """``host:pid:start-time`` of this process (start time tells a reused pid apart)."""
    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.2f}"


def owner_alive(owner: str) -> bool:
    """Whether the process named by an ``owner_id()`` string runs on this host (other hosts: assumed alive)."""
    try:
        host, pid, started = owner.rsplit(":", 2)
        if host != socket.gethostname():
            return True
        proc = psutil.Process(int(pid))
        return abs(proc.create_time() - float(started)) < 1.0
    except (ValueError, psutil.NoSuchProcess):
        return False


def image_for(task: SWETask, settings: DockerSettings) -> str:
    """The task's own image, the base image for a task that brings its repository, else the
    SWE-bench image name made from the instance id."""
    if task.image_name:
        return task.image_name
    if task.repo_path:
        return settings.base_image
    return settings.image_template.format(instance_id=task.instance_id.replace("__", "_1776_").lower())


def image_env(client: Any, image: str) -> dict[str, str]:
    """The image's own environment (its ``ENV`` lines). Blocking.

    Raises:
        docker.errors.ImageNotFound: no such image on the engine.
    """
    attrs = client.images.get(image).attrs
    pairs = (entry.partition("=") for entry in (attrs.get("Config") or {}).get("Env") or [])
    return {key: value for key, _, value in pairs if key}


def image_task_path(image_path: str, env_bin: str | None) -> str:
    """An image task's ``PATH``: the image's own, with ``env_bin`` (a directory inside the image) first."""
    parts = [p for p in image_path.split(os.pathsep) if p]
    if env_bin:
        parts = [env_bin] + [p for p in parts if p != env_bin]
    return os.pathsep.join(parts)


def container_run_kwargs(
    task: SWETask, rollout_id: str, settings: DockerSettings, *, owner: str, cgroup_parent: str | None = None
) -> dict[str, Any]:
    """Arguments for ``client.containers.run`` (detached, kept alive by ``sleep infinity``).

    Units: ``mem_limit`` bytes (swap disabled by ``memswap_limit`` = same), ``nano_cpus``
    1e-9 cores, ``pids_limit`` processes.
    """
    kwargs: dict[str, Any] = {
        "image": image_for(task, settings),
        "command": ["sleep", "infinity"],
        "detach": True,
        "name": f"swe-rl-{rollout_id}",
        "labels": {LABEL_SANDBOX: "1", LABEL_ROLLOUT: rollout_id, LABEL_OWNER: owner},
        "working_dir": settings.workdir,
        "mem_limit": int(settings.memory_bytes),
        "memswap_limit": int(settings.memory_bytes),
        "nano_cpus": int(settings.cpus * 1e9),
        "pids_limit": int(settings.pids_limit),
        "init": True,  # reaps zombies of killed commands
        "environment": {"SWE_ROLLOUT_ID": rollout_id},
    }
    if settings.network_disabled:
        kwargs["network_mode"] = "none"
    if cgroup_parent:
        kwargs["cgroup_parent"] = cgroup_parent
    return kwargs


# The container's own memory cgroup, as it sees it (cgroup v1, then v2): read-only inside.
OOM_COUNTER_COMMAND = "cat /sys/fs/cgroup/memory/memory.oom_control 2>/dev/null || cat /sys/fs/cgroup/memory.events"


def parse_oom_kills(text: str) -> int | None:
    """The ``oom_kill`` counter of ``OOM_COUNTER_COMMAND``'s output, or None when it has none."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


def exec_argv(command: str, timeout_s: float) -> list[str]:
    """The in-container argv: coreutils ``timeout`` SIGKILLs the command inside at ``timeout_s``."""
    return ["timeout", "-s", "KILL", f"{max(1, int(timeout_s))}s", "bash", "-c", command]


class DockerSandbox:
    """One rollout's container (create with ``DockerSandboxFactory.create``)."""

    def __init__(self, container: Any, rollout_id: str, task: SWETask, settings: DockerSettings):
        self.container = container
        self.rollout_id = rollout_id
        self.task = task
        self.settings = settings
        self.isolated = True
        self._closed = False

    async def run(self, command: str, *, timeout_s: float) -> CommandResult:
        """Run ``bash -c command`` in the work tree; killed inside at ``timeout_s`` (exit 137 after
        ``timeout_s`` -> timed_out; 137 earlier is a kill, e.g. the OOM killer's).

        A client-side backstop at ``timeout_s + kill_grace_s`` kills the container itself.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        call = asyncio.to_thread(
            self.container.exec_run, exec_argv(command, timeout_s), workdir=self.settings.workdir, demux=False
        )
        try:
            code, out = await asyncio.wait_for(call, timeout=timeout_s + self.settings.kill_grace_s)
        except asyncio.TimeoutError:
            await asyncio.to_thread(self.container.kill)
            return CommandResult(-9, "", True, loop.time() - start)
        text = (out or b"").decode("utf-8", errors="replace")
        elapsed = loop.time() - start
        # 137 is also an OOM kill (``oom_kills``): only a command that ran its time out timed out.
        return CommandResult(code, text, code in (124, 137) and elapsed >= 0.95 * timeout_s, elapsed)

    async def oom_kills(self) -> int:
        """OOM kills in the container's memory cgroup so far (``oom_kill`` of cgroup v1's
        ``memory.oom_control`` or v2's ``memory.events``, read inside the container, where it is
        read-only). The engine's ``State.OOMKilled`` covers only the container's main process,
        never a tool command started with ``exec`` (checked on docker 20.10, cgroup v1).

        Raises:
            RuntimeError: neither file is readable.
        """
        res = await self.run(OOM_COUNTER_COMMAND, timeout_s=30)
        kills = parse_oom_kills(res.output)
        if kills is None:
            raise RuntimeError(f"no oom_kill counter in the container's memory cgroup: {res.output[-500:]!r}")
        return kills

    async def extract_patch(self) -> str:
        """``git diff`` of the container's work tree against the base commit (new files included)."""
        cmd = f"git add -A && git diff --cached --binary {self.task.base_commit}"
        res = await self.run(cmd, timeout_s=120)
        if res.returncode != 0:
            raise RuntimeError(f"git diff failed in container: {res.output[-2000:]}")
        return res.output

    async def teardown(self) -> None:
        """Remove the container (force: kills what runs). Idempotent."""
        if self._closed:
            return
        self._closed = True
        await asyncio.shield(asyncio.to_thread(_remove, self.container))


def _remove(container: Any) -> None:
    try:
        container.remove(force=True)
    except Exception as exc:  # already gone (404) or the engine went away: nothing left to do here
        logger.debug("container remove: %s", exc)


class DockerSandboxFactory:
    """Creates Docker sandboxes with a start-concurrency cap, and reaps leftovers.

    Args:
        client: a ``docker.DockerClient`` (``docker.from_env()``).
    """

    def __init__(self, client: Any, settings: DockerSettings | None = None, *, work_root: str | None = None):
        self.client = client
        self.settings = settings or DockerSettings()
        self.owner = owner_id()
        self._starts = asyncio.Semaphore(self.settings.start_concurrency)
        # Image tasks' work trees on the host (one extraction per image and commit).
        self.trees = ImageTrees(client, work_root)
        # Images with SWE-ReX's server built in, for SWE-agent's Docker deployment (one per source image).
        self.swerex_images = SWEReXImages(client)

    async def image_env(self, image: str) -> dict[str, str]:
        """The image's own environment (its ``ENV`` lines: ``PATH`` to its interpreter, ...).

        Raises:
            docker.errors.ImageNotFound: no such image on the engine.
        """
        return await asyncio.to_thread(image_env, self.client, image)

    def close(self) -> None:
        """Remove the prepared image trees and close the client (blocking)."""
        self.trees.close()
        self.client.close()

    async def create(self, task: SWETask, rollout_id: str, *, cgroup_parent: str | None = None) -> DockerSandbox:
        """Start the task's container (waits for a start slot).

        Raises:
            RuntimeError: the container did not start within ``start_timeout_s``.
        """
        kwargs = container_run_kwargs(task, rollout_id, self.settings, owner=self.owner, cgroup_parent=cgroup_parent)
        async with self._starts:
            try:
                container = await asyncio.wait_for(
                    asyncio.to_thread(self.client.containers.run, **kwargs), timeout=self.settings.start_timeout_s
                )
            except asyncio.TimeoutError:
                # The start may still complete: remove by label so nothing is left.
                await asyncio.to_thread(self.reap, only_rollout=rollout_id)
                raise RuntimeError(f"container for {rollout_id} did not start in {self.settings.start_timeout_s} s") from None
        return DockerSandbox(container, rollout_id, task, self.settings)

    async def create_container(self, task: SWETask, rollout_id: str, *, volumes: dict[str, dict[str, str]],
                               user: str | None, working_dir: str, environment: dict[str, str],
                               memory_bytes: int | None = None, oom_kill_disable: bool = False) -> Any:
        """Start a rollout's container with host directories mounted (``DockerRolloutSandbox``):
        ``container_run_kwargs`` plus the mounts, the user, no capabilities and no privilege gain.
        ``memory_bytes``: its starting memory limit (the resource shim's; default ``memory_bytes`` of
        the settings); ``oom_kill_disable``: tasks at the limit sleep until it is raised (cgroup v1).

        Raises:
            RuntimeError: the container did not start within ``start_timeout_s``.
            docker.errors.DockerException: the engine refused it (e.g. no such image).
        """
        kwargs = container_run_kwargs(task, rollout_id, self.settings, owner=self.owner)
        kwargs.update(volumes=volumes, working_dir=working_dir, environment={**kwargs["environment"], **environment},
                      cap_drop=["ALL"], security_opt=["no-new-privileges"])
        if memory_bytes is not None:
            kwargs.update(mem_limit=int(memory_bytes), memswap_limit=int(memory_bytes))
        if oom_kill_disable:
            kwargs["oom_kill_disable"] = True
        if user is not None:
            kwargs["user"] = user
        async with self._starts:
            try:
                return await asyncio.wait_for(asyncio.to_thread(self.client.containers.run, **kwargs),
                                              timeout=self.settings.start_timeout_s)
            except BaseException:
                # The start may still complete (a timeout, a cancel): remove by label so nothing is left.
                await asyncio.shield(asyncio.to_thread(self.reap, only_rollout=rollout_id))
                raise

    def reap(self, *, own: bool = False, only_rollout: str | None = None) -> list[str]:
        """Remove our labelled containers whose owner is dead (``own=True``: also this process's).

        Returns the removed containers' rollout ids. Blocking.
        """
        return reap_containers(self.client, self.owner, own=own, only_rollout=only_rollout)


def reap_containers(client: Any, owner: str, *, own: bool = False, only_rollout: str | None = None) -> list[str]:
    """Remove the project's labelled containers whose owner process is dead; with ``own`` also
    ``owner``'s; with ``only_rollout`` exactly that rollout's (any owner). Returns their rollout ids.
    Blocking.
    """
    filters = {"label": [f"{LABEL_SANDBOX}=1"]}
    if only_rollout:
        filters["label"].append(f"{LABEL_ROLLOUT}={only_rollout}")
    removed = []
    for c in client.containers.list(all=True, filters=filters):
        labels = c.labels or {}
        theirs = labels.get(LABEL_OWNER, "")
        mine = theirs == owner
        if only_rollout or (mine and own) or (not mine and not owner_alive(theirs)):
            _remove(c)
            removed.append(labels.get(LABEL_ROLLOUT, c.id))
    if removed:
        logger.warning("removed %d leftover sandbox container(s)", len(removed))
    return removed


def docker_engine_available() -> tuple[bool, str]:
    """(True, "ok") when a Docker engine answers ping; else (False, why) for skip reasons and logs."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.ping()
        return True, "ok"
    except Exception as exc:
        return False, f"no Docker engine reachable ({type(exc).__name__}: {str(exc)[:200]})"


def cgroup_parent_for(group_path: str | os.PathLike[str] | None, mount: str = "/sys/fs/cgroup") -> str | None:
    """Docker's ``--cgroup-parent`` (cgroupfs driver) for a shim group: its path below the cgroup mount."""
    if group_path is None:
        return None
    rel = os.path.relpath(os.fspath(group_path), mount)
    if rel.startswith(".."):
        raise ValueError(f"{group_path} is not under the cgroup mount {mount}")
    return "/" + rel
