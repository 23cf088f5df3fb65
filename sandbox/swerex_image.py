"""Images for SWE-agent's Docker deployment: a task's image with SWE-ReX's server built in.

SWE-ReX starts ``swerex-remote`` in the container and, when the image lacks it, installs it
with pip over the network at every start (swerex/deployment/docker.py). Our containers have
no network, so each source image gets a derived image once: SWE-ReX and its dependencies
installed on the host with ``pip install --target`` (this interpreter's version: the image's
``python3`` must be the same minor version, checked in the build), copied to ``/opt/swerex``,
and a ``swerex-remote`` in ``LAUNCHER_DIR`` (first on the container's ``PATH``: a task's own
environment may bring another one) that runs it with ``python3 -I`` and that directory put
on ``sys.path`` inside the server only -- never on ``PYTHONPATH``, so the tested code and the
agent's commands never import SWE-ReX's packages.

The containers run with ``--network none``, so SWE-ReX cannot reach a published port: when
``SOCKET_DIR`` is mounted, the launcher also starts a relay (stdlib only) that serves the
server's ``127.0.0.1:8000`` on the Unix socket ``SOCKET_DIR/swerex.sock``; the host side
(``sandbox.relay.TcpRelay``) connects SWE-ReX's loopback port to that socket.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

SWEREX_VERSION = "1.4.0"
IMAGE_REPOSITORY = "swe-rl-swerex"
# The host-side install of SWE-ReX that images copy (one per version and Python minor version).
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "swe-rl"
# Seconds the host-side pip install may take.
PIP_TIMEOUT_S = 600.0

# The launcher's directory inside the image; it holds nothing else.
LAUNCHER_DIR = "/usr/local/lib/swe-rl/bin"
# Where the host mounts the directory of the server's Unix socket, inside the container.
SOCKET_DIR = "/run/swe-rl"
SOCKET_NAME = "swerex.sock"

_LAUNCHER = f"""#!/bin/sh
if [ -d {SOCKET_DIR} ]; then python3 -I /usr/local/lib/swe-rl/uds_relay.py {SOCKET_DIR}/{SOCKET_NAME} 8000 & fi
exec python3 -I -c 'import sys; sys.path.insert(0, "/opt/swerex"); sys.argv[0] = "swerex-remote"; \\
from swerex.server import main; main()' "$@"
"""

# Unix socket -> 127.0.0.1:<port> inside the container, one pipe pair per connection.
_UDS_RELAY = """import asyncio, os, sys

path, port = sys.argv[1], int(sys.argv[2])


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def serve(reader, writer):
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        writer.close()
        return
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def main():
    if os.path.exists(path):
        os.unlink(path)
    server = await asyncio.start_unix_server(serve, path)
    os.chmod(path, 0o600)
    await server.serve_forever()


asyncio.run(main())
"""


class SWEReXImageError(RuntimeError):
    """The derived image could not be built (the message says why: pip, the build's log)."""


def swerex_site(cache_dir: Path = CACHE_DIR, version: str = SWEREX_VERSION) -> Path:
    """SWE-ReX ``version`` and its dependencies in a directory of their own (``pip install
    --target``, once; blocking).

    Raises:
        SWEReXImageError: pip failed.
    """
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    site = cache_dir / f"swerex-{version}-{py}"
    if (site / ".complete").is_file():
        return site
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=site.name + ".", dir=cache_dir))
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--target", str(tmp),
                               f"swe-rex=={version}"], capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        if done.returncode != 0:
            raise SWEReXImageError(f"pip install --target swe-rex=={version} failed: {done.stderr[-2000:]}")
        (tmp / ".complete").touch()
        try:
            tmp.rename(site)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return site


class SWEReXImages:
    """Derived images by source image, built once per engine (``image_for``; thread-safe).

    Args:
        client: a ``docker.DockerClient``.
    """

    def __init__(self, client: Any, cache_dir: Path = CACHE_DIR) -> None:
        self.client = client
        self.cache_dir = cache_dir
        self._lock = threading.Lock()

    def image_for(self, source: str) -> str:
        """The tag of ``source`` with SWE-ReX built in (blocking: a first build takes seconds).

        Raises:
            SWEReXImageError: the build failed (e.g. the image's python3 is another version).
            docker.errors.ImageNotFound: no ``source`` image on the engine.
        """
        import docker

        source_id = self.client.images.get(source).id
        minor = f"{sys.version_info.major}.{sys.version_info.minor}"
        recipe = f"{source_id}|{SWEREX_VERSION}|{minor}|{LAUNCHER_DIR}|{_LAUNCHER}|{_UDS_RELAY}"
        key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
        tag = f"{IMAGE_REPOSITORY}:{key}"
        with self._lock:
            try:
                self.client.images.get(tag)
                return tag
            except docker.errors.ImageNotFound:
                pass
            site = swerex_site(self.cache_dir)
            with tempfile.TemporaryDirectory(prefix="swerex-image-") as ctx:
                shutil.copytree(site, Path(ctx) / "swerex", ignore=shutil.ignore_patterns(".complete"))
                (Path(ctx) / "swerex-remote").write_text(_LAUNCHER)
                (Path(ctx) / "uds_relay.py").write_text(_UDS_RELAY)
                (Path(ctx) / "Dockerfile").write_text(
                    f"FROM {source}\n"
                    "COPY swerex /opt/swerex\n"
                    f"COPY swerex-remote {LAUNCHER_DIR}/swerex-remote\n"
                    "COPY uds_relay.py /usr/local/lib/swe-rl/uds_relay.py\n"
                    f"RUN chmod 0755 {LAUNCHER_DIR}/swerex-remote && "
                    f"python3 -c 'import sys; assert sys.version_info[:2] == ({minor.replace('.', ', ')}), "
                    f"\"SWE-ReX was installed for Python {minor}\"' && {LAUNCHER_DIR}/swerex-remote --version\n"
                )
                try:
                    self.client.images.build(path=ctx, tag=tag, rm=True, forcerm=True, network_mode="none",
                                             labels={"swe-rl.swerex": SWEREX_VERSION})
                except docker.errors.BuildError as exc:
                    log = "".join(str(chunk.get("stream", chunk.get("error", ""))) for chunk in exc.build_log)
                    raise SWEReXImageError(f"cannot build {tag} from {source}: {log[-2000:]}") from exc
        return tag
