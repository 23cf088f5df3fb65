"""A scripted policy that replays fixed bash commands through the agent's own actions.

A harness check, never a model result (like SWE-bench's gold-patch validation):
turn k of a trajectory emits command k in the exact format the agent parses, and
once the commands are used up it emits mini-swe-agent's submit command
``echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT``. With ``commands=[]`` it submits at
once (the "submits nothing" policy).

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

from collections import defaultdict
from typing import Any, Literal

from ..tool_format import SUBMIT_COMMAND, hermes_tool_call_text, text_action
from .base import GenerationOutput

ScriptMode = Literal["tool_call", "text"]


class ScriptedPolicyBackend:
    """Replays ``commands`` one per turn, then submits. Turns are counted per ``request_id``."""

    def __init__(self, tokenizer: Any, commands: list[str], mode: ScriptMode = "tool_call") -> None:
        if mode not in ("tool_call", "text"):
            raise ValueError(f"mode must be 'tool_call' or 'text', got {mode!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an eos token (the end-of-turn token)")
        self.tokenizer = tokenizer
        self.commands = list(commands)
        self.mode = mode
        self._turns: dict[str, int] = defaultdict(int)

    def command_for_turn(self, turn: int) -> str:
        """Command of turn ``turn`` (0-based): the script, then the submit command forever."""
        return self.commands[turn] if turn < len(self.commands) else SUBMIT_COMMAND

    def turn_text(self, turn: int) -> str:
        """The assistant text of turn ``turn`` (without the end-of-turn token)."""
        command = self.command_for_turn(turn)
        if self.mode == "tool_call":
            return hermes_tool_call_text("bash", {"command": command})
        if turn < len(self.commands):
            thought = f"Scripted step {turn + 1} of {len(self.commands)}: run the next command."
        else:
            thought = "The scripted commands are done; submit."
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
        return GenerationOutput(token_ids=token_ids, logprobs=[0.0] * len(token_ids), stop_reason=stop_reason)
