"""Anthropic's Messages API over chat completions: ``POST /v1/messages`` in, a ``message`` out.

The proxy serves agents written with the ``anthropic`` SDK (``messages.create``, ``stream=True``,
``messages.stream``) by translating a Messages request into the messages, tools and sampling
parameters of a chat completion, so both APIs share one chat-template rendering, one recording
and one conversation chaining (token-in, token-out: a conversation continues its recorded tokens;
tool results are masked prompt tokens).

Mapping:

- ``system`` (a string or text blocks) -> a leading system message;
- a user message's ``text`` blocks -> a user message; each ``tool_result`` block -> a tool message
  (``tool_call_id`` = ``tool_use_id``; its content a string or text blocks), in block order;
- an assistant message's ``text`` blocks -> its content; ``tool_use`` blocks -> ``tool_calls``
  (``arguments`` = the JSON of ``input``), so a reply sent back continues the recorded turn;
- ``tools`` (custom tools: ``name``, ``description``, ``input_schema``) -> function tools;
  ``tool_choice`` ``auto`` / ``none``; ``max_tokens``, ``temperature``, ``top_p``, ``top_k``;
  ``stop_sequences`` -> ``stop``.

Reply: a ``text`` block (left out when the reply is only tool calls), then one ``tool_use`` block per
call (``input`` = the parsed arguments); ``stop_reason`` ``tool_use``, ``max_tokens``,
``stop_sequence`` (with the matched sequence) or ``end_turn``; ``usage`` counts the tokens. A stream
is the finished message replayed as Anthropic's events: ``message_start``, per block
``content_block_start`` / ``content_block_delta`` (``text_delta`` or ``input_json_delta``) /
``content_block_stop``, then ``message_delta`` (stop reason, output tokens) and ``message_stop``.

Not covered (``ConfigError`` naming the field, what is accepted and how to change the agent):
images, documents and other non-text blocks, thinking, server tools (web search, code execution,
computer use, bash / text editor tools), forced tool choice (``any`` / ``tool``), MCP servers,
containers, token-by-token streaming (events come once the generation has ended).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agentflow import _sampling
from agentflow.errors import ConfigError

if TYPE_CHECKING:
    from agentflow.client import CompletionRecord

__all__ = ["MessagesRequest", "build_message", "matched_stop", "message_sse", "parse_request"]

Json = dict[str, Any]

_PASSED = {
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "stop_sequences": "stop",
    "chat_template_kwargs": "chat_template_kwargs",
    "model": "model",
}
# Handled below, or informational (accounting, routing and caching hints of Anthropic's service).
_IGNORED = frozenset(
    {
        "metadata",
        "service_tier",
        "stream",
        "system",
        "messages",
        "tools",
        "tool_choice",
        "cache_control",
        "inference_geo",
        "diagnostics",
        "speed",
        "user_profile_id",
        "workspace_id",
    }
)
# Accepted only as given here (None = left out), with what to do instead.
_DEFAULT_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "thinking": (
        (None, {"type": "disabled"}),
        "the model reasons as its chat template renders it; leave "
        "thinking out (chat_template_kwargs set template switches)",
    ),
    "mcp_servers": ((None, []), "MCP servers run on Anthropic's side; give the agent the tools itself"),
    "container": ((None,), "there are no server-side containers; run code in the agent's own tools"),
    "context_management": ((None,), "the conversation is never edited server-side; leave it out"),
    "output_format": ((None,), "structured output needs constrained decoding; parse the text instead"),
    "output_config": ((None, {}), "structured output and effort settings need a hosted model; leave it out"),
}
_TOOL_KEYS = frozenset(
    {
        "name",
        "description",
        "input_schema",
        "cache_control",
        "type",
        "strict",
        "input_examples",
        "defer_loading",
        "eager_input_streaming",
        "allowed_callers",
    }
)


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    """A Messages request translated: ``chat`` are chat-completion kwargs."""

    chat: Json
    stream: bool
    model: str
    stop_sequences: tuple[str, ...]


def _fail(problem: str) -> ConfigError:
    return ConfigError(f"POST /v1/messages: {problem}")


def parse_request(body: Mapping[str, Any], who: str) -> MessagesRequest:
    """Check and translate a Messages request body (plain JSON)."""
    _check_fields(body, who)
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _fail(f"max_tokens is required: a positive integer, got {max_tokens!r}")
    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _fail(f"stop_sequences must be a list of non-empty strings, got {stops!r:.80}")
    chat = {_PASSED[k]: body[k] for k in _PASSED if body.get(k) is not None}
    chat["messages"] = [*_system(body.get("system")), *_conversation(body.get("messages"))]
    tools = [_tool(i, t) for i, t in enumerate(body.get("tools") or [])]
    if tools:
        chat["tools"] = tools
    chat["tool_choice"] = _tool_choice(body.get("tool_choice"), who)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _fail(f"stream must be true or false, got {stream!r}")
    return MessagesRequest(
        chat=chat, stream=stream, model=str(body.get("model") or "agentflow"), stop_sequences=tuple(stops)
    )


def _check_fields(body: Mapping[str, Any], who: str) -> None:
    problems = []
    for name, value in body.items():
        refused = _sampling.refusal(name, value, who)
        if refused is not None:
            problems.append(refused)
        elif name in _DEFAULT_ONLY:
            accepted, hint = _DEFAULT_ONLY[name]
            if value not in accepted:
                problems.append(f"{name}={value!r:.80} is not supported by {who}: {hint}")
        elif name not in _PASSED and name not in _IGNORED and name not in _sampling.NEUTRAL:
            problems.append(
                f"unknown Messages API field {name!r}; {who} accepts {sorted({*_PASSED, *_IGNORED})}; "
                f"remove {name} from the agent's request"
            )
    if problems:
        raise ConfigError([f"POST /v1/messages: {p}" for p in problems])


def _system(value: Any) -> list[Json]:
    if value is None or value == "" or value == []:
        return []
    return [{"role": "system", "content": _text(value, "system")}]


def _text(value: Any, where: str) -> str:
    """A string, or the text of a list of ``text`` blocks."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _fail(f"{where} must be a string or a list of text blocks, got {type(value).__name__}")
    parts = []
    for j, block in enumerate(value):
        kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
        if kind != "text" or not isinstance(block.get("text"), str):
            raise _fail(
                f"{where}[{j}] has type {kind!r}; only text blocks ({{'type': 'text', 'text': ...}}) are "
                "served here (the served model reads text: images and documents are not supported)"
            )
        parts.append(block["text"])
    return "".join(parts)


