"""Async subprocess helpers that never block the event loop and never orphan children.

Every command starts in its own session (process group), so a timeout or a
cancellation kills the whole group, not just the shell.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass
class CommandResult:
    """Outcome of one command.

    Attributes:
        returncode: exit status; -9 after a kill on timeout.
        output: stdout and stderr interleaved, decoded as UTF-8 (errors replaced).
        timed_out: True when the command was killed at its timeout.
        duration_s: wall-clock seconds.
    """

    returncode: int
    output: str
    timed_out: bool
    duration_s: float


def kill_process_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process group led by ``pid``; a group already gone is fine."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def run_command(
    argv: Sequence[str] | str,
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    stdin: bytes | None = None,
    pass_fds: Sequence[int] = (),
) -> CommandResult:
    """Run a command (argv list, or a string for ``bash -c``) in a new process group.

    ``pass_fds``: open descriptors the command inherits (as ``subprocess.Popen``'s).

    On timeout or cancellation the whole process group is SIGKILLed and reaped.

    Raises:
        asyncio.CancelledError: propagated after the group is killed.
        FileNotFoundError: the executable does not exist.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    if isinstance(argv, str):
        argv = ["bash", "-c", argv]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=None if cwd is None else str(cwd),
        env=None if env is None else dict(env),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        pass_fds=tuple(pass_fds),
    )
    timed_out = False
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout=timeout_s)
    except asyncio.TimeoutError:
        timed_out = True
        kill_process_group(proc.pid)
        out, _ = await proc.communicate()
    except BaseException:
        kill_process_group(proc.pid)
        await asyncio.shield(proc.wait())
        raise
    # The shell may have exited while background children of its group live on.
    kill_process_group(proc.pid)
    return CommandResult(
        returncode=proc.returncode if proc.returncode is not None else -9,
        output=out.decode("utf-8", errors="replace"),
        timed_out=timed_out,
        duration_s=loop.time() - start,
    )
