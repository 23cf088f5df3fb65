"""Entry point of the mini-swe-agent subprocess (``python -m recipe.runners.mini_swe_agent_entry SPEC``).

Runs mini-swe-agent as a library (``DefaultAgent`` + ``LitellmModel`` +
``LocalEnvironment``) with the builtin ``mini.yaml``/``mini_textbased.yaml``
templates, unattended, against the ModelProxy session given in the spec, and
writes a ``RunnerResult`` JSON next to the agent's own trajectory file.

Kept free of project imports other than the spec model so it starts fast.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path


def keep_failed_turns(model):
    """Make a mini-swe-agent model keep the assistant turn that caused a FormatError.

    mini-swe-agent 2.x appends only the format-error user message and drops the
    response that caused it, so its next request would rewrite the history the
    proxy recorded (not append-only). Re-inserting that response (which
    ``LitellmModel.query`` keeps in the error's ``extra.response``) before the
    error message keeps the history append-only: the policy is trained on exactly
    the context it was conditioned on, and a format error earns its reward
    instead of being masked as a proxy failure.
    """
    from minisweagent.exceptions import FormatError

    query = model.query

    def query_keeping_failed_turns(messages, **kwargs):
        try:
            return query(messages, **kwargs)
        except FormatError as error:
            response = error.messages[0].get("extra", {}).get("response")
            if isinstance(response, dict):
                failed = dict(response["choices"][0]["message"], extra={"format_error": True})
                error.messages = (failed, *error.messages)
            raise

    model.query = query_keeping_failed_turns
    return model


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    A SIGKILLed rollout command cannot kill its agents; without this they would
    run on (they live in their own sessions) until the next start-up reaper.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import os
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the prctl
        os._exit(1)


def _child_dies_with(parent: int):
    """A ``preexec_fn`` (runs between fork and exec) giving the child ``PR_SET_PDEATHSIG`` and
    checking its parent is still ``parent``; everything it calls is resolved here, before any fork,
    so the child imports nothing."""
    import ctypes
    import os
    import signal

    if not sys.platform.startswith("linux"):
        return None
    prctl, getppid, exit_now, kill = ctypes.CDLL(None, use_errno=True).prctl, os.getppid, os._exit, int(signal.SIGKILL)

    def preexec() -> None:
        prctl(1, kill)  # PR_SET_PDEATHSIG
        if getppid() != parent:
            exit_now(1)

    return preexec


_CHILD_DIES_WITH_US = None  # set in main() (the pid is this process's)

# Limits the agent's commands hit in this run (reported in RunnerResult.limits_hit).
LIMITS_HIT: list[str] = []


def run_bounded(argv: list[str], *, cwd: str, env: dict, timeout_s: float, max_bytes: int):
    """Run ``argv`` in a new session; keep the first ``max_bytes`` of its output, count the rest.

    Returns ``(output bytes kept, total bytes, returncode, timed_out)``. At ``timeout_s`` the
    process group is killed (the jail's own ``timeout`` normally ends the command first).
    """
    import os
    import selectors
    import signal
    import subprocess
    import time

    # The command dies with this process even when it is killed while the command starts: the jail
    # (bubblewrap's --die-with-parent) only guards what it starts, not itself before its own prctl.
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_CHILD_DIES_WITH_US)
    kept, total, timed_out = bytearray(), 0, False
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not selector.select(timeout=min(left, 1.0)):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            total += len(chunk)
            if len(kept) < max_bytes:
                kept += chunk[: max_bytes - len(kept)]
    if timed_out:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    returncode = proc.wait()
    proc.stdout.close()
    return bytes(kept), total, returncode, timed_out


# Bytes an entry counts at least: a block, so many empty files or directories (inodes) count too.
ENTRY_MIN_BYTES = 4096


def _tree_bytes(*roots: str) -> int:
    """Disk use of the trees at ``roots``: each file, link or directory counts its size, at least
    ``ENTRY_MIN_BYTES``; links are not followed."""
    import os

    total = 0
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                try:
                    total += max(os.lstat(os.path.join(folder, name)).st_size, ENTRY_MIN_BYTES)
                except OSError:
                    pass
    return total


def sandboxed_environment(base_cls, spec):
    """A mini-swe-agent environment whose commands run in the sandbox (``spec.command_prefix``, the jail),
    with the sandbox's environment, a deadline the jail enforces itself (coreutils ``timeout``: it holds
    even if this process dies), bounded output, and the work tree's size checked after each command."""
    from minisweagent.exceptions import InterruptAgentFlow

    class SandboxedEnvironment(base_cls):
        def execute(self, action: dict, cwd: str = "", *, timeout: int | None = None):
            command = action.get("command", "")
            limit = int(timeout or self.config.timeout)
            argv = [*spec.command_prefix, "timeout", "-k", "5", str(limit), "bash", "-c", command]
            started = time.monotonic()
            kept, total, returncode, killed = run_bounded(argv, cwd=cwd or spec.workdir, env=dict(spec.command_env),
                                                          timeout_s=limit + 15, max_bytes=spec.max_output_bytes)
            elapsed = time.monotonic() - started
            text = kept.decode("utf-8", errors="replace")
            output = {"output": text, "returncode": returncode, "exception_info": ""}
            # 137 is also a SIGKILL from elsewhere (the OOM killer, the shim's hard cap): only a
            # command that ran its time out timed out.
            if killed or returncode == 124 or (returncode == 137 and elapsed >= 0.95 * limit):
                LIMITS_HIT.append("command_timeout")
                output.update(returncode=-1, exception_info=f"The command timed out after {limit} seconds and was killed.")
            elif returncode == 137:
                output.update(exception_info="The command was killed (SIGKILL), e.g. for using more memory than "
                                             "the sandbox allows.")
            if total > len(kept):
                LIMITS_HIT.append("output_truncated")
                output["output"] = text + f"\n[output truncated: {total - len(kept)} more bytes not shown]"
            self._check_finished(output)
            home = spec.command_env.get("HOME")
            trees = [spec.workdir] + ([home] if home and home != spec.workdir else [])
            if spec.max_workdir_bytes and _tree_bytes(*trees) > spec.max_workdir_bytes:
                LIMITS_HIT.append("workdir_bytes")
                reason = f"the work tree and home grew past {spec.max_workdir_bytes} bytes"
                raise InterruptAgentFlow({"role": "exit", "content": f"SandboxLimitExceeded: {reason}",
                                          "extra": {"exit_status": "SandboxLimitExceeded", "submission": ""}})
            return output

    return SandboxedEnvironment


def warm_imports() -> list[str]:
    """What a warm-start server (``recipe.runners.forkserver_main``) imports once for every rollout:
    the modules ``main`` imports, litellm (~6 s of a cold start on 2 cores) first among them, then
    what litellm imports lazily on a first completion (found with ``-X importtime`` on a cold run:
    ~0.8 s more; a name a later litellm lacks is skipped)."""
    return ["litellm", "yaml", "minisweagent.agents.default", "minisweagent.config",
            "minisweagent.environments.local", "minisweagent.models", "minisweagent.models.litellm_model",
            "minisweagent.models.litellm_textbased_model", "minisweagent.exceptions", "recipe.runners.spec",
            "litellm.proxy.openai_files_endpoints.common_utils", "litellm.proxy.spend_tracking.savings",
            "litellm.llms.github_copilot.per_user_auth", "litellm._service_logger",
            "litellm.integrations.generic_api.generic_api_callback", "litellm.llms.openai_like.dynamic_config",
            "ctypes", "encodings.unicode_escape", "httpcore"]


def follow_environment() -> None:
    """Make what mini-swe-agent read from the environment at import time this process's values.

    A warm-started process imported mini-swe-agent in the fork server, under the server's
    environment; its global config directory (``MSWEA_GLOBAL_CONFIG_DIR``, created and its ``.env``
    loaded at import) must be this rollout's, as a cold start gives. A no-op when cold.
    """
    mswea = sys.modules.get("minisweagent")
    wanted = os.environ.get("MSWEA_GLOBAL_CONFIG_DIR")
    if mswea is None or not wanted or Path(wanted) == mswea.global_config_dir:
        return
    import dotenv

    mswea.global_config_dir = Path(wanted)
    mswea.global_config_dir.mkdir(parents=True, exist_ok=True)
    mswea.global_config_file = mswea.global_config_dir / ".env"
    dotenv.load_dotenv(dotenv_path=mswea.global_config_file)


def main(spec_path: str) -> int:
    from recipe.runners.spec import RunnerResult, RunnerSpec

    global _CHILD_DIES_WITH_US
    die_with_parent()
    follow_environment()
    _CHILD_DIES_WITH_US = _child_dies_with(os.getpid())
    spec = RunnerSpec.model_validate_json(Path(spec_path).read_text())
    result = RunnerResult(exit_status="AgentNotStarted")
    try:
        import yaml
        from minisweagent.agents.default import DefaultAgent
        from minisweagent.config import builtin_config_dir
        from minisweagent.environments.local import LocalEnvironment
        from minisweagent.models import get_model

        builtin = "mini.yaml" if spec.mode == "tool_call" else "mini_textbased.yaml"
        defaults = yaml.safe_load((builtin_config_dir / builtin).read_text())
        model_cfg = dict(defaults.get("model", {}))
        model_cfg.update(
            model_name=f"openai/{spec.model_name}",
            model_class="litellm" if spec.mode == "tool_call" else "litellm_textbased",
            cost_tracking="ignore_errors",
            model_kwargs={
                **model_cfg.get("model_kwargs", {}),
                "api_base": spec.api_base,
                "api_key": spec.api_key,
                "timeout": spec.turn_timeout_s,
                "num_retries": 0,
            },
        )
        model = keep_failed_turns(get_model(config=model_cfg))
        env_cfg = dict(defaults.get("environment", {}))
        # mini-swe-agent's environment variables (PAGER=cat...) join the sandbox's allowlist.
        spec = spec.model_copy(update={"command_env": {**env_cfg.get("env", {}), **spec.command_env}})
        env = sandboxed_environment(LocalEnvironment, spec)(cwd=spec.workdir, timeout=spec.command_timeout_s)
        agent_cfg = dict(defaults["agent"])
        agent_cfg.update(
            step_limit=spec.step_limit,
            cost_limit=0,
            output_path=Path(spec.trajectory_path) if spec.trajectory_path else None,
        )
        agent = DefaultAgent(model, env, **agent_cfg)
        try:
            info = agent.run(spec.task)
            result.exit_status = info.get("exit_status", "") or "Unknown"
            result.submission = info.get("submission", "") or ""
        except Exception as exc:  # the agent already recorded an "exit" message
            result.exit_status = type(exc).__name__
            result.error = f"{type(exc).__name__}: {exc}"[-4000:]
        result.n_calls = agent.n_calls
        result.messages = agent.messages
        result.limits_hit = list(LIMITS_HIT)
    except Exception as exc:
        result.exit_status = type(exc).__name__
        result.error = traceback.format_exc()[-4000:]
    Path(spec.result_path).write_text(result.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
