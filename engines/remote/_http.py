"""The HTTP clients of a server pool: several small ``httpx`` connection pools instead of one big one.

An ``httpx.AsyncClient`` does its pool's bookkeeping on every request it starts and every response
it closes, in passes over all of its connections (one of them quadratic in the idle ones). With
one client and 64 requests in flight that cost 9.5 ms of CPU per request on a 2-core machine, on
the event loop that also runs the episodes and, in ``agentflow train``, on the trainer's cores;
over clients of 4 connections each it is 0.6 ms (``benchmarks/bench_http_pool.py``).
:class:`ClientShards` therefore holds clients of at most ``per_client`` connections each, created
on first use, and sends a request through the one with the fewest requests in flight for its size,
so no client holds more connections than it must and the total stays within ``max_connections``.

Idle connections are dropped after ``KEEPALIVE_S`` (2 s). Servers built on uvicorn (SGLang, vLLM,
``agentflow serve``) close a connection that has been idle for 5 s, which is also httpx's default
expiry: a request sent on such a connection as the server closes it fails with a ``ReadError``, and
the pool would take the server for down (measured: 1-2 times in a 20-step remote run). Expiring
idle connections well before the server does leaves no such race; a fresh local connection costs
well under a millisecond.

Not here: routes, retries, health (:mod:`agentflow.engines.remote._pool`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import httpx

__all__ = ["KEEPALIVE_S", "PER_CLIENT", "ClientShards"]

PER_CLIENT = 4  # connections per httpx client; see the module docstring
KEEPALIVE_S = 2.0  # idle connections are closed after this; below uvicorn's 5 s (module docstring)


class ClientShards:
    """``ceil(max_connections / per_client)`` clients made by ``make(limits, ssl_context)``; a
    ``transport`` (tests, custom transports) means one client, which then holds every connection.
    A connection idle for ``keepalive_s`` is closed rather than reused."""

    def __init__(self, make: Callable[[httpx.Limits, Any], httpx.AsyncClient], max_connections: int,
                 per_client: int = PER_CLIENT, *, single: bool = False, keepalive_s: float = KEEPALIVE_S) -> None:
        n = 1 if single else max(1, math.ceil(max_connections / per_client))
        size = max_connections if n == 1 else per_client
        self._capacity = [min(size, max_connections - i * size) for i in range(n)]
        self._limits = [httpx.Limits(max_connections=c, max_keepalive_connections=c, keepalive_expiry=keepalive_s)
                        for c in self._capacity]
        self._make = make
        self._ssl: Any = None  # one TLS context for every client (building one takes ~25 ms)
        self._clients: list[httpx.AsyncClient | None] = [None] * n
        self._in_flight = [0] * n

    def _client(self, i: int) -> httpx.AsyncClient:
        client = self._clients[i]
        if client is None:
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
            client = self._clients[i] = self._make(self._limits[i], self._ssl)
        return client

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """``httpx.AsyncClient.request`` through the client with the fewest requests in flight for
        its size (the last client may be smaller)."""
        counts, capacity = self._in_flight, self._capacity
        i = min(range(len(counts)), key=lambda k: counts[k] / capacity[k])
        counts[i] += 1
        try:
            return await self._client(i).request(method, url, **kwargs)
        finally:
            counts[i] -= 1

    async def aclose(self) -> None:
        clients, self._clients = self._clients, [None] * len(self._clients)
        for client in clients:
            if client is not None:
                await client.aclose()
