"""The Responses API over chat completions: request items in, ``openai.types.responses.Response`` out.

``OpenAIClient.responses.create`` (and the proxy's ``POST /v1/responses``) translate a Responses
request into the messages, tools and sampling parameters of a chat completion, so both APIs share
one chat-template rendering, one recording and one conversation chaining: a Responses conversation
continues its recorded tokens exactly as a chat conversation does, function outputs included as
masked prompt tokens. The reply is translated back into Response output items.

Mapping:

- ``instructions`` -> a leading system message; an ``input`` string -> one user message;
- message items (role user/system/developer/assistant; content a string or
  ``input_text``/``output_text`` parts) -> messages with that role and text;
- ``function_call`` items -> ``tool_calls`` of the assistant message just before them (or of a new
  one), so a reply that was text + calls comes back as the one message it was;
- ``function_call_output`` items -> tool messages (``tool_call_id`` = ``call_id``);
- ``previous_response_id`` -> that response's conversation (its input and output, not its
  instructions, as OpenAI) before the new input; kept for responses created with ``store`` true;
- function tools -> chat tools; ``max_output_tokens`` -> ``max_tokens``; ``tool_choice``
  ``auto``/``none``; ``include=["message.output_text.logprobs"]`` -> log-probs on the text.

Output: an assistant ``message`` item with one ``output_text`` part (left out when the reply is
only tool calls), then one ``function_call`` item per call; status ``incomplete`` (reason
``max_output_tokens``) when the generation was cut by the token limit.

Not covered (``ConfigError`` naming the parameter, what is accepted and how to change the agent):
built-in tools, forced tool choice, reasoning settings, background mode, server-side
conversations and prompt templates, structured output (``text.format`` other than text),
non-text content, other item types. This module does not generate or record anything.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openai.types.responses import Response

from agentflow.errors import ConfigError

if TYPE_CHECKING:
    from agentflow.client import CompletionRecord

__all__ = ["ResponsesRequest", "build_response", "input_messages", "new_id", "parse_request"]

Json = dict[str, Any]
History = Callable[[str], tuple[list[Json], int] | None]

# Parameters accepted only at their default, with what to do instead.
_DEFAULT_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "reasoning": ((), "the model reasons as its chat template renders it; pass extra_body="
                      "{'chat_template_kwargs': {...}} instead (Agents SDK: leave ModelSettings.reasoning unset)"),
    "background": ((False,), "there is no job store; run the request in the foreground"),
    "conversation": ((), "conversations are not kept server-side; send the history in input or use "
                         "previous_response_id"),
    "prompt": ((), "prompt templates live on OpenAI's servers; send instructions and input instead"),
    "max_tool_calls": ((), "built-in tools are not served, so there is nothing to limit; leave it out"),
    "top_logprobs": ((0,), "only the sampled tokens' log-probs are available "
                           "(include=['message.output_text.logprobs'])"),
    "truncation": (("disabled",), "the conversation is never truncated; keep it within the model's context"),
    "context_management": ((), "the conversation is never compacted server-side; leave it out"),
    "moderation": ((), "no moderation runs here; leave it out"),
}
_IGNORED = frozenset({
    "model", "user", "metadata", "parallel_tool_calls", "service_tier", "extra_headers", "extra_query",
    "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options", "safety_identifier",
})
_PASSED = ("model", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "chat_template_kwargs", "timeout")
_HANDLED = frozenset({
    *_PASSED, "input", "instructions", "tools", "tool_choice", "previous_response_id", "max_output_tokens",
    "store", "stream", "stream_options", "include", "text",
})
_LOGPROBS = "message.output_text.logprobs"
_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text")
_TOOL_KEYS = ("name", "description", "parameters", "strict")


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """A Responses request translated: ``chat`` are chat-completion kwargs (``messages`` =
    instructions + ``history`` + ``new``); ``echo`` are the request fields a Response repeats."""

    chat: Json
    history: list[Json]
    new: list[Json]
    echo: Json
    store: bool
    stream: bool
    logprobs: bool
    history_bytes: int = 0


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------- request
def parse_request(kw: Mapping[str, Any], conversations: History, who: str) -> ResponsesRequest:
    """Check and translate ``responses.create`` kwargs (plain JSON data, ``None`` = not given).

    ``conversations`` maps a stored response id to its conversation and that conversation's text
    size (None when the id is unknown or deleted).
    """
    _check_params(kw, who)
    tools = kw.get("tools") or []
    if not isinstance(tools, list):
        raise ConfigError(f"tools must be a list of function tools, got {type(tools).__name__}")
    chat_tools = [_chat_tool(i, t, who) for i, t in enumerate(tools)]
    history, history_bytes = _history(kw.get("previous_response_id"), conversations, who)
    new = input_messages(kw.get("input"), who)
    chat = {k: kw[k] for k in _PASSED if k in kw}
    chat["messages"] = [*_instructions(kw.get("instructions")), *history, *new]
    chat["tools"] = chat_tools or None
    chat["tool_choice"] = _tool_choice(kw.get("tool_choice"), who)
    chat["max_tokens"] = _max_output_tokens(kw.get("max_output_tokens"))
    return ResponsesRequest(
        chat={k: v for k, v in chat.items() if v is not None}, history=history, new=new,
        echo=_echo(kw, tools), store=_flag(kw, "store", True), stream=_stream(kw), logprobs=_include(kw, who),
        history_bytes=history_bytes,
    )


def _check_params(kw: Mapping[str, Any], who: str) -> None:
    problems = []
    for name, value in kw.items():
        if name in _DEFAULT_ONLY:
            accepted, hint = _DEFAULT_ONLY[name]
            if value not in accepted:
                problems.append(f"{name}={value!r} is not supported by {who} (accepted: {list(accepted)} or leave "
                                f"it out): {hint}")
        elif name == "n":
            problems.append("n is not a Responses parameter; call responses.create once per sample")
        elif name not in _HANDLED and name not in _IGNORED:
            problems.append(f"unknown Responses parameter {name!r}; supported: {sorted(_HANDLED)}, "
                            f"ignored: {sorted(_IGNORED)}, default-only: {sorted(_DEFAULT_ONLY)}")
    if problems:
        raise ConfigError(problems)


def _chat_tool(i: int, tool: Any, who: str) -> Json:
    kind = tool.get("type") if isinstance(tool, Mapping) else type(tool).__name__
    if kind != "function":
        raise ConfigError(
            f"tools[{i}] has type {kind!r}; {who} serves function tools only "
            "({'type': 'function', 'name': ..., 'parameters': {...}}). Built-in tools (web_search, file_search, "
            "code_interpreter, computer use, mcp, ...) run on OpenAI's servers: remove them from the agent or "
            "wrap the capability in a function tool"
        )
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise ConfigError(f"tools[{i}] needs a non-empty string 'name', got {tool.get('name')!r}")
    return {"type": "function", "function": {k: tool[k] for k in _TOOL_KEYS if k in tool}}


def _tool_choice(value: Any, who: str) -> str | None:
    if value in (None, "auto", "none"):
        return value
    raise ConfigError(
        f"tool_choice={value!r} is not supported by {who}; accepted: 'auto', 'none' (or leave it out). "
        "The model decides whether to call a tool (Agents SDK: leave ModelSettings.tool_choice unset)"
    )


def _max_output_tokens(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"max_output_tokens must be an integer, got {value!r}")
    return value


def _instructions(value: Any) -> list[Json]:
    if value is None or value == "":
        return []
    if not isinstance(value, str):
        raise ConfigError(f"instructions must be a string, got {type(value).__name__}; put other items in input")
    return [{"role": "system", "content": value}]


def _history(previous_id: Any, conversations: History, who: str) -> tuple[list[Json], int]:
    if previous_id is None:
        return [], 0
    found = conversations(previous_id) if isinstance(previous_id, str) else None
    if found is None:
        raise ConfigError(
            f"previous_response_id={previous_id!r} is unknown to {who}; expected the id of a response it created "
            "with store left true and did not delete (kept while the client or proxy session lives), or send the "
            "whole conversation in input"
        )
    return found


def _flag(kw: Mapping[str, Any], name: str, default: bool) -> bool:
    value = kw.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _stream(kw: Mapping[str, Any]) -> bool:
    stream = _flag(kw, "stream", False)
    options = kw.get("stream_options")
    if options is not None and not stream:
        raise ConfigError("stream_options is only allowed with stream=True; leave it out or set stream=True")
    if options is not None and (not isinstance(options, Mapping) or not set(options) <= {"include_obfuscation"}):
        raise ConfigError(f"stream_options accepts only 'include_obfuscation' (no padding is sent), got {options!r}")
    return stream


def _include(kw: Mapping[str, Any], who: str) -> bool:
    """Whether log-probs were asked for; checks ``include`` and ``text``."""
    text = kw.get("text")
    if text is not None and text not in ({}, {"format": {"type": "text"}}):
        raise ConfigError(
            f"text={text!r} is not supported by {who}; accepted: {{'format': {{'type': 'text'}}}} (or leave it out). "
            "Structured output (json_schema / json_object) and verbosity need constrained decoding or a hosted "
            "model: drop the agent's output type / verbosity and parse the text yourself"
        )
    include = kw.get("include") or []
    unknown = [x for x in include if x != _LOGPROBS] if isinstance(include, list) else include
    if unknown:
        raise ConfigError(f"include={include!r} is not supported by {who}; accepted: [{_LOGPROBS!r}] or leave it out")
    return _LOGPROBS in include


def _echo(kw: Mapping[str, Any], tools: list[Any]) -> Json:
    """Request fields the Response repeats."""
    return {
        "instructions": kw.get("instructions"),
        "tools": [{**{k: t[k] for k in _TOOL_KEYS if k in t}, "type": "function"} for t in tools],
        "tool_choice": kw.get("tool_choice", "auto"),
        "parallel_tool_calls": kw.get("parallel_tool_calls", True),
        "temperature": kw.get("temperature"),
        "top_p": kw.get("top_p"),
        "max_output_tokens": kw.get("max_output_tokens"),
        "previous_response_id": kw.get("previous_response_id"),
        "store": kw.get("store", True),
        "metadata": kw.get("metadata", {}),
    }


# ---------------------------------------------------------------------------------------- input items
def input_messages(value: Any, who: str) -> list[Json]:
    """Chat messages for a Responses ``input`` (a string or a list of items)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise ConfigError(f"input must be a string or a list of items, got {type(value).__name__}")
    out: list[Json] = []
    for i, item in enumerate(value):
        kind = item.get("type", "message") if isinstance(item, Mapping) else type(item).__name__
        add = _ITEMS.get(kind)
        if add is None:
            raise ConfigError(
                f"input[{i}] has type {kind!r}; {who} accepts items of type {sorted(_ITEMS)} (reasoning, item "
                "references and built-in tool calls are not supported: send messages and function calls only)"
            )
        add(out, i, item)
    return out


