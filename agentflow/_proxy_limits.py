"""Bounds of the OpenAI-compatible proxy: what one session, one request and one connection may hold.

The proxy shares the training event loop and the trainer's memory, so an agent (buggy or
hostile) must not be able to grow either without end. :class:`ProxyLimits` holds the bounds:

- ``max_body_bytes``: one request body (checked before and while it is read).
- ``max_conversation_bytes``: the text of one request's conversation, stored history included
  (a ``previous_response_id`` chain of bodies each under the body cap grows it turn by turn).
- ``max_session_tokens``: the tokens a session's records hold (prompt + output of every
  completion, what it exports in the ``individual`` style); ``max_total_tokens``: the same over
  all sessions. A session at its limit gets 413 until it is closed.
- ``max_stored_responses``: Responses API responses a session keeps for ``previous_response_id``.
- ``max_sessions``: open sessions; a request with the run key and a new ``X-Session-ID`` beyond it
  gets 413 instead of opening one.
- ``max_connections``: open connections (uvicorn's ``limit_concurrency``: 503 beyond it).
- ``header_timeout_s``: a connection that has not sent a whole request head within it (or, after
  a response, the next one) is closed; ``body_timeout_s``: a body not fully received within it
  is answered 408.

:class:`TokenBudget` does the token accounting; :func:`deadline_protocol` adds the header
deadline to uvicorn's HTTP protocol (uvicorn itself has none: a half-sent request head holds its
connection open for ever).

Not here: the checks of a body's shape (:mod:`agentflow._proxy_guard`), the routes
(:mod:`agentflow.proxy`).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from agentflow.errors import AgentflowError, ConfigError

__all__ = ["LimitExceeded", "ProxyLimits", "TokenBudget", "deadline_protocol"]


class LimitExceeded(AgentflowError):
    """A request beyond one of the proxy's :class:`ProxyLimits` (the proxy answers 413)."""


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """Per-request, per-session and global bounds of :class:`agentflow.proxy.ProxyServer`."""

    max_body_bytes: int = 1 << 20
    max_conversation_bytes: int = 4 << 20
    max_session_tokens: int = 2_000_000
    max_total_tokens: int = 32_000_000
    max_stored_responses: int = 4096
    max_sessions: int = 4096
    max_connections: int = 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        problems = [
            f"ProxyLimits.{name} must be a positive integer, got {getattr(self, name)!r}"
            for name in (
                "max_body_bytes",
                "max_conversation_bytes",
                "max_session_tokens",
                "max_total_tokens",
                "max_stored_responses",
                "max_sessions",
                "max_connections",
            )
            if isinstance(getattr(self, name), bool)
            or not isinstance(getattr(self, name), int)
            or getattr(self, name) < 1
        ]
        problems += [
            f"ProxyLimits.{name} must be a finite number of seconds > 0, got {getattr(self, name)!r}"
            for name in ("header_timeout_s", "body_timeout_s")
            if not isinstance(getattr(self, name), int | float) or not 0 < getattr(self, name) < math.inf
        ]
        ConfigError.check(problems)


class TokenBudget:
    """Tokens held by recorded completions, against a limit (and a parent budget, e.g. global)."""

    def __init__(self, limit: int, what: str, parent: TokenBudget | None = None) -> None:
        self.limit, self.what, self.parent = limit, what, parent
        self.used = 0

    def check(self, n: int) -> None:
        """Raise :class:`LimitExceeded` when ``n`` more tokens would pass this budget or its parent's."""
        if self.used + n > self.limit:
            raise LimitExceeded(
                f"{self.what} holds {self.used} recorded tokens and this completion would add {n}, beyond its "
                f"limit of {self.limit} tokens; end the episode (export its trajectories and close the session) "
                "or raise the limit (ProxyServer(limits=ProxyLimits(...)))"
            )
        if self.parent is not None:
            self.parent.check(n)

    def add(self, n: int) -> None:
        """Count ``n`` tokens (negative: give them back)."""
        self.used += n
        if self.parent is not None:
            self.parent.add(n)


def deadline_protocol(base: type[asyncio.Protocol], header_timeout_s: float) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's HTTP protocol class) closing connections that send no request head in time.

    The deadline starts when the connection opens and again when a response is complete; when it
    passes with no request in progress, the connection is closed. A request in progress is left to
    the route (its body has its own deadline).
    """

    class _Deadline(base):  # type: ignore[valid-type,misc]  # a subclass of the class uvicorn picked
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(header_timeout_s, self._expire)

        def _expire(self) -> None:
            self._deadline = None
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

    _Deadline.__name__ = f"Deadline{base.__name__}"
    return _Deadline