def _conversation(messages: Any) -> list[Json]:
    if not isinstance(messages, list) or not messages:
        raise _fail(f"messages is required: a non-empty list of {{'role', 'content'}} objects, got {messages!r:.80}")
    out: list[Json] = []
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, Mapping) else None
        if role not in ("user", "assistant"):
            raise _fail(
                f"messages[{i}] must be an object with role 'user' or 'assistant' (the system prompt goes "
                f"in 'system'), got {msg!r:.120}"
            )
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif isinstance(content, list):
            (_assistant if role == "assistant" else _user)(out, content, f"messages[{i}].content")
        else:
            raise _fail(f"messages[{i}].content must be a string or a list of blocks, got {type(content).__name__}")
    return out


def _block_kind(block: Any) -> Any:
    return block.get("type") if isinstance(block, Mapping) else type(block).__name__


def _user(out: list[Json], blocks: list[Any], where: str) -> None:
    texts: list[str] = []
    for j, block in enumerate(blocks):
        kind = _block_kind(block)
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_result" and isinstance(block.get("tool_use_id"), str):
            if texts:
                out.append({"role": "user", "content": "".join(texts)})
                texts = []
            result = block.get("content")
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": block["tool_use_id"],
                    "content": "" if result is None else _text(result, f"{where}[{j}].content"),
                }
            )
        else:
            raise _fail(
                f"{where}[{j}] has type {kind!r}; a user message takes 'text' blocks and 'tool_result' "
                "blocks (with a string 'tool_use_id'); images and documents are not served"
            )
    if texts:
        out.append({"role": "user", "content": "".join(texts)})


