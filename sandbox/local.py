"""A local sandbox: a private git working copy of the task repo per rollout.

Two isolation levels. ``isolation="none"``: directory and process bookkeeping
only, the agent's commands run as ordinary processes in the copy (``isolated``
is False and a warning is logged once per sandbox). ``isolation="bwrap"``: the
agent's commands are wrapped by ``command_prefix`` (bubblewrap, ``sandbox/bwrap.py``):
no network, read-only host, the work tree and home as the only writable places,
a private /tmp, other rollouts, the task repos and ``hide_paths`` invisible.
``"auto"`` picks bwrap when it works here.

Leak-proofing for crashed runs: each sandbox directory holds ``owner.json``
(pid and start time of the process that made it, and the rollout id);
``reap_stale_sandboxes(parent_dir)`` -- run at start-up and exit -- kills the
marked processes of sandboxes whose owner is dead and deletes their directories.

The process bookkeeping: Every process a rollout
starts inherits ``SWE_ROLLOUT_ID=<rollout id>`` in its environment; teardown kills
the rollout's process groups and then every process still carrying that marker,
so commands that started their own session (mini-swe-agent runs each command
with ``start_new_session``) or daemonised are not left behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
import signal
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from prepare.task import SWETask
from sandbox.bwrap import BwrapProbe, bwrap_argv, probe_bwrap
from sandbox.gitrepo import checkout_copy, diff_against
from sandbox.process import kill_process_group

logger = logging.getLogger(__name__)

ROLLOUT_MARKER_ENV = "SWE_ROLLOUT_ID"
SANDBOX_PREFIX = "swe-sandbox-"
OWNER_FILE = "owner.json"
# A sandbox directory without an owner file older than this is a half-made one from a crash, seconds.
ORPHAN_GRACE_S = 300.0
ISOLATION_MODES = ("none", "bwrap", "auto")


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


def _owner_record(rollout_id: str) -> dict:
    me = psutil.Process()
    return {"pid": me.pid, "create_time": me.create_time(), "rollout_id": rollout_id}


def _owner_alive(record: dict) -> bool:
    try:
        proc = psutil.Process(int(record["pid"]))
        # The start time tells a reused pid from the owner.
        return abs(proc.create_time() - float(record["create_time"])) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, KeyError, ValueError, TypeError):
        return False


def reap_stale_sandboxes(parent_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove sandboxes left by dead runs under ``parent_dir`` (default: the system temp dir).

    A sandbox is stale when its ``owner.json`` names a process that is gone (pid and
    start time), or when it has no owner file and is older than ``ORPHAN_GRACE_S``.
    Its marked processes (``SWE_ROLLOUT_ID``) are SIGKILLed before the directory
    is deleted. Returns the removed directories. Blocking: run in a thread from async code.
    """
    parent = Path(parent_dir or tempfile.gettempdir())
    removed = []
    try:
        candidates = sorted(p for p in parent.iterdir() if p.name.startswith(SANDBOX_PREFIX) and p.is_dir())
    except FileNotFoundError:
        return []
    for root in candidates:
        try:
            record = json.loads((root / OWNER_FILE).read_text())
        except FileNotFoundError:
            try:
                if time.time() - root.stat().st_mtime < ORPHAN_GRACE_S:
                    continue
            except FileNotFoundError:
                continue
            record = {}
        except (OSError, ValueError):
            record = {}
        if record and _owner_alive(record):
            continue
        if record.get("rollout_id"):
            kill_marked_processes(str(record["rollout_id"]))
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
    if removed:
        logger.warning("reaped %d stale sandbox(es) under %s", len(removed), parent)
    return removed


@dataclass
class LocalSandbox:
    """One rollout's private working copy and the processes started in it.

    Attributes:
        rollout_id: unique id, also the process marker value.
        root: the sandbox's own temporary directory (removed at teardown).
        workdir: the git work tree at ``task.base_commit`` (``root/repo``).
        home: a private scratch directory for agent config/state (``root/home``).
        task: the task this sandbox was made for.
        isolation: ``"bwrap"`` or ``"none"`` (what is in force, after ``auto``).
        command_prefix: argv prefix that runs one agent command isolated (empty when not).
    """

    rollout_id: str
    root: Path
    workdir: Path
    home: Path
    task: SWETask
    isolation: str = "none"
    command_prefix: list[str] = field(default_factory=list)
    _process_groups: list[int] = field(default_factory=list)
    _closed: bool = False

    @property
    def isolated(self) -> bool:
        """True when the agent's commands run under bubblewrap."""
        return self.isolation == "bwrap"

    @classmethod
    async def create(
        cls,
        task: SWETask,
        *,
        parent_dir: str | None = None,
        rollout_id: str | None = None,
        isolation: str = "none",
        hide_paths: list[str] | tuple[str, ...] = (),
        bwrap: BwrapProbe | None = None,
    ) -> LocalSandbox:
        """Copy ``task.repo_path`` at ``task.base_commit`` into a new temp directory.

        Args:
            parent_dir: where sandboxes are made (default: the system temp dir).
            isolation: ``none``, ``bwrap`` (fails if bwrap does not work) or ``auto``.
            hide_paths: more directories/files the agent's commands must not see under
                bwrap (the task data directory, hidden tests); the sandbox parent and
                the task repository's directory are always hidden.
            bwrap: a ``probe_bwrap()`` result to reuse (probing costs a subprocess).

        Raises:
            SandboxError: the repo is missing or cannot be checked out, or bwrap was
                required and does not work; nothing is left on disk.
            ValueError: unknown ``isolation``.
        """
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
        rollout_id = rollout_id or uuid.uuid4().hex
        if not task.repo_path:
            raise SandboxError(f"{task.instance_id}: task has no repo_path (a Docker image task?)")
        probe = None
        if isolation != "none":
            probe = bwrap or await asyncio.to_thread(probe_bwrap)
            if not probe.available and isolation == "bwrap":
                raise SandboxError(f"{task.instance_id}: isolation=bwrap but {probe.reason}")
        if parent_dir:
            os.makedirs(parent_dir, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=SANDBOX_PREFIX, dir=parent_dir))
        box = cls(rollout_id=rollout_id, root=root, workdir=root / "repo", home=root / "home", task=task)
        try:
            (root / OWNER_FILE).write_text(json.dumps(_owner_record(rollout_id)))
            box.home.mkdir()
            await checkout_copy(task.repo_path, task.base_commit, box.workdir)
            if probe is not None and probe.available:
                hidden = [str(root.parent), str(Path(task.repo_path).resolve().parent), *hide_paths]
                keep = [task.env_bin] if task.env_bin else []
                box.command_prefix = bwrap_argv(
                    probe.executable or "bwrap", writable=[box.workdir, box.home], hide=hidden,
                    keep_visible=keep, chdir=box.workdir,
                )
                box.isolation = "bwrap"
            elif probe is not None:
                logger.warning("sandbox %s is NOT isolated (%s): commands see the host and the network", rollout_id, probe.reason)
            else:
                logger.info("sandbox %s is not isolated (isolation=none)", rollout_id)
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

    def wrap_command(self, command: str) -> list[str]:
        """argv running ``bash -c command`` in this sandbox (under bwrap when isolated)."""
        return [*self.command_prefix, "bash", "-c", command]

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
