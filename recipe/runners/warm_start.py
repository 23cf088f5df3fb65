"""Warm agent start: one pre-imported interpreter per worker forks each rollout's agent process.

A cold start pays the agent's interpreter and imports on every rollout: for mini-swe-agent that is
litellm, ~6 s of CPU on this project's 2-core machine, times every rollout of every GRPO group.
``AgentForkServer`` starts ``recipe.runners.forkserver_main`` once (its imports paid once) and asks it
for one forked child per rollout; the child is what the cold start's ``python -P -m MODULE ARGS``
would be (see that module for what a fork cannot give and how it is made up for).

The server process is the worker's, owned by ``WorkerResources`` (``warm_agent``): it dies with the
worker (``PR_SET_PDEATHSIG``), its children die with it, and ``aclose`` stops it. Everything here is
asyncio (the Unix socket and the child's exit report); nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from core.process import kill_process_group

SERVER_MODULE = "recipe.runners.forkserver_main"
# forkserver_main.PLACEHOLDER_MARKER (not imported: that module is the server's, kept stdlib-only).
PLACEHOLDER_MARKER = "0" * 32


class WarmStartError(RuntimeError):
    """The fork server could not start or could not fork a child (the caller starts cold)."""


@dataclass
class WarmProcess:
    """A child of the fork server: not this process's child, so its exit comes over the socket.

    Attributes:
        pid: the child's pid (also its process group and session id).
    """

    pid: int
    _reader: asyncio.StreamReader
    _writer: asyncio.StreamWriter

    async def wait(self) -> int | None:
        """The child's exit code (negative: killed by that signal, as ``asyncio``'s ``returncode``),
        or None when the server went away first (the child then died with it). A cancelled wait
        can be waited again (after killing the child, say)."""
        try:
            line = await self._reader.readline()
            reply = json.loads(line) if line else {}
        except (OSError, ValueError):
            reply = {}
        self.close()
        code = reply.get("returncode")
        return int(code) if isinstance(code, int) else None

    def close(self) -> None:
        """Stop listening for the exit (the server still reaps the child)."""
        self._writer.close()


class AgentForkServer:
    """One running ``forkserver_main`` for ``module`` (start with ``start``, stop with ``aclose``).

    Args (of ``start``):
        module: the agent entry module the cold start runs with ``python -P -m``.
        env_for_home: ``env_for_home(home)`` is the server's environment, ``home`` its private
            directory: what the entry reads at import time must be what each rollout's own
            environment would give (the child's ``os.environ`` is the rollout's). It must hold
            ``SWE_ROLLOUT_ID`` = ``PLACEHOLDER_MARKER``.
        timeout_s: seconds to wait for the server's imports.

    Raises:
        WarmStartError: the server exited or did not report ready within ``timeout_s``.
    """

    def __init__(self, module: str, proc: asyncio.subprocess.Process, state_dir: Path) -> None:
        self.module = module
        self._proc = proc
        self._state_dir = state_dir
        self.socket_path = state_dir / "fork.sock"

    @classmethod
    async def start(cls, module: str, env_for_home, timeout_s: float) -> AgentForkServer:
        # Short and private: a Unix socket path has a 107-byte limit, and only this worker may connect.
        state_dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="swe-rl-warm-"))
        env = env_for_home(state_dir)
        if env.get("SWE_ROLLOUT_ID") != PLACEHOLDER_MARKER:
            await asyncio.to_thread(shutil.rmtree, state_dir, True)
            raise WarmStartError("the fork server's environment needs the placeholder SWE_ROLLOUT_ID")
        server = None
        log = await asyncio.to_thread(open, state_dir / "server.log", "wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", SERVER_MODULE, module, str(state_dir / "fork.sock"), str(os.getpid()),
                cwd=str(state_dir), env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=log, start_new_session=True,
            )
            server = cls(module, proc, state_dir)
            try:
                ready = await asyncio.wait_for(_ready_line(proc.stdout), timeout_s)
            except asyncio.TimeoutError:
                ready = False
            if not ready:
                tail = (await asyncio.to_thread((state_dir / "server.log").read_bytes))[-2000:]
                raise WarmStartError(f"the {module} fork server did not start within {timeout_s} s: "
                                     f"{tail.decode(errors='replace')}")
            return server
        except BaseException as exc:
            if server is not None:
                await server.aclose()
            else:
                await asyncio.to_thread(shutil.rmtree, state_dir, True)
            if isinstance(exc, OSError):  # the interpreter could not be started: start cold
                raise WarmStartError(f"cannot start the {module} fork server: {exc}") from exc
            raise
        finally:
            log.close()

    @property
    def running(self) -> bool:
        return self._proc.returncode is None

    async def spawn(self, args: list[str], *, env: dict[str, str], cwd: str, log_path: str,
                    marker: str) -> WarmProcess:
        """Fork one child running ``module`` with ``args`` (see ``forkserver_main``).

        Raises:
            WarmStartError: the server is gone or refused the request (nothing was started).
        """
        if not self.running:
            raise WarmStartError(f"the {self.module} fork server exited ({self._proc.returncode})")
        request = {"args": list(args), "env": dict(env), "cwd": cwd, "log_path": log_path, "marker": marker}
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.socket_path), limit=1 << 20)
        except OSError as exc:
            raise WarmStartError(f"cannot reach the {self.module} fork server: {exc}") from exc
        try:
            writer.write((json.dumps(request) + "\n").encode())
            await writer.drain()
            line = await reader.readline()
            reply = json.loads(line) if line else {"error": "the fork server closed the connection"}
        except BaseException as exc:
            # Closing the connection before the child is tracked makes the server kill it.
            writer.close()
            if isinstance(exc, (OSError, ValueError)):
                raise WarmStartError(f"the {self.module} fork server failed: {exc}") from exc
            raise
        if not isinstance(reply.get("pid"), int):
            writer.close()
            raise WarmStartError(f"the {self.module} fork server refused: {reply.get('error', reply)}")
        return WarmProcess(reply["pid"], reader, writer)

    async def aclose(self) -> None:
        """Stop the server (its running children die with it) and remove its directory."""
        if self._proc.returncode is None:
            kill_process_group(self._proc.pid)
        await self._proc.wait()
        await asyncio.to_thread(shutil.rmtree, self._state_dir, True)


async def _ready_line(stdout: asyncio.StreamReader) -> bool:
    """Read the server's stdout until its ``ready`` line (imports may print before it); False at EOF."""
    while line := await stdout.readline():
        if line.strip() == b"ready":
            return True
    return False


