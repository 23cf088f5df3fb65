"""Which process owns a directory: a record written when the directory is made, checked by the
start-up reapers (``sandbox.local.reap_stale_sandboxes``) to tell a dead run's leftovers from a
live run's directories."""

from __future__ import annotations

import psutil


def owner_record(**extra: object) -> dict:
    """This process's pid and start time (a reused pid has another), plus ``extra``."""
    me = psutil.Process()
    return {"pid": me.pid, "create_time": me.create_time(), **extra}


def owner_alive(record: dict) -> bool:
    """Whether the process ``record`` names (``owner_record``) still runs; False for a malformed record."""
    try:
        proc = psutil.Process(int(record["pid"]))
        # The start time tells a reused pid from the owner.
        return abs(proc.create_time() - float(record["create_time"])) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, KeyError, ValueError, TypeError):
        return False
