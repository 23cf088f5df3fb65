"""A package's clean source tree, its virtualenv, and its test runs (``--mode smith``).

Layout under ``<out>/packages/<slug>/``:

    dist/          the sdist as ``pip download --no-deps --no-binary :all:`` fetched it
    clean/         the unpacked sdist: the clean code, never modified after unpacking
    work/          a scratch copy the mutations are tried in (re-made on every run)
    venv/          the package's virtualenv: pytest, coverage, its dependencies and
                   test dependencies, but NOT the package itself (the tests import the
                   repository copy, so no clean copy of the code sits in site-packages)
    coverage.json  per-line coverage with one context per test (``coverage json --show-contexts``)

Every command runs through ``core.process.run_command`` (async, own process
group, killed at its timeout).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from prepare.smith_packages import PackageSpec
from core.task import DEFAULT_TEST_CMD
from reward.test_log import TestStatus, parse_pytest_log
from core.process import CommandResult, run_command

# Named timeouts (seconds).
DOWNLOAD_TIMEOUT_S = 300.0  # pip download of one sdist (builds its metadata)
INSTALL_TIMEOUT_S = 600.0  # venv creation + pip install of test tools and dependencies
BASELINE_TIMEOUT_S = 600.0  # one full clean run of a package's test suite

TEST_TOOLS = ("pytest==9.2.0", "coverage==7.17.3")
PASSING = frozenset({TestStatus.PASSED, TestStatus.XFAIL})
_COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".coverage*", ".tox", ".git")

# A pytest plugin that names the coverage context after the running test's node id,
# so coverage.json says which tests execute each line (lines run during collection,
# e.g. at import, get the empty context).
_COVERAGE_PLUGIN = '''
import coverage
import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cov = coverage.Coverage.current()
    if cov is not None:
        cov.switch_context(item.nodeid)
    yield
    if cov is not None:
        cov.switch_context("")
'''


class PackageError(RuntimeError):
    """A package cannot be used; ``stage`` is download, unpack, install or baseline."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass
class PackageEnv:
    """Paths of one prepared package (see the module docstring)."""

    spec: PackageSpec
    root: Path

    @property
    def clean(self) -> Path:
        return self.root / "clean"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def env_bin(self) -> Path:
        if not self.spec.isolated_env:
            return Path(sys.executable).parent
        return self.venv / "bin"

    @property
    def coverage_json(self) -> Path:
        return self.root / "coverage.json"

    def test_cmd(self) -> str:
        """The shell command prefix that runs this package's tests in a repo copy (node ids follow).

        ``--rootdir=.`` keeps node ids relative to the repository root whatever
        paths are passed; ``-o addopts=`` drops the package's own addopts (coverage,
        doctest or xdist flags that need plugins this environment does not load).
        """
        prefix = f"PYTHONPATH={shlex.quote(self.spec.pythonpath)} " if self.spec.pythonpath else ""
        extra = " ".join(shlex.quote(a) for a in self.spec.pytest_args)
        cmd = f"{prefix}{DEFAULT_TEST_CMD} --rootdir=. -o addopts= --tb=short -W ignore::DeprecationWarning"
        return f"{cmd} {extra}".rstrip()


