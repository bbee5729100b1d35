"""Request checks of the OpenAI-compatible proxy: body size, the shape of a chat body, rewards.

The proxy runs on the training event loop, so a request must not be able to hold it:
:func:`read_body` refuses bodies over the cap before reading them (``Content-Length``) or while
reading them, answers 408 for a body not received within its deadline, and parses large ones in a
thread. :func:`check_chat_body` checks the type of every
chat-completion field the proxy's client reads and refuses keys that are not field names, each
as a :class:`RequestError` naming the field (the proxy answers it as a JSON 4xx).
:func:`check_reward_body` makes a reward that would break training (not a number, non-finite,
beyond ``±REWARD_LIMIT``) a 422.

Not here: authentication and routing (:mod:`agentflow.proxy`), building the completion
(:mod:`agentflow.client`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from agentflow._types import check_reward
from agentflow.errors import TrajectoryError

__all__ = ["MAX_BODY_BYTES", "RequestError", "check_chat_body", "check_reward_body", "read_body"]

MAX_BODY_BYTES = 1 << 20
_OFF_LOOP_BYTES = 64 * 1024


class RequestError(Exception):
    """A request the proxy refuses: ``status`` (4xx), a message naming the field, and its ``param``."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


async def read_body(request: Any, cap: int = MAX_BODY_BYTES, timeout_s: float = 30.0) -> Any:
    """The JSON body of ``request``; 413 over ``cap`` bytes, 408 when not received within ``timeout_s``,
    400 when it is not JSON."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise RequestError(413, f"request body of {length} bytes exceeds the proxy's limit of {cap} bytes; "
                                "shorten the messages (ProxyLimits.max_body_bytes sets the limit)")
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(timeout_s):
            await _receive(request, chunks, cap)
    except TimeoutError:
        raise RequestError(408, f"request body not received within {timeout_s} s (got {sum(map(len, chunks))} bytes); "
                                "send the whole body at once (ProxyLimits.body_timeout_s sets the limit)") from None
    raw = b"".join(chunks)
    try:
        body = await asyncio.to_thread(json.loads, raw) if len(raw) > _OFF_LOOP_BYTES else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON ({e})") from e
    if not isinstance(body, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


async def _receive(request: Any, chunks: list[bytes], cap: int) -> None:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise RequestError(413, f"request body exceeds the proxy's limit of {cap} bytes; shorten the messages")
        chunks.append(chunk)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _list_of(pred: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(pred(x) for x in v)


_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "messages": (_list_of(lambda m: isinstance(m, dict)), "a list of message objects"),
    "tools": (_list_of(lambda t: isinstance(t, dict)), "a list of tool objects"),
    "tool_choice": (lambda v: isinstance(v, str | dict), "a string or an object"),
    "stop": (lambda v: isinstance(v, str) or _list_of(lambda s: isinstance(s, str))(v), "a string or a list of them"),
    "stop_token_ids": (_list_of(_is_int), "a list of integers"),
    "max_tokens": (_is_int, "an integer"),
    "max_completion_tokens": (_is_int, "an integer"),
    "n": (_is_int, "an integer"),
    "temperature": (_is_num, "a number"),
    "top_p": (_is_num, "a number"),
    "top_k": (_is_int, "an integer"),
    "model": (lambda v: isinstance(v, str), "a string"),
    "chat_template_kwargs": (lambda v: isinstance(v, dict), "an object"),
}


def check_chat_body(body: dict[str, Any]) -> None:
    """Raise :class:`RequestError` (400) naming the first field of the wrong type or name."""
    for key, value in body.items():
        if not key.isidentifier() or key in ("self", "kwargs") or key.startswith("_"):
            raise RequestError(400, f"unknown request field {key!r}; expected OpenAI chat-completion fields "
                                    f"such as {', '.join(sorted(_FIELDS))}", key)
        spec = _FIELDS.get(key)
        if spec is not None and value is not None and not spec[0](value):
            raise RequestError(400, f"field {key!r} must be {spec[1]}, got {json.dumps(value)[:80]}", key)
    if "messages" not in body:
        raise RequestError(400, "field 'messages' is required: a list of message objects", "messages")


def check_reward_body(body: dict[str, Any]) -> float:
    """The ``reward`` of a reward body; 400 when missing, 422 when it would break training."""
    if "reward" not in body:
        raise RequestError(400, 'reward body must be {"reward": <number>, "completion_id": <optional id>}', "reward")
    try:
        return check_reward(body["reward"])
    except TrajectoryError as e:
        raise RequestError(422, str(e), "reward") from e
