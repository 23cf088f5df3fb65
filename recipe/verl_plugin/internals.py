"""The few places where the CPU run reaches into verl or torch internals, each checked.

verl 0.9.1 runs on CPU through its extension points (a platform, a rollout
backend, ``VERL_ENGINE_DEVICE``) except for two spots that hard-code an
accelerator. Each ``Reach`` below names the internal it changes, why, and a
``check`` that proves the internal still looks the way the change assumes (its
source text and signature in the installed version). A reach is applied when its
module is imported (a post-import hook, so verl's own import order is kept) and
its check runs first: when verl changes, the run stops at start-up with
``VerlInternalsChanged`` naming the reach, instead of failing somewhere inside a
Ray worker. ``check_all()`` runs every check without applying anything (the
trainer's start-up and ``tests/recipe/test_verl_plugin.py`` call it).

Facts come from verl 0.9.1's code:
- ``verl.utils.distributed.initialize_global_process_group_ray`` builds the backend
  ``f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"``; on the cpu platform that
  is ``"cpu:gloo,cpu:gloo"``, which torch rejects ("Duplicate device type cpu").
  ``verl.workers.engine_workers`` imports the function by name.
- ``verl.workers.engine.fsdp.transformer_impl`` gives the forward-only (reference)
  FSDP2 engine ``CPUOffloadPolicy(pin_memory=True)``; pinning host memory needs an
  accelerator ("Cannot access accelerator device when none is available").
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import verl


class VerlInternalsChanged(RuntimeError):
    """An internal a CPU reach depends on is not as the installed-version check expects."""


@dataclass(frozen=True)
class Reach:
    """One change to a verl/torch internal.

    Attributes:
        name: short name, used in errors.
        module: the module whose attribute is changed (patched when it is imported).
        why: the failure the change avoids.
        check: raises ``VerlInternalsChanged`` when the module no longer matches.
        apply: makes the change on the imported module.
    """

    name: str
    module: str
    why: str
    check: Callable[[ModuleType], None]
    apply: Callable[[ModuleType], None]


def _require(condition: bool, reach: str, detail: str) -> None:
    if not condition:
        raise VerlInternalsChanged(
            f"CPU reach {reach!r} no longer matches verl {verl.__version__}: {detail}. "
            "recipe/verl_plugin/internals.py must be updated for this verl version."
        )


def _source(obj: Any, reach: str) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError) as exc:
        raise VerlInternalsChanged(f"CPU reach {reach!r} cannot read the source of {obj!r} to check it: {exc}") from exc


# -- 1. the gloo process group -------------------------------------------------------------------


def _check_process_group(module: ModuleType) -> None:
    fn = getattr(module, "initialize_global_process_group_ray", None)
    _require(fn is not None, "gloo_process_group", "initialize_global_process_group_ray is gone")
    if getattr(fn, "_swe_cpu_patched", False):
        return
    params = list(inspect.signature(fn).parameters)
    _require("backend" in params, "gloo_process_group", f"its parameters are {params}, without 'backend'")
    source = _source(fn, "gloo_process_group")
    _require(
        'f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"' in source,
        "gloo_process_group",
        "its default backend string changed",
    )


def _apply_process_group(module: ModuleType) -> None:
    original = module.initialize_global_process_group_ray
    if getattr(original, "_swe_cpu_patched", False):
        return

    def initialize_global_process_group_ray(timeout_second: Any = None, backend: str | None = None) -> Any:
        return original(timeout_second=timeout_second, backend=backend or "cpu:gloo")

    initialize_global_process_group_ray._swe_cpu_patched = True  # type: ignore[attr-defined]
    module.initialize_global_process_group_ray = initialize_global_process_group_ray
    # Modules that imported the name before the patch keep the old one.
    for user in ("verl.workers.engine_workers",):
        loaded = sys.modules.get(user)
        if loaded is not None and getattr(loaded, "initialize_global_process_group_ray", None) is original:
            loaded.initialize_global_process_group_ray = initialize_global_process_group_ray


# -- 2. CPU offload without pinned memory --------------------------------------------------------


def _check_offload(module: ModuleType) -> None:
    policy = getattr(module, "CPUOffloadPolicy", None)
    _require(policy is not None, "unpinned_cpu_offload", "transformer_impl no longer imports CPUOffloadPolicy")
    if getattr(policy, "_swe_cpu_patched", False):
        return
    _require(
        "CPUOffloadPolicy(pin_memory=True)" in _source(module, "unpinned_cpu_offload"),
        "unpinned_cpu_offload",
        "the forward-only engine no longer builds CPUOffloadPolicy(pin_memory=True)",
    )
    _require("pin_memory" in inspect.signature(policy).parameters, "unpinned_cpu_offload",
             "torch's CPUOffloadPolicy has no pin_memory parameter")


def _apply_offload(module: ModuleType) -> None:
    base = module.CPUOffloadPolicy
    if getattr(base, "_swe_cpu_patched", False):
        return

    class UnpinnedCPUOffloadPolicy(base):  # type: ignore[misc, valid-type]
        """torch's CPUOffloadPolicy, never pinning host memory (no accelerator to pin for)."""

        _swe_cpu_patched = True

        def __init__(self, pin_memory: bool = False) -> None:
            super().__init__(pin_memory=False)

    module.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy


