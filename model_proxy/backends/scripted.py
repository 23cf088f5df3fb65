"""A scripted policy that replays fixed bash commands through the agent's own actions.

A harness check, never a model result (like SWE-bench's gold-patch validation):
turn k of a trajectory emits command k in the exact format the agent parses, and
once the commands are used up it emits the agent's submit action: mini-swe-agent's
command ``echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT``, or SWE-agent's ``submit`` tool
(``submit_tool="submit"``; its ``review_on_submit_m`` bundle asks once more before it
takes the submission, so the script submits on every turn after its commands). With
``commands=[]`` it submits at once (the "submits nothing" policy).

Scripts:

- ``reference``: the task's reference patch applied (``recipe.swe_agent_loop.reference_commands``);
- ``reference_with_tests`` (``reference_with_tests_commands``): the action sequence of
  a real coding agent (seed 001, "understand - modify - verify"): inspect the code the
  fix touches, reproduce the failure with the task's test command, apply the reference
  fix, re-run the failing tests' files, run the whole suite, look at the diff, submit.
  Its tool calls do the work real agents' tool calls do (test runs are 44-73% of Bash
  time in seed 001), so its resource traces have real tool-phase bursts.

Emulated inference time (``GenerationLatency``): a scripted policy answers in
microseconds, a GPU-served one does not. With a latency set, each turn sleeps
(``asyncio.sleep``, the event loop keeps running) for the time a served model would
take to produce it, so traces recorded with this backend have realistic inference
phases. That time is emulated; everything the tools do is real.

Formats (the text is tokenized with ``tokenizer.encode`` and the eos id appended):

- ``mode="tool_call"`` (mini-swe-agent ``litellm`` model, ``bash`` tool):
  ``<tool_call>\\n{"name": "bash", "arguments": {"command": CMD}}\\n</tool_call>`` +
  ``<|im_end|>`` — Qwen2.5/hermes function calling, parsed by the proxy with verl's
  hermes parser into an OpenAI ``tool_calls`` entry.
- ``mode="text"`` (``litellm_textbased``): ``THOUGHT: ...\\n\\n```mswea_bash_command\\n
  CMD\\n```\\n`` + ``<|im_end|>``, matching
  ``LitellmTextbasedModelConfig.action_regex = r"```mswea_bash_command\\s*\\n(.*?)\\n```"``.
  A command that itself contains a line starting with three backticks would end the
  fence early in that regex: encode such content (e.g. base64) in the command.

Logprobs are 0.0 and ``stop_reason`` is ``"stop"`` unless ``max_tokens`` cuts the
turn (then the ids are truncated and the reason is ``"length"``, as a real model's).
"""

from __future__ import annotations

import asyncio
import base64
import math
import random
import shlex
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence

from ..tool_format import SUBMIT_COMMAND, hermes_tool_call_text, text_action
from .base import GenerationOutput

ScriptMode = Literal["tool_call", "text"]


