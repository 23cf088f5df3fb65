"""Grading in a fresh container of the task's image (``reward.container``) on a real engine.

Image tasks (``python -m prepare.images``: no ``repo_path``, the repository is the image's
``/testbed``) are graded the way SWE-bench's harness grades: the reference resolves, the
empty patch does not, every hack kind scores 0 (the outcome channel forged, the runner
shadowed, conftest and start-up hooks ...), the tested code runs as an unprivileged uid
with no network and no path to the outcomes file, a task that brings its repository can be
graded in the base image too (``backend=docker``), and no container is left. Skipped without
an engine unless ``SWE_RL_REQUIRE_DOCKER=1`` (CI).
"""

from __future__ import annotations

import json
import os
import re

import pytest

from core.task import load_tasks
from reward.config import RewardConfig
from reward.grader import Grader
from reward.hacks import HACKS, TASK_VARIANTS, HackBuilder, build_hacks
from sandbox.docker_sandbox import LABEL_SANDBOX, docker_engine_available

ENGINE, WHY = docker_engine_available()
if not ENGINE and os.environ.get("SWE_RL_REQUIRE_DOCKER") == "1":
    raise RuntimeError(f"SWE_RL_REQUIRE_DOCKER=1 but {WHY}")
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.skipif(not ENGINE, reason=WHY)]


@pytest.fixture(scope="module")
def image_tasks(simple_image_tasks_dir):
    tasks = load_tasks(str(simple_image_tasks_dir / "tasks.jsonl"))
    assert tasks and all(t.image_name and t.repo_path is None for t in tasks)
    return tasks


def _no_container_left():
    import docker

    client = docker.from_env()
    try:
        assert client.containers.list(all=True, filters={"label": f"{LABEL_SANDBOX}=1"}) == []
    finally:
        client.close()


async def test_image_tasks_reference_resolves_empty_does_not_and_every_hack_scores_zero(image_tasks, tmp_path):
    grader = Grader(config=RewardConfig())
    try:
        task = image_tasks[0]
        containers = await grader.containers_for(task)
        assert containers is not None
        hacks = build_hacks(task, tree=str(await containers.copy_tree(task, tmp_path / "tree")))
        assert set(hacks) == set(HACKS)
        reference = await grader.grade(task, task.patch)
        assert reference.resolved and reference.network == "none", reference.log_tail[-2000:]
        empty = await grader.grade(task, "", skip_empty=False)
        assert not empty.resolved and empty.error is None, empty.log_tail[-2000:]
        for kind, patch in hacks.items():
            result = await grader.grade(TASK_VARIANTS.get(kind, lambda t: t)(task), patch)
            assert result.reward == 0.0 and not result.resolved, (kind, result.error, result.log_tail[-1500:])
        for task in image_tasks[1:]:
            assert (await grader.grade(task, task.patch)).resolved, task.instance_id
    finally:
        grader.close()
    _no_container_left()


async def test_the_tested_code_runs_unprivileged_without_network_or_outcomes_path(image_tasks, tmp_path):
    task = image_tasks[0]
    # The patched code reports what it can see at import, through a collection error in the log.
    probe = (
        "import os, glob, json\n"
        "seen = dict(uid=os.getuid(), net=sorted(os.listdir('/sys/class/net')), cwd=os.getcwd(),\n"
        "            outcomes=[p for p in glob.glob('/tmp/grader-outcomes-*/*')], fds=sorted(os.listdir('/proc/self/fd')))\n"
        "raise RuntimeError('SEEN' + json.dumps(seen))\n"
    )
    module = task.patch.split("diff --git a/", 1)[1].split(" ", 1)[0]
    grader = Grader(config=RewardConfig(fail_fast=False))
    try:
        containers = await grader.containers_for(task)
        tree = await containers.copy_tree(task, tmp_path / "tree")
        with HackBuilder(task, tree=str(tree)) as builder:
            patch = builder.patch({module: probe + builder.read(module)})
        result = await grader.grade(task, patch)
    finally:
        grader.close()
    found = re.search(r"SEEN(\{.*\})", result.log_tail)
    assert found, (result.error, result.log_tail[-2000:])
    seen = json.loads(found.group(1))
    assert seen["uid"] != 0 and seen["net"] == ["lo"] and seen["cwd"] == "/testbed"
    assert seen["outcomes"] == []  # the descriptor is open (fd 3), the file has no path the code can open
    assert not result.resolved
    _no_container_left()


async def test_a_repository_task_graded_in_the_base_image_like_locally(simple_tasks_dir):
    task = load_tasks(str(simple_tasks_dir / "tasks.jsonl"))[0]
    grader = Grader(config=RewardConfig(backend="docker"))
    try:
        reference = await grader.grade(task, task.patch)
        empty = await grader.grade(task, "", skip_empty=False)
    finally:
        grader.close()
    assert reference.resolved and reference.network == "none", reference.log_tail[-2000:]
    assert not empty.resolved
    _no_container_left()


