"""An OpenAI-compatible chat client over an agentflow inference engine, recording what it samples.

:class:`OpenAIClient` is an ``openai.AsyncOpenAI`` whose ``chat.completions.create`` never touches
the network: it renders the messages with the tokenizer's chat template, calls
``engine.agenerate`` and returns a real ``openai.types.chat.ChatCompletion`` (tool calls parsed by
a pluggable :mod:`agentflow._toolcalls` parser). Agents written for the OpenAI SDK run unchanged.

Every completion is recorded (:class:`CompletionRecord`: messages, prompt ids, sampled ids,
log-probs, versions). Token-in, token-out: when a request's messages extend a recorded
conversation (its messages, then the assistant reply this client produced, then new messages),
the prompt is the recorded token ids (prompt + sampled output) followed by the tokens of the new
messages only, computed as a text delta of the chat template; the history is never re-templated.
A drift check compares the re-templated conversation with the decoded recorded tokens and counts
mismatches in ``stats["template_drift"]``. Rewards are attached with :meth:`OpenAIClient.set_reward`
and the records become :class:`agentflow.Trajectory` objects with
:meth:`OpenAIClient.export_trajectories`.

``stream=True`` returns an ``openai.AsyncStream`` (a replay) of ``ChatCompletionChunk`` objects; the
chunks are emitted all at once after ``engine.agenerate`` returns (engines return whole
generations), replayed from the finished, recorded reply (:mod:`agentflow._streaming`).
``responses.create`` serves the Responses API (plain and streamed) by translating it onto the same
rendering, recording and chaining (:mod:`agentflow._responses`).

Not covered: token-by-token streaming, ``n > 1`` (call ``create`` n times), forced tool choice,
the legacy Completions API and other endpoints (they still point at the dummy base URL and fail to
connect), ``with_streaming_response``. Templating and tokenising run on the event loop for
chat-sized requests and in a thread for large ones (:mod:`agentflow._recording`), so a huge
conversation cannot hold the loop. What the client keeps per turn does not copy earlier turns
(prefix digests, linked stored responses, shared message objects); a proxy session bounds it
(:attr:`OpenAIClient.bounds`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent

from agentflow import _recording, _responses, _sampling, _streaming
from agentflow._toolcalls import ParsedOutput, ToolParser, get_tool_parser
from agentflow._types import GenerationConfig, ModelRequest, ModelResponse, Trajectory
from agentflow.errors import ConfigError, EngineError, EngineTimeout, TrajectoryError

if TYPE_CHECKING:
    from agentflow._engine_api import InferenceEngine

__all__ = ["CompletionRecord", "OpenAIClient", "ResponseNotFound"]

ExportStyle = Literal["individual", "concat"]
_TEXT_CACHE = 32  # decoded texts of recorded conversations kept for continuing them
_NEUTRAL = _sampling.NEUTRAL  # accepted at their neutral value (refused otherwise)
_NO_NETWORK_URL = "http://agentflow.invalid/v1"  # the parent client needs one; chat never uses it

# Parameters accepted only at their default (None means "not given"); sampling parameters the
# engines cannot honour are in agentflow._sampling.
_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "top_logprobs": (None, 0),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "tool_choice": (None, "auto", "none"),
    "function_call": (None,),
    "functions": (None,),
}
# How to change an agent that sends one of them.
_HINTS = {
    "n": "call create n times",
    "response_format": "structured output needs constrained decoding: drop the agent's output type "
                       "(Agents SDK: output_type; LangChain: with_structured_output) and parse the text",
    "tool_choice": "the model decides whether to call a tool (Agents SDK: leave ModelSettings.tool_choice unset)",
    "top_logprobs": "only the sampled tokens' log-probs exist; use logprobs=True",
}
# Accepted and ignored: informational, or transport options of the openai SDK.
_IGNORED = frozenset(
    {"model", "user", "metadata", "store", "parallel_tool_calls", "service_tier", "extra_headers",
     "extra_query", "reasoning_effort", "prompt_cache_key", "safety_identifier"}
)
_HANDLED = frozenset(
    {"messages", "tools", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "stop",
     "stop_token_ids", "logprobs", "chat_template_kwargs", "extra_body", "timeout", "stream", "stream_options"}
)


@dataclass(frozen=True, slots=True)
class CompletionRecord:
    """One recorded completion.

    ``prompt_ids`` is exactly what the engine saw; for a follow-up turn it equals
    ``parent.prompt_ids + parent.output_ids + delta_ids`` (``delta_ids`` are the new messages'
    tokens). For a first turn ``parent`` is None and ``delta_ids == prompt_ids``.
    """

    id: str
    messages: tuple[dict[str, Any], ...]
    reply: dict[str, Any]
    prompt_ids: list[int]
    delta_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str
    parent: str | None
    context: str = field(repr=False, default="")
    key: bytes = field(repr=False, default=b"")


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A request's prompt: its ids, the record it continues (and the ids appended to it), the
    rendering context and the digest of context + messages (see :mod:`agentflow._recording`)."""

    prompt_ids: list[int]
    parent: CompletionRecord | None
    delta_ids: list[int]
    context: str
    digest: bytes


