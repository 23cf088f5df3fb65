"""SWE-agent 1.x (``sweagent run``) as the agent subprocess of a rollout.

SWE-agent is not on PyPI (the ``sweagent`` 0.0.1 there is a 2024 placeholder): it is
installed from its source, editable, because it finds its ``config/``, ``tools/`` and
``trajectories/`` beside its package (or at ``SWE_AGENT_CONFIG_DIR``,
``SWE_AGENT_TOOLS_DIR``, ``SWE_AGENT_TRAJECTORY_DIR``); ``example/install_sweagent.sh``
does it. Facts from SWE-agent 1.1.0's code that shape the run:

- it calls models through litellm, so ``openai/<name>`` + ``api_base`` reaches the proxy
  session; an unknown model needs both cost limits at 0 and ``max_input_tokens=0`` or it
  refuses to run. ``per_instance_call_limit`` raises ``InstanceCallLimitExceededError`` (a
  ``CostLimitExceededError``: exit status ``exit_cost``), which is our step limit;
- its default history processor (``cache_control``) adds and moves cache markers between
  messages: for training the history must be append-only, so the processors are off;
- function calling is the tool interface (``parse_function.type: function_calling``): the
  tools are ``bash``, ``str_replace_editor`` and ``submit`` (``config/default.yaml``);
- ``env.repo.type=preexisting`` works on the repository at ``/<repo_name>`` as it is
  (``reset: false``: no ``git checkout``/``clean`` of our prepared tree), where the
  ``local`` repo type would copy the tree and the loop would diff the untouched original;
- its ``local`` deployment (SWE-ReX ``LocalRuntime``) runs a ``/usr/bin/env bash``
  session (pexpect) and writes ``/root/tools``, ``/root/.swe-agent-env``,
  ``/root/state.json`` and ``/root/model.patch`` on the host it runs on, so two local
  runs on one host collide; its ``docker`` deployment starts ``swerex-remote`` in a
  container (``docker run -p <port>:8000``) and installs it over the network unless the
  image has it.

How a run is confined here:

- ``local``: the whole ``sweagent run`` runs in a bubblewrap jail of its own (host
  network kept: it must reach the proxy on loopback; the sandbox's leased uid, no
  capabilities) whose ``/root`` is the sandbox's home and ``/testbed`` its work tree.
  ``bash`` on its ``PATH`` is a wrapper that starts the session's shell in a second jail
  inside the first -- no network, its own PID namespace, an allowlisted environment,
  the work tree and home the only writable paths -- so the policy's commands never see
  the harness, its config (the session's key) or its output. Nested jails need
  unprivileged user namespaces (bubblewrap's ``--unshare-user``).
- ``docker``: SWE-ReX's container with the work tree bind-mounted at ``/testbed``, our
  labels (the reaper removes it when its owner dies), no capabilities but what root in
  the container needs, ``no-new-privileges`` and the sandbox's memory/CPU/process limits.

Either way SWE-agent edits the sandbox's work tree in place, and the loop extracts the
patch from it as for mini-swe-agent -- never from SWE-agent's own ``.patch`` file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import shlex
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recipe.config import AgentSettings
from recipe.outcome import ExitStatus
from recipe.runners.base import AgentAdapter, AgentRequest, AgentRun, WrapArgv
from sandbox.jail import (
    JailSpec,
    JailUnavailable,
    bwrap_available,
    give_to_jail,
    interpreter_paths,
    jail_argv,
    running_as_root,
    SYSTEM_PATH,
)
from sandbox.docker_sandbox import (
    LABEL_OWNER,
    LABEL_ROLLOUT,
    LABEL_SANDBOX,
    DockerSandboxFactory,
    image_for,
    image_task_path,
)
from sandbox.local import ROLLOUT_MARKER_ENV, LocalSandbox
from sandbox.relay import TcpRelay
from sandbox.swerex_image import LAUNCHER_DIR, SOCKET_DIR, SOCKET_NAME

# Where SWE-agent finds the repository and keeps its state, inside its deployment.
TESTBED = "/testbed"
AGENT_HOME = "/root"
REPO_NAME = TESTBED.strip("/")
# History processors of a training run: none, so every request extends the last one (SWE-agent's
# default, cache_control, only marks messages; the proxy drops the markers either way).
TRAINING_HISTORY_PROCESSORS: list[dict[str, Any]] = []

# SWE-agent's exit statuses (sweagent/agent/agents.py) -> ours; "submitted (exit_X)" is an
# autosubmission after exit_X and maps as exit_X does.
_SWE_AGENT_STATUS = {
    "submitted": ExitStatus.SUBMITTED,
    "exit_cost": ExitStatus.STEP_LIMIT,
    "exit_context": ExitStatus.CONTEXT_LIMIT,
    "exit_total_execution_time": ExitStatus.ROLLOUT_TIMEOUT,
    "exit_command_timeout": ExitStatus.AGENT_ERROR,
    "exit_format": ExitStatus.AGENT_ERROR,
    "exit_forfeit": ExitStatus.AGENT_ERROR,
    "exit_command": ExitStatus.AGENT_ERROR,
    "exit_api": ExitStatus.PROXY_ERROR,
    "exit_environment_error": ExitStatus.SANDBOX_ERROR,
    "exit_error": ExitStatus.AGENT_ERROR,
}


def from_swe_agent(exit_status: str) -> ExitStatus:
    """Map SWE-agent's ``info.exit_status`` to ours (the README's table); unknown ones are agent errors."""
    status = (exit_status or "").strip()
    if status.startswith("submitted (") and status.endswith(")"):
        status = status[len("submitted ("):-1]
    return _SWE_AGENT_STATUS.get(status, ExitStatus.AGENT_ERROR)


@dataclass(frozen=True)
class SWEAgentInstall:
    """Where an installed SWE-agent keeps its code and data (found without importing it: the
    import takes seconds).

    Attributes:
        package_dir: the ``sweagent`` package.
        config_dir, tools_dir, trajectory_dir: its ``config/``, ``tools/`` and ``trajectories/``.
    """

    package_dir: Path
    config_dir: Path
    tools_dir: Path
    trajectory_dir: Path

    @classmethod
    def locate(cls) -> SWEAgentInstall | None:
        """The importable SWE-agent, or None when it is not installed or its data directories are
        missing (a non-editable install without the ``SWE_AGENT_*_DIR`` variables)."""
        try:
            spec = importlib.util.find_spec("sweagent")
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.origin:
            return None
        package = Path(spec.origin).resolve().parent
        found = cls(
            package_dir=package,
            config_dir=Path(os.environ.get("SWE_AGENT_CONFIG_DIR", package.parent / "config")),
            tools_dir=Path(os.environ.get("SWE_AGENT_TOOLS_DIR", package.parent / "tools")),
            trajectory_dir=Path(os.environ.get("SWE_AGENT_TRAJECTORY_DIR", package.parent / "trajectories")),
        )
        dirs = (found.config_dir, found.tools_dir, found.trajectory_dir)
        return found if all(d.is_dir() for d in dirs) and (found.config_dir / "default.yaml").is_file() else None

    def environment(self) -> dict[str, str]:
        """The variables that point SWE-agent at its data (any install layout)."""
        return {"SWE_AGENT_CONFIG_DIR": str(self.config_dir), "SWE_AGENT_TOOLS_DIR": str(self.tools_dir),
                "SWE_AGENT_TRAJECTORY_DIR": str(self.trajectory_dir)}

    def readable(self) -> list[str]:
        """What a jailed ``sweagent run`` must be able to read."""
        paths = [str(self.package_dir), str(self.config_dir), str(self.tools_dir), str(self.trajectory_dir)]
        return list(dict.fromkeys(paths))


@functools.cache
def installed_sweagent() -> SWEAgentInstall | None:
    """``SWEAgentInstall.locate()``, looked up once per process (it stats files: not once per
    rollout on the event loop)."""
    return SWEAgentInstall.locate()


def sweagent_available() -> bool:
    """Whether SWE-agent is installed with its data directories (``SWEAgentInstall.locate``)."""
    return installed_sweagent() is not None


@dataclass
class SWEAgentRun:
    """One ``sweagent run``: its config file (``config()``), command line (``argv()``) and where
    it writes its trajectory.

    Attributes:
        problem_path: the problem statement file.
        problem_id: the instance id SWE-agent names its output after (the rollout id).
        output_dir: SWE-agent's output directory.
        config_path: where ``config()`` is written.
        default_config: SWE-agent's own ``config/default.yaml`` (tools, templates), loaded first.
        api_base, api_key, model_name: the proxy session.
        deployment: ``{"type": "local"}`` or SWE-ReX's docker deployment options.
        step_limit: LLM calls (``per_instance_call_limit``).
        command_timeout_s: one command (``tools.execution_timeout``), seconds.
        total_command_s: all commands together (``tools.total_execution_timeout``), seconds.
        llm_retry_attempts: attempts per LLM request (``model.retry.retries``).
        max_observation_chars: an observation is cut to this many characters.
    """

    problem_path: Path
    problem_id: str
    output_dir: Path
    config_path: Path
    default_config: Path
    api_base: str
    api_key: str
    model_name: str
    deployment: dict[str, Any] = field(default_factory=lambda: {"type": "local"})
    step_limit: int = 30
    command_timeout_s: int = 60
    total_command_s: int = 1800
    llm_retry_attempts: int = 1
    max_observation_chars: int = 65536

    def config(self) -> dict[str, Any]:
        """SWE-agent config for one training rollout (merged over ``default_config``): the key stays
        out of the command line, where ``/proc`` would show it."""
        return {
            "agent": {
                "model": {
                    "name": f"openai/{self.model_name}",
                    "api_base": self.api_base,
                    "api_key": self.api_key,
                    "per_instance_cost_limit": 0,
                    "total_cost_limit": 0,
                    "max_input_tokens": 0,
                    "per_instance_call_limit": self.step_limit,
                    "retry": {"retries": max(1, self.llm_retry_attempts)},
                },
                "history_processors": list(TRAINING_HISTORY_PROCESSORS),
                "tools": {
                    "parse_function": {"type": "function_calling"},
                    "execution_timeout": int(self.command_timeout_s),
                    "total_execution_timeout": int(self.total_command_s),
                },
                "templates": {"max_observation_length": int(self.max_observation_chars)},
            },
            "env": {
                "deployment": self.deployment,
                "repo": {"type": "preexisting", "repo_name": REPO_NAME, "reset": False},
            },
            "problem_statement": {"type": "text_file", "path": str(self.problem_path), "id": self.problem_id},
            "output_dir": str(self.output_dir),
        }

    def argv(self, file_owner: tuple[int, int] | None = None) -> list[str]:
        """``python -m sweagent run`` (list form: nothing goes through a shell); later ``--config``
        files override earlier ones.

        Args:
            file_owner: (uid, gid) the run creates and opens files as (``setfsuid``), keeping its
                own uid; None = as itself (``_AS_FILE_OWNER``).
        """
        args = ["run", f"--config={self.default_config}", f"--config={self.config_path}"]
        # -I: no user site directory, no PYTHON* variables, nothing of the working directory imported.
        if file_owner is None:
            return [sys.executable, "-I", "-m", "sweagent", *args]
        return [sys.executable, "-I", "-c", _AS_FILE_OWNER, *map(str, file_owner), *args]

    def trajectory_path(self) -> Path:
        """Where SWE-agent writes the trajectory (``info.exit_status`` inside)."""
        return self.output_dir / self.problem_id / f"{self.problem_id}.traj"


# Runs SWE-agent with the file-system ids of the sandbox's uid (setfsuid/setfsgid are per thread:
# set before any thread starts, every thread has them). Its uploads, state files and output are then
# the sandbox uid's, as its shell (that uid) needs for `chmod +x /root/tools/*/bin/*` and state.json,
# and it cannot read a root-only file a planted link points at; its real uid stays 0, so it can still
# make its shell's jail (execve gives children fsuid = euid again).
_AS_FILE_OWNER = """\
import ctypes, runpy, sys
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = int(sys.argv[1]), int(sys.argv[2])
libc.setfsgid(gid)
libc.setfsuid(uid)
if libc.setfsuid(-1) != uid or libc.setfsgid(-1) != gid:
    sys.exit("cannot take the sandbox's file-system ids")
