"""A grade's test runs in a fresh container of the task's image, the way SWE-bench's harness grades.

Which grades run here is ``RewardConfig.backend``: ``auto`` (the default) puts tasks that
run in an image (``SWETask.runs_in_image``: ``image_name`` set or no ``repo_path``; their
environment exists only in the image) in containers and grades the others in the local jail (``reward.isolation``); ``docker`` puts every grade in a container
(tasks that bring their repository use ``DockerSettings.base_image`` with their interpreter
mounted read-only); ``local`` never starts one.

Everything that decides the reward stays on the host and is the same as a local grade
(``reward.grading``): the copy of the task's tree (an image task's from
``sandbox.image_tree``, the same tree its rollouts started from), ``git apply`` of the model
patch, the restoration of protected files, the hidden tests applied after it, and the outcomes
read from the grader's pytest plugin. The container only runs the test command, with:

- the grade's copy mounted at the image's work directory (image tasks) or at its own path,
  the grader's launcher and plugin read-only, the grade's private home;
- no network, memory (swap off), CPU and process limits (``DockerSettings``), every
  capability dropped but the two that give up root (``SETUID``/``SETGID``), no privilege
  gain (``no-new-privileges``), and removal (every process with it) when the grade ends;
- the outcome channel across the container boundary: the outcomes file lies in a root-only
  directory mounted into the container; the command starts as root only to open it on
  descriptor 3 (``bash``'s ``exec 3>>``), lowers its rlimits (``prlimit``) and becomes the
  grade's leased uid without capabilities (``setpriv``) before the tests start, so the tested
  code holds the descriptor the plugin writes to but no path to the file, exactly as in the
  local jail; ``timeout -s KILL`` bounds the run inside the container, the host kills the
  container ``kill_grace_s`` later.

The image must have ``bash``, coreutils' ``timeout`` and util-linux's ``setpriv`` and
``prlimit`` (Debian and Ubuntu images have them: util-linux is essential there).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.process import CommandResult
from core.task import SWETask
from sandbox.docker_sandbox import (
    DockerSettings,
    _remove,
    container_run_kwargs,
    image_env,
    image_for,
    image_task_path,
    owner_id,
    reap_containers,
)
from sandbox.image_tree import ImageTrees
from sandbox.jail import JailSpec, interpreter_paths, prlimit_flags

# The descriptor the in-container launcher opens the outcomes file on.
OUTCOMES_FD_INSIDE = 3
# The uid a test run becomes when the grader has none leased (not running as root): nobody.
FALLBACK_UID = 65534


def in_container(task: SWETask, backend: str) -> bool:
    """Whether ``task``'s grade runs in a container under ``RewardConfig.backend``."""
    return backend == "docker" or (backend == "auto" and task.runs_in_image)


@dataclass
class ContainerGrading:
    """What container grades share: the engine's client, the image trees, a start cap.

    Args:
        client: a ``docker.DockerClient``.
        settings: limits, base image, work directory (``swe_agent.sandbox.docker``).
        trees: image tasks' host trees (share the rollout sandboxes' ``DockerSandboxFactory.trees``
            so rollouts and grades copy one extraction); None = a new store.

    Thread- and loop-safe (grades may run on several event loops): the start cap is a
    thread semaphore taken inside the worker thread that starts the container.
    """

    client: Any
    settings: DockerSettings = field(default_factory=DockerSettings)
    trees: ImageTrees | None = None
    owner: str = field(default_factory=owner_id)
    _starts: threading.BoundedSemaphore = field(init=False, repr=False)
    _made_here: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.trees is None:
            self.trees = ImageTrees(self.client)
        self._starts = threading.BoundedSemaphore(self.settings.start_concurrency)

    async def copy_tree(self, task: SWETask, dest: Path) -> Path:
        """An image task's tree at ``task.base_commit`` at ``dest`` (``sandbox.image_tree``)."""
        assert self.trees is not None
        return await self.trees.copy_to(image_for(task, self.settings), self.settings.workdir, task.base_commit, dest)

    @classmethod
    def connect(cls, settings: DockerSettings) -> ContainerGrading:
        """Connect to the engine at ``settings.base_url`` (None: ``DOCKER_HOST`` / the local socket). Blocking.

        Raises:
            docker.errors.DockerException: no engine answers.
        """
        import docker

        client = docker.DockerClient(base_url=settings.base_url) if settings.base_url else docker.from_env()
        client.ping()
        made = cls(client, settings)
        made._made_here = True
        reap_containers(client, made.owner)  # what killed graders (and rollouts) left behind
        return made

    def close(self) -> None:
        """Remove the image trees, this process's grade containers still there (a start that went on
        after its grade was cancelled) and close the client; for an object made by ``connect``. Blocking."""
        if self.trees is not None:
            self.trees.close()
        if self._made_here:
            reap_containers(self.client, self.owner, own=True)
        self.client.close()

    def workdir_inside(self, task: SWETask, repo: Path) -> str:
        """Where the grade's copy is mounted in the container."""
        return self.settings.workdir if task.runs_in_image else str(repo)

    async def start(self, task: SWETask, *, repo: Path, home: Path, readable: list[str],
                    private_dirs: list[str]) -> GradeContainer:
        """A fresh container of the task's image with the grade's files mounted.

        Args:
            repo: the grade's patched copy (mounted read-write at ``workdir_inside``).
            home: the test run's home (read-write, same path).
            readable: host paths mounted read-only at their own paths (the runner's files).
            private_dirs: root-only host directories mounted read-write at their own paths
                (the outcomes file's).

        Raises:
            docker.errors.DockerException: the engine refused (no such image, no engine).
            TimeoutError: the start took longer than ``start_timeout_s``.
        """
        grade_id = "grade-" + uuid.uuid4().hex[:16]
        inside = self.workdir_inside(task, repo)
        volumes = {str(repo): {"bind": inside, "mode": "rw"}, str(home): {"bind": str(home), "mode": "rw"}}
        for path in private_dirs:
            volumes[path] = {"bind": path, "mode": "rw"}
        paths = list(readable)
        if task.env_bin and not task.runs_in_image:  # the host's interpreter, for a task graded in the base image
            paths += interpreter_paths(Path(task.env_bin) / "python")
        for path in paths:
            volumes.setdefault(path, {"bind": path, "mode": "ro"})
        kwargs = container_run_kwargs(task, grade_id, self.settings, owner=self.owner)
        kwargs.update(volumes=volumes, working_dir=inside, user="0:0", cap_drop=["ALL"],
                      cap_add=["SETUID", "SETGID"], security_opt=["no-new-privileges"])
        kwargs["name"] = f"swe-rl-{grade_id}"

        def run() -> Any:
            with self._starts:
                return self.client.containers.run(**kwargs)

        try:
            container = await asyncio.wait_for(asyncio.to_thread(run), self.settings.start_timeout_s)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self.reap_grade, grade_id))
            raise
        env = await asyncio.to_thread(image_env, self.client, kwargs["image"]) if task.runs_in_image else {}
        return GradeContainer(container, inside, self.settings, env.get("PATH", ""))

    def reap_grade(self, grade_id: str) -> None:
        """Remove a grade's container by its label (a start that timed out or was cancelled)."""
        reap_containers(self.client, self.owner, only_rollout=grade_id)


