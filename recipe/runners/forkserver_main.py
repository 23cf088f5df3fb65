"""The warm-start server process (``python -P -m recipe.runners.forkserver_main MODULE SOCKET PARENT``).

Imports ``MODULE`` and what its ``warm_imports()`` names (for mini-swe-agent: litellm, ~6 s of a
rollout's cold start on 2 cores), freezes the heap into the GC's permanent generation (forked
children then share its pages instead of copying them as the collector touches them), and serves
forks on the Unix socket ``SOCKET``. It dies with ``PARENT`` (``PR_SET_PDEATHSIG``), and each child
dies with it.

Protocol (one JSON line each way per connection, see ``recipe.runners.warm_start``):
  request  ``{"args": [...], "env": {...}, "cwd": "...", "log_path": "...", "marker": "<32 hex>"}``
  replies  ``{"pid": N}`` once the child runs, then ``{"returncode": R}`` when it exits
           (``R`` as ``asyncio``'s ``returncode``: negative for a signal), or ``{"error": "..."}``.

A child is what ``python -P -m MODULE ARGS...`` started in ``cwd`` with ``env`` would be, as far as the
rollout can tell: its own session and process group, stdin ``/dev/null``, stdout and stderr to
``log_path``, no other inherited descriptor, ``os.environ`` = ``env``, ``sys.argv`` = ``[MODULE, *args]``,
the module run as ``__main__``. One thing a fork cannot change is the environment block the kernel
shows in ``/proc/<pid>/environ``, which is how the sandbox finds a rollout's processes
(``sandbox.local.find_marked_processes``): this server is started with a placeholder rollout id of
the same length, and the child overwrites those bytes in place with its own.

Standard library only (besides ``MODULE``); it must not start threads before it forks.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import sys
import threading
import traceback

MARKER_ENV = "SWE_ROLLOUT_ID"  # sandbox.local.ROLLOUT_MARKER_ENV, not imported: this process stays small
PLACEHOLDER_MARKER = "0" * 32  # uuid4().hex length: a rollout id
REQUEST_TIMEOUT_S = 30.0
PR_SET_PDEATHSIG = 1


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def die_with(parent: int) -> None:
    """SIGKILL this process when its parent dies; exit now if ``parent`` is already gone."""
    _libc().prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:
        os._exit(1)


def marker_address() -> int | None:
    """Address of the placeholder id inside the process's original environment block (the bytes
    ``/proc/self/environ`` shows), or None when the block has no placeholder marker."""
    libc = _libc()
    environ = ctypes.POINTER(ctypes.c_void_p).in_dll(libc, "environ")
    needle = f"{MARKER_ENV}={PLACEHOLDER_MARKER}".encode()
    i = 0
    while environ[i]:
        if ctypes.string_at(environ[i]) == needle:
            return environ[i] + len(MARKER_ENV) + 1
        i += 1
    return None


def _write(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall((json.dumps(message) + "\n").encode())
    except OSError:  # the rollout went away; the child is still reaped
        pass


def _read_request(conn: socket.socket) -> dict:
    conn.settimeout(REQUEST_TIMEOUT_S)
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1 << 16)
        if not chunk:
            raise ValueError("connection closed before a full request")
        data += chunk
    request = json.loads(data)
    for key, kind in (("args", list), ("env", dict), ("cwd", str), ("log_path", str), ("marker", str)):
        if not isinstance(request.get(key), kind):
            raise ValueError(f"request field {key!r} missing or not a {kind.__name__}")
    if len(request["marker"]) != len(PLACEHOLDER_MARKER):
        raise ValueError(f"marker must have {len(PLACEHOLDER_MARKER)} characters")
    return request


def run_child(module: str, request: dict, marker_at: int, ready_fd: int, server: int) -> None:
    """In the forked child: become the agent process (module docstring), tell the server through
    ``ready_fd`` once it is its own session leader with its marker, run the module, exit as the
    interpreter would (atexit handlers, non-daemon threads joined). Never returns."""
    code = 1
    try:
        os.setsid()
        libc = _libc()
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        ctypes.memmove(marker_at, request["marker"].encode("ascii"), len(PLACEHOLDER_MARKER))
        os.write(ready_fd, b"1")  # killable by its group and findable by its marker from here on
        os.close(ready_fd)
        if os.getppid() != server:  # the server died before the prctl
            os._exit(1)
        log = os.open(request["log_path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # Signal dispositions stay the interpreter's (SIGPIPE ignored, SIGINT -> KeyboardInterrupt),
        # as in a cold start: this server never changes them.
        sys.argv = [module, *request["args"]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            # What the interpreter does at exit, which os._exit skips.
            threading._shutdown()  # type: ignore[attr-defined]
            import atexit

            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _fork(module: str, request: dict, marker_at: int, inherited: list[socket.socket],
          selector: selectors.BaseSelector) -> int:
    """Fork the child for ``request``; returns its pid once it is set up (or has died trying)."""
    ready_r, ready_w = os.pipe()
    server = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        # The child's copies of this server's descriptors: closed by run_child, so their Python
        # objects must not close a reused descriptor number when collected.
        selector.close()
        for sock in inherited:
            sock.detach()
        run_child(module, request, marker_at, ready_w, server)
    os.close(ready_w)
    try:
        os.read(ready_r, 1)  # b"1", or b"" when the child died first
    finally:
        os.close(ready_r)
    return pid


def serve(module: str, listener: socket.socket, marker_at: int) -> None:
    """Fork one child per request until the parent dies (then the kernel kills this process).

    A connection closed before its child exits (the rollout was cancelled, or crashed, between
    asking and tracking the child) kills the child's process group: no child outlives its asker.
    """
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
    while True:
        for key, _ in selector.select():
            try:
                if key.data is None:
                    _accept(module, listener, marker_at, selector, children)
                elif key.data[0] == "exit":
                    _reap(key.fd, selector, children)
                else:  # the asker's connection is readable: it closed (or sent junk)
                    pidfd = key.data[1]
                    if pidfd in children:
                        try:
                            os.killpg(children[pidfd][0], signal.SIGKILL)
                        except OSError:
                            pass
                    try:
                        selector.unregister(key.fileobj)
                    except (KeyError, ValueError):  # reaped in this same round
                        pass
            except OSError as exc:  # one request's failure (EMFILE, EAGAIN from fork) must not end the others
                print(f"fork server: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def _accept(module: str, listener: socket.socket, marker_at: int, selector: selectors.BaseSelector,
            children: dict[int, tuple[int, socket.socket]]) -> None:
    conn, _ = listener.accept()
    try:
        request = _read_request(conn)
    except (OSError, ValueError) as exc:
        _write(conn, {"error": f"bad request: {exc}"})
        conn.close()
        return
    inherited = [listener, conn] + [c for _, c in children.values()]
    try:
        pid = _fork(module, request, marker_at, inherited, selector)
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        _write(conn, {"error": f"cannot fork: {exc}"})
        conn.close()
        raise
    children[pidfd] = (pid, conn)
    selector.register(pidfd, selectors.EVENT_READ, ("exit", pidfd))
    _write(conn, {"pid": pid})
    selector.register(conn, selectors.EVENT_READ, ("asker", pidfd))


def _reap(pidfd: int, selector: selectors.BaseSelector, children: dict[int, tuple[int, socket.socket]]) -> None:
    pid, conn = children.pop(pidfd)
    selector.unregister(pidfd)
    os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    try:
        selector.unregister(conn)
    except (KeyError, ValueError):
        pass
    _write(conn, {"returncode": os.waitstatus_to_exitcode(status)})
    conn.close()


def main(argv: list[str]) -> int:
    module, socket_path, parent = argv[0], argv[1], int(argv[2])
    die_with(parent)
    marker_at = marker_address()
    if marker_at is None:
        print(f"no {MARKER_ENV}={PLACEHOLDER_MARKER} in this process's environment", file=sys.stderr)
        return 2
    target = importlib.import_module(module)
    for name in getattr(target, "warm_imports", lambda: [])():
        try:
            importlib.import_module(name)
        except ImportError as exc:  # the child imports what it needs itself, only slower
            print(f"warm import {name} skipped: {exc}", file=sys.stderr)
    if threading.active_count() != 1:
        print(f"cannot fork safely: threads {threading.enumerate()}", file=sys.stderr)
        return 2
    gc.collect()
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    os.chmod(socket_path, 0o600)
    listener.listen(64)
    print("ready", flush=True)
    serve(module, listener, marker_at)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
