"""Settings of the reward: which variant, limits, and how the test run is isolated.

One frozen dataclass, so it can key a grader (``reward.compute_score``), built from
verl's ``custom_reward_function.reward_kwargs`` (``from_mapping``) or, as the
``swe_agent.reward`` section of the recipe's schema, from YAML through OmegaConf.
Each setting has its one default here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Any, Literal

RewardVariant = Literal["binary", "partial", "similarity"]
NetworkMode = Literal["auto", "unshare", "env"]

VARIANTS: tuple[str, ...] = ("binary", "partial", "similarity")
NETWORK_MODES: tuple[str, ...] = ("auto", "unshare", "env")
BACKENDS: tuple[str, ...] = ("auto", "local", "docker")

# Default limit on a model patch's size, bytes of UTF-8 text. SWE-bench gold
# patches are a few KB (the largest well under 100 KB); an agent diff above
# 1 MB is a vendored tree or generated data, not a fix.
DEFAULT_MAX_PATCH_BYTES = 1_000_000
# Default limit on a whole grade (copy + apply + test run), seconds: the test
# run's own 300 s plus room for the copy and the git commands.
DEFAULT_GRADE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class RewardConfig:
    """How a patch is turned into a reward.

    Attributes:
        variant: ``binary`` (1.0 when resolved, SWE-bench's ``resolved``; default),
            ``partial`` (fraction of FAIL_TO_PASS passing, 0.0 if any PASS_TO_PASS
            test fails), or ``similarity`` (SWE-RL, Wei et al. 2025: difflib
            ``SequenceMatcher`` ratio between the model and the reference patch,
            -1.0 for an unparsable patch; no test runs).
        timeout_s: wall-clock limit of one test run, seconds.
        max_patch_bytes: a model patch larger than this (UTF-8 bytes) is rejected
            with error ``patch_too_large``.
        allow_binary: accept ``GIT binary patch`` / ``Binary files differ`` sections
            (default False: error ``binary_patch``).
        network: ``unshare`` runs the tests in a new, empty network namespace
            (``unshare --map-current-user --net``; only loopback, brought up when
            permitted); ``env`` only points proxy variables at a dead port and
            sets pip offline, which stops proxy-aware clients, not raw sockets;
            ``auto`` uses ``unshare`` when it works on this machine, else ``env``.
        protect: strip test files and test-runner configuration from the patch
            (see ``reward.patch``). Only for measuring what the hacks would gain
            without it; never turn it off for training.
        fail_fast: stop the test run as soon as the reward is decided (FAIL_TO_PASS
            tests run first; binary: pytest ``--maxfail=1`` / unittest
            ``--failfast``, since any failure means 0; partial: PASS_TO_PASS is
            not run when no FAIL_TO_PASS test passes, and stops at its first
            failure). The reward is the same as without it; the tests that did
            not run are listed in ``GradeResult.not_run`` instead of the
            success/failure lists. Default True (training, through the loop or
            verl's ``compute_score``); the evaluator, the audit and task validation
            ask for every test's outcome explicitly (``fail_fast=False``).
        grade_timeout_s: wall-clock limit of one whole grade (repository copy,
            ``git apply`` of both patches and the test run), seconds; past it the
            grade stops with error ``grade_timeout`` and reward 0, like the test
            run's own ``timeout_s``.
        run_as_uid: when the grader runs as root, the first uid of the test runs' pool
            (each grade leases its own, ``sandbox.jail.lease_uid``, so the process limit
            counts one grade only); None keeps uid 0 with every capability dropped (then
            ``max_processes`` cannot hold).
        uid_pool_size: uids in that pool; 0 = every grade runs as ``run_as_uid``.
        max_processes: processes of the test run's uid, at most (``RLIMIT_NPROC``).
        max_memory_bytes: address space of each test process, bytes (``RLIMIT_AS``).
        max_file_bytes: size of any file the test run writes, bytes (``RLIMIT_FSIZE``).
        backend: where the test run runs (``reward.container``): ``auto`` a fresh container of
            the task's image for image tasks (no ``repo_path``), the local jail for the others;
            ``docker`` a container for every task; ``local`` never a container (image tasks
            then fail with ``repo_missing``). Containers use ``swe_agent.sandbox.docker``'s
            engine, limits and base image.
        work_tree: how a grade's tree starts from its prepared checkout (``core.pristine``):
            ``auto`` an overlay over it where overlays can be mounted (``sandbox.overlay``:
            nothing copied), else a copy; ``copy`` always a copy.
    """

    variant: str = "binary"
    timeout_s: float = 300.0
    max_patch_bytes: int = DEFAULT_MAX_PATCH_BYTES
    allow_binary: bool = False
    network: str = "auto"
    protect: bool = True
    fail_fast: bool = True
    grade_timeout_s: float = DEFAULT_GRADE_TIMEOUT_S
    run_as_uid: int | None = 200000
    uid_pool_size: int = 4096
    max_processes: int = 1024
    max_memory_bytes: int = 8 << 30
    max_file_bytes: int = 1 << 30
    backend: str = "auto"
    work_tree: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"reward backend {self.backend!r}: expected one of {list(BACKENDS)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"reward variant {self.variant!r}: expected one of {list(VARIANTS)}")
        if self.network not in NETWORK_MODES:
            raise ValueError(f"reward network {self.network!r}: expected one of {list(NETWORK_MODES)}")
        if not self.timeout_s > 0:
            raise ValueError(f"reward timeout_s must be > 0 seconds, got {self.timeout_s!r}")
        if not self.grade_timeout_s > 0:
            raise ValueError(f"reward grade_timeout_s must be > 0 seconds, got {self.grade_timeout_s!r}")
        if self.work_tree not in ("auto", "copy"):
            raise ValueError(f"reward work_tree {self.work_tree!r}: expected auto or copy")
        if self.max_patch_bytes <= 0:
            raise ValueError(f"reward max_patch_bytes must be > 0, got {self.max_patch_bytes!r}")

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None, *, section: str = "reward") -> RewardConfig:
        """Build from a dict (e.g. verl's ``reward_kwargs``); None values keep the default.

        Numbers given as strings (Hydra overrides) are converted to the field's type.

        Raises:
            ValueError: a key that is not a field (named as ``{section}.{key}``, with the
                closest field), or a value out of range or that cannot be converted.
        """
        values = dict(values or {})
        names = [f.name for f in fields(cls)]
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(names)})"
                raise ValueError(f"{section}.{key}: unknown reward setting{hint}")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in values or values[f.name] is None:
                continue
            value = values[f.name]
            if f.name in ("timeout_s", "grade_timeout_s"):
                value = float(value)
            elif f.name in ("max_patch_bytes", "run_as_uid", "uid_pool_size", "max_processes", "max_memory_bytes", "max_file_bytes"):
                value = int(value)
            elif f.name in ("allow_binary", "protect", "fail_fast") and isinstance(value, str):
                value = value.strip().lower() in ("1", "true", "yes", "on")
            else:
                value = str(value) if f.name in ("variant", "network", "backend") else value
            kwargs[f.name] = value
        return cls(**kwargs)
