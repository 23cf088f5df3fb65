"""The task record shared by data preparation, sandboxes, the agent loop and the reward.

A task is a SWE-bench instance (field names and meanings as in SWE-bench's
``princeton-nlp/SWE-bench`` dataset card) plus what this project needs to run it
without a Docker engine: where the task's git repository lives on disk and which
command runs its tests.

Storage formats:
- ``tasks.jsonl``: one ``SWETask.model_dump_json()`` per line, FAIL_TO_PASS and
  PASS_TO_PASS as JSON lists (SWE-bench's own files store them as JSON-encoded
  strings; ``SWETask`` accepts both).
- parquet ``extra_info``: every field as a string (lists JSON-encoded), so the
  column keeps one schema across rows; ``SWETask.from_extra_info`` reverses it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Pytest run with no cache dir (the sandbox must stay clean) and -rA so every
# test's outcome appears in the short summary, which the log parser reads.
# Plugin autoloading is off: the tasks need none, and the plugins of the
# environment pytest runs in (hydra, pytest-asyncio) cost ~0.8 s per run and
# print warnings into the test output.
DEFAULT_TEST_CMD = "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python -m pytest -p no:cacheprovider -rA -q"


class SWETask(BaseModel):
    """One software-engineering task in SWE-bench's instance format.

    Fields follow SWE-bench: ``patch`` is the reference fix (non-test files only),
    ``test_patch`` adds or changes the hidden tests, FAIL_TO_PASS are tests that
    fail at ``base_commit`` and pass with ``patch``, PASS_TO_PASS pass in both.
    Test names are pytest node ids relative to the repository root
    (``tests/test_x.py::test_y``).

    ``repo_path`` is a local git repository whose ``base_commit`` holds the buggy
    code and the visible tests but not the hidden ones; ``image_name`` names a
    Docker image for the Docker sandbox (SWE-bench-style datasets). A task with an
    image runs in it (``runs_in_image``): its work tree is mounted at the image's
    ``/testbed`` and its ``env_bin`` is a directory inside the image; without a
    ``repo_path`` the tree itself comes from the image's ``/testbed``
    (``sandbox.image_tree``).
    """

    model_config = ConfigDict(extra="ignore")

    instance_id: str
    repo: str
    base_commit: str
    problem_statement: str
    patch: str = ""
    test_patch: str = ""
    FAIL_TO_PASS: list[str] = Field(default_factory=list)
    PASS_TO_PASS: list[str] = Field(default_factory=list)
    version: str = ""
    created_at: str = ""
    environment_setup_commit: str = ""
    hints_text: str = ""
    # Our additions (not in SWE-bench):
    repo_path: str | None = None
    image_name: str | None = None
    test_cmd: str = DEFAULT_TEST_CMD
    # Directory put first on PATH for the agent's commands and the grader's test run
    # (e.g. the bin/ of a per-package virtualenv); None = this interpreter's directory
    # (an image task: a directory inside the image; None = the image's PATH).
    env_bin: str | None = None
    data_source: str = "swe_simple"
    bug_kind: str = ""

    @field_validator("FAIL_TO_PASS", "PASS_TO_PASS", mode="before")
    @classmethod
    def _decode_json_list(cls, value: Any) -> Any:
        # SWE-bench stores these as JSON-encoded strings.
        if isinstance(value, str):
            return json.loads(value) if value.strip() else []
        return value

    @property
    def runs_in_image(self) -> bool:
        """True when the task's environment is an image (``image_name`` set, or no ``repo_path``:
        SWE-bench's image named from the instance id), not the host's ``env_bin``."""
        return bool(self.image_name) or not self.repo_path

    @property
    def host_python(self) -> str:
        """The host interpreter the task's ``python`` is: ``env_bin/python``, else this process's."""
        return os.path.join(self.env_bin, "python") if self.env_bin else sys.executable

    def to_extra_info(self) -> dict[str, str]:
        """All fields as strings (lists JSON-encoded) for a parquet ``extra_info`` column."""
        out: dict[str, str] = {}
        for key, value in self.model_dump().items():
            if isinstance(value, list):
                out[key] = json.dumps(value)
            else:
                out[key] = "" if value is None else str(value)
        return out

    @classmethod
    def from_extra_info(cls, extra_info: dict[str, Any]) -> SWETask:
        """Rebuild a task from a parquet ``extra_info`` dict (inverse of ``to_extra_info``).

        Raises:
            pydantic.ValidationError: a required field is missing or malformed.
        """
        data = {k: v for k, v in dict(extra_info).items() if v is not None}
        for key in ("repo_path", "image_name", "env_bin"):
            if data.get(key) == "":
                data[key] = None
        return cls.model_validate(data)


def task_path_env(task: SWETask, base: dict[str, str]) -> dict[str, str]:
    """``base`` with the task's Python first on PATH (``task.env_bin``, else this interpreter's bin dir).

    The agent's ``python``/``pytest`` and the grader's must be the same interpreter.
    """
    import os
    import sys

    first = task.env_bin or os.path.dirname(sys.executable)
    return {**base, "PATH": os.pathsep.join([first, base.get("PATH", "")])}


def load_tasks(path: str) -> list[SWETask]:
    """Read a ``tasks.jsonl`` file (one SWE-bench instance per line).

    Raises:
        ValueError: a line is not valid JSON or not a valid instance; the message
            names the line number.
    """
    tasks = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                tasks.append(SWETask.model_validate_json(line))
            except Exception as exc:  # pydantic.ValidationError or JSON error
                raise ValueError(f"{path}:{lineno}: invalid task: {exc}") from exc
    return tasks
