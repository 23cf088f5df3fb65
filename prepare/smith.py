"""``--mode smith``: verified bugs injected into real PyPI packages (SWE-smith's procedural method).

Per package (``prepare.smith_env`` for the environment):

1. download the sdist with pip, unpack it to ``clean/``, check it ships its tests;
2. make the package's virtualenv (``env_bin`` of every task of the package);
3. run the suite twice on clean code (the second run under coverage, one context per
   test): tests passing in both runs are *stable*; a test whose outcome differs
   between the runs is *flaky* and never used;
4. list mutations (``prepare.mutations``) on lines the stable tests execute, order them
   seeded and spread over operators and functions;
5. try each in ``work/``: run the stable tests that execute the mutated function (the
   whole suite when the mutated line also runs at import time). Tests that never run
   the function cannot change outcome, so this is sound and keeps runs and rewards
   cheap. A mutation is kept when at least one of them fails (FAIL_TO_PASS) and the
   others pass (PASS_TO_PASS: the function's other tests, narrower than SWE-bench's
   whole-file lists); one that hangs is killed at the task timeout and dropped;
6. write each kept task as a one-commit git repository holding the bug (no history
   with the fix, like SWE-smith's task images), then validate it with the grader
   (reference patch resolves, empty patch does not).

Resumption: every decision is appended to ``packages/<slug>/state.jsonl`` at once; a
rerun skips mutations already decided and tasks already validated, and reuses the
download, the virtualenv and the baseline.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from prepare.issue_text import problem_statement
from prepare.mutations import Mutation, find_mutations
from prepare.repo_builder import commit_env, git_file_diff
from prepare.smith_env import (
    BASELINE_TIMEOUT_S,
    PASSING,
    PackageEnv,
    PackageError,
    check_import_location,
    check_tests_shipped,
    create_venv,
    download_sdist,
    fresh_work_copy,
    load_line_contexts,
    outcomes_of,
    run_tests,
    run_tests_with_coverage,
    source_paths,
    unpack,
)
from prepare.smith_packages import PackageSpec
from core.task import SWETask
from prepare.validate import validate_task
from reward.protected import is_test_path
from core.process import run_command

DATA_SOURCE = "swe_smith"
# Named timeouts (seconds).
# One mutated test run; a hang is killed here and the mutation dropped. Default
# ("auto", task_timeout_s=0): TASK_TIMEOUT_FACTOR x the clean suite's duration, clamped.
TASK_TIMEOUT_FACTOR = 4.0
TASK_TIMEOUT_MIN_S = 15.0
TASK_TIMEOUT_MAX_S = 60.0
VALIDATE_TIMEOUT_S = 120.0  # one grade during validation
_GIT_TIMEOUT_S = 120.0


@dataclass
class SmithOptions:
    """Settings of one ``--mode smith`` run.

    Attributes:
        out_dir: output root (``repos/``, ``packages/``, tasks.jsonl, parquet files).
        seed: orders the mutations tried and the off-by-one directions.
        max_tasks_per_package: stop a package after this many kept tasks.
        max_candidates_per_package: stop after trying this many mutations (0 = 4x the above).
        jobs: packages prepared at once (each runs one test process at a time).
        task_timeout_s: limit for one mutated test run, seconds (0 = auto: see
            ``task_timeout_for``).
        baseline_timeout_s: limit for one clean suite run, seconds.
        validate_timeout_s: limit for one validation grade, seconds.
        progress: show tqdm bars on stderr.
    """

    out_dir: Path
    seed: int = 0
    max_tasks_per_package: int = 25
    max_candidates_per_package: int = 0
    jobs: int = 2
    task_timeout_s: float = 0.0
    baseline_timeout_s: float = BASELINE_TIMEOUT_S
    validate_timeout_s: float = VALIDATE_TIMEOUT_S
    progress: bool = True

    @property
    def candidate_budget(self) -> int:
        return self.max_candidates_per_package or 4 * self.max_tasks_per_package

    def task_timeout_for(self, clean_suite_s: float) -> float:
        """Seconds allowed for one mutated run: the option, or ``TASK_TIMEOUT_FACTOR`` x the
        clean suite's duration clamped to [``TASK_TIMEOUT_MIN_S``, ``TASK_TIMEOUT_MAX_S``]."""
        if self.task_timeout_s > 0:
            return self.task_timeout_s
        return min(TASK_TIMEOUT_MAX_S, max(TASK_TIMEOUT_MIN_S, TASK_TIMEOUT_FACTOR * clean_suite_s))


