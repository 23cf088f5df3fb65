"""A local sandbox: a private work tree per rollout, its commands jailed (``sandbox.jail``).

Layout (``root`` is private to the host, ``0700``):

- ``root/repo``: the work tree at ``task.base_commit``, in a git repository holding
  that tree as its only commit (``core.gitrepo.checkout_copy``: no later commits,
  branches, tags or objects of the task's history). The agent may do anything to it,
  its ``.git`` included.
- ``root/home``: the agent commands' private home.
- ``root/git``: a second, trusted copy of that repository, never visible to the agent:
  ``extract_patch`` diffs the work tree through it, with hooks, fsmonitor, filters and
  every config file but its own unable to run, so nothing the agent wrote in its
  ``.git`` or work tree runs on the host or decides the patch.
- ``root/runner``: the host-side runner's spec, result, log and agent state: outside the
  agent's reach, so it cannot plant a link where the runner writes.

Isolation (``isolation``): ``bwrap`` (required), ``auto`` (bwrap when it works here,
else unisolated with a warning) or ``none``. Isolated, each agent command runs under
``command_prefix`` (``sandbox.jail.jail_argv``): it sees the system read-only, the
task's interpreter read-only, the work tree and home read-write, a private size-limited
``/tmp``, and nothing else; no network; its own leased uid (``sandbox.jail.lease_uid``)
without capabilities when the host runs as root; rlimits; and ``command_env`` (an allowlist: no trainer secret). When its
shell exits, or the runner dies, every process it started dies.

Leak-proofing for crashed runs: each sandbox directory holds ``owner.json`` (pid and
start time of the process that made it, and the rollout id);
``reap_stale_sandboxes(parent_dir)`` -- run at start-up and exit -- kills the marked
processes of sandboxes whose owner is dead and deletes their directories. Every process
a rollout starts inherits ``SWE_ROLLOUT_ID=<rollout id>``; teardown kills the rollout's
process groups and then every process still carrying that marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from core.task import SWETask
from core.gitrepo import CACHE_EXCLUDES, GIT_ENV, checkout_copy
from core.owner import owner_alive, owner_record
from core.pristine import PristineTrees
from core.trees import HeldTree, reap_stale_stores
from sandbox.overlay import OverlayError, detach_mounts_below, mount_overlay_async, overlay_available
from sandbox.jail import (
    JailSpec,
    UidLease,
    bwrap_available,
    clean_env,
    give_to_jail,
    interpreter_paths,
    jail_argv,
    lease_uid,
)
from core.process import kill_process_group, run_command

logger = logging.getLogger(__name__)

ROLLOUT_MARKER_ENV = "SWE_ROLLOUT_ID"
SANDBOX_PREFIX = "swe-sandbox-"
OWNER_FILE = "owner.json"
# A sandbox directory without an owner file older than this is a half-made one from a crash, seconds.
ORPHAN_GRACE_S = 300.0
ISOLATION_MODES = ("none", "bwrap", "auto")
# How a sandbox's work tree starts from the worker's prepared checkout (LocalSandbox.create).
WORK_TREE_MODES = ("auto", "overlay", "copy")
# Options of every host-side git call on the agent's tree: nothing configured there can run.
SAFE_GIT_OPTIONS = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "safe.directory=*",
                    "-c", "core.quotePath=false", "-c", "diff.noprefix=false")



class SandboxError(RuntimeError):
    """The sandbox could not be created (missing repo, unknown commit, disk)."""


class PatchTooLarge(SandboxError):
    """The work tree's diff is over the size limit ``extract_patch`` was given (it was not read)."""


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
        if record and owner_alive(record):
            continue
        if record.get("rollout_id"):
            kill_marked_processes(str(record["rollout_id"]))
        detach_mounts_below(root)  # a forked work tree's overlay (sandbox.overlay)
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
    if removed:
        logger.warning("reaped %d stale sandbox(es) under %s", len(removed), parent)
    # Then the prepared checkouts of dead workers (their stores live in the temp dir by default).
    for store_parent in {parent, Path(tempfile.gettempdir())}:
        reap_stale_stores(store_parent)
    return removed


