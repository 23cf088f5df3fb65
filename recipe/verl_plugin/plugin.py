"""verl plugin of this recipe, loaded in every process of a training run.

verl imports it through its own mechanism, ``VERL_USE_EXTERNAL_MODULES=recipe.verl_plugin.plugin``
(read by ``verl/__init__.py`` before any platform is resolved), which
``configs/swe_agent_trainer.yaml`` sets in the Ray runtime environment and
``recipe.train`` in the driver. It registers, always:

- the ``swe_sync`` trainer mode (``trainer.py``: verl's sync trainer plus ``swe/*`` step metrics);
- ``grpo_masked`` computed per trajectory in verl's v1 trainer (``internals.py``);
- the ``hf`` rollout backend (``rollout.py``);
- the ``cpu`` platform (``platform.py``), chosen only by ``VERL_PLATFORM=cpu``.

With ``VERL_PLATFORM=cpu`` (``configs/profile/cpu.yaml``, with ``VERL_ENGINE_DEVICE=cuda``:
verl's override that picks the FSDP engine, registered for cuda/npu only and
running on CPU as it is) it also applies the CPU reaches into verl internals.
Every reach is checked against the installed verl before it is applied.
"""

from __future__ import annotations

import os

from verl.plugin.platform.platform_manager import PlatformRegistry

from recipe.verl_plugin import internals
from recipe.verl_plugin.platform import PLATFORM_NAME, PlatformCPU

PlatformRegistry.register(platform=PLATFORM_NAME)(PlatformCPU)
internals.install(internals.TRAINER_REACHES + internals.ROLLOUT_REGISTRATION)
if os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME:
    internals.install(internals.CPU_REACHES)
