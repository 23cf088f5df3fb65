"""Grade a model patch the way SWE-bench's harness does, on a pristine repository copy.

Steps (``swebench/harness/run_evaluation.py`` + ``grading.py``): reject patches
that cannot be graded safely (``reward.patch.check_patch``), check out the task's
``base_commit`` into a fresh temporary copy, apply the model patch, ask git which
paths it changed and put every protected one back (``reward.protected``: tests,
``conftest.py``, pytest's config files, start-up hooks, package metadata, modules
shadowing the runner; shared config files whose pytest section changed,
``reward.runner_config``), apply the task's ``test_patch`` (the hidden tests) after
it, run the FAIL_TO_PASS and PASS_TO_PASS tests sandboxed (``reward.isolation``)
under a timeout, and read each test's outcome from the grader's pytest plugin
(``reward.test_run``; the log only for non-pytest commands). The task counts as
resolved when every FAIL_TO_PASS and every PASS_TO_PASS test passes: its outcome is
``PASSED``, or the one it has with the reference patch (an expected ``XFAIL``); the
reward follows ``RewardConfig.variant`` (``reward.variants``).

The agent's own working copy is never graded: it may hold edited tests, caches
or processes the agent left behind.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.task import SWETask
from reward.cache import GradeCache, cache_key
from reward.config import RewardConfig
from reward.applied import Change, applied_changes, directories_with_init, restore, tree_files
from reward.isolation import NetworkPolicy, grading_env, grading_policy, grading_readable, shell_join
from reward.patch import PatchError, check_patch, normalize_patch
from reward.container import ContainerGrading, GradeContainer, in_container
from core.pristine import PristineTrees
from reward.protected import protected_reason, shadowing_candidates, shadowing_roots
from reward.runner_config import is_shared_config, pytest_settings_changed
from reward.test_run import PytestCommand, PytestRun
from reward.test_log import (
    TestStatus,
    has_pytest_summary,
    is_unittest_command,
    parse_test_log,
    unittest_selector,
)
from reward.variants import UNPARSABLE_SIMILARITY, binary_reward, partial_reward, patch_similarity
from core.gitrepo import GitError, checkout_copy, git, git_env
from core.trees import HeldTree, TreeCopyError
from sandbox.image_tree import ImageTreeError
from sandbox.overlay import OverlayError, detach, mount_overlay_async, overlay_available
from sandbox.jail import JailSpec, give_to_jail, lease_uid
from core.process import run_command

# Error classes a grade can carry (None = the tests ran to completion).
GradeErrorClass = Literal[
    "empty_patch",  # nothing left to apply (only with skip_empty=True)
    "patch_apply_failed",  # git apply rejected the model patch
    "patch_parse_error",  # the model patch is not a unified diff
    "patch_too_large",  # over RewardConfig.max_patch_bytes
    "binary_patch",  # binary sections (RewardConfig.allow_binary is False)
    "path_outside_repo",  # absolute / ".." paths, or symlinks pointing out of the repo
    "timeout",  # the test command ran past the timeout and was killed
    "grade_timeout",  # the whole grade (copy + apply + tests) ran past RewardConfig.grade_timeout_s
    "repo_missing",  # task repository or base_commit not found
    "workdir_error",  # the temporary copy could not be made (work_root missing, disk full)
    "test_error",  # test patch did not apply, or the test run crashed / ran nothing
    "sandbox_error",  # the grade's container could not start (no engine, no image; reward.container)
]
ERROR_CLASSES: tuple[str, ...] = GradeErrorClass.__args__  # type: ignore[attr-defined]
# Errors of the grading infrastructure, not of the patch: a trainer should mask
# these rollouts rather than score them 0 (all others are the patch's fault).
INFRA_ERROR_CLASSES = frozenset({"repo_missing", "workdir_error", "sandbox_error"})

# ``grade_patch``'s settings when none are given: every test's outcome (validation, tests).
FULL_RUN = RewardConfig(fail_fast=False)

# Outcomes that decide a run stopped early or a reward is still open.
_PASSING = frozenset({TestStatus.PASSED})
# Outcomes that pass only when the reference patch gives the same one (an expected failure or skip).
_PASS_IF_REFERENCE = frozenset({TestStatus.XFAIL, TestStatus.XPASS, TestStatus.SKIPPED})
# Outcomes at which pytest --maxfail=1 / unittest --failfast stop the run.
_STOPPING = frozenset({TestStatus.FAILED, TestStatus.ERROR})
# pytest exit codes 0 (all passed) and 1 (some failed) mean the run completed;
# 2-5 mean interrupted / internal error / usage error / nothing collected.
# unittest uses 0 and 1 the same way.
_COMPLETED_RETURNCODES = frozenset({0, 1})
_LOG_TAIL_CHARS = 4000
# Limit for each git command of a grade (clone, checkout, apply), seconds.
GIT_TIMEOUT_S = 60.0


def _empty_report() -> dict[str, dict[str, list[str]]]:
    return {key: {"success": [], "failure": []} for key in ("FAIL_TO_PASS", "PASS_TO_PASS")}


@dataclass
class GradeResult:
    """Outcome of grading one model patch on one task.

    Attributes:
        instance_id: the task's id.
        resolved: every FAIL_TO_PASS and PASS_TO_PASS test passed.
        reward: the variant's reward (``variant``): binary 1.0/0.0, partial in
            [0, 1], similarity in [-1, 1]; 0.0 whenever ``error`` is set, except
            similarity's -1.0 for an unparsable patch.
        patch_applied: the (filtered) model patch applied cleanly; False for an
            empty patch and when grading stopped before applying it.
        error: None, or the error class (see ``GradeErrorClass``).
        tests: SWE-bench's report shape, ``{"FAIL_TO_PASS": {"success": [...],
            "failure": [...]}, "PASS_TO_PASS": ...}``; a test missing from the
            log is a failure. Empty lists when no test ran.
        removed_test_files: every path whose changes were removed before grading
            (test files, runner configuration, start-up hooks, shared config
            files whose pytest section changed), in patch order.
        duration_s: wall-clock seconds for this call (a cache hit is fast).
        log_tail: the last characters of the test (or git) output, for debugging.
        variant: the reward variant that computed ``reward``.
        f2p_pass_fraction: FAIL_TO_PASS tests passing / listed (0.0 when none ran).
        p2p_broken: some PASS_TO_PASS test failed.
        similarity: SWE-RL patch similarity (only for the similarity variant, else None).
        cached: the result was shared with an identical patch's grade.
        network: how the test run was kept off the network ("unshare", "env", or "" if none ran).
        not_run: FAIL_TO_PASS/PASS_TO_PASS tests skipped because the reward was
            already decided (``RewardConfig.fail_fast``); they are in neither
            ``tests`` list. Always empty without fail-fast.
        outcomes: the listed tests' statuses as reported (``TestStatus`` values).
        needs_reference: some listed test ended XFAIL/XPASS/SKIPPED and no
            reference outcomes were given: it counts as failed until re-scored
            with the reference's (``Grader`` does).
    """

    instance_id: str
    resolved: bool = False
    reward: float = 0.0
    patch_applied: bool = False
    error: GradeErrorClass | None = None
    tests: dict[str, dict[str, list[str]]] = field(default_factory=_empty_report)
    removed_test_files: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    log_tail: str = ""
    variant: str = "binary"
    f2p_pass_fraction: float = 0.0
    p2p_broken: bool = False
    similarity: float | None = None
    cached: bool = False
    network: str = ""
    not_run: list[str] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)
    needs_reference: bool = False

    @property
    def n_removed(self) -> int:
        """How many files' changes were removed before grading."""
        return len(self.removed_test_files)

    @property
    def is_infra_error(self) -> bool:
        """True when the grader, not the patch, failed (see ``INFRA_ERROR_CLASSES``)."""
        return self.error in INFRA_ERROR_CLASSES

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of all fields."""
        return asdict(self)


def _tail(text: str) -> str:
    return text[-_LOG_TAIL_CHARS:]


def test_passes(status: TestStatus | None, reference: TestStatus | str | None) -> bool:
    """A test passes when it PASSED, or ended as it does with the reference patch (XFAIL, XPASS, SKIPPED).

    SWE-bench's ``test_passed`` also counts any XFAIL as a pass; then library code
    calling ``pytest.xfail()`` under test (``PYTEST_CURRENT_TEST`` is set) resolves a task.
    """
    if status == TestStatus.PASSED:
        return True
    return status in _PASS_IF_REFERENCE and reference is not None and TestStatus(reference) == status


def build_report(
    outcomes: dict[str, TestStatus],
    fail_to_pass: list[str],
    pass_to_pass: list[str],
    reference: dict[str, str] | None = None,
) -> dict[str, dict[str, list[str]]]:
    """SWE-bench's per-category success/failure lists from the outcomes (``test_passes``).

    A test missing from the outcomes is a failure. ``reference`` holds the reference
    patch's outcomes (None: only PASSED passes).
    """
    report = _empty_report()
    for key, names in (("FAIL_TO_PASS", fail_to_pass), ("PASS_TO_PASS", pass_to_pass)):
        for name in names:
            passed = test_passes(outcomes.get(name), (reference or {}).get(name))
            report[key]["success" if passed else "failure"].append(name)
    return report


async def _apply(repo: Path, patch_text: str, patch_file: Path) -> tuple[bool, str]:
    """``git apply`` a patch in ``repo``; returns (applied, git output)."""
    await asyncio.to_thread(patch_file.write_text, patch_text, encoding="utf-8")
    result = await run_command(
        ["git", "-C", str(repo), "apply", "--whitespace=nowarn", str(patch_file)],
        env=git_env(),
        timeout_s=GIT_TIMEOUT_S,
    )
    return result.returncode == 0 and not result.timed_out, result.output


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _outside(repo: Path, rel: str) -> bool:
    """True when ``repo/rel`` resolves (through symlinks) outside ``repo``."""
    root = os.path.realpath(repo)
    resolved = os.path.realpath(repo / rel)
    return resolved != root and not resolved.startswith(root + os.sep)


async def _restore_protected(repo: Path, base_commit: str, changes: list[Change]) -> list[str]:
    """Put every protected change (``reward.protected``) back to the base commit; returns the paths."""
    added = [c.path for c in changes if not c.in_base and c.status != "D"]
    candidates = shadowing_candidates(added, lambda d: (repo / d / "__init__.py").is_file())
    shadowing: frozenset[str] = frozenset()
    if candidates:  # rare: only new modules named like the runner or the standard library
        base_paths = await tree_files(repo, base_commit)
        shadowing = shadowing_roots(list(candidates), directories_with_init(await tree_files(repo, "--index")),
                                    base_paths)
    protected = [c for c in changes if protected_reason(c.path, new_module_roots=shadowing)]
    if protected:
        await restore(repo, base_commit, protected)
    restored = await _restore_runner_config(repo, base_commit, [c.path for c in changes if c not in protected])
    return [c.path for c in protected] + restored


async def _restore_runner_config(repo: Path, base_commit: str, paths: list[str]) -> list[str]:
    """Put back shared config files whose pytest part the patch changed; returns their paths."""
    restored = []
    for rel in paths:
        if not is_shared_config(rel):
            continue
        try:
            before: str | None = await git(repo, "show", f"{base_commit}:{rel}", timeout_s=GIT_TIMEOUT_S)
        except GitError:
            before = None  # the file is new
        target = repo / rel
        after = await asyncio.to_thread(target.read_text, encoding="utf-8", errors="replace") if target.is_file() else None
        if not pytest_settings_changed(rel, before, after):
            continue
        if before is None:
            await asyncio.to_thread(target.unlink, missing_ok=True)
        else:
            await git(repo, "checkout", base_commit, "--", rel, timeout_s=GIT_TIMEOUT_S)
        restored.append(rel)
    return restored


def score(result: GradeResult, task: SWETask, variant: str, reference: dict[str, str] | None = None) -> None:
    """Fill ``tests``, ``resolved``, the F2P/P2P summaries and ``reward`` from ``result.outcomes``.

    ``reference``: the reference patch's outcomes for the listed tests (``test_passes``).
    FAIL_TO_PASS tests in ``result.not_run`` count as not passing in ``f2p_pass_fraction``.
    """
    outcomes = {name: TestStatus(status) for name, status in result.outcomes.items()}
    if result.network or outcomes:  # the tests ran (``network`` is set by each run)
        result.tests = build_report(outcomes, list(task.FAIL_TO_PASS), list(task.PASS_TO_PASS), reference)
    else:
        result.tests = _empty_report()
    if result.not_run:
        skipped = set(result.not_run)
        for key in ("FAIL_TO_PASS", "PASS_TO_PASS"):
            result.tests[key]["failure"] = [n for n in result.tests[key]["failure"] if n not in skipped]
    result.needs_reference = reference is None and any(
        TestStatus(status) in _PASS_IF_REFERENCE for status in result.outcomes.values())
    fail_to_pass = task.FAIL_TO_PASS
    tests = result.tests
    listed = len(tests["FAIL_TO_PASS"]["success"]) + len(tests["FAIL_TO_PASS"]["failure"])
    skipped = set(result.not_run)
    listed += sum(1 for name in _unique(list(fail_to_pass)) if name in skipped)
    result.f2p_pass_fraction = len(tests["FAIL_TO_PASS"]["success"]) / listed if listed else 0.0
    result.p2p_broken = bool(tests["PASS_TO_PASS"]["failure"])
    if result.error is not None:
        result.resolved, result.reward = False, 0.0
        result.needs_reference = False
        return
    result.resolved = binary_reward(tests) == 1.0
    result.reward = partial_reward(tests) if variant == "partial" else (1.0 if result.resolved else 0.0)


def _failfast_flag(test_cmd: str) -> str | None:
    """The option that stops ``test_cmd`` at its first failing test, None when unknown."""
    if is_unittest_command(test_cmd):
        return "--failfast"
    if re.search(r"(^|[\s/])(py\.test|pytest)(\s|$)", test_cmd):
        return "--maxfail=1"
    return None


def _expects_summary(test_cmd: str) -> bool:
    """True for a pytest command with ``-rA`` (every outcome in a summary section)."""
    return _failfast_flag(test_cmd) == "--maxfail=1" and re.search(r"(^|\s)-r\S*A", test_cmd) is not None


@dataclass
class _Phase:
    """One test-command run: the tests it selects and whether it stops at the first failure."""

    names: list[str]
    stop_at_first_failure: bool


def _phases(task: SWETask, config: RewardConfig) -> list[_Phase]:
    """How the tests run: one run of everything, or fail-fast phases (``RewardConfig.fail_fast``).

    Binary: one run, FAIL_TO_PASS first, stopped at the first failure (any failure
    decides 0, and the run order is the one without fail-fast). Partial: every
    FAIL_TO_PASS test (the fraction is the reward), then PASS_TO_PASS stopped at
    its first failure, run only when some FAIL_TO_PASS test passed.
    """
    fail_to_pass, pass_to_pass = _unique(list(task.FAIL_TO_PASS)), _unique(list(task.PASS_TO_PASS))
    everything = _unique(fail_to_pass + pass_to_pass)
    if not config.fail_fast or _failfast_flag(task.test_cmd) is None:
        return [_Phase(everything, False)]
    if config.variant == "partial" and fail_to_pass:
        rest = [name for name in pass_to_pass if name not in set(fail_to_pass)]
        return [_Phase(fail_to_pass, False)] + ([_Phase(rest, True)] if rest else [])
    return [_Phase(everything, True)]


async def _run_tests(
    task: SWETask,
    patch_text: str,
    config: RewardConfig,
    network: NetworkPolicy,
    work_root: str | None,
    pristine: PristineTrees | None = None,
    skip_empty: bool = False,
    containers: ContainerGrading | None = None,
) -> GradeResult:
    """Copy, apply, restore protected files, run; ``outcomes`` filled, the reward not yet (``score`` does it)."""
    result = GradeResult(instance_id=task.instance_id, variant=config.variant)
    containerized = in_container(task, config.backend)
    if containerized and containers is None:
        result.error = "sandbox_error"
        result.log_tail = (f"reward.backend={config.backend} grades {task.instance_id} in a container, but this "
                           "grader has no Docker engine (none answered, or grade_patch(containers=None))")
        return result
    if not task.repo_path and not containerized:
        result.error, result.log_tail = "repo_missing", "an image task (no repo_path) needs reward.backend=auto or docker"
        return result
    if task.repo_path and not Path(task.repo_path).exists():
        result.error, result.log_tail = "repo_missing", f"task repository not found: {task.repo_path!r}"
        return result
    prefix = "grade-" + re.sub(r"[^A-Za-z0-9_.-]", "_", task.instance_id)[:60] + "-"
    try:
        tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=prefix, dir=work_root))
    except OSError as exc:
        result.error, result.log_tail = "workdir_error", f"cannot create a working directory: {exc}"
        return result
    held: HeldTree | None = None
    try:
        repo = tmp / "repo"
        try:
            if not task.repo_path:
                assert containers is not None
                await containers.copy_tree(task, repo)
            elif pristine is not None and config.work_tree == "auto" and await asyncio.to_thread(overlay_available):
                # Forked, not copied: a GRPO group's grades share one prepared checkout (sandbox.overlay).
                # Its layers outside the grade's directory, which the test run may write.
                held = await pristine.hold_checkout(task.repo_path, task.base_commit)
                try:
                    await mount_overlay_async(held.path, _layers_dir(tmp), repo)
                except OverlayError:
                    await asyncio.to_thread(held.release)
                    held = None
                    await asyncio.to_thread(shutil.rmtree, repo, True)
                    await pristine.copy_to(task.repo_path, task.base_commit, repo)
            elif pristine is not None:
                await pristine.copy_to(task.repo_path, task.base_commit, repo)
            else:
                await checkout_copy(task.repo_path, task.base_commit, repo)
        except (FileNotFoundError, GitError, ImageTreeError, TreeCopyError) as exc:
            result.error, result.log_tail = "repo_missing", _tail(str(exc))
            return result
        except Exception as exc:  # the engine: no such image, unreachable
            result.error, result.log_tail = "sandbox_error", _tail(f"{type(exc).__name__}: {exc}")
            return result

        if patch_text:
            applied, output = await _apply(repo, patch_text, tmp / "model.patch")
            if not applied:
                result.error, result.log_tail = "patch_apply_failed", _tail(output)
                return result
            result.patch_applied = True
            # From here on the paths are git's, after applying: what the patch text claims does not count.
            # The copy holds the base tree as its only commit (core.gitrepo.checkout_copy): HEAD.
            changes = await applied_changes(repo, "HEAD")
            escaped = [c.path for c in changes if _outside(repo, c.path)]
            if escaped:
                result.error = "path_outside_repo"
                result.log_tail = f"patched paths resolve outside the repository: {escaped}"
                return result
            if config.protect:
                result.removed_test_files = await _restore_protected(repo, "HEAD", changes)
            if skip_empty and len(set(result.removed_test_files)) >= len(changes):
                result.error = "empty_patch"
                result.log_tail = "every change the patch made is to protected files"
                return result
        if task.test_patch.strip():
            applied, output = await _apply(repo, task.test_patch, tmp / "test.patch")
            if not applied:
                result.error, result.log_tail = "test_error", _tail("test_patch did not apply:\n" + output)
                return result

        fail_to_pass, pass_to_pass = list(task.FAIL_TO_PASS), list(task.PASS_TO_PASS)
        if not (fail_to_pass or pass_to_pass):
            result.error, result.log_tail = "test_error", "task lists no FAIL_TO_PASS or PASS_TO_PASS tests"
            return result
        pytest_cmd = PytestCommand.parse(task.test_cmd)
        runner = PytestRun(pytest_cmd, work_root=str(tmp)) if pytest_cmd is not None else None
        home = tmp / "home"
        home.mkdir()
        # This grade's own uid (the process limit counts per uid) owns the grade's copy, and nothing else.
        lease = await asyncio.to_thread(lease_uid, network.spec)
        box: GradeContainer | None = None
        try:
            await asyncio.to_thread(give_to_jail, lease.spec, tmp)
            if containerized:
                assert containers is not None
                try:
                    box = await containers.start(
                        task, repo=repo, home=home, readable=[str(runner.dir)] if runner is not None else [],
                        private_dirs=[str(runner.outcomes_file.parent)] if runner is not None else [])
                except Exception as exc:  # no engine, no image, a start past its limit
                    result.error, result.log_tail = "sandbox_error", _tail(f"{type(exc).__name__}: {exc}")
                    return result
            await _run_phases(result, task, repo, config, network, runner, home, lease.spec, box)
        finally:
            if box is not None:
                await box.remove()
            lease.release()
            if runner is not None:
                await asyncio.to_thread(runner.__exit__)
        return result
    finally:
        # Shielded so a second cancellation cannot skip the cleanup; rmtree
        # runs in a thread because a repo copy can hold many files.
        await asyncio.shield(asyncio.to_thread(_remove_grade_dir, tmp, held))


def _layers_dir(tmp: Path) -> Path:
    """Where a forked grade tree's writable layers go: beside the grade's directory, not in it."""
    return tmp.with_name(tmp.name + ".layers")


def _remove_grade_dir(tmp: Path, held: HeldTree | None) -> None:
    """Detach a forked tree (then let its prepared checkout go) and remove the grade's directories."""
    if held is not None:
        detach(tmp / "repo")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(_layers_dir(tmp), ignore_errors=True)
    if held is not None:
        held.release()


