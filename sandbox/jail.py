"""A jail for an untrusted command on a host without delegated cgroups (bubblewrap + util-linux).

``jail_argv(spec, argv, writable=..., readable=..., chdir=...)`` runs ``argv``:

- **deny by default** (bubblewrap): the command sees the system directories read-only
  (``/usr``, ``/bin``, ``/lib*``, ``/sbin``, ``/etc``), its own ``/proc``, ``/dev`` and
  ``/tmp``, the ``readable`` paths read-only, the ``writable`` ones read-write, and
  nothing else -- no ``/root``, ``/home``, task data, checkpoints or other sandboxes;
- in new PID, network, IPC and UTS namespaces: no route out (loopback only), and when
  the command's first process exits the kernel kills every process left in the
  namespace -- daemons that ``setsid``, double-fork or clear their environment
  included (``--die-with-parent`` does the same if the caller dies);
- when the caller is root, as an unprivileged uid with every capability dropped and
  ``no_new_privs`` set (``setpriv``): root's capabilities would let it remount the
  read-only views, change owners, or ignore the process limit (the kernel never applies
  ``RLIMIT_NPROC`` to uid 0). The kernel counts ``RLIMIT_NPROC`` per uid across the host,
  so each jail leases its own uid from a pool (``lease_uid``: ``uid`` .. ``uid +
  uid_pool_size - 1``, file locks shared by every process on the host): one rollout's
  fork bomb cannot starve its siblings or the grader;
- under resource limits (``prlimit``): processes of that uid, address space and file
  size per process, open files, no core dumps.

Without bubblewrap, ``unshare --pid --net --fork --kill-child`` gives the namespaces and
the process cleanup but not the file-system view (``JailSpec.require_fs_isolation``
refuses that). A non-root caller keeps its uid (it cannot change it) and the
namespaces go in a user namespace mapping it to itself. Total memory and CPU of a
process tree need a cgroup (the Docker backend, or a delegated cgroup v2 directory
in ``sandbox.cgroup``): rlimits bound each process only.

``clean_env`` builds an allowlist environment: nothing of the caller's (trainer
secrets such as ``WANDB_API_KEY``, tokens, proxies) reaches the command.
"""

from __future__ import annotations

import fcntl
import functools
import os
import tempfile
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
# First uid of the default pool: above the system and login ranges of /etc/login.defs.
POOL_START = 200000
# Where the pool's lock files live (one per uid in use; shared by every process on the host).
UID_LOCK_DIR = os.path.join(tempfile.gettempdir(), "swe-rl-uids")
# Seconds an availability probe may take.
PROBE_TIMEOUT_S = 10.0
# Locale and terminal settings every jailed command gets.
BASE_ENV = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "dumb", "TZ": "UTC"}
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")


@dataclass(frozen=True)
class JailSpec:
    """How a command is jailed. Sizes are bytes; ``None`` leaves a limit as inherited.

    Attributes:
        uid, gid: the ids to run as when the caller is root (ignored otherwise); None =
            stay uid 0 with every capability dropped. With ``uid_pool_size`` > 0, ``uid`` is
            the first of a pool and ``lease_uid`` picks a free one (gid = uid).
        uid_pool_size: uids in the pool; 0 = always ``uid``/``gid``.
        max_processes: ``RLIMIT_NPROC`` of that uid (not enforced for uid 0).
        max_address_space_bytes: ``RLIMIT_AS`` per process.
        max_file_bytes: ``RLIMIT_FSIZE``: no single file written larger.
        max_open_files: ``RLIMIT_NOFILE``.
        network: keep the host network (False: an empty network namespace).
        require_fs_isolation: refuse to run without bubblewrap's file-system view.
        tmp_bytes: size of the private ``/tmp`` (a RAM-backed tmpfs), bytes.
    """

    uid: int | None = POOL_START
    gid: int | None = POOL_START
    uid_pool_size: int = 4096
    max_processes: int | None = 1024
    max_address_space_bytes: int | None = 8 << 30
    max_file_bytes: int | None = 1 << 30
    max_open_files: int | None = 4096
    network: bool = False
    require_fs_isolation: bool = False
    tmp_bytes: int | None = 512 << 20


class JailUnavailable(RuntimeError):
    """The jail this spec asks for cannot be built here (the message says what is missing)."""


