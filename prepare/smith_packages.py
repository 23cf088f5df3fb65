"""Which PyPI packages ``--mode smith`` injects bugs into, and how to test each.

The default list lives in ``prepare/smith_packages.yaml`` (schema: ``PackageSpec``);
``--packages-file`` names another YAML file of the same shape, ``--packages a,b``
picks entries by name. Versions are pinned so a seed gives the same tasks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

DEFAULT_PACKAGES_FILE = Path(__file__).resolve().parent / "smith_packages.yaml"


@dataclass
class PackageSpec:
    """One package to mine for tasks.

    Attributes:
        name: the PyPI distribution name (``more-itertools``).
        version: the exact version to download (pinned for reproducibility).
        import_name: the top-level module the tests import (``more_itertools``).
        test_paths: repository-relative test files/directories the suite runs.
        source_dirs: repository-relative directories or ``.py`` files to mutate
            (default: ``<pythonpath>/<import_name>`` as a package or a module).
        pythonpath: repository-relative directory put on ``PYTHONPATH`` so the tests
            import the working copy ("" for flat layouts, "src" for src layouts).
        test_deps: extra requirements for the package's virtualenv (pytest and
            coverage are always installed).
        install_deps: install the package once to pull its runtime dependencies, then
            uninstall it, so the environment holds no copy of the clean code.
        pytest_args: extra arguments for every test run (e.g. ``--ignore`` of a
            test file that needs the network).
        local_path: a directory or sdist archive to use instead of downloading from
            PyPI (tests and offline use).
        isolated_env: give the package its own virtualenv (default). False runs its
            tests with this project's interpreter (needs pytest and coverage there;
            for local packages without dependencies, e.g. test fixtures, offline).
    """

    name: str
    version: str = ""
    import_name: str = ""
    test_paths: list[str] = field(default_factory=lambda: ["tests"])
    source_dirs: list[str] = field(default_factory=list)
    pythonpath: str = ""
    test_deps: list[str] = field(default_factory=list)
    install_deps: bool = True
    pytest_args: list[str] = field(default_factory=list)
    local_path: str = ""
    isolated_env: bool = True

    @property
    def slug(self) -> str:
        """A filesystem- and id-safe form of the name (``more_itertools``)."""
        return re.sub(r"[^A-Za-z0-9]+", "_", self.name).strip("_").lower()

    @property
    def module(self) -> str:
        """``import_name``, or the name with dashes as underscores."""
        return self.import_name or self.name.replace("-", "_").lower()

    @property
    def requirement(self) -> str:
        """``name==version`` (or ``name`` when unpinned)."""
        return f"{self.name}=={self.version}" if self.version else self.name


@dataclass
class PackageList:
    """Schema of a packages YAML file: ``packages: [PackageSpec, ...]``."""

    packages: list[PackageSpec] = field(default_factory=list)


def load_packages(path: str | Path = DEFAULT_PACKAGES_FILE, names: list[str] | None = None) -> list[PackageSpec]:
    """The package specs in ``path``, optionally only those named in ``names`` (in file order).

    Raises:
        ValueError: a name in ``names`` is not in the file, or the file does not
            match the schema (the message says which key).
        FileNotFoundError: ``path`` does not exist.
    """
    raw = OmegaConf.load(str(path))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PackageList), raw)
    except Exception as exc:  # omegaconf.errors.ValidationError and friends
        raise ValueError(f"{path}: {exc}") from exc
    specs: list[PackageSpec] = [OmegaConf.to_object(p) for p in merged.packages]  # type: ignore[misc]
    if names is None:
        return specs
    by_name = {s.name: s for s in specs} | {s.slug: s for s in specs}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown package(s) {unknown}; {path} lists {[s.name for s in specs]}")
    wanted = {by_name[n].name for n in names}
    return [s for s in specs if s.name in wanted]
