"""Test-runner settings inside shared configuration files.

``pyproject.toml``, ``setup.cfg`` and ``tox.ini`` hold pytest's settings next to
everything else (``[tool.pytest.ini_options]`` / ``[tool.pytest]``,
``[tool:pytest]``, ``[pytest]``; pytest's ``determine_setup`` reads these). A
patch may change such a file for a legitimate reason (a dependency, a version),
so the grader keeps the change unless the pytest part differs from the base
commit's; then the whole file is restored and counted as removed.
"""

from __future__ import annotations

import configparser
import tomllib
from pathlib import PurePosixPath
from typing import Any

SHARED_CONFIG_NAMES = frozenset({"pyproject.toml", "setup.cfg", "tox.ini"})
_INI_SECTIONS = ("pytest", "tool:pytest")


class _Unreadable:
    """Marker for a file whose pytest part cannot be read (treated as changed)."""

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = None  # type: ignore[assignment]


def is_shared_config(path: str) -> bool:
    """True when ``path``'s file name is one of ``SHARED_CONFIG_NAMES`` (at any depth)."""
    return PurePosixPath(path).name in SHARED_CONFIG_NAMES


def pytest_settings(path: str, text: str | None) -> Any:
    """The pytest part of a shared config file, comparable with ``==``.

    Args:
        path: the file's path (its name picks the format).
        text: the file's content, None when the file does not exist.

    Returns:
        None when there is no file or no pytest part; a dict (TOML table, or
        section name -> {key: value} for INI files); an object equal to nothing
        when the file cannot be parsed (a broken file may still be read by
        pytest in ways we cannot predict).
    """
    if text is None:
        return None
    if PurePosixPath(path).name == "pyproject.toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            return _Unreadable()
        table = data.get("tool", {}).get("pytest") if isinstance(data.get("tool"), dict) else None
        return table or None
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error:
        return _Unreadable()
    found = {name: dict(parser.items(name)) for name in _INI_SECTIONS if parser.has_section(name)}
    return found or None


def pytest_settings_changed(path: str, before: str | None, after: str | None) -> bool:
    """True when the pytest part of ``path`` differs between two contents (None = no file)."""
    return pytest_settings(path, before) != pytest_settings(path, after)