@dataclass(frozen=True)
class GenerationLatency:
    """Emulated inference time of one turn, in seconds:
    ``first_token_s + per_token_s * max(generated tokens, min_turn_tokens)``, times a
    log-normal factor ``exp(N(0, jitter_sigma))`` drawn per turn (seeded by request id
    and turn, so a run is reproducible).

    Attributes:
        per_token_s: decode time per generated token, seconds (time per output token, TPOT).
        first_token_s: time to the first token (queueing + prefill of the context), seconds.
        min_turn_tokens: tokens a real agent's turn has at least (its reasoning before the
            command; the scripted text itself is only the command).
        jitter_sigma: sigma of the log-normal factor; 0 = deterministic.

    ``GenerationLatency()`` is zero (no emulation). ``GenerationLatency.served_7b()`` is the
    profile the recorded trace set used; sources are in its docstring.

    Raises:
        ValueError: a negative field.
    """

    per_token_s: float = 0.0
    first_token_s: float = 0.0
    min_turn_tokens: int = 0
    jitter_sigma: float = 0.0

    def __post_init__(self) -> None:
        for name in ("per_token_s", "first_token_s", "min_turn_tokens", "jitter_sigma"):
            if getattr(self, name) < 0:
                raise ValueError(f"GenerationLatency.{name} must be >= 0, got {getattr(self, name)!r}")

    @classmethod
    def served_7b(cls) -> GenerationLatency:
        """A 3B-7B policy served by vLLM to a batch of concurrent rollouts.

        - ``per_token_s=0.02`` (50 tokens/s per sequence): vLLM serving benchmarks give
          3-15 ms TPOT at 64-256 concurrent sequences for 30-49B models on B200
          (docs.vultr.com/inference-cookbook, "Concurrency Tuning"), and ~9 ms
          (108 tokens/s) for Llama-3.1-8B at one stream (Hugging Face dataset
          rbgo/llm-inference-benchmark); an A100/H100 shared by a rollout batch of
          64 is slower per sequence, so 20 ms.
        - ``first_token_s=1.0``: prefill of a 4-16k-token agent context in a busy batch.
        - ``min_turn_tokens=300``: a mini-swe-agent turn is a THOUGHT paragraph plus
          one command.
        - ``jitter_sigma=0.3``.

        That is about 7 s per turn. Seed 001's GLM runs spent ~64% of 664 s on inference
        over ~30 Bash calls, about 14 s per turn, so this profile is on the short side:
        it makes tool phases a larger share of time than seed 001 saw.
        """
        return cls(per_token_s=0.02, first_token_s=1.0, min_turn_tokens=300, jitter_sigma=0.3)

    @property
    def enabled(self) -> bool:
        return self.per_token_s > 0 or self.first_token_s > 0

    def seconds(self, n_tokens: int, key: str = "") -> float:
        """Emulated seconds for a turn of ``n_tokens`` generated tokens (``key`` seeds the jitter)."""
        base = self.first_token_s + self.per_token_s * max(int(n_tokens), self.min_turn_tokens)
        if self.jitter_sigma <= 0 or base <= 0:
            return base
        rng = random.Random(zlib.crc32(key.encode()))
        return base * math.exp(rng.gauss(0.0, self.jitter_sigma))


class _TaskLike(Protocol):
    """The ``core.task.SWETask`` fields a script reads."""

    patch: str
    test_cmd: str
    FAIL_TO_PASS: list[str]
    PASS_TO_PASS: list[str]


def _patched_files(patch: str) -> list[tuple[str, int]]:
    """(path, first hunk's source line) per file the patch changes (unidiff)."""
    from unidiff import PatchSet

    out = []
    for pf in PatchSet(patch):
        path = pf.path
        line = pf[0].source_start if len(pf) else 1
        out.append((path, line))
    return out


def _test_files(tests: Sequence[str]) -> list[str]:
    """Files of pytest node ids (``a/b.py::C::t`` -> ``a/b.py``); unittest ids are kept whole."""
    files: list[str] = []
    for name in tests:
        f = name.split("::", 1)[0] if "::" in name else name
        if f not in files:
            files.append(f)
    return files


def reference_with_tests_commands(task: _TaskLike, *, output_lines: int = 25) -> list[str]:
    """A real agent's action sequence around the task's reference fix (module docstring).

    Commands, one per turn: (1) ``git status`` and the code around the first hunk of
    each patched file; (2) the task's test command on the FAIL_TO_PASS tests
    (reproduce); (3) the reference patch applied (base64 on one line, as
    ``reference_commands``); (4) the test command on the files of all FAIL_TO_PASS
    and PASS_TO_PASS tests; (5) the test command alone (the whole suite); (6)
    ``git diff --stat``. Test output is cut to its last ``output_lines`` lines, as
    agents do, so observations stay within the context.

    Raises:
        ValueError: the task has no patch or no test command.
    """
    if not task.patch.strip() or not task.test_cmd.strip():
        raise ValueError("reference_with_tests needs the task's patch and test_cmd")
    tail = f" 2>&1 | tail -n {int(output_lines)}"
    views = [f"sed -n '{max(1, line - 15)},{line + 25}p' {shlex.quote(path)}" for path, line in _patched_files(task.patch)]
    failing = list(task.FAIL_TO_PASS)
    files = _test_files(failing + list(task.PASS_TO_PASS))
    encoded = base64.b64encode(task.patch.encode()).decode()
    return [
        " && ".join(["git status --short", *views]),
        f"{task.test_cmd} {shlex.join(failing)}{tail}",
        f"echo {encoded} | base64 -d | git apply --whitespace=nowarn -",
        f"{task.test_cmd} {shlex.join(files)}{tail}",
        f"{task.test_cmd}{tail}",
        "git diff --stat",
    ]