@dataclass
class GradeContainer:
    """One grade's running container (``ContainerGrading.start``); ``remove()`` when done."""

    container: Any
    workdir: str
    settings: DockerSettings
    image_path: str = ""

    def path_env(self, task: SWETask, host_path: str) -> str:
        """The test run's ``PATH``: an image task's image ``PATH`` (``task.env_bin`` first), else the host's."""
        if not task.runs_in_image:
            return host_path
        return image_task_path(self.image_path or "/usr/local/bin:/usr/bin:/bin", task.env_bin)

    async def run(self, command: str, *, env: dict[str, str], timeout_s: float, spec: JailSpec,
                  outcomes_file: str | None) -> CommandResult:
        """Run the shell ``command`` in the work directory as ``spec``'s uid, with its rlimits.

        ``outcomes_file``: opened (by root, before the uid change) on descriptor 3 and named in
        ``SWE_RL_OUTCOMES_FD``. The run is killed inside at ``timeout_s`` and the container
        ``kill_grace_s`` later (``timed_out`` either way).
        """
        uid = spec.uid if spec.uid is not None else FALLBACK_UID
        gid = spec.gid if spec.gid is not None else uid
        inner = ["prlimit", *prlimit_flags(spec), "--core=0", "--",
                 "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all", "--no-new-privs",
                 "--", "timeout", "-s", "KILL", f"{max(1, int(timeout_s))}s", "bash", "-c", command]
        env = dict(env)
        if outcomes_file is not None:
            env["SWE_RL_OUTCOMES_FD"] = str(OUTCOMES_FD_INSIDE)
            argv = ["bash", "-c", f'exec {OUTCOMES_FD_INSIDE}>>"$0" && exec "$@"', outcomes_file, *inner]
        else:
            argv = inner
        start = time.monotonic()
        call = asyncio.to_thread(self.container.exec_run, argv, user="0:0", workdir=self.workdir,
                                 environment=env, demux=False)
        try:
            code, out = await asyncio.wait_for(call, timeout_s + self.settings.kill_grace_s)
        except TimeoutError:
            await asyncio.to_thread(self.container.kill)
            return CommandResult(-9, "", True, time.monotonic() - start)
        finally:
            await asyncio.shield(self.sweep(uid, gid))
        elapsed = time.monotonic() - start
        text = (out or b"").decode("utf-8", errors="replace")
        return CommandResult(code, text, code in (124, 137) and elapsed >= 0.95 * timeout_s, elapsed)

    async def sweep(self, uid: int, gid: int, rounds: int = 3) -> None:
        """Kill every process of ``uid`` in the container (what a test run left behind).

        The local jail's PID namespace ends with each test run; a container outlives its runs,
        and a process a run leaves (a daemon of the tested code) could otherwise read the next
        run's nonce from ``/proc/<pid>/environ`` of its same-uid pytest and write forged records
        through the descriptor it kept. ``kill -KILL -1`` as that uid reaches exactly its own
        processes (no capability needed); repeated for processes forked meanwhile.
        """
        script = "kill -KILL -1 2>/dev/null; true"
        for _ in range(rounds):
            try:
                await asyncio.to_thread(self.container.exec_run, ["sh", "-c", script], user=f"{uid}:{gid}")
            except Exception:  # noqa: BLE001 - the container is gone: nothing of it runs
                return

    async def remove(self) -> None:
        """Remove the container and everything running in it (shielded: runs even when cancelled)."""
        await asyncio.shield(asyncio.to_thread(_remove, self.container))

