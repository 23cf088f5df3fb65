"""What the host side tells the agent subprocess, and what the subprocess reports back."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class RunnerSpec(BaseModel):
    """One agent run, serialised to a JSON file the subprocess reads."""

    task: str
    workdir: str
    api_base: str
    api_key: str
    model_name: str
    mode: Literal["tool_call", "text"] = "tool_call"
    step_limit: int = 30
    command_timeout_s: int = 60
    turn_timeout_s: float = 600.0
    trajectory_path: str | None = None
    result_path: str
    # argv prefix wrapping each bash command (the sandbox's jail); empty = run directly.
    command_prefix: list[str] = Field(default_factory=list)
    # The commands' environment (the sandbox's allowlist), not the runner's own.
    command_env: dict[str, str] = Field(default_factory=dict)
    # A command's observation keeps this many bytes of its output (the rest is counted, not kept).
    max_output_bytes: int = 65536
    # The run ends (agent_error) when the work tree grows past this many bytes; 0 = no check.
    max_workdir_bytes: int = 0


class RunnerResult(BaseModel):
    """The subprocess's report; ``exit_status`` uses mini-swe-agent's names."""

    exit_status: str
    submission: str = ""
    n_calls: int = 0
    error: str | None = None
    messages: list[dict[str, Any]] = Field(default_factory=list)
    # Limits the agent's commands hit, one entry per hit ("command_timeout", "output_truncated", "workdir_bytes").
    limits_hit: list[str] = Field(default_factory=list)