@dataclass(frozen=True)
class ScriptStep:
    """One turn of a scripted policy: the reasoning written before the command, and the command."""

    thought: str
    command: str


def _str_replace_edits(patch: str) -> list[tuple[str, str, str]]:
    """(path, old text, new text) per hunk: the hunk's changed lines with one line of context
    on each side, so the old text is a short, exact copy of what the agent read in the file."""
    from unidiff import PatchSet

    edits = []
    for pf in PatchSet(patch):
        for hunk in pf:
            lines = list(hunk)
            changed = [i for i, line in enumerate(lines) if line.line_type in ("-", "+")]
            if not changed:
                continue
            lo, hi = max(0, changed[0] - 1), min(len(lines), changed[-1] + 2)
            window = lines[lo:hi]
            old = "".join(line.value for line in window if line.line_type in (" ", "-"))
            new = "".join(line.value for line in window if line.line_type in (" ", "+"))
            edits.append((pf.path, old, new))
    return edits


def edit_command(path: str, old: str, new: str) -> str:
    """A bash command replacing the one occurrence of ``old`` by ``new`` in ``path`` (a Python
    here-document: the text travels as Python literals, so no quoting or regex escapes), failing
    loudly when ``old`` is not there exactly once -- the ``str_replace`` edit of SWE-agent's editor."""
    return (
        "python3 - <<'EOF'\n"
        "from pathlib import Path\n"
        f"path = Path({path!r})\n"
        "text = path.read_text()\n"
        f"old = {old!r}\n"
        f"new = {new!r}\n"
        "assert text.count(old) == 1, f'old text found {text.count(old)} times'\n"
        "path.write_text(text.replace(old, new))\n"
        "print('edited', path)\n"
        "EOF"
    )


EXPERT_SUBMIT_THOUGHT = "The fix is in place and the tests pass, so I submit it."
"""The expert policy's last thought (text mode), written before it submits."""


def expert_steps(task: _TaskLike, *, output_lines: int = 30, context_lines: int = 12) -> list[ScriptStep]:
    """A readable expert trajectory for supervised warm starts (SWE-Gym/SWE-smith style), every
    command something a model could write from what it has seen so far:

    (1) list the repository's files; (2) run the visible test suite (the hidden FAIL_TO_PASS
    tests are not in the work tree); (3) read the code each hunk of the fix touches, with line
    numbers; (4) one ``str_replace`` edit per hunk (``edit_command``: the changed lines and one
    line of context, as literals); (5) rerun the suite; (6) look at the diff; then submit.

    Unlike ``reference_with_tests`` the fix is not an opaque base64 patch, so the trajectory can
    be learned. Whether it resolves the task is for the grader to say: SFT data keeps only the
    resolved ones (rejection sampling, as SWE-Gym and SWE-smith do).

    Raises:
        ValueError: the task has no patch or no test command, or the patch changes no line.
    """
    if not task.patch.strip() or not task.test_cmd.strip():
        raise ValueError("the expert needs the task's patch and test_cmd")
    edits = _str_replace_edits(task.patch)
    if not edits:
        raise ValueError("the task's patch changes no line")
    tail = f" 2>&1 | tail -n {int(output_lines)}"
    steps = [
        ScriptStep("I will start by looking at the files in the repository.", "git ls-files | head -n 50"),
        ScriptStep("Next I run the test suite to see its current state.", f"{task.test_cmd}{tail}"),
    ]
    for path, line in _patched_files(task.patch):
        start = max(1, line - context_lines)
        steps.append(ScriptStep(
            f"The issue points at the code in {path}. Let me read it with line numbers.",
            f"nl -ba {shlex.quote(path)} | sed -n '{start},{line + 2 * context_lines}p'",
        ))
    for path, old, new in edits:
        old_line = next((x.strip() for x in old.splitlines() if x.strip() and x not in new.splitlines()), "")
        why = f"`{old_line}` is the bug" if old_line else "a statement is missing here"
        steps.append(ScriptStep(f"In {path}, {why}. I replace the lines with the fixed version.",
                                edit_command(path, old, new)))
    steps.append(ScriptStep("Now I rerun the tests to check the fix.", f"{task.test_cmd}{tail}"))
    steps.append(ScriptStep("Let me review the change before submitting.", "git diff"))
    return steps