async def _run_phases(
    result: GradeResult, task: SWETask, repo: Path, config: RewardConfig, network: NetworkPolicy,
    runner: PytestRun | None, home: Path, spec: JailSpec, box: GradeContainer | None = None,
) -> None:
    """Run the test phases (``_phases``) and record every listed test's outcome in ``result``
    (in the local jail, or in ``box``, the grade's container)."""
    fail_to_pass = list(task.FAIL_TO_PASS)
    outcomes: dict[str, TestStatus] = {}
    logs: list[str] = []
    not_run: list[str] = []
    phases = _phases(task, config)
    for index, phase in enumerate(phases):
        if index > 0 and not any(outcomes.get(name) in _PASSING for name in fail_to_pass):
            not_run.extend(name for phase_left in phases[index:] for name in phase_left.names)
            break  # partial: no FAIL_TO_PASS test passes, so the reward is 0 whatever PASS_TO_PASS does
        selected = phase.names
        failfast = (_failfast_flag(task.test_cmd),) if phase.stop_at_first_failure else ()
        if runner is not None:
            command = runner.command(selected, failfast)
        else:
            if is_unittest_command(task.test_cmd):
                selected = _unique([unittest_selector(name) for name in selected])
            command = shell_join(" ".join([task.test_cmd, *failfast]), selected)
        env = {**grading_env(task, str(home)), **(runner.env() if runner is not None else {})}
        if box is not None:
            env["PATH"] = box.path_env(task, env["PATH"])
            result.network = "none"  # the container's: no interface but loopback
            run = await box.run(command, env=env, timeout_s=config.timeout_s, spec=spec,
                                outcomes_file=str(runner.outcomes_file) if runner is not None else None)
        else:
            readable = grading_readable(task) + ([str(runner.dir)] if runner is not None else [])
            argv = await asyncio.to_thread(lambda: network.wrap(
                command, writable=[str(repo.parent)], readable=readable, chdir=str(repo), spec=spec))
            result.network = network.effective
            run = await run_command(argv, cwd=repo, env=env, timeout_s=config.timeout_s,
                                    pass_fds=runner.pass_fds() if runner is not None else ())
        logs.append(run.output)
        if runner is not None:
            reported = await asyncio.to_thread(runner.outcomes)
            found = reported.tests
            completed = reported.finished and reported.exit_status in _COMPLETED_RETURNCODES
        else:
            found = parse_test_log(run.output, task.test_cmd)
            completed = run.returncode in _COMPLETED_RETURNCODES
        outcomes.update(found)
        if run.timed_out:
            result.error = "timeout"
            logs.append(f"\n[killed after {config.timeout_s:g} s]")
            break
        if not completed or not found:
            # The session did not end normally (a crash, an interrupted or empty run): whatever
            # status lines exist were not pytest's verdict.
            result.error = "test_error"
            break
        if runner is None and _expects_summary(task.test_cmd) and not has_pytest_summary(run.output):
            result.error = "test_error"
            logs.append("\n[no pytest summary section: the run did not finish]")
            break
        if phase.stop_at_first_failure and any(status in _STOPPING for status in found.values()):
            # Stopped early: the tests the run does not mention never ran.
            not_run.extend(name for name in phase.names if name not in found)
            if index + 1 < len(phases):
                not_run.extend(name for later in phases[index + 1:] for name in later.names)
            break
    listed = set(fail_to_pass) | set(task.PASS_TO_PASS)
    result.outcomes = {name: status.value for name, status in outcomes.items() if name in listed}
    result.not_run = _unique(not_run)
    result.log_tail = _tail("".join(logs))


