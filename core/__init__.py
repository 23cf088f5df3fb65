"""The bottom layer: what every stage of the pipeline shares.

- ``core.task``: the task schema (``SWETask``, SWE-bench's fields plus ours) and its JSONL I/O.
- ``core.gitrepo``: git on a task's repository (pinned environment, the one-commit copy).
- ``core.process``: subprocesses with their own process group, timeouts and output caps.

It imports nothing of the project's; every other package may import it
(``tests/test_layering.py``).
"""
