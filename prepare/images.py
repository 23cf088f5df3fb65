"""Docker images for the project's own tasks, built the way SWE-bench builds its images.

``python -m prepare.images --tasks-dir data/smith --out data/smith_images`` (or
``prepare_data.py --mode smith --images``) turns tasks that bring a repository and a host
virtualenv into image tasks: one image per environment (a smith package's virtualenv; the
simple tasks, which need only pytest, share one), holding

- ``/testbed``: a git repository with every one of those tasks' base commits (each under
  ``refs/tasks/<n>``; SWE-bench's images hold one task's repository there), and
- ``/opt/venv``: the environment, made with the image's Python from the host virtualenv's
  ``site-packages`` (``PATH`` starts there), or the base image's own Python and pytest.

The tasks are written again with ``image_name`` set and ``repo_path`` and ``env_bin`` gone
(``env_bin`` becomes ``/opt/venv/bin``, a directory inside the image), then validated in
containers (the reference resolves, the empty patch does not, ``prepare.validate``), so a
written image task is known to run through the Docker path. The images are built locally
(``docker build`` through the SDK, FROM ``DockerSettings.base_image``); nothing is pulled.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.gitrepo import git
from core.task import SWETask, load_tasks
from prepare.export import write_outputs
from prepare.validate import report_failures, validate_tasks
from reward.container import ContainerGrading
from sandbox.docker_sandbox import WORKDIR, DockerSettings

IMAGE_PREFIX = "swe-rl-task"
VENV_INSIDE = "/opt/venv"
# Limit for building one image, seconds.
BUILD_TIMEOUT_S = 1800.0

_DOCKERFILE = """\
FROM {base}
{venv}COPY testbed/ {workdir}/
ENV PATH={path}
WORKDIR {workdir}
"""
_VENV_STEPS = """\
RUN python3 -m venv --without-pip {venv} && test -d {venv}/lib/python{pyver}
COPY site-packages/ {venv}/lib/python{pyver}/site-packages/
COPY bin/ {venv}/bin/
"""
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Console scripts the host venv has with host shebangs: made again for the image's interpreter.
_SCRIPTS = {"pytest": "pytest:console_main", "py.test": "pytest:console_main", "coverage": "coverage.cmdline:main"}


def environment_of(task: SWETask) -> str:
    """The group a task's image is shared by: its virtualenv's directory, or ``system``."""
    return str(Path(task.env_bin).parent) if task.env_bin else "system"


def image_name_for(group: str, tasks: Sequence[SWETask]) -> str:
    """``swe-rl-task-<env name>:<hash of the tasks' ids and commits>`` (a new task set is a new tag)."""
    name = Path(group).parent.name if group != "system" else "system"
    digest = hashlib.sha256("\n".join(sorted(f"{t.instance_id} {t.base_commit}" for t in tasks)).encode()).hexdigest()
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower()).strip("-.") or "env"
    return f"{IMAGE_PREFIX}-{safe}:{digest[:12]}"


async def _testbed(tasks: Sequence[SWETask], dest: Path) -> None:
    """A repository holding each task's base commit under ``refs/tasks/<n>``, the first checked out."""
    await git(dest.parent, "init", "-q", str(dest))
    for n, task in enumerate(tasks):
        assert task.repo_path
        await git(dest, "fetch", "-q", "--no-tags", str(Path(task.repo_path).resolve()),
                  f"+{task.base_commit}:refs/tasks/{n}")
    await git(dest, "-c", "advice.detachedHead=false", "checkout", "-q", "--detach", tasks[0].base_commit)


def _venv_files(env_bin: Path, stage: Path) -> str:
    """Copy the host venv's site-packages into ``stage`` and write its scripts; returns ``X.Y``."""
    libs = sorted((env_bin.parent / "lib").glob("python3.*/site-packages"))
    if len(libs) != 1:
        raise RuntimeError(f"{env_bin.parent}: expected one lib/python3.*/site-packages, found {libs}")
    pyver = libs[0].parent.name.removeprefix("python")
    shutil.copytree(libs[0], stage / "site-packages", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (stage / "bin").mkdir()
    for script, target in _SCRIPTS.items():
        module, _, func = target.partition(":")
        path = stage / "bin" / script
        path.write_text(f"#!{VENV_INSIDE}/bin/python\nimport sys\nfrom {module} import {func}\n"
                        f"sys.exit({func}())\n")
        path.chmod(0o755)
    return pyver


def _context_tar(stage: Path) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(stage, arcname=".")
    buf.seek(0)
    return buf


async def build_image(client: Any, group: str, tasks: Sequence[SWETask], *, base_image: str,
                      work_root: str | None = None) -> str:
    """Build (or find, when its tag exists) the image of one environment's tasks; returns its name.

    Raises:
        docker.errors.BuildError / APIError: the build failed (its log in the message).
        GitError: a task's base commit could not be fetched.
    """
    import docker

    name = image_name_for(group, tasks)
    try:
        await asyncio.to_thread(client.images.get, name)
        return name
    except docker.errors.ImageNotFound:
        pass
    stage = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="image-context-", dir=work_root))
    try:
        await _testbed(tasks, stage / "testbed")
        venv, path = "", _SYSTEM_PATH
        if group != "system":
            pyver = await asyncio.to_thread(_venv_files, Path(group) / "bin", stage)
            venv = _VENV_STEPS.format(venv=VENV_INSIDE, pyver=pyver)
            path = f"{VENV_INSIDE}/bin:{_SYSTEM_PATH}"
        (stage / "Dockerfile").write_text(_DOCKERFILE.format(base=base_image, venv=venv, workdir=WORKDIR, path=path))
        context = await asyncio.to_thread(_context_tar, stage)
        await asyncio.wait_for(asyncio.to_thread(
            client.images.build, fileobj=context, custom_context=True, tag=name, rm=True, forcerm=True,
            network_mode="none", labels={"swe-rl.task-image": "1"}), BUILD_TIMEOUT_S)
        return name
    finally:
        await asyncio.to_thread(shutil.rmtree, stage, True)


