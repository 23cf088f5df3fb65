"""Attacks on the sandbox through the real path: scripted rollouts (policy=script) of SWEAgentLoop --
mini-swe-agent subprocess, proxy, jailed commands, patch extraction, grading -- asserting that each
attack failed and left nothing behind. The reaper for sandboxes of crashed runs is tested at the end.

Runs as the user CI runs as (root on these machines): the jail must hold for a root driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from transformers import AutoTokenizer

from core.task import SWETask
from recipe.swe_agent_loop import SWEAgentLoop
from core.gitrepo import GIT_ENV
from sandbox.jail import bwrap_available
from sandbox.local import OWNER_FILE, LocalSandbox, SandboxError, find_marked_processes, reap_stale_sandboxes
from core.process import run_command

needs_bwrap = pytest.mark.skipif(not bwrap_available(), reason="bubblewrap cannot create namespaces here")
ROOT = os.geteuid() == 0


def _git(cwd, *args):
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout


@pytest.fixture
def task(tmp_path):
    """A task repository under data/repos/ with a secret in a later commit, a branch, a tag and a
    dangling object; the grader's data (tasks.jsonl with the reference patch) next to it."""
    data = tmp_path / "data"
    repo = data / "repos" / "t1"
    repo.mkdir(parents=True)
    (repo / "pkg.py").write_text("def answer():\n    return 41\n")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    base = _git(repo, "rev-parse", "HEAD").strip()
    (repo / "pkg.py").write_text("def answer():\n    return 42  # FUTURE_FIX\n")
    _git(repo, "commit", "-qam", "the fix (a later commit)")
    _git(repo, "tag", "v-fixed")
    _git(repo, "branch", "fix-branch")
    blob = subprocess.run(["git", "-C", str(repo), "hash-object", "-w", "--stdin"], input="DANGLING_SECRET\n",
                          capture_output=True, text=True, check=True).stdout.strip()
    assert blob
    _git(repo, "checkout", "-q", base)
    patch = "diff --git a/pkg.py b/pkg.py\n--- a/pkg.py\n+++ b/pkg.py\n@@ -1,2 +1,2 @@\n def answer():\n-    return 41\n+    return 42\n"
    task = SWETask(instance_id="t1", repo="local/t1", base_commit=base, problem_statement="answer() is off by one",
                   patch=patch, repo_path=str(repo),
                   test_patch=("diff --git a/tests/test_pkg.py b/tests/test_pkg.py\nnew file mode 100644\n--- /dev/null\n"
                               "+++ b/tests/test_pkg.py\n@@ -0,0 +1,5 @@\n+from pkg import answer\n+\n+\n"
                               "+def test_answer():\n+    assert answer() == 42\n"),
                   FAIL_TO_PASS=["tests/test_pkg.py::test_answer"])
    (data / "tasks.jsonl").write_text(task.model_dump_json() + "\n")
    return task


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


async def run_script(task: SWETask, tokenizer, tmp_path: Path, commands: list[str], agent: dict | None = None,
                     reward: dict | None = None, **sandbox) -> dict:
    """One policy=script rollout; returns its record's extra fields plus each command's observation."""
    script = tmp_path / f"script-{time.monotonic_ns()}.sh"
    script.write_text("\n".join(commands) + "\n")
    boxes = tmp_path / "boxes"
    loop = SWEAgentLoop.standalone(
        tokenizer=tokenizer, hf_model_type="qwen2", prompt_length=8192, response_length=16384,
        swe_agent={"policy": "script", "script": str(script),
                   "sandbox": {"parent_dir": str(boxes), "isolation": "bwrap", **sandbox},
                   "agent": {"step_limit": len(commands) + 3, "command_timeout_s": 20, **(agent or {})},
                   "reward": {"timeout_s": 60, **(reward or {})}},
    )
    row = {"raw_prompt": [{"role": "user", "content": task.problem_statement}],
           "extra_info": json.loads(task.model_dump_json())}
    out = await loop.run({"temperature": 1.0, "logprobs": True}, **row)
    extra = dict(out.extra_fields)
    extra["observations"] = [_observation(m) for m in extra["messages"] if m.get("role") in ("tool", "user")][1:]
    # Nothing of the rollout is left: no sandbox directory, no marked process.
    assert not boxes.exists() or list(boxes.iterdir()) == []
    assert await asyncio.to_thread(find_marked_processes, extra["rollout_id"]) == []
    return extra