# -- 3. the hf rollout backend in verl's rollout registries ----------------------------------------

ROLLOUT_NAME = "hf"
ROLLOUT_ADAPTER = "recipe.verl_plugin.rollout.HFServerAdapter"


def _check_rollout_registry(module: ModuleType) -> None:
    registry = getattr(module, "_ROLLOUT_REGISTRY", None)
    _require(isinstance(registry, dict) and ("vllm", "async") in registry, "hf_rollout_backend",
             "verl.workers.rollout.base._ROLLOUT_REGISTRY is no longer a dict keyed by (name, mode)")
    _require(hasattr(module, "get_rollout_class"), "hf_rollout_backend", "get_rollout_class is gone")


def _apply_rollout_registry(module: ModuleType) -> None:
    module._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = ROLLOUT_ADAPTER


def _check_replica_registry(module: ModuleType) -> None:
    registry = getattr(module, "RolloutReplicaRegistry", None)
    _require(registry is not None and hasattr(registry, "register"), "hf_rollout_replica",
             "verl.workers.rollout.replica.RolloutReplicaRegistry.register is gone")


def _apply_replica_registry(module: ModuleType) -> None:
    def load_replica() -> type:
        from recipe.verl_plugin.rollout import HFReplica

        return HFReplica

    module.RolloutReplicaRegistry.register(ROLLOUT_NAME, load_replica)


# -- 4. grpo_masked over trajectories, not rows -------------------------------------------------


def _check_session_advantage(module: ModuleType) -> None:
    fn = getattr(module, "compute_advantage_for_multi_trajectories", None)
    _require(fn is not None, "session_advantage", "trainer_base no longer imports compute_advantage_for_multi_trajectories")
    if getattr(fn, "_swe_patched", False):
        return
    params = list(inspect.signature(fn).parameters)
    _require(params[:3] == ["data", "batch_keys", "adv_estimator"], "session_advantage", f"its parameters are {params}")
    source = _source(module.PPOTrainer._compute_advantage, "session_advantage")
    _require("compute_advantage_for_multi_trajectories(" in source and "batch_keys=batch.keys" in source,
             "session_advantage", "PPOTrainer._compute_advantage no longer calls it with the batch keys")


def _apply_session_advantage(module: ModuleType) -> None:
    original = module.compute_advantage_for_multi_trajectories
    if getattr(original, "_swe_patched", False):
        return
    from recipe.advantage import GRPO_MASKED, compute_grpo_masked_for_sessions, session_keys

    def compute_advantage_for_multi_trajectories(data: Any, batch_keys: list[str], adv_estimator: Any,
                                                 **kwargs: Any) -> Any:
        if adv_estimator != GRPO_MASKED:
            return original(data, batch_keys, adv_estimator, **kwargs)
        advantages, returns = compute_grpo_masked_for_sessions(
            data.batch["token_level_rewards"], data.batch["response_mask"], data.non_tensor_batch["uid"],
            session_keys(batch_keys), norm_adv_by_std_in_grpo=kwargs.get("norm_adv_by_std_in_grpo", True),
            config=kwargs.get("config"),
        )
        data.batch["advantages"], data.batch["returns"] = advantages, returns
        return data

    compute_advantage_for_multi_trajectories._swe_patched = True  # type: ignore[attr-defined]
    module.compute_advantage_for_multi_trajectories = compute_advantage_for_multi_trajectories


def _check_trainer_registry(module: ModuleType) -> None:
    _require(hasattr(module, "register_trainer") and hasattr(module, "get_trainer_cls"), "swe_trainer_mode",
             "verl.trainer.ppo.v1.trainer_base.register_trainer is gone")


def _apply_trainer_registry(module: ModuleType) -> None:
    import recipe.verl_plugin.trainer  # noqa: F401  (registers the trainer mode)


# -- 5. a batch in which every trajectory is masked -------------------------------------------------


def _check_all_masked(module: ModuleType) -> None:
    fn = getattr(module, "compute_rollout_correction_and_add_to_batch", None)
    _require(fn is not None, "all_masked_batch",
             "trainer_base no longer imports compute_rollout_correction_and_add_to_batch")
    if getattr(fn, "_swe_patched", False):
        return
    params = list(inspect.signature(fn).parameters)
    _require(params[:2] == ["batch", "rollout_corr_config"], "all_masked_batch", f"its parameters are {params}")
    helper = sys.modules.get(fn.__module__) or importlib.import_module(fn.__module__)
    _require("response_mask must contain at least one valid token" in _source(helper, "all_masked_batch"),
             "all_masked_batch", "the rollout-correction helper no longer refuses an all-zero response mask")