def as_image_task(task: SWETask, image: str) -> SWETask:
    """``task`` run from ``image``: no host repository or interpreter; the image's venv, if any."""
    return task.model_copy(update={"image_name": image, "repo_path": None,
                                   "env_bin": f"{VENV_INSIDE}/bin" if task.env_bin else None})


async def build_images(client: Any, tasks: Sequence[SWETask], *, base_image: str,
                       work_root: str | None = None, progress: bool = True) -> list[SWETask]:
    """One image per environment (``environment_of``); returns the tasks as image tasks, in order.

    Tasks without a repository are kept as they are (already image tasks). An environment whose
    image cannot be built (e.g. its venv's Python minor version is not the base image's) is
    reported on stderr for each of its tasks (``DROPPED <id>: image build failed: ...``) and its
    tasks are left out; the others go on.
    """
    groups: dict[str, list[SWETask]] = {}
    for task in tasks:
        if task.repo_path:
            groups.setdefault(environment_of(task), []).append(task)
    images: dict[str, str] = {}
    for i, (group, members) in enumerate(groups.items(), 1):
        if progress:
            print(f"[{i}/{len(groups)}] image for {len(members)} task(s) of {group}", file=sys.stderr, flush=True)
        try:
            images[group] = await build_image(client, group, members, base_image=base_image, work_root=work_root)
        except Exception as exc:  # noqa: BLE001 - one environment's failure drops its tasks only
            why = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
            for task in members:
                print(f"DROPPED {task.instance_id}: image build failed for {group}: {why[0][:300]}", file=sys.stderr)
    return [as_image_task(t, images[environment_of(t)]) if t.repo_path else t
            for t in tasks if not t.repo_path or environment_of(t) in images]


def _take(seen: dict[str, int], key: str, limit: int) -> bool:
    seen[key] = seen.get(key, 0) + 1
    return seen[key] <= limit


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m prepare.images", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks-dir", required=True, help="directory holding tasks.jsonl (simple or smith)")
    parser.add_argument("--out", required=True, help="where the image tasks' tasks.jsonl and parquet go")
    parser.add_argument("--limit", type=int, default=0, help="first N tasks only (0 = all)")
    parser.add_argument("--per-environment", type=int, default=0,
                        help="first K tasks of each environment (smith package) only (0 = all)")
    parser.add_argument("--base-image", default=DockerSettings.base_image, help="the images' FROM")
    parser.add_argument("--concurrency", type=int, default=2, help="validation grades in flight")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per validation test run")
    parser.add_argument("--seed", type=int, default=0, help="train/test split seed")
    parser.add_argument("--test-fraction", type=float, default=0.25, help="share of tasks in test.parquet")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    tasks = load_tasks(Path(args.tasks_dir) / "tasks.jsonl")
    if args.per_environment:
        seen: dict[str, int] = {}
        tasks = [t for t in tasks if _take(seen, environment_of(t), args.per_environment)]
    if args.limit:
        tasks = tasks[: args.limit]
    settings = DockerSettings(base_image=args.base_image)
    containers = await asyncio.to_thread(ContainerGrading.connect, settings)
    try:
        image_tasks = await build_images(containers.client, tasks, base_image=args.base_image,
                                         progress=not args.no_progress)
        results = await validate_tasks(image_tasks, concurrency=args.concurrency, timeout_s=args.timeout,
                                       progress=not args.no_progress, containers=containers)
    finally:
        await asyncio.to_thread(containers.close)
    failed = report_failures(results)
    kept = [t for t, r in zip(image_tasks, results, strict=True) if r.ok]
    if not kept:
        print("no image task validated", file=sys.stderr)
        return 1
    paths = write_outputs(kept, args.out, seed=args.seed, test_fraction=args.test_fraction)
    images = sorted({t.image_name for t in kept if t.image_name})
    print(json.dumps({"tasks": len(kept), "dropped": failed, "images": images, "tasks_jsonl": str(paths.tasks_jsonl)}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