sys.argv = ["sweagent", *sys.argv[3:]]
runpy.run_module("sweagent", run_name="__main__", alter_sys=True)
"""


def _dies_with_parent() -> list[str]:
    """``setpriv --pdeathsig KILL --`` (util-linux), when there is one."""
    return ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def session_shell(sandbox: LocalSandbox, spec: JailSpec) -> str:
    """The ``bash`` SWE-agent's local runtime starts (a ``/bin/sh`` script): ``/bin/bash`` in a
    jail inside the run's jail (no network, its own PID namespace, ``/testbed`` and ``/root``
    writable, the task's interpreter readable) with the sandbox's command environment.

    Raises:
        JailUnavailable: bubblewrap cannot make the jail here.
    """
    env = {**sandbox.env(), "HOME": AGENT_HOME, "TMPDIR": "/tmp", ROLLOUT_MARKER_ENV: sandbox.rollout_id}
    inner = jail_argv(
        dataclasses.replace(spec, network=False, require_fs_isolation=True),
        ["/bin/bash"], writable=[TESTBED, AGENT_HOME], readable=interpreter_paths(sandbox.task.host_python),
        chdir=TESTBED, new_session=False,
    )
    assignments = [f"{k}={v}" for k, v in env.items()]
    return "#!/bin/sh\nexec " + shlex.join(["/usr/bin/env", "-i", *assignments, *inner]) + ' "$@"\n'


@dataclass
class SWEAgent(AgentAdapter):
    """``sweagent run`` for one rollout (module docstring). SWE-agent executes its commands
    itself, so the shim wraps the whole process (``wrap_scope="agent"``).

    Attributes:
        run: the run's config and command line.
        task_text: the problem statement.
        install: the SWE-agent the run uses.
    """

    run: SWEAgentRun
    task_text: str
    install: SWEAgentInstall

    name = "sweagent"
    wrap_scope = "agent"

    def log_path(self, sandbox: LocalSandbox) -> Path:
        return sandbox.runner_dir / "sweagent.log"

    def environment(self, sandbox: LocalSandbox, settings: AgentSettings) -> dict[str, str]:
        variables = {**self.install.environment(), "SWE_AGENT_LOG_STREAM_LEVEL": "INFO"}
        if self.run.deployment.get("type") == "local":
            state = self._state_dir(sandbox)
            # HOME is the state directory, not /root (the policy's): no config of the policy's reaches a
            # git the harness runs on /testbed (its autosubmission), which then refuses the tree as
            # another user's ("dubious ownership") instead of running a hook or fsmonitor it set.
            variables.update(HOME=str(state), GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull,
                             PATH=os.pathsep.join([str(state / "bin"), os.path.dirname(sys.executable),
                                                   "/usr/local/bin:/usr/bin:/bin"]))
        return variables

    async def prepare(self, sandbox: LocalSandbox, settings: AgentSettings, wrap_command: WrapArgv | None) -> list[str]:
        local = self.run.deployment.get("type") == "local"
        await asyncio.to_thread(self._write_files, sandbox, local)
        if not local:
            # Dies with the rollout's process (its containers are then the reaper's: label, dead owner).
            return [*_dies_with_parent(), *self.run.argv()]
        if not sandbox.isolated or not bwrap_available():
            raise JailUnavailable("SWE-agent's local deployment runs only in a bubblewrap jail "
                                  "(swe_agent.sandbox.isolation=bwrap, apt-get install bubblewrap)")
        state = self._state_dir(sandbox)
        owner = (sandbox.jail.uid, sandbox.jail.gid) if running_as_root() and sandbox.jail.uid is not None else None
        return jail_argv(
            dataclasses.replace(sandbox.jail, network=True, require_fs_isolation=True),
            self.run.argv(file_owner=owner),
            writable=[state],
            readable=[*interpreter_paths(sys.executable), *self.install.readable(), *interpreter_paths(sandbox.task.host_python)],
            mounts={AGENT_HOME: sandbox.home, TESTBED: sandbox.workdir},
            chdir=state,
            # The harness stays root (no capability dropped) to make its shell's jail; the policy's
            # commands run only in that one, as the sandbox's uid.
            drop_privileges=False,
        )

    def _write_files(self, sandbox: LocalSandbox, local: bool) -> None:
        state = self._state_dir(sandbox)
        (state / "bin").mkdir(parents=True, exist_ok=True)
        self.run.problem_path.write_text(self.task_text)
        self.run.config_path.write_text(yaml.safe_dump(self.run.config(), sort_keys=False))
        if local:
            shell = state / "bin" / "bash"
            shell.write_text(session_shell(sandbox, sandbox.jail))
            shell.chmod(0o755)
            # The run writes its output with the sandbox uid's file-system ids; its shell never sees this directory.
            give_to_jail(sandbox.jail, state)

    @staticmethod
    def _state_dir(sandbox: LocalSandbox) -> Path:
        return sandbox.runner_dir / "sweagent"

    async def read_result(self, sandbox: LocalSandbox, exit_code: int | None, duration_s: float,
                          log_tail: str) -> AgentRun | None:
        try:
            data = json.loads(await asyncio.to_thread(self.run.trajectory_path().read_text))
        except (OSError, ValueError):
            return None
        info = data.get("info", {}) if isinstance(data, dict) else {}
        raw = str(info.get("exit_status", ""))
        calls = int((info.get("model_stats") or {}).get("api_calls", 0) or 0)
        history = data.get("history") if isinstance(data.get("history"), list) else []
        messages = [{k: m[k] for k in ("role", "content", "tool_calls", "tool_call_ids") if m.get(k) is not None}
                    for m in history if isinstance(m, dict)]
        return AgentRun(from_swe_agent(raw), raw, calls, duration_s, log_tail=log_tail, messages=messages,
                        error=None if raw.startswith("submitted") else (raw or None))


@contextlib.asynccontextmanager
async def docker_deployment(sandbox: LocalSandbox, factory: DockerSandboxFactory) -> AsyncIterator[dict[str, Any]]:
    """SWE-ReX Docker deployment options for one rollout, with its relay listening (module docstring).

    The container (SWE-ReX starts it, ``docker run``) comes from the task's image (the base image for a
    task that brings its repository) with SWE-ReX built in (``factory.swerex_images``), without a
    network (SWE-ReX reaches its server through the relay and a Unix socket in ``runner_dir/swerex``,
    mounted at ``SOCKET_DIR``), the work tree at ``/testbed`` (and a repository task's interpreter
    read-only at its host path, first on ``PATH``), our labels, ``DockerSettings`` limits, no
    capabilities and no privilege gain. On exit the relay stops and every container labelled with the rollout is removed
    (SWE-ReX's own ``docker kill`` does not run when its process is killed).

    Raises:
        SWEReXImageError: the derived image could not be built.
        docker.errors.DockerException: the engine refused a call (e.g. no such image).
    """
    task, settings, rollout = sandbox.task, factory.settings, sandbox.rollout_id
    source = image_for(task, settings)
    image = await asyncio.to_thread(factory.swerex_images.image_for, source)
    image_path = (await factory.image_env(source)).get("PATH", SYSTEM_PATH)
    sockets = sandbox.runner_dir / "swerex"
    await asyncio.to_thread(sockets.mkdir, mode=0o700)
    args = ["--network=none", f"--volume={sandbox.workdir}:{TESTBED}", f"--volume={sockets}:{SOCKET_DIR}"]
    if task.runs_in_image:
        path = image_task_path(image_path, task.env_bin)
    else:
        path = image_task_path(image_path, os.path.dirname(task.host_python))
        args += [f"--volume={p}:{p}:ro" for p in interpreter_paths(task.host_python)]
    labels = {LABEL_SANDBOX: "1", LABEL_ROLLOUT: rollout, LABEL_OWNER: factory.owner}
    args += [f"--label={k}={v}" for k, v in labels.items()]
    args += [f"--memory={int(settings.memory_bytes)}", f"--memory-swap={int(settings.memory_bytes)}",
             f"--cpus={settings.cpus}", f"--pids-limit={int(settings.pids_limit)}",
             "--cap-drop=ALL", "--security-opt=no-new-privileges",
             f"--env=PATH={LAUNCHER_DIR}{os.pathsep}{path}", "--env=PIP_NO_INDEX=1", "--env=PYTHONDONTWRITEBYTECODE=1",
             f"--env={ROLLOUT_MARKER_ENV}={rollout}"]
    # A socket path is limited to 107 bytes and sandbox paths can be longer: connect through a
    # descriptor of the directory (/proc/self/fd/N/swerex.sock).
    sockets_fd = os.open(sockets, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        relay = await TcpRelay.start(functools.partial(asyncio.open_unix_connection,
                                                       f"/proc/self/fd/{sockets_fd}/{SOCKET_NAME}"))
    except BaseException:
        os.close(sockets_fd)
        raise
    try:
        yield {"type": "docker", "image": image, "port": relay.port, "docker_args": args, "pull": "never",
               "python_standalone_dir": None, "remove_container": True,
               "startup_timeout": float(settings.start_timeout_s)}
    finally:
        await relay.close()
        os.close(sockets_fd)
        await asyncio.shield(asyncio.to_thread(factory.reap, own=True, only_rollout=rollout))


def swe_agent_for(sandbox: LocalSandbox, request: AgentRequest, settings: AgentSettings,
                  deployment: dict[str, Any] | None = None) -> SWEAgent:
    """The ``sweagent run`` adapter for one rollout (run it with ``recipe.runners.base.run_agent``).

    Args:
        deployment: SWE-ReX deployment options (``docker_deployment``); None = the local deployment.

    Raises:
        FileNotFoundError: SWE-agent is not installed (``example/install_sweagent.sh``).
        ValueError: ``settings.sweagent_deployment`` is docker and no deployment was given.
    """
    if deployment is None and settings.sweagent_deployment != "local":
        raise ValueError(f"SWE-agent's {settings.sweagent_deployment!r} deployment needs its options "
                         "(recipe.runners.swe_agent.docker_deployment)")
    install = installed_sweagent()
    if install is None:
        raise FileNotFoundError("SWE-agent 1.x is not installed with its config/ and tools/ "
                                "(bash example/install_sweagent.sh)")
    state = sandbox.runner_dir / "sweagent"
    run = SWEAgentRun(
        problem_path=state / "problem_statement.md",
        problem_id=sandbox.rollout_id,
        output_dir=state / "output",
        config_path=state / "training.yaml",
        default_config=install.config_dir / "default.yaml",
        api_base=request.api_base,
        api_key=request.api_key,
        model_name=request.model_name,
        deployment=deployment or {"type": "local"},
        step_limit=settings.step_limit,
        command_timeout_s=settings.command_timeout_s,
        total_command_s=int(settings.rollout_timeout_s),
        llm_retry_attempts=settings.llm_retry_attempts,
        max_observation_chars=settings.max_output_bytes,
    )
    return SWEAgent(run, task_text=request.task_text, install=install)
