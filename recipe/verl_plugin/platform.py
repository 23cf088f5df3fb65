"""verl's ``cpu`` platform: what verl asks of an accelerator, answered for a CPU-only machine.

verl 0.9 resolves one platform per process (``verl.plugin.platform.get_platform``:
``VERL_PLATFORM`` names it, else it probes nvidia/huawei/amd and falls back to
nvidia, whose ``get_device_id()`` then raises "Torch not compiled with CUDA").
``PlatformCPU`` is registered under the name ``cpu`` through verl's own extension
point (``PlatformRegistry.register``) and selected with ``VERL_PLATFORM=cpu``.

Two answers differ from a real device on purpose:
- ``ray_resource_name`` is ``"GPU"``: verl's ``ResourcePoolManager`` places
  workers by counting Ray ``GPU``/``NPU`` resources only, so the CPU run starts Ray
  with logical GPUs (``ray_kwargs.ray_init.num_gpus``), one per trainer worker.
- ``device_module`` is ``CPUDeviceModule``, a stand-in for ``torch.cuda`` with the
  calls verl makes through ``get_torch_device()`` (streams, caches, memory queries,
  RNG state), answered by ``torch.cpu`` or as no-ops.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import psutil
import torch
from verl.plugin.platform.platform_base import PlatformBase

PLATFORM_NAME = "cpu"


class CPUDeviceModule:
    """Stand-in for ``torch.cuda`` (see module docstring); unknown names fall through to ``torch.cpu``."""

    Stream = torch.cpu.Stream
    Event = torch.cpu.Event
    StreamContext = torch.cpu.StreamContext

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def current_device(self) -> str:
        return "cpu"

    def set_device(self, device: Any) -> None:
        pass

    def synchronize(self, device: Any = None) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def ipc_collect(self) -> None:
        pass

    def current_stream(self, device: Any = None) -> Any:
        return torch.cpu.current_stream()

    def stream(self, stream: Any) -> Any:
        return torch.cpu.stream(stream)

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        """(free, total) bytes of host memory."""
        vm = psutil.virtual_memory()
        return vm.available, vm.total

    # No device allocator: verl only logs these.
    def memory_allocated(self, device: Any = None) -> int:
        return 0

    max_memory_allocated = memory_reserved = max_memory_reserved = memory_allocated

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        pass

    def set_per_process_memory_fraction(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get_rng_state(self, device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    def get_device_name(self, device: Any = None) -> str:
        return "cpu"

    def is_bf16_supported(self, *args: Any, **kwargs: Any) -> bool:
        return True


class PlatformCPU(PlatformBase):
    """The ``cpu`` platform (see module docstring). Selected only by ``VERL_PLATFORM=cpu``."""

    _module = CPUDeviceModule()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> Any:
        return self._module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never auto-detected: a GPU machine must not pick the CPU platform by accident.
        return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME

    def current_device(self) -> str:
        # verl uses it as `tensor.to(get_device_id())` and `torch.device(get_device_id())`.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: int | None = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return (None, None)

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None