def _add_message(out: list[Json], i: int, item: Mapping[str, Any]) -> None:
    role = item.get("role")
    if role not in _ROLES:
        raise ConfigError(f"input[{i}] is a message with role {role!r}; expected one of {_ROLES}")
    out.append({"role": role, "content": _text(item.get("content"), f"input[{i}].content")})


def _add_function_call(out: list[Json], i: int, item: Mapping[str, Any]) -> None:
    for key in ("call_id", "name", "arguments"):
        if not isinstance(item.get(key), str):
            raise ConfigError(f"input[{i}] is a function_call without a string {key!r}; got {item!r:.200}")
    call = {"id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]}}
    if out and out[-1]["role"] == "assistant":
        out[-1].setdefault("tool_calls", []).append(call)
    else:
        out.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _add_call_output(out: list[Json], i: int, item: Mapping[str, Any]) -> None:
    if not isinstance(item.get("call_id"), str):
        raise ConfigError(f"input[{i}] is a function_call_output without a string 'call_id'; got {item!r:.200}")
    out.append({"role": "tool", "tool_call_id": item["call_id"], "content": _text(item.get("output"),
                                                                                 f"input[{i}].output")})


_ITEMS: dict[str, Callable[[list[Json], int, Mapping[str, Any]], None]] = {
    "message": _add_message,
    "function_call": _add_function_call,
    "function_call_output": _add_call_output,
}


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ConfigError(f"{where} must be a string or a list of {_TEXT_PARTS} parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ConfigError(
                f"{where}[{j}] has type {kind!r}; only text parts {_TEXT_PARTS} with a string 'text' are "
                "supported (the served model reads text: images, files, audio and refusals are not)"
            )
        texts.append(part["text"])
    return "".join(texts)


# ---------------------------------------------------------------------------------------- response
def build_response(
    rec: CompletionRecord, req: ResponsesRequest, model: str, logprobs: list[Json] | None
) -> Response:
    """The ``Response`` for a recorded completion (``rec.id`` is the response id)."""
    status = "incomplete" if rec.finish_reason == "length" else "completed"
    body = {
        **req.echo,
        "id": rec.id,
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": status,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "output": _output(rec.reply, status, logprobs),
        "text": {"format": {"type": "text"}},
        "usage": {
            "input_tokens": len(rec.prompt_ids), "output_tokens": len(rec.output_ids),
            "total_tokens": len(rec.prompt_ids) + len(rec.output_ids),
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }
    return Response.model_validate(body)


def _output(reply: Mapping[str, Any], status: str, logprobs: list[Json] | None) -> list[Json]:
    calls = reply.get("tool_calls") or []
    items: list[Json] = []
    if reply.get("content") or not calls:
        part: Json = {"type": "output_text", "text": reply.get("content") or "", "annotations": []}
        if logprobs is not None:
            part["logprobs"] = logprobs
        items.append({"type": "message", "id": new_id("msg"), "role": "assistant", "status": status,
                      "content": [part]})
    for call in calls:
        fn = call["function"]
        items.append({"type": "function_call", "id": new_id("fc"), "call_id": call["id"], "name": fn["name"],
                      "arguments": fn["arguments"], "status": "completed"})
    return items