class UidLease:
    """A uid of a pool held by this process until ``release()`` (an ``flock`` on its lock file:
    the kernel drops it if the process dies). ``spec`` is the jail with that uid fixed."""

    def __init__(self, spec: JailSpec, fd: int | None) -> None:
        self.spec = spec
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lease_uid(spec: JailSpec, lock_dir: str = UID_LOCK_DIR) -> UidLease:
    """A free uid of ``spec``'s pool (blocking: file locks); a no-op lease when not root or no pool.

    Raises:
        JailUnavailable: every uid of the pool is in use.
    """
    if not running_as_root() or spec.uid is None or spec.uid_pool_size <= 0:
        return UidLease(spec, None)
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    start = spec.uid + (os.getpid() * 7919) % spec.uid_pool_size  # spread processes over the pool
    for i in range(spec.uid_pool_size):
        uid = spec.uid + (start - spec.uid + i) % spec.uid_pool_size
        fd = os.open(os.path.join(lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        fixed = JailSpec(**{**spec.__dict__, "uid": uid, "gid": uid, "uid_pool_size": 0})
        return UidLease(fixed, fd)
    raise JailUnavailable(f"all {spec.uid_pool_size} uids from {spec.uid} are in use (raise uid_pool_size)")


def running_as_root() -> bool:
    return os.geteuid() == 0


def _probe(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.lru_cache(maxsize=None)
def bwrap_available() -> bool:
    """Whether bubblewrap can make this jail's namespaces here (one probe per process)."""
    exe = shutil.which("bwrap")
    return exe is not None and _probe([exe, *_namespaces(), "--ro-bind", "/", "/", "true"])


@functools.lru_cache(maxsize=None)
def unshare_available() -> bool:
    """Whether ``unshare`` can make the PID and network namespaces here (one probe per process)."""
    return shutil.which("unshare") is not None and _probe([*_unshare(False), "true"])


def _namespaces() -> list[str]:
    argv = ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    # As root no user namespace: setpriv must be able to switch to a real unprivileged uid.
    return argv if running_as_root() else ["--unshare-user", *argv]


def _unshare(network: bool) -> list[str]:
    argv = ["unshare"] + ([] if running_as_root() else ["--map-current-user"])
    return [*argv, *([] if network else ["--net"]), "--pid", "--fork", "--kill-child", "--"]


def interpreter_paths(python: str | os.PathLike[str]) -> list[str]:
    """What an interpreter needs to run: its environment's root and its base installation's prefix.

    ``python`` may be a virtualenv's ``bin/python`` (a symlink into a base installation).
    """
    exe = Path(python)
    paths = [str(exe.parent.parent)]
    real = Path(os.path.realpath(exe))
    paths.append(str(real.parent.parent))
    return list(dict.fromkeys(p for p in paths if p not in ("/", "/usr")))


def prlimit_flags(spec: JailSpec) -> list[str]:
    """``prlimit`` options for ``spec``'s limits (processes, address space, file size, open files)."""
    return [f"{flag}={value}" for flag, value in (
        ("--nproc", spec.max_processes), ("--as", spec.max_address_space_bytes),
        ("--fsize", spec.max_file_bytes), ("--nofile", spec.max_open_files)) if value is not None]


def _limits(spec: JailSpec) -> list[str]:
    return ["prlimit", *prlimit_flags(spec), "--core=0", "--"] if shutil.which("prlimit") else []


def _privileges(spec: JailSpec) -> list[str]:
    argv: list[str] = []
    if running_as_root() and shutil.which("setpriv"):
        if spec.uid is not None and spec.uid_pool_size > 0:
            raise ValueError("a pooled JailSpec needs lease_uid(spec).spec before jail_argv")
        ids = [f"--reuid={spec.uid}", f"--regid={spec.gid}", "--clear-groups"] if spec.uid is not None else []
        argv += ["setpriv", *ids, "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all",
                 "--no-new-privs", "--"]
    return argv + _limits(spec)


def jail_argv(
    spec: JailSpec,
    argv: list[str],
    *,
    writable: list[str | os.PathLike[str]] = (),  # type: ignore[assignment]
    readable: list[str | os.PathLike[str]] = (),  # type: ignore[assignment]
    chdir: str | os.PathLike[str] | None = None,
    mounts: dict[str, str | os.PathLike[str]] | None = None,
    new_session: bool = True,
    drop_privileges: bool = True,
) -> list[str]:
    """``argv`` wrapped in the jail (see the module docstring).

    Args:
        writable: directories bound read-write at their own paths (owned by the jail's
            uid: ``give_to_jail``).
        readable: files or directories bound read-only (interpreters: ``interpreter_paths``).
        chdir: the working directory inside (a path as the jail sees it).
        mounts: jail path -> host directory, bound read-write at another path (before the
            binds above, so those may sit inside one of them).
        new_session: detach the command from the caller's terminal (``setsid``: no
            ``TIOCSTI`` into it); False for an interactive shell driven through a
            terminal the caller owns, whose interrupts must reach the command.
        drop_privileges: switch to the spec's uid without capabilities (as root); False keeps
            the caller's uid and capabilities, for a trusted harness that makes jails itself.

    Raises:
        JailUnavailable: ``spec.require_fs_isolation`` and bubblewrap does not work here.
    """
    inner = [*_privileges(spec), *argv] if drop_privileges else [*_limits(spec), *argv]
    if bwrap_available():
        jail = [shutil.which("bwrap") or "bwrap", "--die-with-parent", *(["--new-session"] if new_session else []),
                *_namespaces()]
        if not spec.network:
            jail.append("--unshare-net")
        for path in SYSTEM_DIRS:
            jail += ["--ro-bind-try", path, path] if not os.path.islink(path) else [
                "--symlink", os.readlink(path), path]
        tmp_size = ["--size", str(spec.tmp_bytes)] if spec.tmp_bytes else []
        jail += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", *tmp_size, "--tmpfs", "/tmp",
                 "--size", str(16 << 20), "--tmpfs", "/run"]
        for target, source in (mounts or {}).items():
            jail += ["--bind", os.path.realpath(source), target]
        # Directories bubblewrap makes for the binds below must be traversable by the jail's uid.
        made: set[str] = set()
        for path in [*readable, *writable]:
            parts = Path(os.path.realpath(path)).parts
            for i in range(2, len(parts)):
                ancestor = str(Path(*parts[:i]))
                if ancestor not in made and ancestor != "/tmp" and not any(
                        ancestor == d or ancestor.startswith(d + "/") for d in (*SYSTEM_DIRS, "/proc", "/dev", "/run")):
                    jail += ["--perms", "0755", "--dir", ancestor]
                    made.add(ancestor)
        for path in readable:
            real = os.path.realpath(path)
            jail += ["--ro-bind", real, real]
            if os.path.abspath(path) != real:
                jail += ["--ro-bind", real, os.path.abspath(path)]
        for path in writable:
            real = os.path.realpath(path)
            jail += ["--bind", real, real]
        if chdir is not None:
            jail += ["--chdir", str(chdir) if mounts and str(chdir) in mounts else os.path.realpath(chdir)]
        return [*jail, "--", *inner]
    if spec.require_fs_isolation:
        raise JailUnavailable("bubblewrap is missing or cannot create namespaces here (apt-get install bubblewrap)")
    if unshare_available():
        script = 'ip link set lo up >/dev/null 2>&1 || true\nexec "$@"'
        return [*_unshare(spec.network), "bash", "-c", script, "jail", *inner]
    return inner


def clean_env(*, path_first: str | None = None, home: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """An allowlist environment: ``BASE_ENV``, a system ``PATH`` (``path_first`` in front), ``HOME``
    and ``TMPDIR`` = ``home``, then ``extra``."""
    path = SYSTEM_PATH if path_first is None else os.pathsep.join([path_first, SYSTEM_PATH])
    return {**BASE_ENV, "PATH": path, "HOME": home, "TMPDIR": home, **(extra or {})}


def give_to_jail(spec: JailSpec, *paths: str | os.PathLike[str]) -> None:
    """Make ``paths`` (recursively, links not followed) owned by the jail's uid, when root (blocking)."""
    if not running_as_root() or spec.uid is None:
        return
    gid = spec.gid if spec.gid is not None else spec.uid
    for top in paths:
        os.chown(top, spec.uid, gid, follow_symlinks=False)
        for root, dirs, files in os.walk(top):
            for name in dirs + files:
                os.chown(os.path.join(root, name), spec.uid, gid, follow_symlinks=False)


def this_interpreter() -> list[str]:
    """``interpreter_paths`` of the running Python (the default task interpreter)."""
    return interpreter_paths(sys.executable)