def _observation(message: dict) -> str:
    """A command's output as the model read it (mini-swe-agent's tool message holds JSON with "output",
    or "output_head"/"output_tail" for long output, and "exception_info" for a timeout)."""
    content = message.get("content")
    text = content if isinstance(content, str) else json.dumps(content)
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    if not isinstance(parsed, dict):
        return text
    return "\n".join(str(parsed[k]) for k in ("output", "output_head", "output_tail", "exception_info") if parsed.get(k))


def _joined(extra: dict) -> str:
    return "\n".join(extra["observations"])


@needs_bwrap
async def test_grader_data_other_rollouts_and_the_host_are_out_of_sight(task, tokenizer, tmp_path):
    other = await LocalSandbox.create(task, parent_dir=str(tmp_path / "boxes-b"), isolation="bwrap")
    (other.workdir / "other_rollout.txt").write_text("B's work")
    data = Path(task.repo_path).parent.parent
    try:
        extra = await run_script(task, tokenizer, tmp_path, [
            f"cat {data}/tasks.jsonl || echo NO_TASKS",
            f"ls {task.repo_path} || echo NO_REPO",
            f"cat {other.workdir}/other_rollout.txt || echo NO_OTHER",
            "ls /root /home 2>&1; echo LISTED",
            f"ls {Path(sys.executable).resolve().parents[3]} 2>&1 | head -3; echo PREFIX",
            "echo x > /usr/evil 2>&1 || echo SYSTEM_READONLY",
            "echo w > pkg_new.py && echo WROTE_WORKTREE; echo t > /tmp/t && echo WROTE_TMP",
        ])
    finally:
        await other.teardown()
    seen = _joined(extra)
    assert "FUTURE_FIX" not in seen and "\"patch\"" not in seen and "NO_TASKS" in seen
    assert "NO_REPO" in seen and "NO_OTHER" in seen and "B's work" not in seen
    assert "SYSTEM_READONLY" in seen and "WROTE_WORKTREE" in seen and "WROTE_TMP" in seen
    assert not os.path.exists("/usr/evil") and not (tmp_path / "t").exists()
    assert "pkg_new.py" in extra["model_patch"]


@needs_bwrap
async def test_no_privilege_even_for_a_root_driver(task, tokenizer, tmp_path):
    extra = await run_script(task, tokenizer, tmp_path, [
        "id -u; grep -E 'CapEff|CapBnd|NoNewPrivs' /proc/self/status",
        "mount -o remount,bind,rw / 2>&1 || echo REMOUNT_REFUSED",
        "umount /tmp 2>&1 || echo UMOUNT_REFUSED",
    ])
    seen = _joined(extra)
    assert "CapEff:\t0000000000000000" in seen and "CapBnd:\t0000000000000000" in seen and "NoNewPrivs:\t1" in seen
    assert "REMOUNT_REFUSED" in seen and "UMOUNT_REFUSED" in seen
    if ROOT:
        assert int(seen.split()[0]) >= 200000  # a leased uid of the pool (sandbox.jail.lease_uid)