@dataclass
class PackageReport:
    """What happened to one package (one row of the final table)."""

    name: str
    version: str
    ok: bool = True
    stage: str = ""
    reason: str = ""
    stable_tests: int = 0
    flaky_tests: int = 0
    candidates: int = 0
    tried: int = 0
    kept: int = 0
    validated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Candidate:
    """A mutation with the tests to run for it: the stable tests that execute any line of
    the mutated function (node ids), or None for every test when the mutated line also
    runs at import time."""

    mutation: Mutation
    affected: list[str] | None


# -- state -------------------------------------------------------------------------------


class PackageState:
    """Append-only decisions of one package (``state.jsonl``) plus its baseline (``baseline.json``)."""

    def __init__(self, root: Path) -> None:
        self.path = root / "state.jsonl"
        self.baseline_path = root / "baseline.json"
        self.decided: dict[str, dict] = {}
        self.validated: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interrupt: that decision is redone
                target = self.validated if record.get("event") == "validated" else self.decided
                target[record["key"]] = record

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        target = self.validated if record.get("event") == "validated" else self.decided
        target[record["key"]] = record

    def kept_tasks(self) -> list[tuple[str, SWETask]]:
        return [(k, SWETask.model_validate(r["task"])) for k, r in self.decided.items() if r["status"] == "kept"]

    def load_baseline(self) -> dict | None:
        if not self.baseline_path.exists():
            return None
        return json.loads(self.baseline_path.read_text())

    def save_baseline(self, baseline: dict) -> None:
        tmp = self.baseline_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(baseline))
        tmp.replace(self.baseline_path)


# -- baseline ----------------------------------------------------------------------------


def stable_and_flaky(first: dict, second: dict) -> tuple[list[str], list[str]]:
    """Stable tests (passing in both clean runs) and flaky ones (outcome differs between them).

    Args:
        first, second: ``{node_id: TestStatus}`` of two clean runs.

    Returns:
        (stable, flaky), each sorted. A test absent from one run counts as a changed
        outcome (flaky) if it passed in the other.
    """
    names = set(first) | set(second)
    stable = sorted(n for n in names if first.get(n) in PASSING and second.get(n) in PASSING)
    flaky = sorted(n for n in names if first.get(n) != second.get(n))
    return stable, flaky


async def _baseline(pkg: PackageEnv, opts: SmithOptions) -> dict:
    plain = await run_tests(pkg, list(pkg.spec.test_paths), timeout_s=opts.baseline_timeout_s)
    if plain.timed_out:
        raise PackageError("baseline", f"clean test run timed out after {opts.baseline_timeout_s:g} s")
    if plain.returncode not in (0, 1):
        tail = " | ".join(plain.output.strip().splitlines()[-4:])
        raise PackageError("baseline", f"clean test run exited {plain.returncode}: {tail}")
    covered = await run_tests_with_coverage(pkg, timeout_s=opts.baseline_timeout_s)
    stable, flaky = stable_and_flaky(outcomes_of(plain), outcomes_of(covered))
    if not stable:
        raise PackageError("baseline", "no test passes on the clean code")
    return {"stable": stable, "flaky": flaky, "duration_s": plain.duration_s}


# -- candidates --------------------------------------------------------------------------


def _read_source(path: Path) -> str:
    with open(path, encoding="utf-8", newline="") as fh:
        return fh.read()