async def test_no_engine_is_an_infra_error_not_a_zero(image_tasks):
    from sandbox.docker_sandbox import DockerSettings

    grader = Grader(config=RewardConfig(), docker_settings=DockerSettings(base_url="tcp://127.0.0.1:9"))
    try:
        result = await grader.grade(image_tasks[0], image_tasks[0].patch)
    finally:
        grader.close()
    assert result.error == "sandbox_error" and result.is_infra_error


async def test_swebench_format_rows_whose_image_is_on_the_engine_grade_through_the_same_path(image_tasks, tmp_path):
    import json
    import subprocess
    import sys

    from pathlib import Path

    rows = tmp_path / "rows.jsonl"
    with rows.open("w") as fh:
        for task in image_tasks[:2]:  # SWE-bench's field names, FAIL_TO_PASS JSON-encoded, the image as R2E-Gym names it
            row = {k: v for k, v in task.model_dump().items() if k not in ("repo_path", "image_name", "env_bin")}
            row.update(FAIL_TO_PASS=json.dumps(task.FAIL_TO_PASS), PASS_TO_PASS=json.dumps(task.PASS_TO_PASS),
                       docker_image=task.image_name)
            fh.write(json.dumps(row) + "\n")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "prepare/prepare_data.py", "--mode", "swebench", "--input", str(rows),
                           "--out", str(tmp_path / "out")], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = load_tasks(str(tmp_path / "out" / "tasks.jsonl"))
    assert [t.image_name for t in imported] == [t.image_name for t in image_tasks[:2]]
    grader = Grader(config=RewardConfig())
    try:
        for task in imported:
            assert (await grader.grade(task, task.patch)).resolved, task.instance_id
            assert not (await grader.grade(task, "", skip_empty=False)).resolved, task.instance_id
    finally:
        grader.close()
    _no_container_left()


def test_evaluate_cli_grades_image_task_predictions_in_containers(simple_image_tasks_dir, image_tasks, tmp_path):
    import json
    import subprocess
    import sys

    from pathlib import Path

    preds = tmp_path / "preds.jsonl"
    with preds.open("w") as fh:
        for i, task in enumerate(image_tasks[:2]):
            fh.write(json.dumps({"instance_id": task.instance_id, "model_name_or_path": "m",
                                 "model_patch": task.patch if i == 0 else ""}) + "\n")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "reward.evaluate", "--instances",
                           str(simple_image_tasks_dir / "tasks.jsonl"), "--predictions", str(preds),
                           "--out", str(tmp_path / "report.json"), "--no-progress", "--max-workers", "2"],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"]["resolved_ids"] == [image_tasks[0].instance_id], report["summary"]
    assert report["summary"]["empty_patch_ids"] == [image_tasks[1].instance_id]
    _no_container_left()


async def test_a_process_the_tested_code_leaves_does_not_live_into_the_next_test_run(image_tasks, tmp_path):
    """The local jail's PID namespace ends with each run; a grade's container outlives its runs (phases)."""
    from reward.container import ContainerGrading
    from sandbox.docker_sandbox import DockerSettings
    from sandbox.jail import JailSpec

    containers = ContainerGrading.connect(DockerSettings())
    task = image_tasks[0]
    repo, home = tmp_path / "repo", tmp_path / "home"
    home.mkdir()
    await containers.copy_tree(task, repo)
    box = await containers.start(task, repo=repo, home=home, readable=[], private_dirs=[])
    try:
        spec = JailSpec(uid=201999, gid=201999, max_processes=64)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
        # The image has no ps: count the sleepers from /proc.
        count = ("n=0; for f in /proc/[0-9]*/cmdline; do case \"$(tr '\\0' ' ' < $f 2>/dev/null)\" in "
                 "'sleep 30'?' ') n=$((n+1));; esac; done; echo $n")
        first = await box.run("setsid sh -c 'sleep 300 & sleep 301 &' ; nohup sleep 302 >/dev/null 2>&1 & sleep 1; "
                              + count, env=env, timeout_s=30, spec=spec, outcomes_file=None)
        assert first.output.strip().splitlines()[-1] == "3", first.output  # left running by the first run
        second = await box.run(count, env=env, timeout_s=30, spec=spec, outcomes_file=None)
        assert second.output.strip().splitlines()[-1] == "0", second.output
    finally:
        await box.remove()
        containers.close()


async def test_an_environment_whose_image_cannot_be_built_drops_its_tasks_with_the_reason(simple_tasks_dir, capsys):
    import docker

    from prepare.images import build_images

    tasks = load_tasks(str(simple_tasks_dir / "tasks.jsonl"))[:2]
    client = docker.from_env()
    try:
        built = await build_images(client, tasks, base_image="swe-rl-no-such-base:none", progress=False)
    finally:
        client.close()
    assert built == []
    err = capsys.readouterr().err
    assert all(f"DROPPED {t.instance_id}: image build failed" in err for t in tasks), err
