"""A rollout command SIGKILLed mid-run leaves nothing behind once the start-up reaper has run.

Runs the real rollout CLI (scripted reference policy, real mini-swe-agent
subprocesses, real sandboxes) at ``$SWE_RL_LEAK_CONCURRENCY`` (default 8; the
issue's check uses 64, which takes a few minutes on 2 cores), kills it with
SIGKILL while rollouts are in flight, then checks what is left: agent processes
die with their parent (PR_SET_PDEATHSIG in the agent entry), and
``reap_stale_sandboxes`` removes the dead run's directories and marked processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sandbox.local import OWNER_FILE, ROLLOUT_MARKER_ENV, reap_stale_sandboxes

ROOT = Path(__file__).resolve().parents[2]
CONCURRENCY = int(os.environ.get("SWE_RL_LEAK_CONCURRENCY", "8"))


def _marked(rollout_ids: set[str], parent: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get(ROLLOUT_MARKER_ENV) in rollout_ids or str(p.cwd()).startswith(str(parent)):
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkilled_rollout_command_leaves_no_process_or_directory(simple_tasks_dir, tmp_path):
    parent = tmp_path / "boxes"
    import pyarrow.parquet as pq

    files = sorted(Path(simple_tasks_dir).glob("*.parquet"))
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    n = 2 * CONCURRENCY // rows + 1  # enough rollouts to keep every slot busy when the kill comes
    cmd = [
        sys.executable, "-m", "recipe.rollout", f"data={','.join(map(str, files))}", "policy=reference",
        f"concurrency={CONCURRENCY}", f"n={n}", f"out_dir={tmp_path / 'out'}",
        f"swe_agent.sandbox.parent_dir={parent}",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rollout_ids: set[str] = set()
    deadline = time.monotonic() + 600
    try:
        # Wait until the run is in full flight: sandboxes exist and agents run in them.
        while time.monotonic() < deadline and proc.poll() is None:
            for owner in parent.glob(f"*/{OWNER_FILE}") if parent.exists() else []:
                try:
                    rollout_ids.add(json.loads(owner.read_text())["rollout_id"])
                except (OSError, ValueError, KeyError):
                    pass
            in_flight = len(list(parent.glob(f"*/{OWNER_FILE}"))) if parent.exists() else 0
            if in_flight >= CONCURRENCY * 3 // 4 and len(_marked(rollout_ids, parent)) >= CONCURRENCY // 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the rollout command ended before it could be killed"
        assert rollout_ids, "no sandbox appeared"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    # The agents die with their parent; give the kernel a moment to deliver it.
    time.sleep(1.0)
    left_before = _marked(rollout_ids, parent)
    removed = reap_stale_sandboxes(parent)  # what the next start-up does
    time.sleep(0.5)
    left = [p for p in _marked(rollout_ids, parent) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], f"processes left: {[(p.pid, p.name()) for p in left]}"
    assert list(parent.iterdir()) == [], f"dirs left: {list(parent.iterdir())}"
    # Report for the record (visible with -s): what the reaper had to do.
    print(f"concurrency={CONCURRENCY} sandboxes seen={len(rollout_ids)} "
          f"processes alive right after the kill={len(left_before)} dirs reaped={len(removed)}")