# ---------------------------------------------------------------------------------------- messages
def _plain(obj: Any) -> Any:
    """Pydantic models (e.g. a returned ``ChatCompletionMessage``) and mappings -> plain JSON data."""
    if hasattr(obj, "model_dump"):
        return _plain(obj.model_dump(exclude_none=True, mode="json"))
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    raise ConfigError(
        f"message content must be a string or a list of text parts, got {type(content).__name__}"
    )


def _canonical_args(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _message_key(msg: Mapping[str, Any]) -> str:
    """What identifies a message when matching conversations (tool-call ids and JSON spacing ignored)."""
    calls = [
        (tc.get("function", {}).get("name"), _canonical_args(tc.get("function", {}).get("arguments")))
        for tc in msg.get("tool_calls") or ()
    ]
    fields = [msg.get("role"), _text_of(msg.get("content")), calls, msg.get("tool_call_id"), msg.get("name")]
    return json.dumps(fields, sort_keys=True, ensure_ascii=False)


_ROLES = ("system", "developer", "user", "assistant", "tool")


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ConfigError(f"messages must be a non-empty list of chat messages, got {messages!r:.200}")
    plain = [_plain(m) for m in messages]
    for i, m in enumerate(plain):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ConfigError(f"messages[{i}] must be a mapping with role in {_ROLES}, got {m!r:.200}")
    return plain


# ---------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True, slots=True)
class _Params:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    gconfig: GenerationConfig
    template_kwargs: dict[str, Any]
    parse_tools: bool
    logprobs: bool
    model: str
    timeout: float | None
    stream: bool = False
    include_usage: bool = False


def _given(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the openai SDK's ``NOT_GIVEN`` / ``omit`` sentinels; flatten ``extra_body``."""
    out = {k: v for k, v in kwargs.items() if not isinstance(v, openai.NotGiven | openai.Omit)}
    extra = out.pop("extra_body", None) or {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"extra_body must be a mapping, got {type(extra).__name__}")
    clash = sorted(set(extra) & set(out))
    if clash:
        raise ConfigError(f"parameters {clash} given both directly and in extra_body; give each once")
    return {**out, **extra}


def _check_params(kw: Mapping[str, Any], who: str) -> None:
    problems = []
    for name, value in kw.items():
        refused = _sampling.refusal(name, value, who)
        if refused is not None:
            problems.append(refused)
        elif name in _DEFAULT_ONLY and value not in _DEFAULT_ONLY[name]:
            hint = f": {_HINTS[name]}" if name in _HINTS else ""
            problems.append(
                f"{name}={value!r} is not supported by {who}; accepted values: "
                f"{[v for v in _DEFAULT_ONLY[name] if v is not None]} (or leave it out){hint}"
            )
        elif name not in _DEFAULT_ONLY and name not in _IGNORED and name not in _HANDLED and name not in _NEUTRAL:
            problems.append(
                f"unknown parameter {name!r}: {who} does not know it. Supported: {sorted(_HANDLED - {'extra_body'})}"
                f"; ignored: {sorted(_IGNORED)}; accepted only at their default: {sorted(_DEFAULT_ONLY)}. "
                f"Remove {name} from the agent's request"
            )
    if problems:
        raise ConfigError(problems)


_INT_PARAMS = ("max_tokens", "max_completion_tokens", "top_k")
_FLOAT_PARAMS = ("temperature", "top_p")


def _check_types(kw: Mapping[str, Any]) -> None:
    problems = []
    for name in _INT_PARAMS + _FLOAT_PARAMS:
        v = kw.get(name)
        ok = (int,) if name in _INT_PARAMS else (int, float)
        if v is not None and (isinstance(v, bool) or not isinstance(v, ok)):
            kind = "an integer" if name in _INT_PARAMS else "a number"
            problems.append(f"{name} must be {kind}, got {v!r}")
    stop = kw.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
        isinstance(stop, list | tuple) and all(isinstance(x, str) for x in stop)
    ):
        problems.append(f"stop must be a string or a list of strings, got {stop!r}")
    if problems:
        raise ConfigError(problems)


_STREAM_OPTIONS = frozenset({"include_usage", "include_obfuscation"})  # obfuscation: accepted, no padding sent


def _stream_flags(kw: Mapping[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage) from ``stream`` and ``stream_options``."""
    stream, options = kw.get("stream"), kw.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise ConfigError(f"stream must be true or false, got {stream!r}")
    if options is None:
        return bool(stream), False
    if not stream:
        raise ConfigError("stream_options is only allowed with stream=True; leave it out or set stream=True")
    if not isinstance(options, Mapping) or not set(options) <= _STREAM_OPTIONS:
        raise ConfigError(f"stream_options must be a mapping with keys in {sorted(_STREAM_OPTIONS)}, got {options!r}")
    return True, bool(options.get("include_usage"))


def _max_tokens(kw: Mapping[str, Any], default: int) -> int:
    a, b = kw.get("max_tokens"), kw.get("max_completion_tokens")
    if a is not None and b is not None and a != b:
        raise ConfigError(f"max_tokens={a} and max_completion_tokens={b} disagree; give one of them")
    return int(a if a is not None else b if b is not None else default)


def _gconfig(kw: Mapping[str, Any], base: GenerationConfig) -> GenerationConfig:
    stop = kw.get("stop")
    stops = base.stop if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop))
    extra_ids = tuple(kw.get("stop_token_ids") or ())
    changes = {
        "n_samples": 1,
        "max_new_tokens": _max_tokens(kw, base.max_new_tokens),
        "stop": stops,
        "stop_token_ids": tuple(dict.fromkeys(base.stop_token_ids + extra_ids)),
    }
    for name in ("temperature", "top_p", "top_k"):
        if kw.get(name) is not None:
            changes[name] = kw[name]
    return base.new(**changes)


def _parse_params(
    kwargs: Mapping[str, Any], base: GenerationConfig, template_kwargs: dict[str, Any], who: str
) -> _Params:
    kw = _given(kwargs)
    if "messages" not in kw:
        raise ConfigError("create() needs messages=[...]; got none")
    _check_params(kw, who)
    _check_types(kw)
    stream, include_usage = _stream_flags(kw)
    tools = _plain(kw.get("tools")) or None
    per_call = kw.get("chat_template_kwargs") or {}
    timeout = kw.get("timeout")
    return _Params(
        messages=_check_messages(kw["messages"]),
        tools=tools,
        gconfig=_gconfig(kw, base),
        template_kwargs={**template_kwargs, **per_call},
        parse_tools=bool(tools) and kw.get("tool_choice") != "none",
        logprobs=bool(kw.get("logprobs")),
        model=str(kw.get("model") or "agentflow"),
        timeout=float(timeout) if isinstance(timeout, int | float) else None,
        stream=stream,
        include_usage=include_usage,
    )


# ---------------------------------------------------------------------------------------- client
class _RawCreate:
    """``<resource>.with_raw_response``: ``create`` returns a :class:`agentflow._streaming.RawResponse`."""

    def __init__(self, resource: _Completions | _Responses, path: str) -> None:
        self._resource, self._path = resource, path

    async def create(self, **kwargs: Any) -> _streaming.RawResponse:
        out = await self._resource.create(**kwargs)
        return _streaming.raw_response(self._resource._client, out, self._path)


class _Completions:
    def __init__(self, client: OpenAIClient) -> None:
        self._client = client
        self.with_raw_response = _RawCreate(self, "/chat/completions")

    async def create(self, **kwargs: Any) -> ChatCompletion | openai.AsyncStream[ChatCompletionChunk]:
        """``chat.completions.create`` over the engine; see :class:`OpenAIClient`."""
        return await self._client._create(kwargs)


class _Chat:
    def __init__(self, client: OpenAIClient) -> None:
        self.completions = _Completions(client)


class _Responses:
    def __init__(self, client: OpenAIClient) -> None:
        self._client = client
        self.with_raw_response = _RawCreate(self, "/responses")

    async def create(self, **kwargs: Any) -> Response | openai.AsyncStream[ResponseStreamEvent]:
        """``responses.create`` over the engine; see :mod:`agentflow._responses`."""
        return await self._client._respond(kwargs)

    async def retrieve(self, response_id: str, **kwargs: Any) -> Response:
        """A response this client created with ``store`` left true (as ``GET /v1/responses/{id}``)."""
        _check_lookup("responses.retrieve", kwargs, self._client._who)
        return self._client._stored(response_id)

    async def delete(self, response_id: str, **kwargs: Any) -> None:
        """Forget a stored response: it can no longer be retrieved or continued with
        ``previous_response_id`` (its completions stay recorded for training)."""
        _check_lookup("responses.delete", kwargs, self._client._who)
        client = self._client
        client._stored(response_id)
        del client._responses_by_id[response_id]
        if all(turn.previous != response_id for turn in client._conversations.values()):
            client._conversations.pop(response_id, None)  # else its turn stays: later responses continue it


# Request options the openai client accepts on every call; a lookup has no other parameters here.
_LOOKUP_OPTIONS = frozenset({"extra_headers", "extra_query", "extra_body", "timeout"})


class ResponseNotFound(ConfigError, LookupError):
    """``responses.retrieve`` / ``delete`` of an id the client did not store (the proxy answers 404)."""


def _check_lookup(what: str, kwargs: Mapping[str, Any], who: str) -> None:
    extra = sorted(k for k, v in _given(kwargs).items() if k not in _LOOKUP_OPTIONS and v is not None)
    if extra:
        raise ConfigError(f"{what}: {', '.join(map(repr, extra))} is not supported by {who}; expected the "
                          "response id only (a stored response comes back whole, not streamed)")


class _RawClient:
    """``client.with_raw_response``: the raw-response view of the served resources."""

    def __init__(self, client: OpenAIClient) -> None:
        self.chat = _RawChat(client.chat.completions.with_raw_response)
        self.responses = client.responses.with_raw_response


@dataclass(frozen=True, slots=True)
class _RawChat:
    completions: _RawCreate


class OpenAIClient(openai.AsyncOpenAI):
    """``openai.AsyncOpenAI`` whose chat completions come from an agentflow engine (no network).

    Args:
        engine: any :class:`agentflow.InferenceEngine`.
        tokenizer: a Hugging Face tokenizer with a chat template.
        gconfig: default sampling parameters; request parameters override them. Its
            ``stop_token_ids`` default to the tokenizer's eos token.
        chat_template_kwargs: extra variables for the chat template (e.g. ``enable_thinking``).
        tool_parser: ``"qwen"`` / ``"hermes"`` / ``"none"`` or an object with
            ``parse(text) -> ParsedOutput`` (see :mod:`agentflow._toolcalls`).

    ``stats`` counts ``completions``, ``continued`` (turns appended to a recorded conversation),
    ``tool_calls``, ``tool_parse_failures``, ``template_drift`` and ``template_not_prefix`` (the
    template re-rendered the history differently, so the turn started a new chain).

    ``stream=True`` returns an ``openai.AsyncStream`` once the whole generation is done (the
    chunks are replayed from the finished reply, see :mod:`agentflow._streaming`); it is recorded
    exactly as a non-streamed call. ``responses.create`` serves the Responses API over the same
    rendering and recording (:mod:`agentflow._responses`). The client has no transport:
    ``with_options`` / ``copy`` return the client itself, so copies share its records.
    """

    _who = "agentflow's OpenAIClient"  # names the server in error messages (the proxy overrides it)

    def __init__(
        self,
        engine: InferenceEngine,
        tokenizer: Any,
        *,
        gconfig: GenerationConfig | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tool_parser: str | ToolParser = "qwen",
    ) -> None:
        super().__init__(api_key="agentflow-in-process", base_url=_NO_NETWORK_URL, max_retries=0)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(
                "tokenizer has no chat_template; set tokenizer.chat_template to a Jinja chat template"
            )
        self.engine = engine
        self.tokenizer = tokenizer
        base = gconfig or GenerationConfig()
        if not base.stop_token_ids and tokenizer.eos_token_id is not None:
            base = base.new(stop_token_ids=(tokenizer.eos_token_id,))
        self.gconfig = base
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.tool_parser = get_tool_parser(tool_parser)
        self.stats: dict[str, int] = dict.fromkeys(
            ("completions", "continued", "tool_calls", "tool_parse_failures", "template_drift",
             "template_not_prefix", "abandoned"), 0
        )
        self.bounds = _recording.Bounds()  # what the client may hold (a proxy session sets its limits)
        self._records: dict[str, CompletionRecord] = {}
        self._by_key: dict[bytes, str] = {}  # digest of context + messages + reply -> completion id
        self._parents: set[str] = set()
        self._rewards: dict[str, float] = {}
        self._texts: dict[str, str] = {}
        self._conversations: dict[str, _recording.StoredTurn] = {}  # stored Responses' turns, by id
        self._responses_by_id: dict[str, Response] = {}  # stored Responses (retrievable), by id

    @cached_property
    def chat(self) -> _Chat:  # type: ignore[override]  # same call shape, served in-process
        return _Chat(self)

    @cached_property
    def responses(self) -> _Responses:  # type: ignore[override]  # same call shape, served in-process
        return _Responses(self)

    @cached_property
    def with_raw_response(self) -> _RawClient:  # type: ignore[override]
        return _RawClient(self)

    @property
    def with_streaming_response(self) -> Any:  # type: ignore[override]
        raise AttributeError(
            "OpenAIClient does not serve with_streaming_response; use create(stream=True) or with_raw_response"
        )

    def copy(self, **_options: Any) -> OpenAIClient:  # type: ignore[override]
        """The client itself: there is no transport, so client options (retries, timeouts, headers)
        do not apply (a request's ``timeout=`` does), and frameworks that call ``with_options``
        keep recording into this client."""
        return self

    with_options = copy  # type: ignore[assignment]

    # ------------------------------------------------------------------ create
    async def _create(
        self, kwargs: Mapping[str, Any], *, off_loop: bool | None = None
    ) -> ChatCompletion | openai.AsyncStream[ChatCompletionChunk]:
        p, rec = await self._chat_record(kwargs, f"chatcmpl-{uuid.uuid4().hex}", off_loop)
        completion = self._completion(rec, p)
        if not p.stream:
            return completion
        chunks = _streaming.chat_chunks(completion.model_dump(mode="json", exclude_none=True), p.include_usage)
        return _streaming.chat_stream(self, chunks)

    async def _chat_record(
        self, kwargs: Mapping[str, Any], completion_id: str, off_loop: bool | None
    ) -> tuple[_Params, CompletionRecord]:
        """Check, render (in a thread when ``off_loop``, or when large), generate and record a chat request."""
        big = _recording.is_large(kwargs, "messages") if off_loop is None else off_loop
        prepare = functools.partial(self._prepare_chat, kwargs)
        p, prep = await asyncio.to_thread(prepare) if big else prepare()
        return p, await self._complete(p, prep, completion_id)

    def _prepare_chat(self, kwargs: Mapping[str, Any]) -> tuple[_Params, _Prepared]:
        p = _parse_params(kwargs, self.gconfig, self.chat_template_kwargs, self._who)
        self.bounds.check_conversation(_recording.conversation_bytes(p.messages))
        return p, self._prepare(p)

    async def _respond(
        self, kwargs: Mapping[str, Any], *, off_loop: bool | None = None
    ) -> Response | openai.AsyncStream[ResponseStreamEvent]:
        kw = _given(kwargs)
        prev_id = kw.get("previous_response_id")
        previous = self._conversations.get(prev_id) if isinstance(prev_id, str) else None
        big = off_loop if off_loop is not None else (
            _recording.is_large(kw, "input") or (previous is not None and previous.is_large()))
        prepare = functools.partial(self._prepare_response, kw)
        req, p, prep = await asyncio.to_thread(prepare) if big else prepare()
        rec = await self._complete(p, prep, _responses.new_id("resp"))
        response = _responses.build_response(rec, req, p.model, self._token_logprobs(rec) if req.logprobs else None)
        if req.store:
            turn = (*req.new, rec.reply)
            total = req.history_bytes + _recording.conversation_bytes(turn)
            self._conversations[rec.id] = _recording.StoredTurn(
                req.echo["previous_response_id"], turn, total, len(req.history) + len(turn))
            self._responses_by_id[rec.id] = response
        if not req.stream:
            return response
        events = _streaming.response_events(response.model_dump(mode="json", exclude_none=True))
        return _streaming.response_stream(self, events)

    def _prepare_response(self, kw: Mapping[str, Any]) -> tuple[_responses.ResponsesRequest, _Params, _Prepared]:
        if kw.get("store", True) is not False:
            self.bounds.check_store(len(self._conversations))
        history = _recording.stored_history(self._conversations, self._responses_by_id.__contains__)
        req = _responses.parse_request(_plain(kw), history, self._who)
        p = _parse_params(req.chat, self.gconfig, self.chat_template_kwargs, self._who)
        self.bounds.check_conversation(req.history_bytes + _recording.conversation_bytes(req.new))
        return req, p, self._prepare(p)

    def _stored(self, response_id: str) -> Response:
        try:
            return self._responses_by_id[response_id]
        except KeyError:
            raise ResponseNotFound(
                f"response {response_id!r} is unknown to {self._who}: expected the id of a response it created with "
                "store left true and did not delete (kept while the client or proxy session lives)") from None

    def _prepare(self, p: _Params) -> _Prepared:
        """The prompt of a request (token-in, token-out): pure, may run in a thread."""
        context = json.dumps([p.tools, p.template_kwargs], sort_keys=True, ensure_ascii=False)
        digests = _recording.prefix_digests(context, [_message_key(m) for m in p.messages])
        prompt_ids, parent, delta_ids = self._prompt(p, digests)
        return _Prepared(prompt_ids, parent, delta_ids, context, digests[-1])

    async def _complete(self, p: _Params, prep: _Prepared, completion_id: str) -> CompletionRecord:
        """Generate, parse and record one completion of a prepared prompt."""
        if self.bounds.budget is not None:
            self.bounds.budget.check(len(prep.prompt_ids) + p.gconfig.max_new_tokens)
        resp = await self._generate(ModelRequest(input_ids=prep.prompt_ids, gconfig=p.gconfig), p.timeout)
        text = self._output_text(resp.output_tokens, p.gconfig)
        parsed = self.tool_parser.parse(text) if p.parse_tools else ParsedOutput(content=text or None)
        reply = _reply_message(parsed)
        parent = prep.parent
        # A follow-up turn shares its parent's message objects (no copy of the history per turn).
        messages = tuple(p.messages) if parent is None else (
            *parent.messages, parent.reply, *p.messages[len(parent.messages) + 1:])
        rec = CompletionRecord(
            id=completion_id, messages=messages, reply=reply,
            prompt_ids=prep.prompt_ids, delta_ids=prep.delta_ids, output_ids=list(resp.output_tokens),
            logprobs=list(resp.output_logprobs), versions=list(resp.output_versions),
            finish_reason=_finish_reason(resp, parsed), parent=parent.id if parent else None,
            context=prep.context, key=_recording.extend_digest(prep.digest, _message_key(reply)),
        )
        self._record(rec, parsed)
        return rec

    async def _generate(self, req: ModelRequest, limit_s: float | None) -> ModelResponse:
        try:
            async with asyncio.timeout(limit_s):
                resp = await self.engine.agenerate(req)
        except TimeoutError as e:
            raise EngineTimeout(
                f"chat completion took longer than timeout={limit_s}s; raise the timeout or leave it out"
            ) from e
        if resp.stop_reason == "abort":
            raise EngineError(
                "the engine aborted the generation (is it shutting down?); expected a finished generation"
            )
        return resp

    def _record(self, rec: CompletionRecord, parsed: ParsedOutput | None) -> None:
        self._records[rec.id] = rec
        if rec.key:
            self._by_key[rec.key] = rec.id
        if rec.parent is not None:
            self._parents.add(rec.parent)
            self.stats["continued"] += 1
        self.stats["completions"] += 1
        if parsed is not None:
            self.stats["tool_calls"] += len(parsed.tool_calls)
            self.stats["tool_parse_failures"] += parsed.error is not None
        if self.bounds.budget is not None:
            self.bounds.budget.add(len(rec.prompt_ids) + len(rec.output_ids))

    def _forget(self, completion_id: str) -> None:
        """Drop a recorded completion its requester never received (the proxy's client went away)."""
        rec = self._records.pop(completion_id, None)
        if rec is None:
            return
        if self._by_key.get(rec.key) == rec.id:
            del self._by_key[rec.key]
        if rec.parent is not None:
            self.stats["continued"] -= 1
            if all(r.parent != rec.parent for r in self._records.values()):
                self._parents.discard(rec.parent)
        for table in (self._rewards, self._texts, self._conversations, self._responses_by_id):
            table.pop(rec.id, None)  # type: ignore[attr-defined]  # dicts keyed by completion id
        self.stats["completions"] -= 1
        self.stats["abandoned"] += 1
        if self.bounds.budget is not None:
            self.bounds.budget.add(-(len(rec.prompt_ids) + len(rec.output_ids)))

    # ------------------------------------------------------------------ prompts (token-in, token-out)
    def _render(self, messages: list[dict[str, Any]], p: _Params, *, generation: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=p.tools, tokenize=False, add_generation_prompt=generation, **p.template_kwargs
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _find_parent(self, digests: list[bytes]) -> CompletionRecord | None:
        """The recorded completion whose messages + reply are the longest prefix of the request's messages."""
        for k in range(len(digests) - 1, 1, -1):
            rid = self._by_key.get(digests[k])
            if rid is not None and rid in self._records:
                return self._records[rid]
        return None

    def _recorded_text(self, rec: CompletionRecord) -> str:
        text = self._texts.get(rec.id)
        if text is None:
            text = self.tokenizer.decode(rec.prompt_ids + rec.output_ids, skip_special_tokens=False)
            if len(self._texts) >= _TEXT_CACHE:  # a bounded cache: the newest turns are the ones continued
                self._texts.pop(next(iter(self._texts)), None)
            self._texts[rec.id] = text
        return text

    def _prompt(self, p: _Params, digests: list[bytes]) -> tuple[list[int], CompletionRecord | None, list[int]]:
        """(prompt ids, parent record or None, ids appended to the parent's tokens)."""
        full = self._render(p.messages, p, generation=True)
        parent = self._find_parent(digests)
        if parent is None:
            ids = self._encode(full)
            return ids, None, ids
        delta = self._delta_text(p, parent, full)
        if delta is None:
            ids = self._encode(full)
            return ids, None, ids
        delta_ids = self._encode(delta)
        return parent.prompt_ids + parent.output_ids + delta_ids, parent, delta_ids

    def _delta_text(self, p: _Params, parent: CompletionRecord, full: str) -> str | None:
        """Text of the messages after ``parent``'s reply, to append to its recorded tokens.

        The template's rendering of the whole conversation should start with the decoded recorded
        tokens; then the delta is the rest. Otherwise (drift: e.g. the model wrote a tool call with
        other JSON spacing than the template renders) the delta is the template's text after the
        history, preceded by what the template puts after the reply's end-of-turn token.
        Returns None when the template does not render the history as a prefix at all.
        """
        recorded = self._recorded_text(parent)
        if full.startswith(recorded):
            return full[len(recorded):]
        self.stats["template_drift"] += 1
        history = self._render([*p.messages[: len(parent.messages) + 1]], p, generation=False)
        if not full.startswith(history):
            self.stats["template_not_prefix"] += 1
            return None
        return self._turn_glue(history, parent) + full[len(history):]

    def _turn_glue(self, history: str, parent: CompletionRecord) -> str:
        """What the template renders after the reply's sampled text (e.g. ``<|im_end|>`` + newline)."""
        eos = self.tokenizer.eos_token
        at = history.rfind(eos) if eos else -1
        if at < 0:
            return ""
        ended = bool(parent.output_ids) and parent.output_ids[-1] == self.tokenizer.eos_token_id
        return history[at + len(eos) if ended else at :]

    # ------------------------------------------------------------------ responses
    def _output_text(self, ids: list[int], g: GenerationConfig) -> str:
        """The reply text: without the final stop token or a matched stop string (as OpenAI)."""
        if ids and ids[-1] in set(g.stop_token_ids):
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        for s in g.stop:
            if s and text.endswith(s):
                return text[: -len(s)]
        return text

    def _completion(self, rec: CompletionRecord, p: _Params) -> ChatCompletion:
        choice: dict[str, Any] = {"index": 0, "finish_reason": rec.finish_reason, "message": rec.reply}
        if p.logprobs:
            choice["logprobs"] = {"content": self._token_logprobs(rec)}
        return ChatCompletion.model_validate({
            "id": rec.id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": p.model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(rec.prompt_ids),
                "completion_tokens": len(rec.output_ids),
                "total_tokens": len(rec.prompt_ids) + len(rec.output_ids),
            },
        })

    def _token_logprobs(self, rec: CompletionRecord) -> list[dict[str, Any]]:
        out = []
        for tid, lp in zip(rec.output_ids, rec.logprobs, strict=True):
            tok = self.tokenizer.decode([tid], skip_special_tokens=False)
            out.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": []})
        return out

    # ------------------------------------------------------------------ records and rewards
    @property
    def records(self) -> list[CompletionRecord]:
        """Every recorded completion, oldest first."""
        return list(self._records.values())

    def get_completion(self, completion_id: str) -> CompletionRecord:
        try:
            return self._records[completion_id]
        except KeyError:
            raise TrajectoryError(
                f"unknown completion id {completion_id!r}; expected one of the {len(self._records)} ids this "
                "client returned (ChatCompletion.id, chunk.id of a stream, or Response.id)"
            ) from None

    def set_reward(self, completion_id: str, reward: float) -> None:
        """Attach a reward to one completion (replaces an earlier one)."""
        self.get_completion(completion_id)
        self._rewards[completion_id] = _check_reward(reward)

    def set_last_reward(self, reward: float) -> None:
        """Attach a reward to the most recent completion."""
        if not self._records:
            raise TrajectoryError(
                "set_last_reward: no completion recorded yet; call chat.completions.create first"
            )
        self.set_reward(next(reversed(self._records)), reward)

    def get_reward(self, completion_id: str) -> float | None:
        self.get_completion(completion_id)
        return self._rewards.get(completion_id)

    def export_trajectories(
        self, discount: float = 1.0, style: ExportStyle = "individual"
    ) -> list[Trajectory]:
        """The recorded completions as trajectories (sampled token ids exactly; unset rewards count 0).

        ``"individual"``: one trajectory per completion, oldest first: prompt (mask 0) + output
        (mask 1); reward = its own reward, or with ``discount < 1`` the discounted return
        ``r_i + discount * G_{i+1}`` over completions in creation order (as AReaL's ArealOpenAI).
        ``"concat"``: one trajectory per conversation leaf (a completion no later turn extends):
        first prompt (0), then per turn sampled tokens (1) and new-message tokens (0); reward =
        the leaf's reward. ``discount`` must be 1 for this style.
        """
        if not 0.0 <= discount <= 1.0:
            raise TrajectoryError(f"discount must be in [0, 1], got {discount}")
        if style == "individual":
            return self._export_individual(discount)
        if style == "concat":
            if discount != 1.0:
                raise TrajectoryError(
                    f"discount={discount} applies to style='individual' only; use discount=1.0 with concat"
                )
            return self._export_concat()
        raise TrajectoryError(f"style must be 'individual' or 'concat', got {style!r}")

    def _export_individual(self, discount: float) -> list[Trajectory]:
        records = self.records
        rewards = [self._rewards.get(r.id, 0.0) for r in records]
        if discount < 1.0:
            ret = 0.0
            for i in range(len(rewards) - 1, -1, -1):
                ret = rewards[i] + discount * ret
                rewards[i] = ret
        return [_individual(r, reward) for r, reward in zip(records, rewards, strict=True)]

    def _export_concat(self) -> list[Trajectory]:
        out = []
        for leaf in self.records:
            if leaf.id in self._parents:
                continue
            chain = [leaf]
            while chain[-1].parent is not None:
                chain.append(self._records[chain[-1].parent])
            out.append(_concat(chain[::-1], self._rewards.get(leaf.id, 0.0)))
        return out


# ---------------------------------------------------------------------------------------- helpers
def _check_reward(reward: float) -> float:
    if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
        raise TrajectoryError(f"reward must be a finite number, got {reward!r}")
    return float(reward)


def _finish_reason(resp: ModelResponse, parsed: ParsedOutput) -> str:
    if resp.stop_reason == "length":
        return "length"
    return "tool_calls" if parsed.tool_calls else "stop"


def _reply_message(parsed: ParsedOutput) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.tool_calls:
        msg["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in parsed.tool_calls
        ]
    return msg


def _individual(rec: CompletionRecord, reward: float) -> Trajectory:
    p, o = len(rec.prompt_ids), len(rec.output_ids)
    return Trajectory(
        input_ids=rec.prompt_ids + rec.output_ids,
        loss_mask=[0] * p + [1] * o,
        logprobs=[0.0] * p + rec.logprobs,
        versions=[-1] * p + rec.versions,
        reward=reward,
        info={"completion_id": rec.id, "finish_reason": rec.finish_reason},
    )


def _concat(chain: list[CompletionRecord], reward: float) -> Trajectory:
    ids: list[int] = []
    mask: list[int] = []
    lps: list[float] = []
    vers: list[int] = []
    for rec in chain:
        ids += rec.delta_ids + rec.output_ids
        mask += [0] * len(rec.delta_ids) + [1] * len(rec.output_ids)
        lps += [0.0] * len(rec.delta_ids) + rec.logprobs
        vers += [-1] * len(rec.delta_ids) + rec.versions
    leaf = chain[-1]
    if ids != leaf.prompt_ids + leaf.output_ids:  # invariant of token-in, token-out
        raise TrajectoryError(
            f"conversation chain ending at {leaf.id} does not reproduce its recorded tokens (internal bug)"
        )
    return Trajectory(
        input_ids=ids, loss_mask=mask, logprobs=lps, versions=vers, reward=reward,
        info={"completion_ids": [r.id for r in chain], "finish_reason": leaf.finish_reason},
    )
