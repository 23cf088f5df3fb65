"""Per-call profile log of the proxy: one JSON object per line (as in seed 004's PROFILE log).

Off by default. Turn it on with ``ModelProxyServer.start(profile_log_dir=DIR)`` (every
session of that server) or ``SessionConfig(profile_log_dir=DIR)`` (one session).
Each server process writes ``DIR/proxy_profile.<pid>.<port>.jsonl``, so several verl
workers can share a directory without interleaving lines. Analyse with
``python -m model_proxy.analyze DIR``.

Line types (all times in milliseconds, ``ts`` in Unix seconds):

- ``{"type": "llm_call", "ts", "session", "request_id", "segment", "turn",
  "prompt_tokens", "context_tokens", "completion_tokens", "max_tokens", "queue_ms",
  "generate_ms", "total_ms", "ttft_ms", "finish_reason", "stream"}``: one per sampled
  turn. ``queue_ms``: request arrival -> backend call (lock wait, parsing,
  tokenization); ``generate_ms``: inside ``backend.generate`` (prefill + decode: the
  backends return whole turns); ``total_ms``: arrival -> response ready (non-streaming)
  or -> last SSE event written (streaming); ``ttft_ms``: arrival -> first SSE event
  carrying content or tool calls (streaming only, else null; the backends return
  whole turns, so this is the proxy's time to first byte after generation, not the
  model's prefill time). Refused requests and
  retries answered from the cache write no line: they are not samples.
- ``{"type": "tool_phase", "ts", "session", "request_id", "turn", "duration_ms"}``:
  the time between the response to ``turn`` leaving and the next request arriving
  (the agent running its tool).

Writes are one buffered ``write`` + ``flush`` of a short line to a local file (page
cache, microseconds): done inline on the event loop; a crash loses at most nothing
already flushed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import IO, Any


class ProfileWriter:
    """Appends JSON lines to one file. Thread-safe; ``close`` is idempotent.

    Args:
        log_dir: directory (created if missing).
        name: file name inside it.

    Raises:
        OSError: the directory or file cannot be created.
    """

    def __init__(self, log_dir: str | os.PathLike[str], name: str) -> None:
        directory = Path(log_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / name
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def write(self, event: dict[str, Any]) -> None:
        """Write ``event`` plus a ``ts`` key as one line (no-op once closed)."""
        line = json.dumps({"ts": round(time.time(), 6), **event}, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is None:
                return
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class ProfileWriters:
    """One ``ProfileWriter`` per directory for one server (``proxy_profile.<pid>.<port>.jsonl``)."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._writers: dict[str, ProfileWriter] = {}

    def get(self, log_dir: str | os.PathLike[str] | None) -> ProfileWriter | None:
        if log_dir is None:
            return None
        key = os.path.abspath(os.fspath(log_dir))
        writer = self._writers.get(key)
        if writer is None:
            writer = ProfileWriter(key, f"proxy_profile.{os.getpid()}.{self._port}.jsonl")
            self._writers[key] = writer
        return writer

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
