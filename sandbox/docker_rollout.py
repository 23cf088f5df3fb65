"""A rollout sandbox whose agent commands run in a Docker container (``swe_agent.sandbox.backend=docker``).

The work tree is the local sandbox's own one-commit copy (``LocalSandbox``), bind-mounted
into a container at the same path, so everything the loop does with it stays the trusted
host-side code: the patch is extracted through the sandbox's private git directory, the
agent harness runs on the host and talks to the proxy on loopback, and only the agent's
commands run in the container (``command_prefix`` = ``docker exec``). The container gives
what the engine enforces: no network, memory (swap off), CPU and process limits, an OOM
counter, limits changed while it runs (``docker update``), and removal of everything the
commands started. The per-command timeout runs inside the container (the runner's
``timeout`` comes after the prefix), so it holds even when the client side dies.

Inside, commands run as the sandbox's leased uid (``sandbox.jail.lease_uid``) with every
capability dropped and no privilege gain; the task's interpreter (``task.env_bin``) is
mounted read-only at its host path, else the image's ``python`` is used.

Tasks with their own image (``task.image_name``, SWE-bench style) use it; others use
``DockerSettings.base_image`` (``example/docker_engine.sh`` builds ``swe-rl-base:bookworm``).

An image task (no ``repo_path``: the repository is the image's ``/testbed``) gets its work
tree from the image itself (``sandbox.image_tree``: pulled out once per image and commit,
copied per rollout). Every task that runs in an image (``SWETask.runs_in_image``) has its tree
mounted at the image's work directory (``DockerSettings.workdir``)
because the image's environment was installed against that path (editable installs,
compiled extensions); its commands get the image's ``PATH`` with ``task.env_bin``, a
directory inside the image, first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.pristine import PristineTrees
from core.task import SWETask
from sandbox.docker_sandbox import (
    LABEL_OWNER,
    LABEL_ROLLOUT,
    LABEL_SANDBOX,
    OOM_COUNTER_COMMAND,
    DockerSandboxFactory,
    _remove,
    image_for,
    image_task_path,
    parse_oom_kills,
)
from sandbox.jail import JailSpec, give_to_jail, interpreter_paths, lease_uid, running_as_root
from sandbox.local import LocalSandbox

logger = logging.getLogger(__name__)

# The docker CLI (the host side of every command) needs these from the trainer's environment.
_CLIENT_ENV = ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "DOCKER_CONTEXT")


@dataclass(eq=False)
class DockerRolloutSandbox(LocalSandbox):
    """A ``LocalSandbox`` whose commands run in its own container (see module docstring).

    Attributes (besides ``LocalSandbox``'s):
        container: the ``docker`` SDK container object.
        container_name: its name (``swe-rl-<rollout_id>``).
        container_workdir: where the work tree is mounted inside: its host path, or the image's
            work directory (``DockerSettings.workdir``) for an image task.
    """

    container: Any = None
    container_name: str = ""
    container_workdir: str = ""

    @classmethod
    async def create_in_docker(
        cls,
        task: SWETask,
        *,
        factory: DockerSandboxFactory,
        parent_dir: str | None = None,
        rollout_id: str | None = None,
        jail: JailSpec | None = None,
        trees: PristineTrees | None = None,
        work_tree: str = "auto",
        memory_bytes: int | None = None,
        oom_kill_disable: bool = False,
    ) -> DockerRolloutSandbox:
        """The host copy, then the task's container with the copy mounted (waits for a start slot).
        ``trees``, ``work_tree``: as ``LocalSandbox.create``'s (repository tasks; an image task's tree comes from
        ``factory.trees``). ``memory_bytes``, ``oom_kill_disable``: the container's starting limit and
        whether it sleeps at it (``DockerSandboxFactory.create_container``; the resource shim's lease).

        Raises:
            SandboxError: the copy or the container could not be made; nothing is left.
        """
        image_task = task.runs_in_image
        box = await cls.create(task, parent_dir=parent_dir, rollout_id=rollout_id, isolation="none", jail=jail,
                               copy_tree=image_tree_copier(task, factory), trees=trees, work_tree=work_tree)
        async with box.torn_down_on_failure("cannot start the sandbox container"):
            if running_as_root() and box.jail.uid is not None:
                box._uid_lease = await asyncio.to_thread(lease_uid, box.jail)
                box.jail = box._uid_lease.spec
                await asyncio.to_thread(give_to_jail, box.jail, box.workdir, box.home)
            # An image task's environment was installed against its work directory: the copy goes back there.
            inside = factory.settings.workdir if image_task else str(box.workdir)
            image_env = await factory.image_env(image_for(task, factory.settings)) if image_task else {}
            box.command_env = _container_env(task, box, image_env)
            mounts = {str(box.workdir): {"bind": inside, "mode": "rw"},
                      str(box.home): {"bind": str(box.home), "mode": "rw"}}
            if task.env_bin and not image_task:
                for path in interpreter_paths(Path(task.env_bin) / "python"):
                    mounts.setdefault(path, {"bind": path, "mode": "ro"})
            user = None
            if box.jail.uid is not None and running_as_root():
                user = f"{box.jail.uid}:{box.jail.gid if box.jail.gid is not None else box.jail.uid}"
            box.container = await factory.create_container(
                task, box.rollout_id, volumes=mounts, user=user, working_dir=inside,
                environment=box.command_env, memory_bytes=memory_bytes, oom_kill_disable=oom_kill_disable)
            box.container_name = box.container.name
            box.container_workdir = inside
            box.command_prefix = ["docker", "exec", "-w", inside,
                                  *[f"-e{k}={v}" for k, v in sorted(box.command_env.items())], box.container_name]
            box.isolation = "docker"
        return box

    @property
    def isolated(self) -> bool:
        return self.container is not None

    def env(self) -> dict[str, str]:
        """The environment of the host side of each command (the ``docker`` CLI); the command's own
        environment inside the container is ``command_env``, passed in ``command_prefix``."""
        host = {k: os.environ[k] for k in _CLIENT_ENV if k in os.environ}
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home), **host}

    async def oom_kills(self) -> int:
        """OOM kills in the container's memory cgroup so far (see ``DockerSandbox.oom_kills``)."""
        _, out = await asyncio.to_thread(self.container.exec_run, ["sh", "-c", OOM_COUNTER_COMMAND])
        return parse_oom_kills((out or b"").decode(errors="replace")) or 0

    def _teardown_blocking(self) -> None:
        if self.container is not None:
            _remove(self.container)  # kills every process the commands started
        super()._teardown_blocking()


def image_tree_copier(task: SWETask, factory: DockerSandboxFactory) -> Callable[[Path], Awaitable[None]] | None:
    """``LocalSandbox.create``'s ``copy_tree`` for a task without a repository (its tree is pulled
    out of its image: ``factory.trees``); None for a task that brings its repository."""
    if task.repo_path:
        return None
    image, workdir = image_for(task, factory.settings), factory.settings.workdir

    async def copy_tree(dest: Path) -> None:
        await factory.trees.copy_to(image, workdir, task.base_commit, dest)

    return copy_tree


def _container_env(task: SWETask, box: LocalSandbox, image_env: dict[str, str]) -> dict[str, str]:
    """The commands' environment inside the container: the local sandbox's allowlist, with the
    host interpreter's directory replaced by the task's (mounted) or none (the image's python).

    An image task keeps its image's ``PATH`` (where the image installed its interpreter), with
    ``task.env_bin``, a directory inside the image there, first.
    """
    env = dict(box.command_env)
    host_dir = os.path.dirname(sys.executable)
    path = image_env.get("PATH") or os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and p != host_dir)
    env["PATH"] = image_task_path(path, task.env_bin)
    env["TMPDIR"] = "/tmp"
    return env


__all__ = ["DockerRolloutSandbox", "LABEL_OWNER", "LABEL_ROLLOUT", "LABEL_SANDBOX", "image_tree_copier"]
