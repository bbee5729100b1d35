"""Book-keeping of :class:`agentflow.OpenAIClient` that must stay linear in a conversation's length.

A conversation of n turns is sent n times, each time whole. Whatever the client keeps per turn
must therefore not copy the earlier turns, or memory grows as n²:

- :func:`prefix_digests`: conversation prefixes are indexed by a rolling digest (one 16-byte key
  per recorded completion) instead of a tuple of every message's key;
- :class:`StoredTurn`: a stored Responses API response keeps its own new messages and reply and
  the id of the response it continued; :func:`stored_history` walks that chain when a request names
  ``previous_response_id`` (a chain of 1,000 turns costs 1,000 small nodes, not 500,000 messages);
- :class:`Bounds`: what a proxy session may hold (conversation bytes, stored responses, tokens);
  the in-process client has none;
- :func:`conversation_bytes`: the text size of a conversation, checked against the bound before
  anything is rendered;
- :data:`OFF_LOOP_CHARS`: above this size a request is prepared (checked, rendered, tokenized) in a
  thread so the event loop stays free.

Not here: rendering, generating and recording (:mod:`agentflow.client`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agentflow._proxy_limits import LimitExceeded, TokenBudget

__all__ = [
    "OFF_LOOP_CHARS",
    "Bounds",
    "StoredTurn",
    "conversation_bytes",
    "extend_digest",
    "is_large",
    "prefix_digests",
    "stored_history",
]

Json = dict[str, Any]
OFF_LOOP_CHARS = 32 * 1024
_OFF_LOOP_ITEMS = 64


@dataclass(frozen=True, slots=True)
class Bounds:
    """What one client (a proxy session) may hold; ``None`` = unbounded (the in-process client)."""

    conversation_bytes: int | None = None
    stored_responses: int | None = None
    budget: TokenBudget | None = None

    def check_conversation(self, size: int) -> None:
        if self.conversation_bytes is not None and size > self.conversation_bytes:
            raise LimitExceeded(
                f"the conversation of this request holds {size} bytes of text (stored history included), beyond "
                f"the proxy's limit of {self.conversation_bytes} bytes per conversation; start a new conversation "
                "(drop previous_response_id, or send fewer messages) or raise ProxyLimits.max_conversation_bytes"
            )

    def check_store(self, stored: int) -> None:
        if self.stored_responses is not None and stored >= self.stored_responses:
            raise LimitExceeded(
                f"this session already stores {stored} responses, the proxy's limit "
                f"(ProxyLimits.max_stored_responses); send store=false for responses the agent will not "
                "continue, delete them (DELETE /v1/responses/{id}), or start a new session"
            )


@dataclass(frozen=True, slots=True)
class StoredTurn:
    """One stored response: the response it continued, its new input messages + reply, and the
    text size and message count of the whole conversation up to and including it."""

    previous: str | None
    messages: tuple[Json, ...]
    total_bytes: int
    total_messages: int = 0

    def is_large(self) -> bool:
        """Whether continuing it means preparing a request large enough to go off the loop."""
        return self.total_bytes > OFF_LOOP_CHARS or self.total_messages > _OFF_LOOP_ITEMS


def stored_history(
    turns: Mapping[str, StoredTurn], visible: Callable[[str], bool]
) -> Callable[[str], tuple[list[Json], int] | None]:
    """A lookup: response id -> (its conversation's messages, their text size), None if not visible."""

    def history(response_id: str) -> tuple[list[Json], int] | None:
        if not visible(response_id) or response_id not in turns:
            return None
        chain, rid = [], response_id
        while rid is not None:
            turn = turns[rid]
            chain.append(turn.messages)
            rid = turn.previous
        return [m for part in reversed(chain) for m in part], turns[response_id].total_bytes

    return history


def prefix_digests(context: str, keys: Sequence[str]) -> list[bytes]:
    """``out[k]`` identifies the context and the first k message keys (``out[0]``: the context alone)."""
    out = [hashlib.blake2b(context.encode(), digest_size=16).digest()]
    for key in keys:
        out.append(extend_digest(out[-1], key))
    return out


def extend_digest(digest: bytes, key: str) -> bytes:
    """The digest of a prefix followed by one more message key."""
    return hashlib.blake2b(digest + key.encode(), digest_size=16).digest()


def _message_bytes(msg: Mapping[str, Any]) -> int:
    content = msg.get("content")
    size = len(content) if isinstance(content, str) else len(json.dumps(content)) if content else 0
    for call in msg.get("tool_calls") or ():
        size += len(json.dumps(call))
    return size


def conversation_bytes(messages: Sequence[Mapping[str, Any]]) -> int:
    """The text size of ``messages`` (content and tool calls; what the chat template renders)."""
    return sum(_message_bytes(m) if isinstance(m, Mapping) else 0 for m in messages)


def is_large(kwargs: Mapping[str, Any], field: str) -> bool:
    """Whether ``kwargs[field]`` (messages, or a Responses input) is big enough to prepare off the loop."""
    value = kwargs.get(field)
    if isinstance(value, str):
        return len(value) > OFF_LOOP_CHARS
    if not isinstance(value, list | tuple):
        return False
    if len(value) > _OFF_LOOP_ITEMS:
        return True
    return (
        sum(len(m["content"]) if isinstance(m, Mapping) and isinstance(m.get("content"), str) else 1024 for m in value)
        > OFF_LOOP_CHARS
    )
