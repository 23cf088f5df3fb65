"""How the grader runs a task's pytest command, and reads outcomes the tested code cannot write.

A task's ``test_cmd`` (``[VAR=value ...] python -m pytest ARGS`` or ``pytest ARGS``)
is kept for its environment and pytest arguments, but the run itself is the
grader's (``PytestRun.command``):

- pytest starts through ``reward/runner/swe_rl_pytest.py``, from a directory outside
  the repository copy, so nothing in the repository can stand in for pytest, its
  start-up imports or the outcome plugin (``python -m pytest`` would import them from
  the working directory first);
- ``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1`` and ``-p no:cacheprovider`` always, whatever the
  command says (an entry point in a ``*.dist-info`` the patch added would otherwise load
  as a plugin);
- outcomes come from the grader's plugin (``reward/runner/swe_rl_outcomes.py``) through
  an inherited file descriptor of a file in a root-only directory outside the jail's view,
  each record carrying a per-run nonce, never from the log: a forged summary at exit, a
  skip reason holding ``PASSED <node id>``, or any other text cannot pose as a result, and
  no path the tested code can open leads to the file. The launcher and plugin live in a
  directory the jail sees read-only, so one test run cannot rewrite them for the next.

Commands of other shapes (``python -m unittest``, scripts) keep the log parsers of
``reward.test_log``.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from reward.test_log import TestStatus

RUNNER_DIR = Path(__file__).resolve().parent / "runner"
LAUNCHER = "swe_rl_pytest.py"
PLUGIN = "swe_rl_outcomes.py"
OUTCOMES_FD_ENV = "SWE_RL_OUTCOMES_FD"
NONCE_ENV = "SWE_RL_OUTCOMES_NONCE"
_PYTHONS = frozenset({"python", "python3"})
_PYTESTS = frozenset({"pytest", "py.test"})


@dataclass(frozen=True)
class PytestCommand:
    """A ``test_cmd`` split into its environment assignments and pytest arguments."""

    env: tuple[str, ...]
    args: tuple[str, ...]

    @classmethod
    def parse(cls, test_cmd: str) -> PytestCommand | None:
        """The command's parts, or None when it does not run pytest (``python -m pytest`` / ``pytest``)."""
        try:
            tokens = shlex.split(test_cmd)
        except ValueError:
            return None
        env = []
        while tokens and "=" in tokens[0] and tokens[0].split("=", 1)[0].isidentifier():
            env.append(tokens.pop(0))
        if len(tokens) >= 3 and Path(tokens[0]).name in _PYTHONS and tokens[1:3] == ["-m", "pytest"]:
            return cls(tuple(env), tuple(tokens[3:]))
        if tokens and Path(tokens[0]).name in _PYTESTS:
            return cls(tuple(env), tuple(tokens[1:]))
        return None


@dataclass
class Outcomes:
    """What the outcome plugin reported for one run.

    Attributes:
        tests: node id -> final status.
        collect_errors: node ids of modules or packages that failed to import.
        finished: the session ended normally (pytest's exit status in ``exit_status``).
    """

    tests: dict[str, TestStatus] = field(default_factory=dict)
    collect_errors: list[str] = field(default_factory=list)
    finished: bool = False
    exit_status: int | None = None

    @classmethod
    def read(cls, path: Path, nonce: str | None = None) -> Outcomes:
        """Parse the plugin's file; unreadable lines are ignored (a crash may cut the last one).

        With ``nonce``, records without it are ignored, and so is everything after the first
        ``finished`` record (code running at exit cannot add outcomes).
        """
        result = cls()
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return result
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            if nonce is not None and record.get("nonce") != nonce:
                continue
            if "test" in record and record.get("outcome") in TestStatus.__members__:
                result.tests[str(record["test"])] = TestStatus(record["outcome"])
            elif "collect_error" in record:
                result.collect_errors.append(str(record["collect_error"]))
            elif "finished" in record:
                result.finished, result.exit_status = True, int(record["finished"])
                if nonce is not None:
                    break
        return result


class PytestRun:
    """One grading run's runner files and outcome channel; a context manager.

    ``dir`` (launcher and plugin, root-owned, read-only to the jail: bind it with ``readable``)
    and a private directory holding the outcomes file (never bound into the jail) live in the
    system temp dir, outside the repository copy the test run may write. ``command(names)`` is
    the shell command to run in the copy, ``env()`` and ``pass_fds()`` what its process needs;
    ``outcomes()`` reads what the plugin wrote. Both directories are removed on exit.
    """

    def __init__(self, parsed: PytestCommand, *, work_root: str | None = None) -> None:
        self.parsed = parsed
        self.dir = Path(tempfile.mkdtemp(prefix="grader-runner-"))
        self._private = Path(tempfile.mkdtemp(prefix="grader-outcomes-"))
        self._private.chmod(0o700)
        for name in (LAUNCHER, PLUGIN):
            shutil.copyfile(RUNNER_DIR / name, self.dir / name)
            (self.dir / name).chmod(0o644)
        self.dir.chmod(0o755)
        self.outcomes_file = self._private / "outcomes.jsonl"
        self.nonce = secrets.token_hex(16)
        self._fd: int | None = None

    def __enter__(self) -> PytestRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self._private, ignore_errors=True)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def command(self, names: list[str], extra_args: tuple[str, ...] = ()) -> str:
        """The shell command running ``names`` (node ids) with the task's environment and arguments.

        Opens a fresh outcomes file for this run (its descriptor: ``pass_fds()``).
        """
        self._close()
        self._fd = os.open(self.outcomes_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        args = list(self.parsed.args) + list(extra_args)
        if "no:cacheprovider" not in args:
            args += ["-p", "no:cacheprovider"]
        env = [*self.parsed.env, "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1"]
        return " ".join([*map(_quote_assignment, env), shlex.join(["python", str(self.dir / LAUNCHER), *args, *names])])

    def env(self) -> dict[str, str]:
        """Variables the plugin reads (and removes from its environment) at import."""
        return {OUTCOMES_FD_ENV: str(self._fd), NONCE_ENV: self.nonce}

    def pass_fds(self) -> tuple[int, ...]:
        """The descriptor the plugin writes outcomes to (``command`` must have been called)."""
        return () if self._fd is None else (self._fd,)

    def outcomes(self) -> Outcomes:
        self._close()
        return Outcomes.read(self.outcomes_file, self.nonce)


def _quote_assignment(assignment: str) -> str:
    name, _, value = assignment.partition("=")
    return f"{name}={shlex.quote(value)}"