async def grade_patch(
    task: SWETask,
    model_patch: str,
    *,
    timeout_s: float | None = None,
    work_root: str | None = None,
    skip_empty: bool = False,
    config: RewardConfig | None = None,
    network: NetworkPolicy | None = None,
    cache: GradeCache[GradeResult] | None = None,
    pristine: PristineTrees | None = None,
    reference: dict[str, str] | None = None,
    as_reference: bool = False,
    containers: ContainerGrading | None = None,
) -> GradeResult:
    """Grade ``model_patch`` on a fresh copy of the task repo (see the module docstring).

    Args:
        task: the task; needs ``repo_path``, ``base_commit``, ``test_patch``,
            ``test_cmd`` (pytest, or ``python -m unittest``) and
            FAIL_TO_PASS/PASS_TO_PASS names.
        model_patch: a unified diff (``git diff`` style) against ``base_commit``.
        timeout_s: wall-clock limit in seconds for the test command; None =
            ``config.timeout_s`` (300 s by default).
        work_root: directory for the temporary copy (default: the system temp dir).
        skip_empty: when the patch is empty after filtering, return error
            "empty_patch" without running the tests. By default the tests run
            anyway, which is how task validation checks that FAIL_TO_PASS fails
            at ``base_commit``.
        config: reward settings; None = ``FULL_RUN`` (every test's outcome, no fail-fast).
        network: the network policy to use (one per grader, so the namespace
            probe runs once); None = a new ``NetworkPolicy(config.network)``.
        cache: share grades of identical filtered patches of the same instance
            (``reward.cache``); use one cache per (config, task set).
        pristine: copy the repository from prepared checkouts
            (``core.pristine``) instead of cloning it for this grade; the
            grade's tree is the same either way.
        reference: the reference patch's outcomes of the listed tests (its
            ``GradeResult.outcomes``): a test ending XFAIL/XPASS/SKIPPED passes only
            when the reference's ends the same way. None: such a test fails and
            ``needs_reference`` is set.
        as_reference: ``model_patch`` is the reference itself (task validation):
            its own outcomes are the reference.
        containers: the Docker engine for grades ``config.backend`` puts in a container
            (``reward.container``; image tasks under ``auto``); None: such a grade ends
            with error ``sandbox_error``.

    Returns:
        A ``GradeResult``. Bad patches, missing repositories, timeouts (the test
        run's ``config.timeout_s``; the whole copy + apply + test run's
        ``config.grade_timeout_s``, error ``grade_timeout``) and test crashes
        are reported through ``GradeResult.error``, never raised. The
        temporary copy is removed in every case, cancellation included; on
        timeout or cancellation the test command's process group is killed.

    Raises:
        asyncio.CancelledError: propagated after cleanup.
    """
    start = time.monotonic()
    config = config or FULL_RUN
    if timeout_s is not None and timeout_s != config.timeout_s:
        config = RewardConfig(**{**asdict(config), "timeout_s": float(timeout_s)})
    network = network or grading_policy(config)
    result = GradeResult(instance_id=task.instance_id, variant=config.variant)

    def finish(res: GradeResult) -> GradeResult:
        res.duration_s = time.monotonic() - start
        return res

    if config.variant == "similarity":
        # The size limit still applies: SequenceMatcher is quadratic in the worst case.
        size = len(model_patch.encode("utf-8", errors="replace"))
        if size > config.max_patch_bytes:
            result.error = "patch_too_large"
            result.log_tail = f"patch is {size} bytes, over the limit of {config.max_patch_bytes} bytes"
            return finish(result)
        result.similarity = patch_similarity(model_patch, task.patch)
        result.reward = result.similarity
        if result.similarity == UNPARSABLE_SIMILARITY:
            result.error = "patch_parse_error"
        elif not model_patch.strip():
            result.error = "empty_patch"
        return finish(result)

    try:
        check_patch(model_patch, max_bytes=config.max_patch_bytes, allow_binary=config.allow_binary)
    except PatchError as exc:
        result.error, result.log_tail = exc.error_class, _tail(str(exc))  # type: ignore[assignment]
        return finish(result)
    patch_text = model_patch if model_patch.strip() else ""
    if skip_empty and not patch_text:
        result.error = "empty_patch"
        return finish(result)

    async def compute() -> GradeResult:
        try:
            graded = await asyncio.wait_for(
                _run_tests(task, patch_text, config, network, work_root, pristine, skip_empty, containers),
                config.grade_timeout_s,
            )
        except TimeoutError:
            # wait_for cancelled the grade: its test process group is killed and its copy removed.
            graded = GradeResult(instance_id=task.instance_id, variant=config.variant, error="grade_timeout")
            graded.log_tail = f"grade (copy + apply + tests) stopped after {config.grade_timeout_s:g} s"
        score(graded, task, config.variant, dict(graded.outcomes) if as_reference else reference)
        return graded

    if cache is None:
        graded, shared = await compute(), False
    else:
        key = cache_key(task.instance_id, normalize_patch(patch_text))
        graded, shared = await cache.get_or_compute(key, compute)
        graded = copy.deepcopy(graded)  # callers may mutate their result
    graded.cached = shared
    return finish(graded)
