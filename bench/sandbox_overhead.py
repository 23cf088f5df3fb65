"""Fixed cost of a rollout outside the agent's own work, measured in one run.

    python bench/sandbox_overhead.py [--data data/simple/test.parquet] [--concurrency 1,8,32] [--reps 5]

1. Sandbox create + teardown for a small task repo (the first task of ``--data``) and a
   large synthetic one (``--large-files`` files, ~``--large-mb`` MB), by copy method:
   ``clone`` (what ``LocalSandbox`` does: ``git clone --no-hardlinks`` + checkout),
   ``hardlink-clone`` (``git clone --local``: objects hard-linked), ``worktree``
   (``git worktree add`` on the task repo) and ``reflink`` (``cp -a --reflink=auto``
   of a checked-out copy; a real reflink only on btrfs/xfs, else a plain copy).
2. At each concurrency: sandbox create+teardown, agent process start (the
   mini-swe-agent entry's imports), grading the reference patch, and the whole
   rollout with ``policy=empty`` (sandbox, agent start, proxy session, one scripted
   turn, patch extraction, grading) -- everything but the agent's own work. With a Docker
   engine (``--docker auto``, the default: when one answers) the same for Docker sandboxes
   (``DockerRolloutSandbox`` create+teardown, a ``backend=docker`` rollout), with the
   docker/local ratios of the same run.

Prints mean seconds per item and ratios (against concurrency 1, against the
``clone`` method, and against seed 001's 26.5 s mean container start).

``--paths`` instead compares, in one run, the cold path (a new agent interpreter per rollout,
``agent.warm_start=false``; a new clone per work tree, ``sandbox.work_tree=clone``) with the warm one
(agents forked from a pre-imported server, work trees forked from one prepared checkout per task:
the defaults): whole ``policy=empty`` rollouts, each level a GRPO group of ``c`` rollouts of one
task, ``--reps`` times, in one worker per path after one warm-up group (a worker starts its fork
server once; that start is printed apart). It prints the fixed cost per rollout, the throughput,
warm/cold ratios, and the mean seconds per phase (``recipe.phases``) with their sum against the
total.

``--compare-rev REV`` instead times the whole ``policy=empty`` rollout of this checkout
against git revision REV's (checked out in a temporary worktree, run with this venv),
alternating the two ``--reps`` times at each concurrency, and prints the median ratio:
how a change moved the fixed cost, measured in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.task import SWETask  # noqa: E402
from core.gitrepo import GIT_ENV  # noqa: E402
from sandbox.local import LocalSandbox  # noqa: E402

SEED_CONTAINER_START_S = 26.5


def _git(cwd, *args):
    subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, env={**os.environ, **GIT_ENV})


def make_large_repo(path: Path, files: int, mb: int) -> str:
    """A git repo with ``files`` files totalling ~``mb`` MB of text; returns HEAD."""
    path.mkdir(parents=True)
    per = max(1, mb * (1 << 20) // files)
    line = "x = 'abcdefghijklmnopqrstuvwxyz0123456789'\n"
    body = line * (per // len(line) + 1)
    for i in range(files):
        d = path / f"pkg{i % 50}"
        d.mkdir(exist_ok=True)
        (d / f"mod{i}.py").write_text(f"# {i}\n{body}")
    _git(path, "init", "-q")
    _git(path, "add", "-A")
    _git(path, "commit", "-qm", "base")
    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


async def _run(*argv: str, cwd: str | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, env={**os.environ, **GIT_ENV},
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{argv}: {err.decode()[-500:]}")


async def copy_once(method: str, task: SWETask, parent: Path, pristine: Path) -> float:
    """Create and remove one working copy by ``method``; seconds."""
    t0 = time.perf_counter()
    if method == "clone":
        box = await LocalSandbox.create(task, parent_dir=str(parent))
        await box.teardown()
        return time.perf_counter() - t0
    dest = Path(tempfile.mkdtemp(dir=parent)) / "repo"
    if method == "hardlink-clone":
        await _run("git", "clone", "-q", "--local", "--no-checkout", task.repo_path, str(dest))
        await _run("git", "-C", str(dest), "checkout", "-q", "--detach", task.base_commit)
    elif method == "worktree":
        await _run("git", "-C", task.repo_path, "worktree", "add", "-q", "--detach", str(dest), task.base_commit)
    elif method == "reflink":
        await _run("cp", "-a", "--reflink=auto", str(pristine), str(dest))
    if method == "worktree":
        await _run("git", "-C", task.repo_path, "worktree", "remove", "--force", str(dest))
    await asyncio.to_thread(shutil.rmtree, dest.parent, True)
    return time.perf_counter() - t0


async def bench_copies(tasks: dict[str, SWETask], reps: int, work: Path) -> dict:
    out = {}
    for label, task in tasks.items():
        pristine = work / f"pristine-{label}"
        await _run("git", "clone", "-q", "--no-hardlinks", task.repo_path, str(pristine))
        for method in ("clone", "hardlink-clone", "worktree", "reflink"):
            times = [await copy_once(method, task, work, pristine) for _ in range(reps)]
            out[(label, method)] = sum(times) / len(times)
    return out


async def concurrent(fn, c: int) -> tuple[float, float]:
    """(mean seconds per item, wall seconds) of ``c`` concurrent ``fn()`` calls."""
    t0 = time.perf_counter()
    times = await asyncio.gather(*(fn() for _ in range(c)))
    return sum(times) / c, time.perf_counter() - t0


async def timed(coro_fn) -> float:
    t0 = time.perf_counter()
    await coro_fn()
    return time.perf_counter() - t0


async def bench_fixed(task: SWETask, data: str, levels: list[int], work: Path, docker: bool = False) -> dict:
    from recipe.rollout import load_config, run_rollouts
    from reward.grading import grade_patch

    async def sandbox_cycle():
        box = await LocalSandbox.create(task, parent_dir=str(work / "boxes"))
        await box.teardown()

    factory = None
    if docker:
        import docker as docker_sdk

        from sandbox.docker_rollout import DockerRolloutSandbox
        from sandbox.docker_sandbox import DockerSandboxFactory, DockerSettings

        factory = DockerSandboxFactory(docker_sdk.from_env(), DockerSettings(start_concurrency=max(levels)))

    async def docker_sandbox_cycle():
        box = await DockerRolloutSandbox.create_in_docker(task, factory=factory, parent_dir=str(work / "boxes"))
        await box.teardown()

    async def agent_start():
        await _run(sys.executable, "-c",
                   "import minisweagent.agents.default, minisweagent.models, minisweagent.environments.local")

    async def grade():
        await grade_patch(task, task.patch, timeout_s=300)

    out = {}
    parts = [("sandbox", sandbox_cycle), ("agent_start", agent_start), ("grading", grade)]
    if docker:
        parts.insert(1, ("docker_sandbox", docker_sandbox_cycle))
    for c in levels:
        for name, fn in parts:
            out[(name, c)] = await concurrent(lambda fn=fn: timed(fn), c)
        for name, backend in [("whole_rollout", "local")] + ([("docker_rollout", "docker")] if docker else []):
            cfg = load_config([f"data={data}", "policy=empty", f"concurrency={c}", f"n={c}", "limit=1",
                               f"out_dir={work / f'rollout-{backend}-{c}'}", f"swe_agent.sandbox.backend={backend}"])
            t0 = time.perf_counter()
            summary = await run_rollouts(cfg)
            wall = time.perf_counter() - t0
            out[(name, c)] = (summary["all"]["mean_total_s"], wall)
    return out


PATHS = {
    "cold": ["swe_agent.agent.warm_start=false", "swe_agent.sandbox.work_tree=clone"],
    "warm": ["swe_agent.agent.warm_start=true", "swe_agent.sandbox.work_tree=auto"],
}


async def rollout_groups(data: str, overrides: list[str], levels: list[int], reps: int, out: Path) -> dict:
    """Whole ``policy=empty`` rollouts in one worker: a warm-up group, then ``reps`` groups of ``c``
    concurrent rollouts of the first task per level. Returns {"warmup": records, c: [(wall, records)]}."""
    from recipe.rollout import load_config, make_loop_factory, read_rows
    from recipe.trajectory import TrajectoryRecord
    from recipe.worker_resources import WorkerResources

    cfg = load_config([f"data={data}", "policy=empty", "limit=1", f"out_dir={out}", *overrides])
    row = read_rows(data, 1)[0]
    make_loop, _ = make_loop_factory(cfg)
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}

    async def one(resources, session: int) -> TrajectoryRecord:
        output = await make_loop(resources).run(dict(sampling), raw_prompt=row.get("prompt") or [],
                                                extra_info=row["extra_info"], data_source=row.get("data_source", ""),
                                                session_id=session)
        return TrajectoryRecord.from_output(output, data_source="", policy="empty")

    results: dict = {}
    async with WorkerResources(make_loop().swe_config) as resources:
        results["warmup"] = [await one(resources, 0)]
        for c in levels:
            results[c] = []
            for _ in range(reps):
                t0 = time.perf_counter()
                records = await asyncio.gather(*(one(resources, k) for k in range(c)))
                results[c].append((time.perf_counter() - t0, records))
    return results


def compare_paths(args: argparse.Namespace, levels: list[int]) -> int:
    """The cold path against the warm one, whole rollouts (module docstring)."""
    from recipe.trajectory import mean_phases

    with tempfile.TemporaryDirectory(prefix="bench-sandbox-paths-") as tmp:
        runs = {name: asyncio.run(rollout_groups(args.data, overrides, levels, args.reps, Path(tmp) / name))
                for name, overrides in PATHS.items()}
    print(f"\n== whole policy=empty rollouts, cold vs warm path ({args.reps} groups per level, one worker each) ==")
    for name, run in runs.items():
        first = run["warmup"][0]
        print(f"{name}: the worker's first rollout {first.total_s:.2f} s (agent start {first.phases['agent_start']:.2f} s"
              f"{', the fork server starting' if name == 'warm' else ''})")
    stats: dict = {}
    for c in levels:
        for name, run in runs.items():
            records = [r for _, group in run[c] for r in group]
            bad = [r.exit_status for r in records if r.exit_status != "submitted"]
            mean = statistics.fmean(r.total_s for r in records)
            throughput = statistics.fmean(c / wall for wall, _ in run[c])
            stats[(name, c)] = (mean, throughput)
            phases = mean_phases([r.phases for r in records])
            named = sum(v for k, v in phases.items() if k != "total")
            print(f"{name:4s} c={c:3d}  fixed cost {mean:6.3f} s/rollout  throughput {throughput:6.2f} rollouts/s"
                  f"{'  NOT SUBMITTED: ' + str(bad) if bad else ''}")
            print("           phases: " + " ".join(f"{k}={v:.3f}" for k, v in phases.items() if k != "total")
                  + f"  sum {named:.3f} / total {phases['total']:.3f} ({100 * named / phases['total']:.1f}%)")
        cold, warm = stats[("cold", c)], stats[("warm", c)]
        print(f"     c={c:3d}  cold/warm fixed cost {cold[0] / warm[0]:5.1f}x   warm/cold throughput "
              f"{warm[1] / cold[1]:5.1f}x")
    return 0


def compare_revision(args: argparse.Namespace, levels: list[int]) -> int:
    """Alternate this checkout's ``policy=empty`` rollouts with ``args.compare_rev``'s (module docstring)."""
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-compare-") as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.compare_rev],
                       check=True, capture_output=True)
        try:
            for c in levels:
                times: dict[str, list[float]] = {"this": [], args.compare_rev: []}
                for i in range(args.reps):
                    for label in (list(times) if i % 2 == 0 else list(times)[::-1]):
                        root = ROOT if label == "this" else old
                        out = Path(tmp) / f"out-{label}-{c}-{i}"
                        subprocess.run([sys.executable, "-m", "recipe.rollout", f"data={args.data}", "policy=empty",
                                        f"concurrency={c}", f"n={c}", "limit=1", f"out_dir={out}"], cwd=root,
                                       check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(root)})
                        times[label].append(json.loads((out / "summary.json").read_text())["all"]["mean_total_s"])
                this, base = statistics.median(times["this"]), statistics.median(times[args.compare_rev])
                print(f"policy=empty rollout c={c:3d}: this checkout {this:6.2f} s {[round(t, 2) for t in times['this']]}"
                      f"  {args.compare_rev} {base:6.2f} s {[round(t, 2) for t in times[args.compare_rev]]}"
                      f"  -> this/{args.compare_rev} {this / base:5.2f}x (median of {args.reps} alternating runs)")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT / "data/simple/test.parquet"))
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--large-files", type=int, default=3000)
    ap.add_argument("--large-mb", type=int, default=60)
    ap.add_argument("--compare-rev", default=None, help="time policy=empty rollouts against this git revision")
    ap.add_argument("--paths", action="store_true", help="the cold rollout path against the warm one (docstring)")
    ap.add_argument("--docker", choices=("auto", "on", "off"), default="auto",
                    help="also time Docker sandboxes and rollouts (auto: when an engine answers)")
    args = ap.parse_args(argv)
    from recipe.rollout import read_rows

    if args.compare_rev:
        return compare_revision(args, [int(x) for x in args.concurrency.split(",")])
    if args.paths:
        return compare_paths(args, [int(x) for x in args.concurrency.split(",")])

    task = SWETask.from_extra_info(read_rows(args.data, 1)[0]["extra_info"])
    levels = [int(x) for x in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
        work = Path(tmp)
        head = make_large_repo(work / "large_repo", args.large_files, args.large_mb)
        large = SWETask(instance_id="large", repo="bench/large", base_commit=head, problem_statement="-",
                        repo_path=str(work / "large_repo"))
        copies = asyncio.run(bench_copies({"small": task, "large": large}, args.reps, work))
        from sandbox.docker_sandbox import docker_engine_available

        docker = args.docker == "on" or (args.docker == "auto" and docker_engine_available()[0])
        fixed = asyncio.run(bench_fixed(task, args.data, levels, work, docker=docker))

    print(f"\n== sandbox create+teardown by copy method (mean of {args.reps}, seconds) ==")
    for label in ("small", "large"):
        base = copies[(label, "clone")]
        for method in ("clone", "hardlink-clone", "worktree", "reflink"):
            t = copies[(label, method)]
            print(f"{label:6s} {method:15s} {t:7.3f} s   clone/this = {base / t:5.2f}x   "
                  f"seed container start/this = {SEED_CONTAINER_START_S / t:7.1f}x")
    print("\n== fixed cost per rollout by concurrency (mean seconds per item; wall seconds for the batch) ==")
    names = ("sandbox", "docker_sandbox", "agent_start", "grading", "whole_rollout", "docker_rollout")
    for name in (n for n in names if (n, levels[0]) in fixed):
        base = fixed[(name, levels[0])][0]
        for c in levels:
            mean, wall = fixed[(name, c)]
            print(f"{name:14s} c={c:3d}  mean {mean:7.3f} s  wall {wall:7.2f} s  "
                  f"mean/c={levels[0]} {mean / base:5.2f}x  throughput {c / wall:6.2f}/s")
    if ("docker_rollout", levels[0]) in fixed:
        print("\n== docker / local, same run ==")
        for c in levels:
            for docker_name, local_name in (("docker_sandbox", "sandbox"), ("docker_rollout", "whole_rollout")):
                print(f"{docker_name:14s} c={c:3d}  docker/local {fixed[(docker_name, c)][0] / fixed[(local_name, c)][0]:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