def run_env(env_bin: Path) -> dict[str, str]:
    """Environment for a package's test runs: its venv first on PATH, no outer pytest/Python settings."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(env_bin), env.get("PATH", "")])
    # No .pyc files: a same-size mutation written within one second of the
    # original could otherwise be served from a stale cache.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PY_COLORS"] = "0"
    env["NO_COLOR"] = "1"
    for key in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTHONPATH", "PYTEST_CURRENT_TEST", "VIRTUAL_ENV", "COVERAGE_PROCESS_START"):
        env.pop(key, None)
    return env


async def _checked(stage: str, argv: list[str] | str, *, timeout_s: float, **kwargs) -> CommandResult:
    result = await run_command(argv, timeout_s=timeout_s, **kwargs)
    if result.timed_out:
        raise PackageError(stage, f"timed out after {timeout_s:g} s: {shlex.join(argv) if isinstance(argv, list) else argv}")
    if result.returncode != 0:
        tail = result.output.strip().splitlines()[-5:]
        raise PackageError(stage, f"exit {result.returncode}: " + " | ".join(tail))
    return result


async def download_sdist(spec: PackageSpec, dest: Path) -> Path:
    """The package's sdist in ``dest`` (downloaded with pip unless already there, or ``spec.local_path``).

    Raises:
        PackageError: ("download") pip failed or fetched no archive.
    """
    if spec.local_path:
        return Path(spec.local_path)
    archives = sorted(p for p in dest.glob("*") if p.suffix in (".gz", ".zip", ".bz2"))
    if archives:
        return archives[0]
    dest.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(dest), spec.requirement]
    await _checked("download", argv, timeout_s=DOWNLOAD_TIMEOUT_S)
    archives = sorted(p for p in dest.glob("*") if p.suffix in (".gz", ".zip", ".bz2"))
    if not archives:
        raise PackageError("download", f"pip fetched no sdist for {spec.requirement}")
    return archives[0]


def unpack(archive: Path, dest: Path) -> None:
    """Unpack an sdist (or copy a directory) so that ``dest`` is its top-level project directory.

    Raises:
        PackageError: ("unpack") unknown archive type or not a single top-level directory.
    """
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    if archive.is_dir():
        shutil.copytree(archive, dest, ignore=_COPY_IGNORE)
        return
    tmp.mkdir(parents=True)
    if archive.name.endswith((".tar.gz", ".tgz", ".tar.bz2")):
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
    elif archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
    else:
        raise PackageError("unpack", f"unknown archive type: {archive.name}")
    tops = list(tmp.iterdir())
    if len(tops) != 1 or not tops[0].is_dir():
        raise PackageError("unpack", f"{archive.name} does not hold one top-level directory")
    tops[0].rename(dest)
    shutil.rmtree(tmp, ignore_errors=True)


def check_tests_shipped(pkg: PackageEnv) -> None:
    """Raise ``PackageError("unpack")`` when a configured test path is missing from the sdist."""
    missing = [p for p in pkg.spec.test_paths if not (pkg.clean / p).exists()]
    if missing or not pkg.spec.test_paths:
        raise PackageError("unpack", f"the sdist ships no tests at {missing or pkg.spec.test_paths}")


def fresh_work_copy(pkg: PackageEnv) -> None:
    """Replace ``work/`` with a copy of ``clean/`` (undoes a mutation an interrupted run left)."""
    shutil.rmtree(pkg.work, ignore_errors=True)
    shutil.copytree(pkg.clean, pkg.work, ignore=_COPY_IGNORE)


async def create_venv(pkg: PackageEnv) -> None:
    """Make ``venv/`` with pytest, coverage, the test deps and the package's dependencies.

    The package is installed (from ``clean/``) only to resolve its dependencies and
    then uninstalled. A ``venv/.ready`` marker makes a finished venv reused.

    Raises:
        PackageError: ("install") venv creation or a pip install failed.
    """
    ready = pkg.venv / ".ready"
    if ready.exists() or not pkg.spec.isolated_env:
        return
    shutil.rmtree(pkg.venv, ignore_errors=True)
    await _checked("install", [sys.executable, "-m", "venv", str(pkg.venv)], timeout_s=INSTALL_TIMEOUT_S)
    pip = [str(pkg.env_bin / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    await _checked("install", [*pip, *TEST_TOOLS, *pkg.spec.test_deps], timeout_s=INSTALL_TIMEOUT_S, env=run_env(pkg.env_bin))
    if pkg.spec.install_deps:
        await _checked("install", [*pip, str(pkg.clean)], timeout_s=INSTALL_TIMEOUT_S, env=run_env(pkg.env_bin))
        uninstall = [str(pkg.env_bin / "python"), "-m", "pip", "uninstall", "-y", "-q", pkg.spec.name]
        await _checked("install", uninstall, timeout_s=INSTALL_TIMEOUT_S, env=run_env(pkg.env_bin))
    ready.write_text("ok\n")


async def check_import_location(pkg: PackageEnv) -> None:
    """The tests must import the repository copy, or mutations would go unseen.

    Raises:
        PackageError: ("baseline") the module imports from elsewhere or not at all.
    """
    prefix = f"PYTHONPATH={shlex.quote(pkg.spec.pythonpath)} " if pkg.spec.pythonpath else ""
    code = f"import {pkg.spec.module} as m, os; print(os.path.realpath(m.__file__))"
    result = await run_command(f"{prefix}python -c {shlex.quote(code)}", cwd=pkg.work, env=run_env(pkg.env_bin), timeout_s=60)
    where = result.output.strip().splitlines()[-1:] or [""]
    if result.returncode != 0 or not where[0].startswith(str(pkg.work.resolve())):
        raise PackageError("baseline", f"`import {pkg.spec.module}` does not load the repository copy: {result.output.strip()[-300:]}")


async def run_tests(pkg: PackageEnv, targets: list[str], *, timeout_s: float) -> CommandResult:
    """Run the package's test command on ``targets`` (paths or node ids) in ``work/``."""
    command = pkg.test_cmd() + " " + " ".join(shlex.quote(t) for t in targets)
    return await run_command(command, cwd=pkg.work, env=run_env(pkg.env_bin), timeout_s=timeout_s)


