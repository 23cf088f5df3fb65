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
  a file in a private directory, never from the log: a forged summary at exit, a skip
  reason holding ``PASSED <node id>``, or any other text cannot pose as a result.

Commands of other shapes (``python -m unittest``, scripts) keep the log parsers of
``reward.test_log``.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from reward.test_log import TestStatus

RUNNER_DIR = Path(__file__).resolve().parent / "runner"
LAUNCHER = "swe_rl_pytest.py"
PLUGIN = "swe_rl_outcomes.py"
OUTCOMES_ENV = "SWE_RL_OUTCOMES_FILE"
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
    def read(cls, path: Path) -> Outcomes:
        """Parse the plugin's file; unreadable lines are ignored (a crash may cut the last one)."""
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
            if "test" in record and record.get("outcome") in TestStatus.__members__:
                result.tests[str(record["test"])] = TestStatus(record["outcome"])
            elif "collect_error" in record:
                result.collect_errors.append(str(record["collect_error"]))
            elif "finished" in record:
                result.finished, result.exit_status = True, int(record["finished"])
        return result


class PytestRun:
    """One grading run's private runner directory (outside the repository copy); a context manager.

    ``command(names)`` is the shell command to run in the repository copy;
    ``outcomes()`` reads what the plugin wrote. The directory is removed on exit.
    """

    def __init__(self, parsed: PytestCommand, *, work_root: str | None = None) -> None:
        self.parsed = parsed
        self.dir = Path(tempfile.mkdtemp(prefix="grader-runner-", dir=work_root))
        self.dir.chmod(0o700)
        for name in (LAUNCHER, PLUGIN):
            shutil.copyfile(RUNNER_DIR / name, self.dir / name)
        self.outcomes_file = self.dir / f"outcomes-{self.dir.name}.jsonl"

    def __enter__(self) -> PytestRun:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def command(self, names: list[str], extra_args: tuple[str, ...] = ()) -> str:
        """The shell command running ``names`` (node ids) with the task's environment and arguments."""
        self.outcomes_file.unlink(missing_ok=True)
        args = list(self.parsed.args) + list(extra_args)
        if "no:cacheprovider" not in args:
            args += ["-p", "no:cacheprovider"]
        env = [*self.parsed.env, "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1", f"{OUTCOMES_ENV}={self.outcomes_file}"]
        return " ".join([*map(_quote_assignment, env), shlex.join(["python", str(self.dir / LAUNCHER), *args, *names])])

    def outcomes(self) -> Outcomes:
        return Outcomes.read(self.outcomes_file)


def _quote_assignment(assignment: str) -> str:
    name, _, value = assignment.partition("=")
    return f"{name}={shlex.quote(value)}"