class ScriptedPolicyBackend:
    """Replays ``commands`` one per turn, then submits. Turns are counted per ``request_id``.

    Args:
        tokenizer: a tokenizer with an eos token (the end-of-turn token).
        commands: bash commands, one per turn; a ``ScriptStep`` also gives the turn's thought
            (text mode writes it before the action block).
        mode: ``"tool_call"`` or ``"text"`` (module docstring).
        latency: emulated inference time per turn (``GenerationLatency``); None = answer at once.
        submit_tool: the name of a tool the agent submits with, called without arguments
            (SWE-agent: ``submit``); None = mini-swe-agent's submit command through ``bash``.
        latency_key: seeds each turn's latency jitter instead of the request id, so runs with
            new rollout ids get the same emulated timings (benchmarks comparing policies).
        submit_thought: the thought written before the submit action in text mode; None = a
            neutral default (``EXPERT_SUBMIT_THOUGHT`` is the expert policy's).

    Raises:
        ValueError: unknown ``mode``, a tokenizer without eos, or a submit tool in text mode.
    """

    def __init__(
        self,
        tokenizer: Any,
        commands: Sequence[str | ScriptStep],
        mode: ScriptMode = "tool_call",
        latency: GenerationLatency | None = None,
        submit_tool: str | None = None,
        latency_key: str | None = None,
        submit_thought: str | None = None,
    ) -> None:
        if mode not in ("tool_call", "text"):
            raise ValueError(f"mode must be 'tool_call' or 'text', got {mode!r}")
        if submit_tool is not None and mode != "tool_call":
            raise ValueError("a submit tool is called through function calling: mode must be 'tool_call'")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an eos token (the end-of-turn token)")
        self.tokenizer = tokenizer
        self.steps = [c if isinstance(c, ScriptStep) else ScriptStep("", c) for c in commands]
        self.commands = [step.command for step in self.steps]
        self.mode = mode
        self.latency = latency or GenerationLatency()
        self.submit_tool = submit_tool
        self.latency_key = latency_key
        self.submit_thought = submit_thought or "The scripted commands are done; submit."
        self._turns: dict[str, int] = defaultdict(int)

    def command_for_turn(self, turn: int) -> str:
        """Command of turn ``turn`` (0-based): the script, then the submit command forever."""
        return self.commands[turn] if turn < len(self.commands) else SUBMIT_COMMAND

    def turn_text(self, turn: int) -> str:
        """The assistant text of turn ``turn`` (without the end-of-turn token)."""
        command = self.command_for_turn(turn)
        if self.submit_tool is not None and turn >= len(self.commands):
            return hermes_tool_call_text(self.submit_tool, {})
        if self.mode == "tool_call":
            return hermes_tool_call_text("bash", {"command": command})
        if turn < len(self.commands) and self.steps[turn].thought:
            thought = self.steps[turn].thought
        elif turn < len(self.commands):
            thought = f"Scripted step {turn + 1} of {len(self.commands)}: run the next command."
        else:
            thought = self.submit_thought
        return text_action(command, thought)

    async def generate(
        self, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any]
    ) -> GenerationOutput:
        turn = self._turns[request_id]
        self._turns[request_id] = turn + 1
        # A few hundred tokens: encoding on the event loop costs microseconds.
        token_ids = list(self.tokenizer.encode(self.turn_text(turn), add_special_tokens=False))
        token_ids.append(int(self.tokenizer.eos_token_id))
        stop_reason: Literal["stop", "length"] = "stop"
        max_tokens = sampling_params.get("max_tokens")
        if max_tokens is not None and len(token_ids) > int(max_tokens):
            token_ids = token_ids[: int(max_tokens)]
            stop_reason = "length"
        if self.latency.enabled:
            await asyncio.sleep(self.latency.seconds(len(token_ids), key=f"{self.latency_key or request_id}/{turn}"))
        return GenerationOutput(token_ids=token_ids, logprobs=[0.0] * len(token_ids), stop_reason=stop_reason)
