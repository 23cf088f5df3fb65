"""A local sandbox: a private git working copy of the task repo per rollout.

Isolation here is by directory and process bookkeeping only (no namespaces): the
agent's commands run as ordinary processes in the copy. Every process a rollout
starts inherits ``SWE_ROLLOUT_ID=<rollout id>`` in its environment; teardown kills
the rollout's process groups and then every process still carrying that marker,
so commands that started their own session (mini-swe-agent runs each command
with ``start_new_session``) or daemonised are not left behind.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from prepare.task import SWETask
from sandbox.gitrepo import checkout_copy, diff_against
from sandbox.process import kill_process_group

ROLLOUT_MARKER_ENV = "SWE_ROLLOUT_ID"
SANDBOX_PREFIX = "swe-sandbox-"


class SandboxError(RuntimeError):
    """The sandbox could not be created (missing repo, unknown commit, disk)."""


def find_marked_processes(rollout_id: str) -> list[psutil.Process]:
    """Processes whose environment has ``SWE_ROLLOUT_ID=rollout_id``.

    Reads ``/proc/<pid>/environ``; processes we may not inspect are skipped.
    Blocking (walks /proc): call it from a worker thread in async code.
    """
    needle = rollout_id
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(ROLLOUT_MARKER_ENV) == needle:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def kill_marked_processes(rollout_id: str, rounds: int = 3) -> int:
    """SIGKILL every process marked with ``rollout_id``; returns how many were killed.

    Repeats a few rounds because a dying shell's children can fork between scans.
    Blocking: call from a worker thread in async code.
    """
    killed = 0
    for _ in range(rounds):
        procs = find_marked_processes(rollout_id)
        if not procs:
            break
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
                killed += 1
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=2)
    return killed


@dataclass
class LocalSandbox:
    """One rollout's private working copy and the processes started in it.

    Attributes:
        rollout_id: unique id, also the process marker value.
        root: the sandbox's own temporary directory (removed at teardown).
        workdir: the git work tree at ``task.base_commit`` (``root/repo``).
        home: a private scratch directory for agent config/state (``root/home``).
        task: the task this sandbox was made for.
    """

    rollout_id: str
    root: Path
    workdir: Path
    home: Path
    task: SWETask
    _process_groups: list[int] = field(default_factory=list)
    _closed: bool = False

    @classmethod
    async def create(
        cls, task: SWETask, *, parent_dir: str | None = None, rollout_id: str | None = None
    ) -> LocalSandbox:
        """Copy ``task.repo_path`` at ``task.base_commit`` into a new temp directory.

        Args:
            parent_dir: where sandboxes are made (default: the system temp dir).

        Raises:
            SandboxError: the repo is missing or cannot be checked out; nothing is left on disk.
        """
        rollout_id = rollout_id or uuid.uuid4().hex
        if not task.repo_path:
            raise SandboxError(f"{task.instance_id}: task has no repo_path (a Docker image task?)")
        if parent_dir:
            os.makedirs(parent_dir, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=SANDBOX_PREFIX, dir=parent_dir))
        box = cls(rollout_id=rollout_id, root=root, workdir=root / "repo", home=root / "home", task=task)
        try:
            box.home.mkdir()
            await checkout_copy(task.repo_path, task.base_commit, box.workdir)
        except BaseException as exc:
            await asyncio.shield(box.teardown())
            if isinstance(exc, Exception):
                raise SandboxError(f"{task.instance_id}: cannot create sandbox: {exc}") from exc
            raise
        return box

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for processes of this rollout: ``base`` (default os.environ) plus the marker."""
        env = dict(os.environ if base is None else base)
        env[ROLLOUT_MARKER_ENV] = self.rollout_id
        env["HOME"] = str(self.home)
        env["TMPDIR"] = str(self.home)
        return env

    def track_process_group(self, pgid: int) -> None:
        """Register a process group (e.g. the agent's) to kill at teardown."""
        self._process_groups.append(pgid)

    async def extract_patch(self) -> str:
        """The work tree's changes against ``base_commit`` as a git diff (new files included).

        Test-file changes are kept here; the grader strips them.
        """
        return await diff_against(self.workdir, self.task.base_commit)

    async def teardown(self) -> None:
        """Kill every process of this rollout and delete the sandbox directory.

        Idempotent; safe to call from ``finally`` after a timeout, an exception or
        a cancellation (the work is shielded so a second cancel cannot interrupt it).
        """
        if self._closed:
            return
        self._closed = True
        await asyncio.shield(asyncio.to_thread(self._teardown_blocking))

    def _teardown_blocking(self) -> None:
        for pgid in self._process_groups:
            kill_process_group(pgid)
        kill_marked_processes(self.rollout_id)
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def closed(self) -> bool:
        return self._closed