async def run_tests_with_coverage(pkg: PackageEnv, *, timeout_s: float) -> CommandResult:
    """One clean run of the whole suite under coverage, one context per test; writes ``coverage.json``.

    Raises:
        PackageError: ("baseline") coverage could not write its report.
    """
    plugin_dir = pkg.root / "plugin"
    plugin_dir.mkdir(exist_ok=True)
    (plugin_dir / "smith_cov_context.py").write_text(_COVERAGE_PLUGIN)
    data_file = pkg.root / ".coverage"
    rc = pkg.root / "coveragerc"
    # ``include`` patterns, not ``source``: source takes packages and directories only,
    # and a single-module distribution (six.py) is a file.
    patterns = []
    for rel in source_paths(pkg):
        path = (pkg.work / rel).resolve()
        patterns.append(f"{path}/*" if path.is_dir() else str(path))
    rc.write_text("[run]\ndata_file = " + str(data_file) + "\ninclude =\n" + "".join(f"    {p}\n" for p in patterns))
    pythonpath = os.pathsep.join([str(plugin_dir)] + ([pkg.spec.pythonpath] if pkg.spec.pythonpath else []))
    base = pkg.test_cmd().split("python -m pytest", 1)[1]
    extra_env = f"PYTHONPATH={shlex.quote(pythonpath)} PYTEST_DISABLE_PLUGIN_AUTOLOAD=1"
    command = (
        f"{extra_env} python -m coverage run --rcfile={shlex.quote(str(rc))} -m pytest -p smith_cov_context{base} "
        + " ".join(shlex.quote(t) for t in pkg.spec.test_paths)
    )
    result = await run_command(command, cwd=pkg.work, env=run_env(pkg.env_bin), timeout_s=timeout_s)
    if result.timed_out:
        raise PackageError("baseline", f"coverage run timed out after {timeout_s:g} s")
    report = f"python -m coverage json --rcfile={shlex.quote(str(rc))} --show-contexts -q -o {shlex.quote(str(pkg.coverage_json))}"
    await _checked("baseline", report, timeout_s=300, cwd=pkg.work, env=run_env(pkg.env_bin))
    return result


def source_paths(pkg: PackageEnv) -> list[str]:
    """Repository-relative paths to mutate (``spec.source_dirs`` or the import package/module).

    Raises:
        PackageError: ("unpack") none of them exists in the sdist.
    """
    if pkg.spec.source_dirs:
        candidates = list(pkg.spec.source_dirs)
    else:
        base = Path(pkg.spec.pythonpath) if pkg.spec.pythonpath else Path()
        candidates = [str(base / pkg.spec.module), str(base / f"{pkg.spec.module}.py")]
    found = [c for c in candidates if (pkg.clean / c).exists()]
    if not found:
        raise PackageError("unpack", f"no source to mutate at {candidates}")
    return found


def load_line_contexts(pkg: PackageEnv) -> dict[str, dict[int, list[str]]]:
    """``{repo-relative file: {line: [test node ids or "" for import time]}}`` from ``coverage.json``."""
    data = json.loads(pkg.coverage_json.read_text())
    work = str(pkg.work.resolve())
    out: dict[str, dict[int, list[str]]] = {}
    for name, info in data.get("files", {}).items():
        path = name if not os.path.isabs(name) else os.path.relpath(name, work)
        contexts = info.get("contexts", {})
        out[path] = {int(line): list(ctxs) for line, ctxs in contexts.items()}
    return out


def outcomes_of(result: CommandResult) -> dict[str, TestStatus]:
    """Per-test outcomes of a run (``reward.test_log.parse_pytest_log``), real node ids only.

    The parser also records SWE-bench's whitespace-split alias of a parametrized id
    with spaces (``t[a b]`` -> ``t[a``); such an alias is not a node id pytest can
    select, so it is left out here.
    """
    outcomes = parse_pytest_log(result.output)
    return {k: v for k, v in outcomes.items() if "[" not in k or k.endswith("]")}
