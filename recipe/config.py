"""Dataclass schema of the ``swe_agent`` config section (defaults in ``configs/swe_agent.yaml``).

Every timeout is in seconds. Loading goes through OmegaConf structured configs,
so an unknown key fails with its name and a wrongly typed value fails with the
key and the expected type.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from reward.config import RewardConfig
from sandbox.docker_sandbox import DockerSettings
from sandbox.shim import ShimSettings


class Policy(str, Enum):
    """Who writes the assistant turns.

    ``model``: the policy being trained/evaluated (verl's server manager, or a
    backend handed to the loop). ``reference``: a scripted replay of the task's
    reference patch through the agent's own tool calls -- a harness check, as
    SWE-bench validates its harness with gold patches, never a model result.
    ``empty``: submits at once without changing anything (a 0% floor check).
    ``reference_with_tests``: the reference fix inside the action sequence of a real
    agent (read the code, run the failing tests, fix, rerun them and the suite,
    submit): tool phases that do real work, for resource traces and load tests.
    ``group_check``: a GRPO harness check with known outcomes per group: rollout k of
    a group (verl's ``session_id``, the rollout CLI's repeat index) plays reference,
    empty and stall (no-op commands until the step limit: a masked ``step_limit``
    exit) in turn, so the trainer's rewards, masks and advantages can be checked.
    ``expert``: a readable expert trajectory (list files, run the suite, read the code, a
    ``str_replace`` edit per hunk of the fix, rerun, diff, submit) with a thought per turn: the
    supervised warm start's data (``python -m recipe.learn.expert``), not a model result.
    ``script``: the bash commands of a user-given file (``swe_agent.script``, one per line;
    blank lines and lines starting with ``#`` skipped) through the agent, proxy, sandbox and
    grader, then submit: for debugging an environment or re-running an attack.
    """

    MODEL = "model"
    REFERENCE = "reference"
    EMPTY = "empty"
    REFERENCE_WITH_TESTS = "reference_with_tests"
    GROUP_CHECK = "group_check"
    SCRIPT = "script"
    EXPERT = "expert"


@dataclass
class ScriptedSettings:
    """Emulated inference time of the scripted policies (``model_proxy.backends.scripted.GenerationLatency``).

    A scripted policy answers at once, so without this its rollouts have no inference
    phases; all zero (default) = no emulation. ``GenerationLatency.served_7b()``
    documents a realistic profile: 0.02 s/token, 1.0 s first token, 300 tokens, 0.3.
    """

    latency_per_token_s: float = 0.0  # seconds per generated token
    latency_first_token_s: float = 0.0  # seconds before the first token
    latency_min_turn_tokens: int = 0  # tokens a turn is charged for at least
    latency_jitter_sigma: float = 0.0  # log-normal jitter of each turn's time; 0 = none


@dataclass
class AgentSettings:
    """The coding agent run as a subprocess per rollout."""

    # "mini_swe_agent" (default, PyPI) or "swe_agent" (SWE-agent 1.x `sweagent run`, installed from source).
    backend: str = "mini_swe_agent"
    # SWE-agent deployment: "local" (sweagent run in a bubblewrap jail of its own, its shell in a
    # second one inside it) or "docker" (SWE-ReX's container per rollout from the task's image with
    # SWE-ReX built in, on an internal network, the work tree mounted; limits from sandbox.docker).
    sweagent_deployment: str = "local"
    # mini-swe-agent model class: "tool_call" (bash tool, function calling) or "text" (litellm_textbased).
    mode: str = "tool_call"
    # Maximum number of LLM calls before the agent stops with step_limit.
    step_limit: int = 30
    # Wall-clock limit for one bash command inside the sandbox, seconds.
    command_timeout_s: int = 60
    # Client-side limit for one LLM request (queueing + generation), seconds.
    turn_timeout_s: float = 600.0
    # Whole rollout limit (agent start to exit), seconds; the agent's process tree is killed after it.
    rollout_timeout_s: float = 1800.0
    # Attempts per LLM request in the agent (mini-swe-agent defaults to 10 with 4-60 s backoff).
    llm_retry_attempts: int = 1
    # A command's observation keeps this many bytes of its output (the rest is counted, not kept).
    max_output_bytes: int = 65536
    # The rollout ends as agent_error when the work tree and the commands' home together grow past
    # this many bytes (each entry counts at least 4 KiB), checked after each command; 0 = no check.
    max_workdir_bytes: int = 1073741824
    # Fork each rollout's mini-swe-agent process from a pre-imported server per worker
    # (recipe/runners/warm_start.py) instead of a new interpreter (~6 s of imports on 2 cores);
    # the server may take warm_start_timeout_s seconds to start, else agents start cold.
    warm_start: bool = True
    warm_start_timeout_s: float = 300.0


@dataclass
class SandboxSettings:
    """Where and how each rollout's working copy is made."""

    # Where the agent's commands run: "local" (the bubblewrap jail of sandbox/local.py) or "docker"
    # (a container per rollout, sandbox/docker_rollout.py; settings in `docker`).
    backend: str = "local"
    # Parent directory for sandboxes; null = the system temp dir.
    parent_dir: str | None = None
    # "auto" (bubblewrap when it works here, else unisolated with a warning), "bwrap" (required), "none".
    isolation: str = "auto"
    # The jail of the agent's commands (sandbox/jail.py): when the trainer runs as root, each sandbox
    # leases its own uid from run_as_uid .. run_as_uid + uid_pool_size - 1 (0 = always run_as_uid);
    # processes of that uid, address space per process (bytes), any file's size (bytes), /tmp (bytes).
    run_as_uid: int = 200000
    uid_pool_size: int = 4096
    max_processes: int = 1024
    max_memory_bytes: int = 8589934592
    max_file_bytes: int = 1073741824
    tmp_bytes: int = 536870912
    # How each rollout's work tree starts: from a checkout made once per (repository, commit) per
    # worker (core/pristine.py; at most max_prepared_trees kept, least recently used go), either
    # "overlay" (forked: an overlay mount over it, nothing copied; needs root, sandbox/overlay.py),
    # "copy" (cp -a --reflink=auto of it) or "auto" (overlay where it can be mounted, else copy);
    # or "clone" (a new clone and checkout per rollout).
    work_tree: str = "auto"
    max_prepared_trees: int = 64
    # Resource shim (sandbox/shim.py); `enabled: null` (auto) = on for backend=docker or with a cgroup root.
    shim: ShimSettings = field(default_factory=ShimSettings)
    # Containers of the docker backend (sandbox/docker_sandbox.py).
    docker: DockerSettings = field(default_factory=DockerSettings)

    def jail_spec(self):
        """The jail of the agent's commands (``sandbox.jail.JailSpec``)."""
        from sandbox.jail import JailSpec

        return JailSpec(uid=self.run_as_uid, gid=self.run_as_uid, uid_pool_size=self.uid_pool_size,
                        max_processes=self.max_processes,
                        max_address_space_bytes=self.max_memory_bytes, max_file_bytes=self.max_file_bytes,
                        tmp_bytes=self.tmp_bytes, require_fs_isolation=self.isolation == "bwrap")


@dataclass
class ProxySettings:
    """The OpenAI-compatible ModelProxy the agent talks to (always 127.0.0.1)."""

    host: str = "127.0.0.1"
    # 0 = let the OS choose a free port.
    port: int = 0
    model_name: str = "swe-policy"
    # verl tool parser for the model's tool-call format (Qwen2.5/Hermes: "hermes").
    tool_parser: str = "hermes"
    # When the agent rewrites its history: "new_segment" (train on each append-only segment)
    # or "error" (refuse the request; the agent then ends the episode).
    on_history_rewrite: str = "new_segment"
    # verl continuous-token builder family (verl.utils.tokenizer.continuous_token_wiring): "auto" infers
    # it from the model config's model_type; ChatML models of other types (SmolLM2: llama) need "qwen".
    # Checked against the chat template at start-up (model_proxy/token_check.py).
    token_builder: str = "auto"
    # Tokens one turn may sample at most (mini-swe-agent sends no max_tokens); null = only the
    # response budget limits a turn. A turn cut here ends the episode as context_limit.
    max_turn_tokens: int | None = 4096
    # Per-call profiling log (JSONL) directory for `python -m model_proxy.analyze`; null = off.
    profile_log_dir: str | None = None
    # gc.freeze() the worker's import-time heap when the proxy starts: full cyclic-GC passes
    # over it stall every session ~0.3 s (ModelProxyServer.start, bench/proxy_overhead.py).
    freeze_gc: bool = True


@dataclass
class MaskingSettings:
    """Which trajectories are kept out of the policy loss (response_mask all 0).

    Infrastructure failures (sandbox, proxy, reward errors) are always masked.
    """

    # DeepSWE practice: trajectories cut by context, step or time limits are masked, not scored 0.
    mask_limit_exits: bool = True


@dataclass
class SWEAgentConfig:
    """Everything the SWE agent loop needs beyond verl's own rollout config."""

    # One of Policy's values (a plain string: OmegaConf enums match member names, not values).
    policy: str = Policy.MODEL.value
    agent: AgentSettings = field(default_factory=AgentSettings)
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    # The grader's own settings class, so each reward setting has one default (reward/config.py).
    reward: RewardConfig = field(default_factory=RewardConfig)
    masking: MaskingSettings = field(default_factory=MaskingSettings)
    scripted: ScriptedSettings = field(default_factory=ScriptedSettings)
    # Per-rollout agent trajectory files go here; null = not kept.
    trajectory_dir: str | None = None
    # policy=script: a file of bash commands, one per line (the scripted policy's actions).
    script: str | None = None

    def __post_init__(self) -> None:
        allowed = [p.value for p in Policy]
        if self.policy not in allowed:
            raise ValueError(f"swe_agent.policy={self.policy!r}: expected one of {allowed}")
        if self.policy == Policy.SCRIPT.value and not self.script:
            raise ValueError("swe_agent.policy=script needs swe_agent.script (a file of bash commands)")
        if self.agent.backend not in ("mini_swe_agent", "swe_agent"):
            raise ValueError(f"swe_agent.agent.backend={self.agent.backend!r}: expected 'mini_swe_agent' or 'swe_agent'")
        if self.agent.sweagent_deployment not in ("docker", "local"):
            raise ValueError(
                f"swe_agent.agent.sweagent_deployment={self.agent.sweagent_deployment!r}: expected 'docker' or 'local'"
            )
        if self.proxy.on_history_rewrite not in ("new_segment", "error"):
            raise ValueError(
                f"swe_agent.proxy.on_history_rewrite={self.proxy.on_history_rewrite!r}: expected new_segment or error"
            )
        if self.sandbox.isolation not in ("auto", "bwrap", "none"):
            raise ValueError(f"swe_agent.sandbox.isolation={self.sandbox.isolation!r}: expected auto, bwrap or none")
        if self.sandbox.work_tree not in ("auto", "overlay", "copy", "clone"):
            raise ValueError(f"swe_agent.sandbox.work_tree={self.sandbox.work_tree!r}: expected auto, overlay, copy "
                             "or clone")
        if not self.reward.protect:
            raise ValueError("swe_agent.reward.protect=false: test-file protection is for measuring hacks "
                             "(python -m reward.audit), never for training")
        if self.agent.mode not in ("tool_call", "text"):
            raise ValueError(f"swe_agent.agent.mode={self.agent.mode!r}: expected 'tool_call' or 'text'")
        if self.sandbox.backend not in ("local", "docker"):
            raise ValueError(f"swe_agent.sandbox.backend={self.sandbox.backend!r}: expected 'local' or 'docker'")
        if (self.agent.backend == "swe_agent" and self.agent.sweagent_deployment == "local"
                and self.sandbox.isolation == "none"):
            raise ValueError("swe_agent.sandbox.isolation=none: SWE-agent's local deployment runs only in its "
                             "bubblewrap jails (isolation auto or bwrap)")
        if self.sandbox.backend == "docker" and self.agent.backend != "mini_swe_agent":
            raise ValueError("swe_agent.sandbox.backend=docker runs mini-swe-agent's commands in the container; "
                             "SWE-agent brings its own deployment (swe_agent.agent.sweagent_deployment)")


def load_swe_agent_config(*overrides: Any) -> SWEAgentConfig:
    """Merge ``overrides`` (dicts, DictConfigs or None, later wins) onto the schema defaults.

    Raises:
        omegaconf.errors.ConfigKeyError: an unknown key (the message names it).
        omegaconf.errors.ValidationError: a value of the wrong type.
    """
    schema = OmegaConf.structured(SWEAgentConfig)
    OmegaConf.set_readonly(schema.reward, False)  # a frozen dataclass (it keys graders); merged into here
    parts = [o if isinstance(o, DictConfig) else OmegaConf.create(o) for o in overrides if o is not None]
    try:
        merged = OmegaConf.merge(schema, *parts)
    except ConfigKeyError as exc:
        raise ConfigKeyError(f"{exc}{_closest_key_hint(schema, exc)}") from exc
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ValueError as exc:  # a section's own check (e.g. RewardConfig.__post_init__)
        message = str(exc)
        raise ValueError(message if message.startswith("swe_agent") else f"swe_agent: {message}") from exc


def _closest_key_hint(schema: DictConfig, exc: ConfigKeyError) -> str:
    """`` (did you mean 'x'?)`` for an unknown key, from the valid keys of its section."""
    full_key = str(getattr(exc, "full_key", "") or "")
    parent, _, key = full_key.rpartition(".")
    node = OmegaConf.select(schema, parent) if parent else schema
    if not key or not isinstance(node, DictConfig):
        return ""
    close = difflib.get_close_matches(key, [str(k) for k in node.keys()], n=1)
    return f"\n    did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