def _apply_all_masked(module: ModuleType) -> None:
    original = module.compute_rollout_correction_and_add_to_batch
    if getattr(original, "_swe_patched", False):
        return

    def compute_rollout_correction_and_add_to_batch(batch: Any, rollout_corr_config: Any) -> Any:
        if not bool(batch.batch["response_mask"].any()):
            # Nothing reaches the loss (e.g. every trajectory hit a limit and was masked): nothing to
            # correct. verl would raise and end the run; the step trains on nothing instead.
            return batch, {"rollout_corr/all_masked": 1.0}
        return original(batch, rollout_corr_config)

    compute_rollout_correction_and_add_to_batch._swe_patched = True  # type: ignore[attr-defined]
    module.compute_rollout_correction_and_add_to_batch = compute_rollout_correction_and_add_to_batch


TRAINER_REACHES: tuple[Reach, ...] = (
    Reach(
        name="swe_trainer_mode",
        module="verl.trainer.ppo.v1.trainer_base",
        why="verl's public trainer registry: trainer.v1.trainer_mode=swe_sync adds the rollouts' metrics per step",
        check=_check_trainer_registry,
        apply=_apply_trainer_registry,
    ),
    Reach(
        name="session_advantage",
        module="verl.trainer.ppo.v1.trainer_base",
        why="verl's v1 trainer computes GRPO per trajectory (its final segment) but hands any other estimator "
        "every segment row, so grpo_masked would count a multi-segment trajectory once per segment",
        check=_check_session_advantage,
        apply=_apply_session_advantage,
    ),
)

TRAINER_REACHES += (
    Reach(
        name="all_masked_batch",
        module="verl.trainer.ppo.v1.trainer_base",
        why="verl's rollout correction raises when no token of the batch reaches the loss, which ends the run "
        "whenever every trajectory of a step is masked (limit exits of a weak policy)",
        check=_check_all_masked,
        apply=_apply_all_masked,
    ),
)

ROLLOUT_REGISTRATION: tuple[Reach, ...] = (
    Reach(
        name="hf_rollout_backend",
        module="verl.workers.rollout.base",
        why="verl has no public call to add a rollout adapter; its registry is a module-level dict",
        check=_check_rollout_registry,
        apply=_apply_rollout_registry,
    ),
    Reach(
        name="hf_rollout_replica",
        module="verl.workers.rollout.replica",
        why="verl's public registry of rollout server replicas",
        check=_check_replica_registry,
        apply=_apply_replica_registry,
    ),
)

CPU_REACHES: tuple[Reach, ...] = (
    Reach(
        name="gloo_process_group",
        module="verl.utils.distributed",
        why='verl builds the backend "cpu:gloo,cpu:gloo" on the cpu platform; torch rejects duplicate devices',
        check=_check_process_group,
        apply=_apply_process_group,
    ),
    Reach(
        name="unpinned_cpu_offload",
        module="verl.workers.engine.fsdp.transformer_impl",
        why="the reference (forward-only) FSDP2 engine pins host memory, which needs an accelerator",
        check=_check_offload,
        apply=_apply_offload,
    ),
)


REACHES: tuple[Reach, ...] = TRAINER_REACHES + ROLLOUT_REGISTRATION + CPU_REACHES


def check_all() -> list[str]:
    """Import every reached module and run its check (nothing is changed).

    Returns:
        The names of the reaches checked.

    Raises:
        VerlInternalsChanged: the first reach whose internal changed.
    """
    for reach in REACHES:
        reach.check(importlib.import_module(reach.module))
    return [reach.name for reach in REACHES]


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Applies each reach right after its module executes (or at once if it is loaded)."""

    def __init__(self, reaches: tuple[Reach, ...]) -> None:
        self._by_module: dict[str, list[Reach]] = {}
        for reach in reaches:
            self._by_module.setdefault(reach.module, []).append(reach)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        reaches = self._by_module.get(fullname)
        if not reaches:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _apply(reaches, module)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def _apply(reaches: list[Reach], module: ModuleType) -> None:
    for reach in reaches:
        reach.check(module)
        reach.apply(module)


_installed: set[str] = set()


def install(reaches: tuple[Reach, ...]) -> None:
    """Apply ``reaches``: now for loaded modules, when imported for the others. Idempotent per reach."""
    todo = tuple(r for r in reaches if r.name not in _installed)
    _installed.update(r.name for r in todo)
    pending = tuple(r for r in todo if r.module not in sys.modules)
    for reach in todo:
        if reach.module in sys.modules:
            _apply([reach], sys.modules[reach.module])
    if pending:
        sys.meta_path.insert(0, _PatchOnImport(pending))
