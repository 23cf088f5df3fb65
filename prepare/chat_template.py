"""The ChatML chat template with tool calls that this project writes into its local models.

Structure (not wording) follows Qwen2.5-Instruct, so token boundaries and the
tool-call and tool-response layout match what Qwen models, verl's hermes tool
parser and verl's ``QwenContinuousTokenBuilder`` (continuous-token family ``qwen``)
expect. Used by ``prepare.tiny_model`` and ``prepare.smollm2``.

Layout:
    <|im_start|>system\\n{system}[tool block]<|im_end|>\\n
    <|im_start|>user\\n{text}<|im_end|>\\n
    <|im_start|>assistant[\\n{text}][\\n<tool_call>\\n{json}\\n</tool_call>]*<|im_end|>\\n
    <|im_start|>user[\\n<tool_response>\\n{text}\\n</tool_response>]+<|im_end|>\\n   (consecutive tool messages)

Content may be a string or a list of ``{"type": "text", "text": ...}`` parts.
Tool-call arguments may be a JSON string (OpenAI wire format, rendered as is)
or a mapping (rendered with ``tojson``).
"""

from __future__ import annotations


def chatml_tools_template(default_system_prompt: str) -> str:
    """The template; ``default_system_prompt`` is used when a conversation has no system message."""
    return (
    "{%- macro text_of(content) -%}"
    "{%- if content is none -%}"
    "{%- elif content is string -%}{{- content -}}"
    "{%- elif content is mapping -%}{{- content.text if content.text is defined else '' -}}"
    "{%- else -%}"
    "{%- for part in content -%}"
    "{%- if part is mapping and part.type == 'text' -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set system_text = text_of(messages[0].content) -%}"
    "{%- set body = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_text = '" + default_system_prompt.replace("'", "\\'") + "' -%}"
    "{%- set body = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system_text -}}"
    "{%- if tools -%}"
    "{{- '\\n\\n# Tools\\n\\nThese functions are available. "
    "Their JSON signatures are listed in <tools></tools>:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nTo call a function, answer with one JSON object per call "
    "inside <tool_call></tool_call> tags:\\n"
    '<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>\' -}}'
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- for message in body -%}"
    "{%- if message.role == 'tool' -%}"
    "{%- if loop.first or body[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + text_of(message.content) + '\\n</tool_response>' -}}"
    "{%- if loop.last or body[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- elif message.role == 'assistant' -%}"
    "{%- set text = text_of(message.content) -%}"
    "{%- if message.tool_calls -%}"
    "{{- '<|im_start|>assistant' -}}"
    "{%- if text -%}{{- '\\n' + text -}}{%- endif -%}"
    "{%- for call in message.tool_calls -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' -}}"
    "{%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + text + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + text_of(message.content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
