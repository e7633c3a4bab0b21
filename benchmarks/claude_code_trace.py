"""Claude-Code-shaped `POST /v1/messages` bodies, turn after turn, for benchmarks and tests.

The shape follows ../shared/reference/claude_code_requests.md (Claude Code 2.1, observed
2026-12-01); the texts are synthetic (Python's own documentation topics), not Anthropic's:

- `system`: the billing-header block (its `cch=` checksum differs on every request), a one-line
  identity block and the main system prompt (~6.8k characters), both with `cache_control`;
- `tools`: 12 tools with JSON schemas carrying `$schema` and `additionalProperties`, ~32k
  characters in all;
- `messages[0]`: a user turn of three text blocks (two `<system-reminder>`s, then the user's
  words); `messages[1]`: a mid-conversation *system* message (~9.3k characters of environment:
  working directory, platform, date, skills);
- every later turn appends an assistant message (text and a `tool_use`) and a user message (its
  `tool_result` and a few words), about `append_chars` characters together;
- from one turn to the next the earlier messages keep their text but not their JSON form: the
  `cache_control` breakpoint moves to the newest message, so a block list becomes a plain
  string, and the mid-conversation system message switches between a block list and a string.

With cortex-tiny's tokenizer the first turn renders to about 17.4k prompt tokens, as the real
one did.
"""

from __future__ import annotations

import json
import random
from typing import Any

TOOL_NAMES = (
    "Agent",
    "Bash",
    "Edit",
    "ListAgents",
    "Read",
    "ReportFindings",
    "ScheduleWakeup",
    "Skill",
    "ToolSearch",
    "Workflow",
    "DeferredToolPlaceholder",
    "Write",
)
EPHEMERAL = {"type": "ephemeral"}


def _documents() -> list[str]:
    import pydoc_data.topics

    return [text for _, text in sorted(pydoc_data.topics.topics.items()) if len(text) > 400]


_DOCUMENTS = _documents()


def prose(chars: int, seed: int) -> str:
    """About `chars` characters of documentation English, the same for the same seed."""
    generator = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < chars:
        document = generator.choice(_DOCUMENTS)
        start = generator.randrange(0, max(1, len(document) - 400))
        piece = document[start : start + min(chars - size, 1200)].strip()
        parts.append(piece)
        size += len(piece) + 2
    return "\n\n".join(parts)[:chars]


def tools(scale: float = 1.0) -> list[dict[str, Any]]:
    """Twelve tools, ~32k characters of JSON (times `scale`)."""
    out = []
    for index, name in enumerate(TOOL_NAMES):
        properties = {
            f"param_{p}": {
                "type": "string",
                "description": prose(int(220 * scale), 1000 + 10 * index + p),
            }
            for p in range(3)
        }
        out.append(
            {
                "name": name,
                "description": prose(int(1900 * scale), 900 + index),
                "input_schema": {
                    "$schema": "https://json-schema.org/draft/2020-12/schema",
                    "type": "object",
                    "properties": properties,
                    "required": ["param_0"],
                    "additionalProperties": False,
                },
            }
        )
    return out


class Conversation:
    """One Claude Code session: `request(turn)` is the body of its turn-th request (1-based)."""

    def __init__(
        self,
        session: int,
        model: str = "claude-sonnet-4-5",
        max_tokens: int = 32_000,
        scale: float = 1.0,
        append_chars: int = 2300,
        stream: bool = True,
    ) -> None:
        self.session = session
        self.model = model
        self.max_tokens = max_tokens
        self.scale = scale
        self.append_chars = append_chars
        self.stream = stream
        self.requests = 0
        # Shared by every session (Claude Code's own prompt and tools).
        self.identity = "You are a command-line coding assistant working in a git repository."
        self.system_prompt = prose(int(6800 * scale), 1)
        self.tools = tools(scale)
        # Per session: repository state, environment, the user's first words.
        self.git_status = (
            "<system-reminder>\nThis is the git status at the start of the conversation.\n"
            + prose(int(520 * scale), 2000 + session)
            + "\n</system-reminder>"
        )
        self.attribution = (
            "<system-reminder>\n" + prose(int(560 * scale), 3) + "\n</system-reminder>"
        )
        self.first_words = f"Session {session}: " + prose(120, 4000 + session)
        self.environment = (
            f"<env>\nWorking directory: /home/dev/project-{session}\nPlatform: linux\n"
            f"OS Version: Linux 6.8.0\nToday's date: 2026-12-01\n</env>\n\n"
            + prose(int(9100 * scale), 5000 + session)
        )

    def _turn_messages(self, index: int) -> tuple[str, str, str]:
        """(assistant text, tool_result text, user words) of appended turn `index` (1-based)."""
        seed = 10_000 * self.session + index
        share = self.append_chars
        return (
            prose(int(share * 0.15), seed),
            prose(int(share * 0.75), seed + 5000),
            prose(int(share * 0.10), seed + 7000),
        )

    def request(self, turn: int) -> dict[str, Any]:
        self.requests += 1
        newest = turn == 1
        first_blocks: list[dict[str, Any]] = [
            {"type": "text", "text": self.git_status},
            {"type": "text", "text": self.attribution},
            {"type": "text", "text": self.first_words},
        ]
        if newest:
            first_blocks[-1]["cache_control"] = EPHEMERAL
        environment: Any = (
            [{"type": "text", "text": self.environment}] if turn % 2 else self.environment
        )
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": first_blocks},
            {"role": "system", "content": environment},
        ]
        for index in range(1, turn):
            said, result, words = self._turn_messages(index)
            call_id = f"toolu_{self.session:02d}{index:04d}"
            messages.append(
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": said},
                        {
                            "type": "tool_use",
                            "id": call_id,
                            "name": "Read",
                            "input": {"param_0": f"src/module_{index}.py"},
                        },
                    ],
                }
            )
            if index == turn - 1:  # the newest message carries the breakpoint, as blocks
                content: Any = [
                    {"type": "tool_result", "tool_use_id": call_id, "content": result},
                    {"type": "text", "text": words, "cache_control": EPHEMERAL},
                ]
            else:
                content = [
                    {"type": "tool_result", "tool_use_id": call_id, "content": result},
                    {"type": "text", "text": words},
                ]
            messages.append({"role": "user", "content": content})
        ids = {
            "device_id": "d" * 64,
            "account_uuid": "00000000-0000-4000-8000-000000000000",
            "session_id": f"00000000-0000-4000-8000-{self.session:012d}",
        }
        return {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "stream": self.stream,
            "system": [
                {
                    "type": "text",
                    "text": "x-anthropic-billing-header: cc_version=2.1.332.abc; "
                    f"cc_entrypoint=cli; cch={self.session:02d}{self.requests:04d};",
                },
                {"type": "text", "text": self.identity, "cache_control": EPHEMERAL},
                {"type": "text", "text": self.system_prompt, "cache_control": EPHEMERAL},
            ],
            "tools": self.tools,
            "messages": messages,
            "metadata": {"user_id": json.dumps(ids)},
            "thinking": {"type": "adaptive", "display": "omitted"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "output_config": {"effort": "high"},
        }
