"""Streamed replies: OpenAI's chunk and event sequences, as server-sent events, from finished replies.

agentflow's engines return a whole generation at once (``engine.agenerate``), so a streamed reply
is the finished ``ChatCompletion`` or ``Response`` replayed as the sequence OpenAI streams: every
chunk arrives once the generation has ended (a stream adds no time-to-first-token benefit). This
module builds those sequences and encodes them as server-sent events (``data: {...}`` lines ending
with ``data: [DONE]`` for chat; ``event: <type>`` + ``data: {...}`` for the Responses API): the
proxy sends those bytes. In process, :class:`ReplayStream` (an ``openai.AsyncStream``) yields the
same items validated into the SDK's chunk and event classes, without the SDK's per-chunk parsing
of the bytes (a test checks both give equal objects). :class:`RawResponse` is what
``with_raw_response.create`` returns in process (LangChain uses it).

Chat chunks: the role, then the content in one delta, then per tool call a delta with its
index, id, type and name (empty arguments) and one with its arguments, then ``finish_reason``
(with the log-probs when asked), then with ``include_usage`` a chunk with no choices and the usage.

Not here: generating, recording or validating requests (:mod:`agentflow.client`).
"""

from __future__ import annotations

import functools
import json
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, TypeVar

import openai
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import ResponseStreamEvent

try:  # the HTTP library of the installed openai SDK (httpx2 since openai 3)
    import httpx2 as _http
except ImportError:  # pragma: no cover - depends on the installed openai version
    import httpx as _http

__all__ = [
    "RawResponse", "ReplayStream", "chat_chunks", "chat_sse", "chat_stream", "parse_event", "raw_response",
    "response_events", "response_sse", "response_stream", "sse_body",
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
_T = TypeVar("_T")


class ReplayStream(openai.AsyncStream[_T]):
    """A finished reply replayed as an ``openai.AsyncStream`` (``isinstance`` checks hold).

    Iterating yields the chunk or event objects, validated into the classes the SDK parses them
    into; ``async with``, ``close()`` / ``aclose()`` behave as for a network stream (closing ends
    the iteration). ``.response`` is a 200 ``text/event-stream`` response whose ``.content`` is the
    SSE encoding of the same items (what the proxy sends), built on first access. Items are
    validated as they are read (the proxy only encodes them).
    """

    def __init__(
        self, client: openai.AsyncOpenAI, items: list[Json], parse: Callable[[Json], _T],
        encode: Callable[[list[Json]], bytes], path: str,
    ) -> None:
        # The parent's constructor reads a network response; a replay has none (see ``response``).
        self._client = client
        self._items, self._parse, self._encode, self._path = items, parse, encode, path
        self._http: Any = None
        self._closed = False
        self._iterator = self._replay()

    async def _replay(self) -> AsyncIterator[_T]:
        for item in self._items:
            if self._closed:
                return
            yield self._parse(item)

    async def __anext__(self) -> _T:
        return await self._iterator.__anext__()

    async def __aiter__(self) -> AsyncIterator[_T]:
        async for item in self._iterator:
            yield item

    @property
    def response(self) -> Any:  # type: ignore[override]  # built lazily: in process it is rarely read
        if self._http is None:
            self._http = _http.Response(
                200, headers={"content-type": "text/event-stream; charset=utf-8"},
                content=self._encode(self._items), request=_request(self._client, self._path),
            )
        return self._http

    async def close(self) -> None:
        self._closed = True
        if self._http is not None:
            await self._http.aclose()


def chat_stream(client: openai.AsyncOpenAI, chunks: list[Json]) -> ReplayStream[ChatCompletionChunk]:
    return ReplayStream(client, chunks, ChatCompletionChunk.model_validate, chat_sse, "/chat/completions")


def response_stream(client: openai.AsyncOpenAI, events: list[Json]) -> ReplayStream[Any]:
    return ReplayStream(client, events, parse_event, response_sse, "/responses")


@functools.cache
def _event_classes() -> dict[str, Any]:
    """Responses stream event classes by their ``type`` (the members of ``ResponseStreamEvent``)."""
    union = ResponseStreamEvent
    if typing.get_origin(union) is typing.Annotated:
        union = typing.get_args(union)[0]
    return {typing.get_args(cls.model_fields["type"].annotation)[0]: cls for cls in typing.get_args(union)}


def parse_event(event: Json) -> Any:
    """The event object of a Responses stream event (as the SDK parses it off the network)."""
    return _event_classes()[event["type"]].model_validate(event)


def _request(client: openai.AsyncOpenAI, path: str) -> Any:
    return _http.Request("POST", f"{str(client.base_url).rstrip('/')}{path}")


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
                          request=_request(client, path))
    return RawResponse(out, http)


def sse_body(stream: ReplayStream[Any]) -> bytes:
    """The SSE bytes of a replayed stream (what the proxy sends)."""
    return stream._encode(stream._items)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