def _assistant(out: list[Json], blocks: list[Any], where: str) -> None:
    texts, calls = [], []
    for j, block in enumerate(blocks):
        kind = _block_kind(block)
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and isinstance(block.get("id"), str) and isinstance(block.get("name"), str):
            arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
            calls.append(
                {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": arguments}}
            )
        else:
            raise _fail(
                f"{where}[{j}] has type {kind!r}; an assistant message takes 'text' blocks and 'tool_use' "
                "blocks (with string 'id' and 'name'); send back the content the proxy returned"
            )
    msg: Json = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        msg["tool_calls"] = calls
    out.append(msg)


def _tool(i: int, tool: Any) -> Json:
    if not isinstance(tool, Mapping) or tool.get("type", "custom") != "custom":
        kind = tool.get("type") if isinstance(tool, Mapping) else type(tool).__name__
        raise _fail(
            f"tools[{i}] has type {kind!r}; only custom tools ({{'name', 'description', 'input_schema'}}) "
            "are served. Server tools (web search, code execution, bash, text editor, computer use) run "
            "on Anthropic's side: remove them or wrap the capability in a custom tool"
        )
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise _fail(f"tools[{i}] needs a non-empty string 'name', got {tool.get('name')!r}")
    unknown = sorted(set(tool) - _TOOL_KEYS)
    if unknown:
        raise _fail(f"tools[{i}] has unknown keys {unknown}; expected name, description, input_schema")
    schema = tool.get("input_schema", {"type": "object"})
    function = {"name": tool["name"], "parameters": schema}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(value: Any, who: str) -> str:
    kind = value.get("type") if isinstance(value, Mapping) else value
    if value is None or kind == "auto":
        return "auto"
    if kind == "none":
        return "none"
    raise _fail(
        f"tool_choice={value!r:.80} is not supported by {who}; accepted: {{'type': 'auto'}} or "
        "{'type': 'none'} (or leave it out): the model decides whether to call a tool"
    )


# ---------------------------------------------------------------------------------------- reply
def matched_stop(raw_text: str, stops: tuple[str, ...]) -> str | None:
    """The stop sequence the generated text ends with (the engine stopped on it), if any."""
    return next((s for s in stops if raw_text.endswith(s)), None)


def build_message(rec: CompletionRecord, model: str, stop_sequence: str | None) -> Json:
    """The Messages API reply for a recorded completion (``rec.id`` is the message id)."""
    reply = rec.reply
    calls = reply.get("tool_calls") or []
    content: list[Json] = []
    if reply.get("content") or not calls:
        content.append({"type": "text", "text": reply.get("content") or ""})
    for call in calls:
        fn = call["function"]
        content.append({"type": "tool_use", "id": call["id"], "name": fn["name"], "input": json.loads(fn["arguments"])})
    if rec.finish_reason == "length":
        reason = "max_tokens"
    else:
        reason = "tool_use" if calls else "stop_sequence" if stop_sequence is not None else "end_turn"
    return {
        "id": rec.id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": stop_sequence if reason == "stop_sequence" else None,
        "usage": {"input_tokens": len(rec.prompt_ids), "output_tokens": len(rec.output_ids)},
    }


def _events(message: Mapping[str, Any]) -> list[Json]:
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": message["usage"]["input_tokens"], "output_tokens": 0},
    }
    events: list[Json] = [{"type": "message_start", "message": start}]
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            opening: Json = {"type": "text", "text": ""}
            delta: Json = {"type": "text_delta", "text": block["text"]}
        else:
            opening = {**block, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
        events += [
            {"type": "content_block_start", "index": index, "content_block": opening},
            {"type": "content_block_delta", "index": index, "delta": delta},
            {"type": "content_block_stop", "index": index},
        ]
    events.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]},
            "usage": {"output_tokens": message["usage"]["output_tokens"]},
        }
    )
    events.append({"type": "message_stop"})
    return events


def message_sse(message: Mapping[str, Any]) -> bytes:
    """The server-sent events of a finished message, as Anthropic streams them."""
    return "".join(
        f"event: {e['type']}\ndata: {json.dumps(e, ensure_ascii=False, separators=(',', ':'))}\n\n"
        for e in _events(message)
    ).encode()
