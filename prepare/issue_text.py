"""Issue-style problem statements from failing test output (no LLM, never the fix).

The text names the failing tests, quotes pytest's error lines (the ``E   ...``
lines of ``--tb=short`` output: assertion values and exception messages) and
says what is expected. Lines that contain a line of the reference fix are left
out, so the statement never quotes the patch.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

_SECTION = re.compile(r"^_{3,} (.+?) _{3,}$")
_MAX_TESTS_LISTED = 8
_MAX_ERRORS_QUOTED = 3
_MAX_E_LINES = 6
_MIN_FIX_LINE_CHARS = 8  # shorter fix lines ("return x") are too common to filter on


def failure_sections(output: str) -> dict[str, list[str]]:
    """``{section title: [E lines]}`` from pytest's FAILURES/ERRORS sections.

    The title is pytest's head line (``TestClass.test_method``, ``test_x[1-2]``).
    """
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        match = _SECTION.match(line.strip())
        if match:
            title = match.group(1)
            if title.startswith(("ERROR at", "FAILURES", "ERRORS")) and title not in sections:
                title = title.replace("ERROR at setup of ", "").replace("ERROR at teardown of ", "")
            current = sections.setdefault(title, [])
            continue
        if line.startswith("=") or line.startswith("short test summary"):
            current = None
        elif current is not None and line.startswith("E "):
            current.append(line[1:].strip())
    return sections


def _head_line(node_id: str) -> str:
    """pytest's section title for a node id: ``Class.test`` / ``test`` (file part dropped)."""
    parts = node_id.split("::")[1:]
    return ".".join(parts) if parts else node_id


def added_lines(patch: str) -> list[str]:
    """Stripped ``+`` lines of a unified diff long enough to be tell-tale."""
    lines = []
    for line in patch.splitlines():
        if line.startswith("+") and not line.startswith("+++"):
            text = line[1:].strip()
            if len(text) >= _MIN_FIX_LINE_CHARS:
                lines.append(text)
    return lines


def problem_statement(
    package: str,
    version: str,
    fail_to_pass: Sequence[str],
    output: str,
    *,
    fix_patch: str = "",
    n_passing: int = 0,
) -> str:
    """An issue report for ``package`` whose tests ``fail_to_pass`` now fail.

    Args:
        package: distribution name, for the title.
        version: its version.
        fail_to_pass: failing node ids (the first few are listed).
        output: the failing pytest run's output (``-rA --tb=short``).
        fix_patch: the reference fix; lines quoting it are dropped from the text.
        n_passing: how many other tests in the same files still pass.

    Returns:
        Markdown text: a title line, the failing tests, quoted errors, a
        reproduction command and the expectation.
    """
    sections = failure_sections(output)
    fix = added_lines(fix_patch)
    files = sorted({n.split("::")[0] for n in fail_to_pass})
    heads = [_head_line(n) for n in fail_to_pass]
    subject = heads[0].split(".")[-1].split("[")[0]
    title = f"{package} {version}: `{subject}` fails" + (f" (and {len(fail_to_pass) - 1} more tests)" if len(fail_to_pass) > 1 else "")
    lines = [f"# {title}", ""]
    where = ", ".join(f"`{f}`" for f in files)
    lines.append(
        f"Running the test suite of {package} {version} on a clean checkout, "
        f"{len(fail_to_pass)} test(s) in {where} fail:"
    )
    lines.append("")
    for node in fail_to_pass[:_MAX_TESTS_LISTED]:
        lines.append(f"- `{node}`")
    if len(fail_to_pass) > _MAX_TESTS_LISTED:
        lines.append(f"- ... and {len(fail_to_pass) - _MAX_TESTS_LISTED} more")
    quoted = 0
    for node, head in zip(fail_to_pass, heads):
        errors = [e for e in sections.get(head, []) if not any(f in e for f in fix)][:_MAX_E_LINES]
        if not errors:
            continue
        if quoted == 0:
            lines += ["", "The errors:"]
        lines += ["", f"`{node}`:", "```", *errors, "```"]
        quoted += 1
        if quoted >= _MAX_ERRORS_QUOTED:
            break
    command = "python -m pytest " + " ".join(shlex.quote(n) for n in fail_to_pass[:3])
    lines += ["", "To reproduce:", "```", command, "```", ""]
    others = f" The other {n_passing} tests of the same code pass and should keep passing." if n_passing else ""
    lines.append(f"Expected: these tests pass.{others}")
    return "\n".join(lines) + "\n"
