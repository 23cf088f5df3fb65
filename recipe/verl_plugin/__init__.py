"""verl on a CPU-only machine: a ``cpu`` platform, the ``hf`` rollout backend, checked internal reaches.

``plugin`` is what verl loads (``VERL_USE_EXTERNAL_MODULES``); ``platform``,
``rollout`` and ``internals`` are its parts.
"""