@dataclass
class LocalSandbox:
    """One rollout's private working copy and the processes started in it.

    Attributes:
        rollout_id: unique id, also the process marker value.
        root: the sandbox's own private directory (removed at teardown).
        workdir: the agent's work tree at ``task.base_commit`` (``root/repo``).
        home: the agent commands' private home (``root/home``).
        runner_dir: the host-side runner's files (``root/runner``), never visible to the agent.
        task: the task this sandbox was made for.
        isolation: ``"bwrap"`` or ``"none"`` (what is in force, after ``auto``).
        jail: the jail's uid and limits.
        command_prefix: argv prefix that runs one agent command jailed (empty when not).
        command_env: the environment of the agent's commands (an allowlist).
    """

    rollout_id: str
    root: Path
    workdir: Path
    home: Path
    task: SWETask
    runner_dir: Path = Path()
    isolation: str = "none"
    jail: JailSpec = field(default_factory=JailSpec)
    command_prefix: list[str] = field(default_factory=list)
    command_env: dict[str, str] = field(default_factory=dict)
    _process_groups: list[int] = field(default_factory=list)
    _uid_lease: UidLease | None = None
    _held_tree: HeldTree | None = None
    _closed: bool = False

    @property
    def isolated(self) -> bool:
        """True when the agent's commands run in the jail."""
        return self.isolation == "bwrap"

    @property
    def git_dir(self) -> Path:
        """The trusted git directory patches are extracted with (``root/git``)."""
        return self.root / "git"

    @classmethod
    async def create(
        cls,
        task: SWETask,
        *,
        parent_dir: str | None = None,
        rollout_id: str | None = None,
        isolation: str = "none",
        jail: JailSpec | None = None,
        copy_tree: Callable[[Path], Awaitable[object]] | None = None,
        trees: PristineTrees | None = None,
        work_tree: str = "auto",
    ) -> LocalSandbox:
        """Copy ``task.repo_path`` at ``task.base_commit`` into a new private directory.

        Args:
            parent_dir: where sandboxes are made (default: the system temp dir).
            isolation: ``none``, ``bwrap`` (fails if bubblewrap does not work here) or ``auto``.
            jail: uid and limits of the jailed commands (``JailSpec()`` defaults).
            copy_tree: makes the work tree at the path it is given, a one-commit repository
                (an image task's tree: ``sandbox.image_tree``); None = ``checkout_copy`` of
                ``task.repo_path``.
            trees: the worker's prepared checkouts, one per (repository, commit): the work tree
                starts from it instead of a new ``checkout_copy`` (a clone, a checkout and a
                re-hashed one-commit history per rollout); the same tree either way.
            work_tree: with ``trees``: ``overlay`` forks the prepared checkout (an overlay mount,
                ``sandbox.overlay``: nothing copied), ``copy`` copies it (``cp -a --reflink=auto``),
                ``auto`` forks where overlays can be mounted and copies elsewhere.

        Raises:
            SandboxError: the repo is missing or cannot be checked out, or bwrap was
                required and does not work; nothing is left on disk.
            ValueError: unknown ``isolation``.
        """
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
        if work_tree not in WORK_TREE_MODES:
            raise ValueError(f"work_tree must be one of {WORK_TREE_MODES}, got {work_tree!r}")
        rollout_id = rollout_id or uuid.uuid4().hex
        if not task.repo_path and copy_tree is None:
            raise SandboxError(f"{task.instance_id}: task has no repo_path (an image task: use "
                               "swe_agent.sandbox.backend=docker, or swe_agent.agent.sweagent_deployment=docker "
                               "with SWE-agent)")
        jailed = False
        if isolation != "none":
            jailed = await asyncio.to_thread(bwrap_available)
            if not jailed and isolation == "bwrap":
                raise SandboxError(f"{task.instance_id}: isolation=bwrap but bubblewrap cannot create namespaces "
                                   "here (apt-get install bubblewrap)")
        if parent_dir:
            os.makedirs(parent_dir, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=SANDBOX_PREFIX, dir=parent_dir))
        box = cls(rollout_id=rollout_id, root=root, workdir=root / "repo", home=root / "home", task=task,
                  runner_dir=root / "runner", jail=jail or JailSpec())
        async with box.torn_down_on_failure("cannot create sandbox"):
            (root / OWNER_FILE).write_text(json.dumps(owner_record(rollout_id=rollout_id)))
            box.home.mkdir()
            box.runner_dir.mkdir()
            if copy_tree is not None:
                await copy_tree(box.workdir)
            elif trees is not None and (work_tree == "overlay"
                                        or (work_tree == "auto" and await asyncio.to_thread(overlay_available))):
                await box._fork_tree(trees, required=work_tree == "overlay")
            elif trees is not None:
                await trees.copy_to(task.repo_path, task.base_commit, box.workdir)
            else:
                await checkout_copy(task.repo_path, task.base_commit, box.workdir)
            await run_command(["cp", "-a", str(box.workdir / ".git"), str(box.git_dir)], timeout_s=120.0)
            interpreter = task.host_python
            box.command_env = clean_env(path_first=os.path.dirname(interpreter), home=str(box.home), extra={
                ROLLOUT_MARKER_ENV: rollout_id,
                "TMPDIR": "/tmp" if jailed else str(box.home),
                # The agent's own pytest runs need none of this environment's plugins (DEFAULT_TEST_CMD).
                "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
                "PIP_NO_INDEX": "1",
                "PYTHONDONTWRITEBYTECODE": "1",
                # The leased uid has no passwd entry: name it for tools that ask (git commit, getpass).
                "USER": "agent", "LOGNAME": "agent",
                **{k: v for k, v in GIT_ENV.items() if k.startswith(("GIT_AUTHOR", "GIT_COMMITTER"))},
            })
            if jailed:
                # Its own uid: the kernel counts the process limit per uid, across every sandbox.
                box._uid_lease = await asyncio.to_thread(lease_uid, box.jail)
                box.jail = box._uid_lease.spec
                await asyncio.to_thread(give_to_jail, box.jail, box.workdir, box.home)
                box.command_prefix = jail_argv(box.jail, [], writable=[box.workdir, box.home],
                                               readable=interpreter_paths(interpreter), chdir=box.workdir)
                box.isolation = "bwrap"
            elif isolation != "none":
                logger.warning("sandbox %s is NOT isolated (bubblewrap unusable): commands see the host and the "
                               "network", rollout_id)
            else:
                logger.info("sandbox %s is not isolated (isolation=none)", rollout_id)
        return box

    async def _fork_tree(self, trees: PristineTrees, *, required: bool) -> None:
        """The work tree as an overlay over the prepared checkout, held until teardown; a copy of it
        when the mount fails and ``required`` is False.

        Raises:
            OverlayError: the mount failed and ``required``.
        """
        self._held_tree = await trees.hold_checkout(self.task.repo_path, self.task.base_commit)
        try:
            await mount_overlay_async(self._held_tree.path, self.root / "layers", self.workdir)
        except OverlayError as exc:
            if required:
                raise
            logger.warning("%s: cannot fork the work tree (%s); copying it", self.task.instance_id, exc)
            held, self._held_tree = self._held_tree, None
            await asyncio.to_thread(held.release)
            await asyncio.to_thread(shutil.rmtree, self.root / "layers", True)
            await asyncio.to_thread(shutil.rmtree, self.workdir, True)
            await trees.copy_to(self.task.repo_path, self.task.base_commit, self.workdir)

    @contextlib.asynccontextmanager
    async def torn_down_on_failure(self, what: str) -> AsyncIterator[None]:
        """Tear this sandbox down when the block fails (nothing is left on disk or running);
        an ``Exception`` becomes ``SandboxError("<instance id>: <what>: <exc>")``, a cancellation
        propagates."""
        try:
            yield
        except BaseException as exc:
            await asyncio.shield(self.teardown())
            if isinstance(exc, Exception):
                raise SandboxError(f"{self.task.instance_id}: {what}: {exc}") from exc
            raise

    def env(self) -> dict[str, str]:
        """The environment of the agent's commands (``command_env``: an allowlist with the marker)."""
        return dict(self.command_env)

    def runner_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The host-side agent process's environment: an allowlist (no trainer secret), the marker,
        ``HOME`` = ``runner_dir``, this interpreter first on ``PATH``, then ``extra``."""
        return clean_env(path_first=os.path.dirname(sys.executable), home=str(self.runner_dir),
                         extra={ROLLOUT_MARKER_ENV: self.rollout_id, **(extra or {})})

    def wrap_command(self, command: str) -> list[str]:
        """argv running ``bash -c command`` in this sandbox (under bwrap when isolated)."""
        return [*self.command_prefix, "bash", "-c", command]

    def track_process_group(self, pgid: int) -> None:
        """Register a process group (e.g. the agent's) to kill at teardown."""
        self._process_groups.append(pgid)

    async def extract_patch(self, max_bytes: int | None = None) -> str:
        """The work tree's changes against ``base_commit`` as a git diff (new files included).

        The diff goes to a file in ``runner_dir`` first; over ``max_bytes`` it is not read
        (``PatchTooLarge``). Nested repositories (gitlinks: a directory holding a ``.git``) are
        left out, so git never reads a repository the agent pointed a ``.git`` file at.

        Through the trusted git directory (``git_dir``): the agent's ``.git`` (its config,
        hooks, fsmonitor, refs) plays no part, and no filter, external diff or hook can run.
        Caches of interpreters and pytest are left out. Test-file changes are kept here;
        the grader puts them back.
        """
        git = ["git", f"--git-dir={self.git_dir}", f"--work-tree={self.workdir}", *SAFE_GIT_OPTIONS]
        env = {**{k: v for k, v in os.environ.items() if k in ("PATH", "LANG")}, **GIT_ENV,
               "GIT_CONFIG_GLOBAL": os.devnull, "HOME": str(self.runner_dir)}
        added = await run_command([*git, "add", "-A", "--", ".", *CACHE_EXCLUDES], env=env, timeout_s=120.0)
        if added.returncode != 0 or added.timed_out:
            raise SandboxError(f"{self.task.instance_id}: cannot read the work tree: {added.output[-1000:]}")
        staged = await run_command([*git, "ls-files", "--stage", "-z"], env=env, timeout_s=120.0)
        gitlinks = [entry.split("\t", 1)[1] for entry in staged.output.split("\0") if entry.startswith("160000 ")]
        if gitlinks:
            await run_command([*git, "rm", "-q", "--cached", "-r", "--", *gitlinks], env=env, timeout_s=120.0)
        out = self.runner_dir / "patch.diff"
        diff = await run_command([*git, "diff", "--cached", "--binary", "--no-ext-diff", "--no-textconv",
                                  f"--output={out}", "HEAD"], env=env, timeout_s=120.0)
        if diff.returncode != 0 or diff.timed_out:
            raise SandboxError(f"{self.task.instance_id}: cannot diff the work tree: {diff.output[-1000:]}")
        size = out.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise PatchTooLarge(f"{self.task.instance_id}: the work tree's diff is {size} bytes, over {max_bytes}")
        return await asyncio.to_thread(out.read_text, encoding="utf-8", errors="replace")

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
        if self._held_tree is not None:
            detach_mounts_below(self.root)  # the work tree's overlay (made even if its creation was cancelled)
        shutil.rmtree(self.root, ignore_errors=True)
        if self._held_tree is not None:
            self._held_tree.release()
        if self._uid_lease is not None:
            self._uid_lease.release()

    @property
    def closed(self) -> bool:
        return self._closed
