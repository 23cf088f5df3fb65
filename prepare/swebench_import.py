"""``--mode swebench``: SWE-bench-format instance rows -> ``SWETask`` (then our parquet).

Accepted rows: SWE-bench / SWE-bench Verified / SWE-Gym (``princeton-nlp/SWE-bench``
field names), SWE-smith (the same plus ``image_name``), and exports that use
R2E-Gym's names for the same things (``repo_name``, ``commit_hash``,
``docker_image``). ``FAIL_TO_PASS``/``PASS_TO_PASS`` may be JSON-encoded strings,
as in SWE-bench's files, or lists.

The Docker image is kept in ``image_name``: the row's own (``image_name`` or
``docker_image``), else SWE-bench's harness name for the instance
(``swebench/sweb.eval.x86_64.<id with "__" as "_1776_">:latest``, the naming of
``swebench.harness.test_spec`` images pushed to Docker Hub). Rows are converted,
not run here; they run through the Docker path (``swe_agent.sandbox.backend=docker``,
grading in a fresh container: ``reward.container``) wherever their image is on the
engine (pulled where a registry is reachable; ``docker image ls`` here). ``env_bin``
is a directory inside the image: the row's, else SWE-bench's conda env for its images.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.task import SWETask

REQUIRED = ("instance_id", "repo", "base_commit", "problem_statement", "patch", "FAIL_TO_PASS", "PASS_TO_PASS")
# Other exports' names for SWE-bench fields.
ALIASES = {"repo_name": "repo", "commit_hash": "base_commit", "docker_image": "image_name"}
SWEBENCH_IMAGE_NAMESPACE = "swebench"
SWEBENCH_IMAGE_ARCH = "x86_64"
# SWE-bench's images install each instance's environment as the conda env ``testbed``
# (swebench.harness: ``source /opt/miniconda3/bin/activate && conda activate testbed``); the
# image's own PATH leads to conda's base interpreter instead.
SWEBENCH_ENV_BIN = "/opt/miniconda3/envs/testbed/bin"


def swebench_image_name(instance_id: str, *, namespace: str = SWEBENCH_IMAGE_NAMESPACE, arch: str = SWEBENCH_IMAGE_ARCH) -> str:
    """SWE-bench's instance image name: ``<namespace>/sweb.eval.<arch>.<id>:latest``.

    Docker Hub repository names cannot hold ``__``, so SWE-bench's published images
    spell it ``_1776_`` (``django__django-11099`` -> ``django_1776_django-11099``).
    """
    name = instance_id.lower().replace("__", "_1776_")
    return f"{namespace}/sweb.eval.{arch}.{name}:latest"


def convert_row(row: dict[str, Any], *, data_source: str) -> SWETask:
    """One instance row -> ``SWETask`` (``repo_path`` None, ``image_name`` set).

    Raises:
        ValueError: a required field is missing or empty (the message names it),
            or a field has the wrong type.
    """
    data = dict(row)
    for alias, name in ALIASES.items():
        if alias in data and not data.get(name):
            data[name] = data[alias]
    missing = [key for key in REQUIRED if data.get(key) in (None, "")]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    if not data.get("image_name"):
        data["image_name"] = swebench_image_name(str(data["instance_id"]))
    data["data_source"] = data_source
    data["repo_path"] = None
    # An image task's env_bin is a directory inside its image: the row's, else SWE-bench's conda env.
    if not data.get("env_bin"):
        data["env_bin"] = SWEBENCH_ENV_BIN if "/sweb.eval." in str(data["image_name"]) else None
    # Every string field of SWETask must be a string (SWE-bench's version is sometimes a float).
    for key in ("version", "created_at", "environment_setup_commit", "hints_text", "test_patch"):
        if key in data and data[key] is not None and not isinstance(data[key], str):
            data[key] = str(data[key])
        if data.get(key) is None:
            data.pop(key, None)
    try:
        task = SWETask.model_validate(data)
    except (ValidationError, json.JSONDecodeError) as exc:
        raise ValueError(str(exc).splitlines()[0] if isinstance(exc, json.JSONDecodeError) else _first_error(exc)) from exc
    if not task.FAIL_TO_PASS:
        raise ValueError("FAIL_TO_PASS is empty")
    return task


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err.get("loc", ()))
    return f"field {where}: {err.get('msg')}"


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{path}:{lineno}", ValueError(f"not valid JSON ({exc.msg})")
                continue
            if not isinstance(row, dict):
                yield f"{path}:{lineno}", ValueError("not a JSON object")
                continue
            yield f"{path}:{lineno}", row


def _hub_rows(name: str, split: str) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    try:
        import datasets

        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure becomes one clear error
        raise RuntimeError(
            f"cannot load {name!r} (split {split!r}) from the Hugging Face hub: {type(exc).__name__}: {exc}. "
            "Without hub access, export the rows to a JSONL file and pass its path to --input."
        ) from exc
    for index, row in enumerate(dataset):
        yield f"{name}[{split}]#{index}", dict(row)


def convert_rows(
    rows: Iterable[tuple[str, dict[str, Any] | Exception]], *, data_source: str
) -> tuple[list[SWETask], list[str]]:
    """Convert located rows; returns (tasks, problems), a problem being ``"<where>: <reason>"``.

    A row with a missing field, a bad value or a duplicate ``instance_id`` is a
    problem and is skipped; the rest are converted.
    """
    tasks: list[SWETask] = []
    problems: list[str] = []
    seen: set[str] = set()
    for where, row in rows:
        if isinstance(row, Exception):
            problems.append(f"{where}: {row}")
            continue
        try:
            task = convert_row(row, data_source=data_source)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if task.instance_id in seen:
            problems.append(f"{where}: duplicate instance_id {task.instance_id}")
            continue
        seen.add(task.instance_id)
        tasks.append(task)
    return tasks, problems


def load_instances(source: str, *, data_source: str = "swe_bench", split: str = "test") -> tuple[list[SWETask], list[str]]:
    """Tasks from a JSONL file (one instance per line) or, if ``source`` is no file, a hub dataset name.

    Returns:
        (tasks, problems): see ``convert_rows``; problems name the file and line.

    Raises:
        FileNotFoundError: ``source`` looks like a file path but does not exist.
        RuntimeError: ``source`` is not a file and the hub dataset cannot be loaded
            (no network here), with a message saying so.
    """
    path = Path(source)
    if not path.is_file() and (path.suffix in (".jsonl", ".json") or source.startswith((".", "/"))):
        raise FileNotFoundError(f"no such file: {source}")
    rows = _jsonl_rows(path) if path.is_file() else _hub_rows(source, split)
    return convert_rows(rows, data_source=data_source)
