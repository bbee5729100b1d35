"""Tool-call parsing: turn a model's raw completion text into OpenAI ``tool_calls``.

A :class:`ToolParser` is anything with ``parse(text) -> ParsedOutput``. Parsers never raise on
model output: a malformed call (bad JSON, missing name, unclosed tag) comes back as
``ParsedOutput(content=text, tool_calls=(), error="...")`` so the caller can hand the text to the
agent as plain content and count the failure. Built in: ``"qwen"`` / ``"hermes"`` (the
``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` format of Qwen2.5/Qwen3 and Hermes,
as rendered by :data:`agentflow.testing.CHATML_TEMPLATE`) and ``"none"`` (no parsing).

This module does not render tool calls into prompts (the chat template does) and does not
validate arguments against the tool's JSON schema (that is the agent's business, as with OpenAI).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from agentflow.errors import ConfigError

__all__ = [
    "TOOL_PARSERS",
    "NoToolParser",
    "ParsedOutput",
    "QwenToolParser",
    "ToolCall",
    "ToolParser",
    "get_tool_parser",
]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One parsed call. ``arguments`` is a JSON string, as in OpenAI's ``function.arguments``."""

    name: str
    arguments: str
    id: str = ""


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    """Text outside the calls (None if empty), the calls, and why parsing failed (None if it did not)."""

    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()
    error: str | None = None


@runtime_checkable
class ToolParser(Protocol):
    def parse(self, text: str) -> ParsedOutput: ...


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class QwenToolParser:
    """Qwen/Hermes format: each call is ``<tool_call>{json}</tool_call>`` with keys ``name`` and
    ``arguments`` (an object, or a string holding JSON). Text around the calls is the content."""

    def __init__(self, start: str = "<tool_call>", end: str = "</tool_call>") -> None:
        self.start, self.end = start, end
        self._pattern = re.compile(re.escape(start) + r"(.*?)" + re.escape(end), re.DOTALL)

    def parse(self, text: str) -> ParsedOutput:
        if self.start not in text:
            return ParsedOutput(content=text or None)
        calls: list[ToolCall] = []
        for body in self._pattern.findall(text):
            call = _parse_call_json(body)
            if isinstance(call, str):
                return ParsedOutput(content=text, error=call)
            calls.append(call)
        rest = self._pattern.sub("", text)
        if self.start in rest or self.end in rest:
            return ParsedOutput(content=text, error=f"unbalanced {self.start}/{self.end} tags")
        return ParsedOutput(content=rest.strip() or None, tool_calls=tuple(calls))


def _parse_call_json(body: str) -> ToolCall | str:
    """A :class:`ToolCall` from one call's JSON body, or a string saying what is wrong."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return f"tool call is not valid JSON ({e.msg} at char {e.pos}): {body.strip()[:200]!r}"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return f'tool call must be a JSON object with a non-empty string "name", got {body.strip()[:200]!r}'
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return f"tool call arguments string is not valid JSON: {args[:200]!r}"
    if not isinstance(args, dict):
        return f"tool call arguments must be a JSON object, got {type(args).__name__}"
    return ToolCall(name=obj["name"], arguments=json.dumps(args, ensure_ascii=False), id=_new_call_id())


class NoToolParser:
    """Never parses: the whole completion is content."""

    def parse(self, text: str) -> ParsedOutput:
        return ParsedOutput(content=text or None)


TOOL_PARSERS: dict[str, ToolParser] = {
    "qwen": QwenToolParser(),
    "hermes": QwenToolParser(),
    "none": NoToolParser(),
}


def get_tool_parser(parser: str | ToolParser) -> ToolParser:
    """A parser by name (see :data:`TOOL_PARSERS`) or the object itself if it has ``parse``."""
    if isinstance(parser, str):
        if parser not in TOOL_PARSERS:
            raise ConfigError(
                f"tool_parser={parser!r} is unknown; expected one of {sorted(TOOL_PARSERS)} "
                "or an object with a parse(text) -> ParsedOutput method"
            )
        return TOOL_PARSERS[parser]
    if not isinstance(parser, ToolParser):
        raise ConfigError(
            f"tool_parser must be a name or have parse(text) -> ParsedOutput, got {type(parser).__name__}"
        )
    return parser