def _write_source(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def list_candidates(
    pkg: PackageEnv, contexts: dict[str, dict[int, list[str]]], stable: Sequence[str], seed: int
) -> list[Candidate]:
    """Mutations on lines at least one stable test executes, in trial order.

    Order: seeded shuffle, then spread so that no function gets a second mutation
    before every function has one, and operators take turns.
    """
    stable_set = set(stable)
    found: list[Candidate] = []
    for rel in source_paths(pkg):
        root = pkg.clean / rel
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for file in files:
            path = file.relative_to(pkg.clean).as_posix()
            if is_test_path(path) or path not in contexts:
                continue
            source = _read_source(file)
            if "\r" in source or not source.endswith("\n"):
                continue  # the patch writer needs plain \n files ending in a newline
            try:
                mutations = find_mutations(source, path, seed=seed)
            except SyntaxError:
                continue
            lines = contexts[path]
            for mutation in mutations:
                at_line: set[str] = set(lines.get(mutation.stmt_lineno, []))
                for line in range(mutation.lineno, mutation.end_lineno + 1):
                    at_line.update(lines.get(line, []))
                if not at_line & stable_set:
                    continue  # no stable test executes the mutated line
                if "" in at_line:
                    affected = None  # the line also runs at import: every test may notice
                else:
                    first, last = mutation.function_lines
                    in_function: set[str] = set()
                    for line in range(first, last + 1):
                        in_function.update(lines.get(line, []))
                    affected = sorted(in_function & stable_set)
                found.append(Candidate(mutation, affected))
    rng = random.Random(f"smith:{seed}:{pkg.spec.slug}")
    rng.shuffle(found)
    per_function: Counter[tuple[str, str]] = Counter()
    ranked = []
    for cand in found:
        key = (cand.mutation.path, cand.mutation.function)
        ranked.append((per_function[key], cand))
        per_function[key] += 1
    ranked.sort(key=lambda item: item[0])  # stable: keeps the shuffle within a rank
    queues: dict[str, list[Candidate]] = defaultdict(list)
    for _, cand in ranked:
        queues[cand.mutation.kind].append(cand)
    kinds = sorted(queues)
    rng.shuffle(kinds)
    ordered: list[Candidate] = []
    while any(queues.values()):
        for kind in kinds:
            if queues[kind]:
                ordered.append(queues[kind].pop(0))
    return ordered


@dataclass
class Verdict:
    """Outcome of one mutated test run."""

    kept: bool
    reason: str = ""
    fail_to_pass: list[str] = field(default_factory=list)
    pass_to_pass: list[str] = field(default_factory=list)
    output: str = ""


def judge_mutation(outcomes: dict, in_scope: Sequence[str], *, timed_out: bool, returncode: int, timeout_s: float) -> Verdict:
    """Keep/drop decision for one mutated run (pure).

    Args:
        outcomes: ``{node_id: TestStatus}`` of the mutated run.
        in_scope: the stable tests of the files that were run.
        timed_out: the run was killed at ``timeout_s``.
        returncode: pytest's exit status.
    """
    if timed_out:
        return Verdict(False, f"hang: killed after {timeout_s:g} s")
    broken_modules = sorted(n for n, s in outcomes.items() if "::" not in n and s.value == "ERROR")
    if broken_modules:
        return Verdict(False, "collection error")
    if returncode not in (0, 1):
        return Verdict(False, f"test run crashed (exit {returncode})")
    f2p = [t for t in in_scope if outcomes.get(t) not in PASSING]
    p2p = [t for t in in_scope if outcomes.get(t) in PASSING]
    if not f2p:
        return Verdict(False, "no test fails")
    return Verdict(True, "", f2p, p2p)


async def _try_mutation(pkg: PackageEnv, cand: Candidate, stable: Sequence[str], timeout_s: float) -> Verdict:
    target = pkg.work / cand.mutation.path
    original = await asyncio.to_thread(_read_source, target)
    await asyncio.to_thread(_write_source, target, cand.mutation.apply(original))
    try:
        targets = cand.affected if cand.affected is not None else list(pkg.spec.test_paths)
        run = await run_tests(pkg, targets, timeout_s=timeout_s)
    finally:
        await asyncio.shield(asyncio.to_thread(_write_source, target, original))
    in_scope = list(stable) if cand.affected is None else list(cand.affected)
    verdict = judge_mutation(
        outcomes_of(run), in_scope, timed_out=run.timed_out, returncode=run.returncode, timeout_s=timeout_s
    )
    verdict.output = run.output
    return verdict


# -- task repositories -------------------------------------------------------------------


async def _git(repo: Path, *args: str) -> None:
    result = await run_command(["git", "-C", str(repo), *args], env=commit_env(), timeout_s=_GIT_TIMEOUT_S)
    if result.returncode != 0 or result.timed_out:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {result.output.strip()[-500:]}")


async def write_task_repo(clean: Path, dest: Path, path: str, buggy_source: str) -> str:
    """Copy ``clean`` to ``dest``, put the bug in ``path``, commit it as the only commit; returns its hash.

    ``add -f``: an sdist may ship files its own ``.gitignore`` ignores (generated
    version modules), and the task needs them.
    """
    await asyncio.to_thread(shutil.rmtree, dest, ignore_errors=True)
    await asyncio.to_thread(
        shutil.copytree, clean, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".git")
    )
    await asyncio.to_thread(_write_source, dest / path, buggy_source)
    await _git(dest, "init", "-q", "-b", "main")
    await _git(dest, "add", "-A", "-f")
    await _git(dest, "commit", "-q", "--no-verify", "-m", "Initial commit")
    result = await run_command(["git", "-C", str(dest), "rev-parse", "HEAD"], env=commit_env(), timeout_s=_GIT_TIMEOUT_S)
    return result.output.strip()


