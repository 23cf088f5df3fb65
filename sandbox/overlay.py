"""Work trees that fork: an overlay mount over a prepared checkout instead of a copy of it.

The rollouts of a GRPO group start from the same tree. Copying it (``cp -a``; a reflink only on
btrfs/xfs, none on ext4) costs time and disk in proportion to the repository, per rollout.
overlayfs gives each sandbox the prepared tree as its read-only lower layer and a private upper
layer that receives its writes: nothing is copied until a file is written, and the lower tree is
never modified (a write copies the file up first). ``metacopy=on`` makes the ownership change
that hands the tree to the jail's uid (``sandbox.jail.give_to_jail``) copy up metadata only.

Mounting needs root (``CAP_SYS_ADMIN``) in this process's mount namespace; ``overlay_available``
probes it once per process, and sandboxes copy when it fails. The mounts live in the host's mount
namespace (the harness reads the merged tree: patch extraction, Docker bind mounts), so every
sandbox detaches its mount at teardown and the start-up reaper detaches those of dead runs
(``detach_mounts_below``) before it deletes their directories. The upper layer is inside the
sandbox's private directory, which the jail never mounts: the policy reaches the layers only
through the overlay, where the kernel writes them (it cannot set the ``trusted.overlay.*``
attributes that steer overlayfs without ``CAP_SYS_ADMIN``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

MNT_DETACH = 2
# No setuid bits or device nodes through a work tree: root in a container could make either in its
# upper layer, which is in the host's mount namespace.
MS_NOSUID, MS_NODEV = 2, 4


class OverlayError(OSError):
    """An overlay could not be mounted (the caller copies instead)."""


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _options(lower: Path, upper: Path, work: Path) -> str:
    for path in (lower, upper, work):
        if any(c in str(path) for c in ",:\\"):  # the mount option syntax cannot carry these
            raise OverlayError(f"path unusable in overlay options: {path}")
    return f"lowerdir={lower},upperdir={upper},workdir={work},metacopy=on"


def mount_overlay(lower: Path, layers: Path, merged: Path) -> None:
    """Mount ``lower`` (read-only, shared) at ``merged`` with its writable layers under ``layers``
    (``layers/upper``, ``layers/work``; created here). Blocking.

    Raises:
        OverlayError: the kernel refused the mount (not root, no overlayfs, unsupported layers).
    """
    upper, work = layers / "upper", layers / "work"
    try:
        upper.mkdir(parents=True)
        work.mkdir()
        merged.mkdir(exist_ok=True)
        # The merged root takes the upper directory's owner and mode; the lower's must show.
        st = os.stat(lower)
        os.chown(upper, st.st_uid, st.st_gid)
        os.chmod(upper, st.st_mode & 0o7777)
    except OSError as exc:
        raise OverlayError(exc.errno, f"overlay layers under {layers}: {exc}") from exc
    if _libc().mount(b"overlay", str(merged).encode(), b"overlay", MS_NOSUID | MS_NODEV,
                     _options(lower, upper, work).encode()) != 0:
        err = ctypes.get_errno()
        raise OverlayError(err, f"mount overlay at {merged}: {os.strerror(err)}")


async def mount_overlay_async(lower: Path, layers: Path, merged: Path) -> None:
    """``mount_overlay`` in a thread; a cancelled caller still waits for the mount to finish (then
    is cancelled), so its cleanup finds the mount if it was made.

    Raises:
        OverlayError: as ``mount_overlay``.
    """
    mounting = asyncio.ensure_future(asyncio.to_thread(mount_overlay, lower, layers, merged))
    try:
        await asyncio.shield(mounting)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await mounting
        raise


def detach(merged: Path) -> bool:
    """Detach the mount at ``merged`` (lazily: a process still inside cannot keep it); False when
    nothing was mounted there. Blocking."""
    if _libc().umount2(str(merged).encode(), MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
        logger.warning("cannot detach %s: %s", merged, os.strerror(err))
    return False


def mounts_below(root: Path) -> list[Path]:
    """Mount points at or below ``root`` in this mount namespace, deepest first (``/proc/self/mountinfo``)."""
    prefix = str(root.resolve()).rstrip("/") + "/"
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # \040 = space
            if (point + "/").startswith(prefix):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def detach_mounts_below(root: Path) -> int:
    """Detach every mount at or below ``root`` (a dead run's sandbox); returns how many. Blocking."""
    return sum(detach(point) for point in mounts_below(root))


@functools.cache
def overlay_available() -> bool:
    """Whether this process can mount overlays (probed once: a real mount in a temporary directory)."""
    if os.geteuid() != 0:
        return False
    probe = Path(tempfile.mkdtemp(prefix="swe-rl-overlay-probe-"))
    try:
        lower = probe / "lower"
        lower.mkdir()
        (lower / "f").write_text("lower\n")
        mount_overlay(lower, probe / "layers", probe / "merged")
        try:
            (probe / "merged" / "f").write_text("upper\n")
            works = (lower / "f").read_text() == "lower\n" and (probe / "merged" / "f").read_text() == "upper\n"
        finally:
            detach(probe / "merged")
        return works
    except OSError as exc:
        logger.info("overlay work trees unavailable here (%s): sandboxes copy their trees", exc)
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)
