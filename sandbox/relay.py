"""A loopback TCP relay: each connection to ``127.0.0.1:<port>`` is piped to a connection the
relay opens with ``connect()`` (a Unix socket a container serves on).

SWE-ReX's Docker deployment talks to its container at ``127.0.0.1:<port>``, which needs a
published port, which needs a network. The recipe's SWE-agent containers have none
(``--network none``: no host service, no internet): inside, a relay serves SWE-ReX's server on
a Unix socket in a directory mounted from the host (``sandbox.swerex_image``), and this relay
takes SWE-ReX's connections to it. A connection that comes before the socket exists is closed
(the client retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

# Bytes read per chunk when piping.
CHUNK_BYTES = 1 << 16


Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class TcpRelay:
    """Forward connections on ``127.0.0.1:port`` to ``await connect()`` (e.g.
    ``functools.partial(asyncio.open_unix_connection, path)``).

    Use ``await TcpRelay.start(connect)``; ``port`` is then the listening port; ``close()`` stops
    listening and drops the open connections.
    """

    def __init__(self, connect: Connect) -> None:
        self._connect = connect
        self._server: asyncio.AbstractServer | None = None
        self._pipes: set[asyncio.Task] = set()
        self.port = 0

    @classmethod
    async def start(cls, connect: Connect, port: int = 0) -> TcpRelay:
        """Listen on ``127.0.0.1:port`` (0 = a free port).

        Raises:
            OSError: the port cannot be bound.
        """
        relay = cls(connect)
        relay._server = await asyncio.start_server(relay._serve, "127.0.0.1", port)
        relay.port = relay._server.sockets[0].getsockname()[1]
        return relay

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await self._connect()
            pipes = [asyncio.create_task(_pipe(reader, upstream)), asyncio.create_task(_pipe(up_reader, writer))]
            self._pipes.update(pipes)
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in pipes:
                    task.cancel()
                    self._pipes.discard(task)
        except OSError as exc:
            logger.debug("relay: %s", exc)
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()

    async def close(self) -> None:
        """Stop listening and cancel every open connection's pipes."""
        if self._server is not None:
            self._server.close()
            for task in list(self._pipes):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(CHUNK_BYTES):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()