def instance_id(spec: PackageSpec, mutation: Mutation) -> str:
    """``smith__<slug>-<mutation key>``: stable across runs, says nothing about the bug."""
    return f"smith__{spec.slug}-{mutation.key}"


async def _make_task(pkg: PackageEnv, cand: Candidate, verdict: Verdict, repos_dir: Path) -> SWETask:
    mutation = cand.mutation
    clean_source = await asyncio.to_thread(_read_source, pkg.clean / mutation.path)
    buggy = mutation.apply(clean_source)
    iid = instance_id(pkg.spec, mutation)
    repo = repos_dir / iid
    base_commit = await write_task_repo(pkg.clean, repo, mutation.path, buggy)
    patch = git_file_diff(mutation.path, buggy, clean_source)
    statement = problem_statement(
        pkg.spec.name,
        pkg.spec.version,
        verdict.fail_to_pass,
        verdict.output,
        fix_patch=patch,
        n_passing=len(verdict.pass_to_pass),
    )
    return SWETask(
        instance_id=iid,
        repo=f"pypi/{pkg.spec.name}",
        base_commit=base_commit,
        problem_statement=statement,
        patch=patch,
        test_patch="",
        FAIL_TO_PASS=verdict.fail_to_pass,
        PASS_TO_PASS=verdict.pass_to_pass,
        version=pkg.spec.version,
        repo_path=str(repo),
        test_cmd=pkg.test_cmd(),
        env_bin=str(pkg.env_bin),
        data_source=DATA_SOURCE,
        bug_kind=mutation.kind,
    )


# -- one package -------------------------------------------------------------------------


async def prepare_package(
    spec: PackageSpec, opts: SmithOptions, *, kept_bar: tqdm | None = None
) -> tuple[list[SWETask], PackageReport]:
    """Mine, build and validate the tasks of one package (resuming from its state files).

    Returns:
        (validated tasks, report). Never raises for a bad package: a failed
        download, install or baseline is in ``report.stage``/``report.reason``.
    """
    start = time.monotonic()
    report = PackageReport(spec.name, spec.version)
    root = opts.out_dir / "packages" / spec.slug
    repos_dir = opts.out_dir / "repos"
    pkg = PackageEnv(spec, root)
    try:
        await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(repos_dir.mkdir, parents=True, exist_ok=True)
        state = await asyncio.to_thread(PackageState, root)
        archive = await download_sdist(spec, root / "dist")
        # The marker sits beside clean/, not in it: clean/ is copied into every task repo.
        if not (root / "unpacked.ok").exists():
            await asyncio.to_thread(unpack, archive, pkg.clean)
            await asyncio.to_thread((root / "unpacked.ok").write_text, "ok\n")
        await asyncio.to_thread(check_tests_shipped, pkg)
        await asyncio.to_thread(source_paths, pkg)
        await create_venv(pkg)
        await asyncio.to_thread(fresh_work_copy, pkg)
        baseline = await asyncio.to_thread(state.load_baseline)
        if baseline is None or not pkg.coverage_json.exists():
            await check_import_location(pkg)
            baseline = await _baseline(pkg, opts)
            await asyncio.to_thread(state.save_baseline, baseline)
        stable = baseline["stable"]
        report.stable_tests, report.flaky_tests = len(stable), len(baseline["flaky"])
        contexts = await asyncio.to_thread(load_line_contexts, pkg)
        candidates = await asyncio.to_thread(list_candidates, pkg, contexts, stable, opts.seed)
    except PackageError as exc:
        report.ok, report.stage, report.reason = False, exc.stage, exc.reason
        report.seconds = time.monotonic() - start
        return [], report
    except Exception as exc:  # noqa: BLE001 - one broken package must not stop the others
        report.ok, report.stage, report.reason = False, "prepare", f"{type(exc).__name__}: {exc}"
        report.seconds = time.monotonic() - start
        return [], report
    report.candidates = len(candidates)

    dropped: Counter[str] = Counter()
    kept = sum(1 for r in state.decided.values() if r["status"] == "kept")
    if kept_bar is not None:
        kept_bar.update(kept)
    tried = len(state.decided)
    task_timeout_s = opts.task_timeout_for(float(baseline.get("duration_s", 0.0)))
    for cand in candidates:
        if kept >= opts.max_tasks_per_package or tried >= opts.candidate_budget:
            break
        key = cand.mutation.key
        if key in state.decided:
            continue
        verdict = await _try_mutation(pkg, cand, stable, task_timeout_s)
        tried += 1
        if not verdict.kept:
            state.append({"key": key, "status": "dropped", "kind": cand.mutation.kind, "reason": verdict.reason})
            continue
        task = await _make_task(pkg, cand, verdict, repos_dir)
        state.append({"key": key, "status": "kept", "kind": cand.mutation.kind, "task": task.model_dump()})
        kept += 1
        if kept_bar is not None:
            kept_bar.update(1)
    for record in state.decided.values():
        if record["status"] == "dropped":
            dropped[record["reason"].split(":")[0]] += 1
    report.tried = len(state.decided)

    # Validate with the real grader (SWE-bench's gold-patch check); a task that fails is dropped.
    tasks: list[SWETask] = []
    for key, task in state.kept_tasks():
        record = state.validated.get(key)
        if record is None:
            result = await validate_task(task, timeout_s=opts.validate_timeout_s)
            record = {"event": "validated", "key": key, "ok": result.ok, "reason": result.reason}
            if not result.ok and result.reference is not None:
                record["log_tail"] = result.reference.log_tail[-1500:]
            state.append(record)
        if record["ok"]:
            tasks.append(task)
        else:
            dropped["validation failed"] += 1
            await asyncio.to_thread(shutil.rmtree, task.repo_path or "", ignore_errors=True)
    report.kept = len(state.kept_tasks())
    report.validated = len(tasks)
    report.dropped = dict(dropped)
    report.seconds = time.monotonic() - start
    return tasks, report


