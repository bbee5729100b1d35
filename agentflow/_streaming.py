"""Streamed replies: OpenAI's chunk and event sequences, as server-sent events, from finished replies.

agentflow's engines return a whole generation at once (``engine.agenerate``), so a streamed reply
is the finished ``ChatCompletion`` or ``Response`` replayed as the sequence OpenAI streams: every
chunk arrives once the generation has ended (a stream adds no time-to-first-token benefit). This
module builds those sequences and encodes them as server-sent events (``data: {...}`` lines ending
with ``data: [DONE]`` for chat; ``event: <type>`` + ``data: {...}`` for the Responses API). The
proxy sends the bytes as they are; the in-process client wraps the same bytes in a real
``openai.AsyncStream``, so agents iterate exactly the objects the SDK would parse off the network.
:class:`RawResponse` is what ``with_raw_response.create`` returns in process (LangChain uses it).

Chat chunks: the role, then the content in one delta, then per tool call a delta with its
index, id, type and name (empty arguments) and one with its arguments, then ``finish_reason``
(with the log-probs when asked), then with ``include_usage`` a chunk with no choices and the usage.

Not done here: generating, recording or validating requests (:mod:`agentflow.client`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import openai

try:  # the HTTP library of the installed openai SDK (httpx2 since openai 3)
    import httpx2 as _http
except ImportError:  # pragma: no cover - depends on the installed openai version
    import httpx as _http

__all__ = [
    "RawResponse", "async_stream", "chat_chunks", "chat_sse", "raw_response", "response_events", "response_sse",
    "sse_body",
]

Json = dict[str, Any]


# ---------------------------------------------------------------------------------------- chat
def chat_chunks(completion: Mapping[str, Any], include_usage: bool) -> list[Json]:
    """The ``chat.completion.chunk`` objects of a finished completion (a JSON-mode model dump)."""
    head = {"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"],
            "model": completion["model"]}
    choice = completion["choices"][0]
    chunks = [_chunk(head, delta) for delta in _deltas(choice["message"])]
    last = {"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}
    if choice.get("logprobs") is not None:
        last["logprobs"] = choice["logprobs"]
    chunks.append({**head, "choices": [last]})
    if include_usage:
        chunks.append({**head, "choices": [], "usage": completion["usage"]})
    return chunks


def _chunk(head: Json, delta: Json) -> Json:
    return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def _deltas(message: Mapping[str, Any]) -> list[Json]:
    deltas: list[Json] = [{"role": "assistant", "content": ""}]
    if message.get("content"):
        deltas.append({"content": message["content"]})
    for index, call in enumerate(message.get("tool_calls") or ()):
        fn = call["function"]
        opening = {"index": index, "id": call["id"], "type": "function",
                   "function": {"name": fn["name"], "arguments": ""}}
        deltas.append({"tool_calls": [opening]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": fn["arguments"]}}]})
    return deltas


def chat_sse(chunks: Iterable[Mapping[str, Any]]) -> bytes:
    """``data: {chunk}`` per chunk, then ``data: [DONE]``."""
    lines = [f"data: {_dumps(c)}\n\n" for c in chunks]
    lines.append("data: [DONE]\n\n")
    return "".join(lines).encode()


# ---------------------------------------------------------------------------------------- responses
class _Events:
    """Collects events, numbering them (``sequence_number``) in order."""

    def __init__(self) -> None:
        self.items: list[Json] = []

    def emit(self, kind: str, **fields: Any) -> None:
        self.items.append({"type": kind, "sequence_number": len(self.items), **fields})


def response_events(response: Mapping[str, Any]) -> list[Json]:
    """The Responses stream events of a finished response (a JSON-mode model dump).

    ``response.created`` and ``response.in_progress`` (status in_progress, no output), then per
    output item its added / delta / done events, then ``response.completed`` (or
    ``response.incomplete`` when the reply was cut by ``max_output_tokens``) with the response.
    """
    ev = _Events()
    started = {k: v for k, v in response.items() if k not in ("usage", "incomplete_details")}
    started.update(status="in_progress", output=[])
    ev.emit("response.created", response=started)
    ev.emit("response.in_progress", response=started)
    for index, item in enumerate(response["output"]):
        _ITEM_EVENTS[item["type"]](ev, index, item)
    done = "response.completed" if response["status"] == "completed" else f"response.{response['status']}"
    ev.emit(done, response=dict(response))
    return ev.items


def _message_events(ev: _Events, index: int, item: Mapping[str, Any]) -> None:
    ev.emit("response.output_item.added", output_index=index, item={**item, "status": "in_progress", "content": []})
    for k, part in enumerate(item["content"]):
        at = {"item_id": item["id"], "output_index": index, "content_index": k}
        logprobs = part.get("logprobs") or []
        ev.emit("response.content_part.added", **at, part={"type": part["type"], "text": "", "annotations": []})
        ev.emit("response.output_text.delta", **at, delta=part["text"], logprobs=logprobs)
        ev.emit("response.output_text.done", **at, text=part["text"], logprobs=logprobs)
        ev.emit("response.content_part.done", **at, part=part)
    ev.emit("response.output_item.done", output_index=index, item=item)


def _function_call_events(ev: _Events, index: int, item: Mapping[str, Any]) -> None:
    opening = {**item, "arguments": "", "status": "in_progress"}
    ev.emit("response.output_item.added", output_index=index, item=opening)
    at = {"item_id": item["id"], "output_index": index}
    ev.emit("response.function_call_arguments.delta", **at, delta=item["arguments"])
    ev.emit("response.function_call_arguments.done", **at, arguments=item["arguments"])
    ev.emit("response.output_item.done", output_index=index, item=item)


_ITEM_EVENTS: dict[str, Callable[[_Events, int, Mapping[str, Any]], None]] = {
    "message": _message_events,
    "function_call": _function_call_events,
}


def response_sse(events: Iterable[Mapping[str, Any]]) -> bytes:
    """``event: <type>`` + ``data: {event}`` per event (the Responses API sends no ``[DONE]``)."""
    return "".join(f"event: {e['type']}\ndata: {_dumps(e)}\n\n" for e in events).encode()


# ---------------------------------------------------------------------------------------- in process
def async_stream(client: openai.AsyncOpenAI, body: bytes, cast_to: Any, path: str) -> openai.AsyncStream[Any]:
    """A real ``openai.AsyncStream`` reading ``body`` (SSE bytes) as if ``POST path`` had returned it.

    ``async for``, ``async with``, ``close()`` / ``aclose()`` and ``.response`` (a 200 response whose
    ``.content`` is ``body``) behave as for a network stream.
    """
    request = _http.Request("POST", f"{str(client.base_url).rstrip('/')}{path}")
    response = _http.Response(
        200, headers={"content-type": "text/event-stream; charset=utf-8"}, content=body, request=request
    )
    return openai.AsyncStream(cast_to=cast_to, response=response, client=client)


class RawResponse:
    """What ``with_raw_response.create`` gives in process: ``parse()`` returns the reply (a
    ``ChatCompletion``, ``Response`` or ``AsyncStream``); ``http_response``, ``headers`` and
    ``status_code`` describe the 200 response the network would have carried."""

    request_id = None
    retries_taken = 0

    def __init__(self, parsed: Any, http_response: Any) -> None:
        self._parsed = parsed
        self.http_response = http_response

    def parse(self) -> Any:
        return self._parsed

    @property
    def headers(self) -> Any:
        return self.http_response.headers

    @property
    def status_code(self) -> int:
        return int(self.http_response.status_code)


def raw_response(client: openai.AsyncOpenAI, out: Any, path: str) -> RawResponse:
    """Wrap a reply object made in process as :class:`RawResponse` (JSON body, or the stream's SSE)."""
    if isinstance(out, openai.AsyncStream):
        return RawResponse(out, out.response)
    body = out.model_dump_json(exclude_none=True).encode()
    http = _http.Response(200, headers={"content-type": "application/json"}, content=body,
                          request=_http.Request("POST", f"{str(client.base_url).rstrip('/')}{path}"))
    return RawResponse(out, http)


def sse_body(stream: openai.AsyncStream[Any]) -> bytes:
    """The SSE bytes behind a stream made by :func:`async_stream` (what the proxy sends)."""
    return stream.response.content


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