class WarmStartPool:
    """The worker's fork servers, one per agent entry module, started on first use.

    Owned by ``WorkerResources``; ``aclose`` stops them. A server that fails to start is reported
    once (a warning) and its module starts cold from then on; one that died is started again.

    Args:
        timeout_s: seconds a server may take for its imports (``agent.warm_start_timeout_s``).
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._starts: dict[str, asyncio.Task[AgentForkServer]] = {}
        self._failed: dict[str, str] = {}

    async def server(self, module: str, env_for_home) -> AgentForkServer | None:
        """The running server for ``module``, or None when it cannot start (start cold).

        ``env_for_home(home)`` gives the server's environment with ``HOME`` at ``home`` (its private
        directory) and the placeholder marker.
        """
        if module in self._failed:
            return None
        task = self._starts.get(module)
        if task is not None and task.done() and (task.cancelled() or task.exception() or not task.result().running):
            if not task.cancelled() and task.exception() is None:
                await task.result().aclose()  # it died: its directory goes, a new one starts
            task = None
        if task is None:
            task = self._starts[module] = asyncio.get_running_loop().create_task(
                self._start(module, env_for_home), name=f"warm-start-{module}")
        try:
            return await asyncio.shield(task)
        except WarmStartError as exc:
            if module not in self._failed:
                self._failed[module] = str(exc)
                logging.getLogger(__name__).warning("warm start off for %s, starting cold: %s", module, exc)
            return None

    async def _start(self, module: str, env_for_home) -> AgentForkServer:
        return await AgentForkServer.start(module, env_for_home, self.timeout_s)

    async def aclose(self) -> None:
        starts, self._starts = self._starts, {}
        for task in starts.values():
            if not task.done():
                task.cancel()
            try:
                server = await task
            except BaseException:
                continue
            await server.aclose()