async def build_smith(specs: Sequence[PackageSpec], opts: SmithOptions) -> tuple[list[SWETask], list[PackageReport]]:
    """Prepare every package, at most ``opts.jobs`` at a time.

    Returns:
        (validated tasks ordered by package then instance id, one report per package in ``specs`` order).
    """
    semaphore = asyncio.Semaphore(max(1, opts.jobs))
    pkg_bar = tqdm(total=len(specs), desc="smith packages", unit="pkg", file=sys.stderr, disable=not opts.progress, position=0)
    kept_bar = tqdm(
        total=len(specs) * opts.max_tasks_per_package, desc="smith tasks kept", unit="task",
        file=sys.stderr, disable=not opts.progress, position=1,
    )

    async def one(spec: PackageSpec) -> tuple[list[SWETask], PackageReport]:
        async with semaphore:
            result = await prepare_package(spec, opts, kept_bar=kept_bar)
        pkg_bar.update(1)
        return result

    try:
        results = await asyncio.gather(*(one(spec) for spec in specs))
    finally:
        kept_bar.close()
        pkg_bar.close()
    tasks = [t for ts, _ in results for t in sorted(ts, key=lambda t: t.instance_id)]
    return tasks, [r for _, r in results]


def format_reports(reports: Sequence[PackageReport]) -> str:
    """A plain-text table: one row per package (stable/flaky tests, mutations tried, tasks kept and validated)."""
    header = f"{'package':<22} {'version':<10} {'status':<10} {'stable':>6} {'flaky':>5} {'tried':>5} {'kept':>4} {'valid':>5} {'secs':>6}  notes"
    rows = [header, "-" * len(header)]
    for r in reports:
        status = "ok" if r.ok else "FAILED"
        notes = r.reason if not r.ok else ", ".join(f"{k}={v}" for k, v in sorted(r.dropped.items()))
        if not r.ok:
            notes = f"{r.stage}: {notes}"
        rows.append(
            f"{r.name:<22} {r.version:<10} {status:<10} {r.stable_tests:>6} {r.flaky_tests:>5} {r.tried:>5} "
            f"{r.kept:>4} {r.validated:>5} {r.seconds:>6.0f}  {notes[:160]}"
        )
    return "\n".join(rows)


def write_reports(reports: Sequence[PackageReport], path: Path) -> None:
    """Write the reports as JSON lines (``smith_report.jsonl``)."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in reports:
            fh.write(json.dumps(asdict(r)) + "\n")