@needs_bwrap
async def test_git_config_the_agent_writes_never_runs_on_the_host(task, tokenizer, tmp_path):
    pwned = tmp_path / "PWNED"
    extra = await run_script(task, tokenizer, tmp_path, [
        f"git config core.fsmonitor 'touch {pwned}-fsmonitor; echo'",
        f"git config filter.evil.clean 'touch {pwned}-filter; cat' && echo '* filter=evil' > .gitattributes",
        f"git config diff.external 'sh -c \"touch {pwned}-diff; echo FORGED\"'",
        f"printf '#!/bin/sh\\ntouch {pwned}-hook\\n' > .git/hooks/pre-commit && chmod +x .git/hooks/pre-commit",
        "git config core.hooksPath .git/hooks && git config alias.diff '!touch /tmp/x'",
        "sed -i 's/41/42/' pkg.py && git diff --stat",
    ])
    assert list(tmp_path.glob("PWNED*")) == []
    patch = extra["model_patch"]
    # The patch is the work tree's real change (no external diff chose it), filters did not run.
    assert "-    return 41\n+    return 42" in patch and "FORGED" not in patch
    assert extra["resolved"], extra["grade"]["log_tail"][-1500:]


@needs_bwrap
async def test_trainer_secrets_and_host_sockets_are_out_of_reach(task, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-value")
    monkeypatch.setenv("HF_TOKEN", "hf-secret-value")
    sock_path = tmp_path / "host.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    server.listen(1)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    try:
        extra = await run_script(task, tokenizer, tmp_path, [
            "env | grep -i -E 'wandb|hf_token|secret-value' || echo NO_SECRETS",
            f"python -c \"import socket; s=socket.socket(socket.AF_UNIX); s.connect('{sock_path}')\" 2>&1 | tail -1",
            f"python -c \"import socket; socket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), timeout=3)\""
            " 2>&1 | tail -1",
            "ls ../runner 2>&1; ln -s /etc/passwd ../runner/runner_result.json 2>&1 || echo NO_RUNNER_DIR",
        ])
    finally:
        server.close()
        tcp.close()
    seen = _joined(extra)
    assert "secret-value" not in seen and "NO_SECRETS" in seen
    assert "FileNotFoundError" in seen or "No such file" in seen  # the socket's path does not exist inside
    assert "ConnectionRefused" in seen or "unreachable" in seen.lower() or "Errno" in seen
    assert "NO_RUNNER_DIR" in seen
    assert Path("/etc/passwd").read_text().startswith("root:")  # the runner wrote its own result file


@needs_bwrap
async def test_limits_end_the_command_with_an_observation(task, tokenizer, tmp_path):
    extra = await run_script(task, tokenizer, tmp_path, [
        "for i in $(seq 300); do sleep 30 >/dev/null 2>&1 & done 2>&1 | tail -2; echo FORKS_DONE",
        "python -c \"b = bytearray(3 << 30)\" 2>&1 | tail -1",
        "head -c 100000000 /dev/zero 2>&1 >/tmp/big; ls -la /tmp/big | awk '{print $5}'; df -h /tmp | tail -1",
        "head -c 60000000 /dev/zero > big.bin; ls -la big.bin | awk '{print \"SIZE\", $5}'; rm -f big.bin",
        "yes 0123456789 | head -c 5000000",
        "sleep 60",
    ], max_processes=64, max_memory_bytes=1 << 30, tmp_bytes=8 << 20, max_file_bytes=20 << 20)
    obs = extra["observations"]
    assert "Resource temporarily unavailable" in obs[0] or "fork" in obs[0]
    assert "MemoryError" in obs[1]
    assert "No space left on device" in obs[2]
    assert "File size limit exceeded" in obs[3] or "SIZE 20971520" in obs[3]
    assert "[output truncated:" in obs[4] and len(obs[4]) < 80_000
    assert "timed out" in obs[5].lower()
    assert {"output_truncated", "command_timeout"} <= set(extra["limits_hit"])


@needs_bwrap
async def test_commands_cannot_leave_daemons(task, tokenizer, tmp_path):
    """A daemon (setsid, double fork, cleared environment: no rollout marker) ends with its command."""
    extra = await run_script(task, tokenizer, tmp_path, [
        "(setsid sleep 777.125 &); (env -i setsid nohup sleep 777.125 >/dev/null 2>&1 &); echo STARTED",
        "ps -e -o comm= | grep -x sleep || echo NO_DAEMONS",
    ])
    assert "STARTED" in extra["observations"][0] and "NO_DAEMONS" in extra["observations"][1]
    assert [p for p in psutil.process_iter(["cmdline"]) if "777.125" in (p.info["cmdline"] or [])] == []


@needs_bwrap
async def test_the_copy_holds_only_the_base_commit(task, tokenizer, tmp_path):
    extra = await run_script(task, tokenizer, tmp_path, [
        "git log --all --oneline | wc -l", "git tag; git branch -a; echo REFS_LISTED",
        "git fsck --lost-found 2>&1 | grep -c dangling || true", "git reflog | wc -l",
        "git cat-file --batch-all-objects --batch-check | wc -l; git grep -r FUTURE_FIX $(git rev-list --all) || echo NO_FIX",
    ])
    obs = extra["observations"]
    assert obs[0].strip().splitlines()[0] == "1"
    assert "v-fixed" not in obs[1] and "fix-branch" not in obs[1]
    assert obs[2].strip().splitlines()[-1] == "0"
    assert "NO_FIX" in obs[4] and "FUTURE_FIX" not in _joined(extra)


@needs_bwrap
async def test_a_workdir_over_its_limit_ends_the_rollout(task, tokenizer, tmp_path):
    extra = await run_script(task, tokenizer, tmp_path, ["head -c 3000000 /dev/urandom > blob1.bin", "echo after"],
                             agent={"max_workdir_bytes": 1_000_000})
    assert extra["exit_status"] == "agent_error" and extra["agent_exit_status"] == "SandboxLimitExceeded"
    assert "workdir_bytes" in extra["limits_hit"]
    assert not any("after" in o for o in extra["observations"])


@needs_bwrap
async def test_home_counts_toward_the_disk_limit(task, tokenizer, tmp_path):
    """$HOME persists between commands on host disk: it counts with the work tree, as do empty files."""
    extra = await run_script(task, tokenizer, tmp_path, ["head -c 3000000 /dev/zero > ~/blob", "echo after"],
                             agent={"max_workdir_bytes": 2_000_000})
    assert "workdir_bytes" in extra["limits_hit"] and not any("after" in o for o in extra["observations"])
    extra = await run_script(task, tokenizer, tmp_path, ["mkdir many && cd many && touch $(seq 1000)", "echo after"],
                             agent={"max_workdir_bytes": 2_000_000})
    assert "workdir_bytes" in extra["limits_hit"]


@needs_bwrap
async def test_the_host_side_agent_never_imports_from_the_work_tree(task, tokenizer, tmp_path):
    """litellm imports optional packages lazily (e.g. on a failed model call, after the commands ran):
    modules the agent planted in its work tree must not be importable by the host-side agent process."""
    marker = tmp_path / "HOST_IMPORTED"
    hook = f"open({str(marker)!r}, 'w').write('imported')"
    names = ["fastapi", "starlette", "email_validator", "python_multipart", "opentelemetry", "orjson",
             "tiktoken", "tokenizers", "jinja2", "httpx", "openai", "litellm", "minisweagent", "yaml", "json"]
    commands = [f"printf '%s\\n' \"{hook}\" > {name}.py" for name in names]
    commands.append("head -c 200000 /dev/urandom")  # an observation the next model call fails on
    await run_script(task, tokenizer, tmp_path, commands, agent={"max_output_bytes": 65536})
    assert not marker.exists()


@needs_bwrap
@pytest.mark.skipif(not ROOT, reason="uids are leased only when the driver is root")
async def test_each_sandbox_runs_as_its_own_uid(task, tmp_path):
    """The kernel counts RLIMIT_NPROC per uid across the host: one rollout's fork bomb must not starve
    another's commands or the grader, so each jail leases its own uid."""
    from sandbox.jail import JailSpec

    spec = JailSpec(max_processes=16)
    boxes = [await LocalSandbox.create(task, parent_dir=str(tmp_path / "boxes"), isolation="bwrap", jail=spec)
             for _ in range(2)]
    try:
        bomb = await asyncio.create_subprocess_exec(
            *boxes[0].wrap_command("(for i in $(seq 40); do sleep 30 & done) 2>/dev/null; sleep 30"), cwd=boxes[0].workdir,
            env=boxes[0].env(), start_new_session=True)
        await asyncio.sleep(2)
        starved = await run_command(boxes[0].wrap_command("sleep 0.1 & wait; echo FORKED"), cwd=boxes[0].workdir,
                                    env=boxes[0].env(), timeout_s=20)
        assert "Resource temporarily unavailable" in starved.output  # the bomb holds its own uid's limit
        other = await run_command(boxes[1].wrap_command("id -u; for i in 1 2 3 4; do sleep 0.1 & done; wait; echo FORKED"),
                                  cwd=boxes[1].workdir, env=boxes[1].env(), timeout_s=20)
        assert "FORKED" in other.output and "Resource temporarily unavailable" not in other.output, other.output
        assert int(other.output.split()[0]) == boxes[1].jail.uid != boxes[0].jail.uid
        assert all(box.jail.uid >= spec.uid for box in boxes)
        if bomb.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                bomb.kill()
        await bomb.wait()
    finally:
        for box in boxes:
            await box.teardown()


@needs_bwrap
async def test_patch_limits_and_nested_repositories(task, tokenizer, tmp_path):
    """A diff over the reward's max_patch_bytes is never read (graded as no patch); a ``.git`` file
    pointing at a host repository does not make host git read it into the patch."""
    project = Path(__file__).resolve().parents[2]
    extra = await run_script(task, tokenizer, tmp_path, [
        f"mkdir ext && echo 'gitdir: {project}/.git' > ext/.git && echo x > ext/f",
        "sed -i 's/41/42/' pkg.py",
    ])
    assert "Subproject commit" not in extra["model_patch"] and "ext/" not in extra["model_patch"]
    assert "+    return 42" in extra["model_patch"]
    extra = await run_script(task, tokenizer, tmp_path, ["head -c 3000000 /dev/urandom | base64 > big.txt"],
                             reward={"max_patch_bytes": 1_000_000})
    assert extra["model_patch"] == "" and "patch_bytes" in extra["limits_hit"] and extra["reward"] == 0.0


KILLED_RUN = textwrap.dedent("""
    import sys
    from recipe.rollout import main
    sys.exit(main(sys.argv[1:]))
""")


@needs_bwrap
async def test_a_killed_16_rollout_run_leaves_nothing_running(task, tmp_path, tiny_model_dir):
    """kill -9 of the rollout driver while 16 rollouts run commands: every process is gone within
    10 s (the runners die with the driver, the jails with their runners), the directories at the
    next start."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = {"data_source": "test", "prompt": [{"role": "user", "content": "x"}], "ability": "swe",
           "agent_name": "swe_agent", "reward_model": {"style": "rule", "ground_truth": ""},
           "extra_info": json.loads(task.model_dump_json())}
    data = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([row]), data)
    script = tmp_path / "hang.sh"
    script.write_text("(setsid sleep 123.456 &); sleep 123.456\n")
    boxes = tmp_path / "boxes"
    argv = [sys.executable, "-c", KILLED_RUN, f"data={data}", "policy=script", f"script={script}", "n=16",
            "concurrency=16", f"out_dir={tmp_path / 'out'}", f"model_path={tiny_model_dir}",
            f"swe_agent.sandbox.parent_dir={boxes}"]
    driver = subprocess.Popen(argv, cwd=Path(__file__).resolve().parents[2], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)

    def sleepers() -> list[int]:
        return [p.pid for p in psutil.process_iter(["cmdline"]) if "123.456" in (p.info["cmdline"] or [])]

    deadline = time.monotonic() + 240
    while len(sleepers()) < 16 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert len(sleepers()) >= 16, "the rollouts did not start their commands"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    killed_at = time.monotonic()
    while sleepers() and time.monotonic() - killed_at < 10:
        await asyncio.sleep(0.2)
    assert sleepers() == []
    assert len(list(boxes.iterdir())) == 16  # left for the next start's reaper
    removed = await asyncio.to_thread(reap_stale_sandboxes, boxes)
    assert len(removed) == 16 and list(boxes.iterdir()) == []


async def test_without_isolation_the_sandbox_works_and_says_unisolated(task, tmp_path, caplog, monkeypatch):
    box = await LocalSandbox.create(task, parent_dir=str(tmp_path / "boxes"), isolation="none")
    try:
        assert not box.isolated and box.command_prefix == []
        res = await run_command(box.wrap_command("echo hi"), cwd=box.workdir, env=box.env(), timeout_s=10)
        assert res.output == "hi\n"
    finally:
        await box.teardown()
    import sandbox.local

    monkeypatch.setattr(sandbox.local, "bwrap_available", lambda: False)
    box = await LocalSandbox.create(task, parent_dir=str(tmp_path / "boxes"), isolation="auto")
    try:
        assert not box.isolated
        assert "NOT isolated" in caplog.text
    finally:
        await box.teardown()
    with pytest.raises(SandboxError, match="bubblewrap"):
        await LocalSandbox.create(task, parent_dir=str(tmp_path / "boxes"), isolation="bwrap")
    assert list((tmp_path / "boxes").iterdir()) == []


CRASHING_OWNER = textwrap.dedent("""
    import asyncio, json, subprocess, sys, time
    from core.task import SWETask
    from sandbox.local import LocalSandbox

    async def main():
        task = SWETask.model_validate_json(sys.argv[1])
        box = await LocalSandbox.create(task, parent_dir=sys.argv[2])
        # A command that escaped into its own session, as mini-swe-agent's do.
        subprocess.Popen(["setsid", "sleep", "300"], env=box.env())
        print(json.dumps({"root": str(box.root), "rollout_id": box.rollout_id}), flush=True)
        time.sleep(300)

    asyncio.run(main())
""")


async def test_reaper_cleans_up_after_a_killed_owner(task, tmp_path):
    boxes = tmp_path / "boxes"
    owner = subprocess.Popen(
        [sys.executable, "-c", CRASHING_OWNER, task.model_dump_json(), str(boxes)],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )
    info = json.loads(owner.stdout.readline())
    live = await LocalSandbox.create(task, parent_dir=str(boxes))  # ours: alive, must stay
    try:
        deadline = time.monotonic() + 10
        while not await asyncio.to_thread(find_marked_processes, info["rollout_id"]):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert reap_stale_sandboxes(boxes) == []  # the owner is alive: nothing to reap
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        removed = await asyncio.to_thread(reap_stale_sandboxes, boxes)
        assert [str(p) for p in removed] == [info["root"]]
        assert await asyncio.to_thread(find_marked_processes, info["rollout_id"]) == []
        assert live.root.exists() and json.loads((live.root / OWNER_FILE).read_text())["pid"] == os.getpid()
    finally:
        await live.teardown()
    assert list(boxes.iterdir()) == []


async def test_reaper_ignores_young_ownerless_dirs_and_other_names(tmp_path):
    boxes = tmp_path / "boxes"
    (boxes / "swe-sandbox-halfmade").mkdir(parents=True)
    (boxes / "unrelated").mkdir()
    assert reap_stale_sandboxes(boxes) == []
    old = time.time() - 3600
    os.utime(boxes / "swe-sandbox-halfmade", (old, old))
    assert [p.name for p in reap_stale_sandboxes(boxes)] == ["swe-sandbox-halfmade"]
    assert (boxes / "unrelated").exists()
    assert psutil.pid_exists(os.getpid())
