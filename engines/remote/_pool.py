"""The server pool: a set of HTTP inference servers used as one, whatever protocol they speak.

One set of ``httpx`` clients (:class:`~agentflow.engines.remote._http.ClientShards`, opened in
:meth:`ServerPool.open`, closed in :meth:`ServerPool.close`) reaches every server; a
:class:`~agentflow.engines.remote.protocol.ServerProtocol` adapter says which routes and bodies
each operation is. The pool does:

- **Health**: ``open`` waits up to ``startup_timeout_s`` for the servers; those not healthy yet are
  marked down. A background probe (one task in the pool's own ``TaskGroup``, asleep while every
  server is up) health-checks down servers every ``probe_interval_s``; while a call waits for a
  server it probes at once and then with exponential backoff. While paused it probes only for a
  waiting call (SGLang answers ``/health`` with 503 after ~20 s while paused). A healthy server
  passes the protocol's optional ``check_server`` first (vLLM's: a supported version); a refusal
  fails ``open``, or keeps a returning server down.
- **Every server down**: a generation or a weight update waits for a server to come back, up to
  ``server_wait_timeout_s`` (one log line per wait, naming each server and its last error), then
  fails naming each server, how long it has been down and its last error.
- **API key**: ``RemoteEngineConfig.api_key`` goes out as ``Authorization: Bearer <key>`` on every
  request (SGLang's ``--api-key``); a 401 says whether the key is missing or refused and how to set
  it, and fails ``open`` instead of every later request.
- **Routing**: least outstanding requests across healthy servers, ties round robin; sticky per key
  (a conversation goes back to the server that holds its prefix cache), least recently used keys
  forgotten after ``max_sticky``.
- **Failures**: a connection error or a 5xx is retried with exponential backoff (tenacity), each
  attempt on a server picked afresh with a fresh ``uuid4().hex`` request id. A server that fails to
  connect or answers 503 is marked down; a 4xx is the caller's error and is not retried.
- **Rejoin**: a server that is healthy again is first brought to the weights the others have (the
  last disk update is re-applied unless the server reports its version; a missed broadcast update
  keeps it down), then through the steps registered with :meth:`ServerPool.on_rejoin` (the LoRA
  client's: load the current adapters). A disk update is remembered before it is sent, so a server
  that is down during the update gets it when it returns, before it serves.
- **Fan-out**: pause, resume and weight updates go to every healthy server at once; a server
  that failed with a retryable error is marked down, any other failure raises.
- **Deadlines**: every adapter call runs under one (:class:`RemoteEngineConfig`, or the weight
  update's ``timeout_s``).

Not here: any route or JSON body (the adapters), the resume-after-abort loop of a generation and
token versions (``engines/remote/engine.py``), launching or restarting servers, catching a server up on a
missed broadcast (``"nccl"``) update, and the admin key of SGLang's ``--admin-api-key`` (one key is
sent on every route).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import tenacity

from agentflow import GenerationConfig, WeightUpdateMeta
from agentflow.engines.remote._http import ClientShards
from agentflow.engines.remote.protocol import BroadcastSpec, Generated, GenerateJob, ServerProtocol, WeightGroup
from agentflow.errors import ConfigError, EngineError, EngineTimeout, ServerError

__all__ = ["RemoteEngineConfig", "Server", "ServerPool"]

log = logging.getLogger("agentflow.remote")


@dataclass(frozen=True, slots=True)
class RemoteEngineConfig:
    """Deadlines, retries and routing of a remote engine and its server pool (times in seconds).

    Attributes:
        connect_timeout_s: TCP connect to a server.
        request_timeout_s: one generation attempt (a long generation must fit).
        control_timeout_s: pause/resume/info calls.
        health_timeout_s: one health check (SGLang answers 503 only after ~20 s when unhealthy).
        startup_timeout_s: ``initialize`` waits this long for the servers to become healthy.
        server_wait_timeout_s: how long a generation (in all its attempts) or a weight update waits
            for a healthy server while every server is down; then it fails naming each server.
        probe_interval_s: pause between health probes of down servers.
        max_attempts: attempts per call on connection errors and 5xx (with exponential backoff).
        backoff_initial_s, backoff_max_s: the backoff's first and largest wait.
        max_resumes: abort-and-resume cycles one ``agenerate`` may go through before it fails.
        sticky_key: ``ModelRequest.metadata`` key that names a conversation (sticky routing).
        max_sticky: conversations remembered for sticky routing (least recently used dropped).
        max_connections: HTTP connection pool size.
        dist_backend: backend of the ``"nccl"`` weight-update group (``"gloo"`` for CPU tests).
        api_key: sent as ``Authorization: Bearer <key>`` on every request (the servers' ``--api-key``);
            None sends none. Left out of ``repr``.
    """

    connect_timeout_s: float = 5.0
    request_timeout_s: float = 600.0
    control_timeout_s: float = 120.0
    health_timeout_s: float = 30.0
    startup_timeout_s: float = 300.0
    server_wait_timeout_s: float = 120.0
    probe_interval_s: float = 2.0
    max_attempts: int = 5
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 5.0
    max_resumes: int = 64
    sticky_key: str = "session"
    max_sticky: int = 100_000
    max_connections: int = 1024
    dist_backend: str = "nccl"
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        problems = [
            f"remote.{f} must be a positive finite number of seconds, got {getattr(self, f)!r}"
            for f in ("connect_timeout_s", "request_timeout_s", "control_timeout_s", "health_timeout_s",
                      "startup_timeout_s", "server_wait_timeout_s", "probe_interval_s", "backoff_initial_s",
                      "backoff_max_s")
            if not (isinstance(getattr(self, f), int | float) and 0 < getattr(self, f) < math.inf)
        ]
        problems += [f"remote.{f} must be an integer >= 1, got {getattr(self, f)!r}"
                     for f in ("max_attempts", "max_resumes", "max_sticky", "max_connections")
                     if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 1)]
        if self.dist_backend not in ("nccl", "gloo"):
            problems.append(f"remote.dist_backend must be 'nccl' or 'gloo', got {self.dist_backend!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()
                                         or any(c in self.api_key for c in "\r\n")):
            problems.append("remote.api_key must be the servers' --api-key (a non-empty string on one line) or "
                            "None for servers without a key")
        ConfigError.check(problems)


@dataclass(slots=True)
class Server:
    """One server's state as the pool sees it."""

    address: str
    up: bool = False
    outstanding: int = 0
    tp_size: int = 1
    last_error: str = ""
    down_since: float | None = None  # time.monotonic() when it was marked down
    weights: _DiskUpdate | None = None  # the last disk update it is known to have loaded


@dataclass(frozen=True, eq=False, slots=True)
class _DiskUpdate:
    """One disk weight update; compared by identity, so sending the same path again is a new update."""

    path: str
    version: int | None


def _secs(t: float) -> str:
    return f"{round(t, 1):g}"


def _down_for(s: Server, now: float) -> str:
    """``address down for 3.2 s (last error: ...)``, for logs and errors."""
    since = "" if s.down_since is None else f" down for {_secs(now - s.down_since)} s"
    return f"{s.address}{since} (last error: {s.last_error or 'none recorded'})"


class _Retryable(ServerError):
    """A failure worth another attempt (connection error, 5xx)."""


class _Unauthorized(ServerError):
    """401: the API key is missing or wrong (fails ``open``; never retried)."""


def _unauthorized(what: str, key_sent: bool) -> str:
    if not key_sent:
        return (f"{what} answered 401 Unauthorized: the server requires an API key and none was sent. Set "
                "inference.api_key=<the server's --api-key> (agentflow train) or RemoteEngineConfig(api_key=...); "
                "inference.api_key='${oc.env:NAME}' reads it from the environment variable NAME")
    return (f"{what} answered 401 Unauthorized: the server refused the API key sent (RemoteEngineConfig.api_key, "
            "inference.api_key in agentflow train). Expected the server's --api-key; a server started with "
            "--admin-api-key wants that other key on its weight-update and pause routes, and one key is sent "
            "on every route, so start such servers with --api-key only")


def _normalise(address: str) -> str:
    address = address.rstrip("/")
    return address if "://" in address else f"http://{address}"


def _decoded(r: httpx.Response, what: str) -> Any:
    """The JSON body; ``{}`` for an empty or non-JSON one (e.g. text/plain)."""
    if not r.content:
        return {}
    try:
        return r.json()
    except ValueError:
        if r.headers.get("content-type", "").startswith("application/json"):
            raise ServerError(f"{what} answered {r.status_code} with invalid JSON: {r.text[:200]!r}; expected "
                              "a JSON body (is this server speaking the configured protocol?)") from None
        return {}


class _Link:
    """:class:`~agentflow.engines.remote.protocol.ServerLink` for one server of a pool."""

    __slots__ = ("_pool", "_server", "address")

    def __init__(self, pool: ServerPool, server: Server) -> None:
        self._pool, self._server, self.address = pool, server, server.address

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        what = f"{method} {path} on {self.address}"
        try:
            r = await self._pool.client.request(method, f"{self.address}{path}", json=body)
        except httpx.TransportError as e:
            self._pool.mark_down(self._server, f"{what} failed: {e!r}")
            raise _Retryable(f"{what} failed: {e!r}") from e
        if r.status_code == 401:
            raise _Unauthorized(_unauthorized(what, self._pool.config.api_key is not None), 401)
        if r.status_code >= 400:
            text = self._pool.protocol.error_text(r.text)
            if r.status_code == 503:
                self._pool.mark_down(self._server, "answered 503")
            error = _Retryable if r.status_code >= 500 else ServerError
            raise error(f"{what} answered {r.status_code}: {text}", r.status_code)
        return _decoded(r, what)


class ServerPool:
    """A set of servers speaking ``protocol`` (see the module docstring).

    Args:
        addresses: ``"host:port"`` or ``"http://host:port"`` of each server.
        protocol: the adapter that speaks the servers' protocol.
        config: deadlines, retries, routing.
        transport: an ``httpx.AsyncBaseTransport`` to use instead of the network (tests).
    """

    def __init__(self, addresses: Sequence[str], protocol: ServerProtocol, config: RemoteEngineConfig,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if isinstance(addresses, str) or not addresses:
            raise ConfigError(f"addresses must be a non-empty list of 'host:port' strings, got {addresses!r}")
        self.protocol, self.config = protocol, config
        self.servers = [Server(_normalise(a)) for a in addresses]
        self._transport = transport
        self._client: ClientShards | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._some_down = asyncio.Event()
        self._sticky: OrderedDict[str, Server] = OrderedDict()
        self._rr = itertools.count()
        self._paused: list[Server] | None = None  # the servers pause_all paused; None = not paused
        self._last_disk: _DiskUpdate | None = None  # the last disk update (re-applied on rejoin)
        self._expected_version: int | None = None  # what a rejoining server must have; None = no check
        self._group: tuple[str, int, str] | None = None
        self._waiting: Counter[str] = Counter()  # calls waiting for a server, by operation
        self._wake = asyncio.Event()  # set when a call starts waiting: the probe probes at once
        self._rejoin_steps: list[Callable[[Server], Awaitable[None]]] = []

    # ------------------------------------------------------------------ lifetime
    async def open(self) -> None:
        """Connect and wait for the servers (at least one must become healthy); start the probe."""
        cfg = self.config
        timeout = httpx.Timeout(None, connect=cfg.connect_timeout_s)
        headers = {} if cfg.api_key is None else {"Authorization": f"Bearer {cfg.api_key}"}

        def make(limits: httpx.Limits, ssl_context: Any) -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=self._transport, timeout=timeout, limits=limits, headers=headers,
                                     verify=ssl_context)

        self._client = ClientShards(make, cfg.max_connections, single=self._transport is not None)
        try:
            await self._await_startup()
        except BaseException:
            await self._client.aclose()
            self._client = None
            raise
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._probe_task = self._tg.create_task(self._probe_loop())

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                await tg.__aexit__(None, None, None)
        finally:
            if self._client is not None:
                await self._client.aclose()
                self._client = None

    @property
    def client(self) -> ClientShards:
        if self._client is None:
            raise EngineError("the remote engine is not started: use `async with engine:` first")
        return self._client

    async def _await_startup(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.config.startup_timeout_s
        async with asyncio.TaskGroup() as tg:
            for s in self.servers:
                tg.create_task(self._wait_healthy(s, deadline))
        down = [s for s in self.servers if not s.up]
        if len(down) == len(self.servers):
            detail = "; ".join(f"{s.address}: {s.last_error or 'not healthy'}" for s in down)
            raise EngineError(
                f"no {self.protocol.name} server became healthy within startup_timeout_s="
                f"{self.config.startup_timeout_s}: {detail}. Start them first ({self.protocol.launch_hint}) "
                "or raise RemoteEngineConfig.startup_timeout_s."
            )
        self._some_down.clear()  # set by failed checks of servers that came up in the end
        for s in down:
            s.down_since = time.monotonic()
            log.warning("server %s not healthy at start (%s); it joins when a probe sees it healthy",
                        s.address, s.last_error)
            self._some_down.set()
        for s in self.servers:
            if s.up:
                await self._check_server(s)  # a refused server (ConfigError) fails open
                await self._read_tp_size(s)

    async def _check_server(self, s: Server) -> None:
        """The protocol's optional ``check_server`` (e.g. a supported server version)."""
        check = getattr(self.protocol, "check_server", None)
        if check is not None:
            await self.within(s, "check_server", self.config.control_timeout_s, check)

    async def _wait_healthy(self, s: Server, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        delay = self.config.backoff_initial_s
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return
            if await self._healthy(s, min(left, self.config.health_timeout_s)):
                s.up = True
                return
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))  # server still starting
            delay = min(2 * delay, self.config.backoff_max_s)

    async def _healthy(self, s: Server, limit: float) -> bool:
        try:
            await self.within(s, "health check", limit, self.protocol.health)
        except (EngineError, httpx.HTTPError) as e:
            s.last_error = str(e) or repr(e)
            return False
        s.last_error = ""
        return True

    async def _read_tp_size(self, s: Server) -> None:
        """Also the first call that needs the API key: a 401 here fails ``open``."""
        try:
            s.tp_size = int(await self.within(s, "tp_size", self.config.control_timeout_s, self.protocol.tp_size))
        except _Unauthorized:
            raise
        except (EngineError, ValueError, TypeError) as e:
            log.warning("could not read tp_size of %s (%r); assuming 1", s.address, e)

    # ------------------------------------------------------------------ routing
    def up_servers(self) -> list[Server]:
        return [s for s in self.servers if s.up]

    def _choose(self, key: str | None) -> Server | None:
        up = self.up_servers()
        if not up:
            return None
        if key is not None:
            s = self._sticky.get(key)
            if s is not None and s.up:
                self._sticky.move_to_end(key)
                return s
        k = next(self._rr) % len(up)
        best = min(up[k:] + up[:k], key=lambda s: s.outstanding)  # ties: round robin
        if key is not None:
            self._sticky[key] = best
            self._sticky.move_to_end(key)
            if len(self._sticky) > self.config.max_sticky:
                self._sticky.popitem(last=False)
        return best

    async def pick(self, key: str | None, deadline: float | None = None) -> Server:
        """The server for ``key``; while every server is down, waits for one (:meth:`await_servers`)."""
        s = self._choose(key)
        while s is None:
            await self.await_servers("generate", deadline)
            s = self._choose(key)
        return s

    def mark_down(self, s: Server, why: str) -> None:
        if s.up:
            log.warning("server %s marked down: %s", s.address, why)
        if s.up or s.down_since is None:
            s.down_since = time.monotonic()
        s.up, s.last_error = False, why
        self._some_down.set()

    async def _mark_up(self, s: Server) -> None:
        async with self._changed:
            s.up, s.last_error, s.down_since = True, "", None
            self._changed.notify_all()

    # ------------------------------------------------------------------ waiting for a server
    def wait_deadline(self) -> float:
        """The loop time until which a call that starts waiting now may wait for a server:
        ``server_wait_timeout_s`` from now, cut short to when every server will have been down that
        long. The cut keeps a dead fleet from costing each new call the whole wait: once every server
        has been down that long, calls fail at once (and the rollout's rejection limit stops a run
        promptly with the error) until a probe sees a server again."""
        now = asyncio.get_running_loop().time()
        wait = self.config.server_wait_timeout_s
        downs = [s.down_since for s in self.servers if not s.up and s.down_since is not None]
        if downs and len(downs) == len(self.servers):
            wait = min(wait, max(downs) + wait - time.monotonic())
        return now + wait

    async def await_servers(self, what: str, deadline: float | None = None) -> list[Server]:
        """The healthy servers. While there are none, wait for one until ``deadline`` (a loop time;
        default :meth:`wait_deadline`), then raise naming each server and its last error."""
        up = self.up_servers()
        if up:
            return up
        deadline = self.wait_deadline() if deadline is None else deadline
        if deadline <= asyncio.get_running_loop().time():
            raise self._none_came_back(what)  # the fleet has been down past the wait (no log line per call)
        self._begin_wait(what, deadline)
        try:
            async with asyncio.timeout_at(deadline), self._changed:
                await self._changed.wait_for(lambda: any(s.up for s in self.servers))
        except TimeoutError:
            raise self._none_came_back(what) from None
        finally:
            self._waiting[what] -= 1
        return self.up_servers()

    def _begin_wait(self, what: str, deadline: float) -> None:
        """Count the waiter, wake the probe, and log one line unless a call of this kind already waits."""
        if not self._waiting[what]:
            left = deadline - asyncio.get_running_loop().time()
            now = time.monotonic()
            log.warning("%s waits up to %s s for a %s server to come back (every server is down; probing): %s",
                        what, _secs(max(left, 0.0)), self.protocol.name,
                        "; ".join(_down_for(s, now) for s in self.servers))
        self._waiting[what] += 1
        self._wake.set()

    def _none_came_back(self, what: str) -> EngineError:
        now = time.monotonic()
        return EngineError(
            f"{what} needs a healthy {self.protocol.name} server, and none came back within server_wait_timeout_s="
            f"{self.config.server_wait_timeout_s} s: {'; '.join(_down_for(s, now) for s in self.servers)}. "
            f"Expected at least one server to pass its health check: restart the servers "
            f"({self.protocol.launch_hint}), or give them longer with inference.server_wait_timeout_s "
            "(agentflow train) or RemoteEngineConfig.server_wait_timeout_s."
        )

    # ------------------------------------------------------------------ calls
    async def within(self, s: Server, what: str, limit: float, op: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """``await op(link to s, *args)`` under a deadline of ``limit`` seconds."""
        try:
            async with asyncio.timeout(limit):
                return await op(_Link(self, s), *args)
        except TimeoutError as e:
            if isinstance(e, EngineTimeout):
                raise
            raise EngineTimeout(f"{what} on {s.address} took longer than {limit} s (the configured deadline); "
                                "raise it (RemoteEngineConfig, or WeightUpdateMeta.timeout_s for weight updates) "
                                "or check the server") from e

    def _retrying(self) -> tenacity.AsyncRetrying:
        cfg = self.config
        return tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(cfg.max_attempts),
            wait=tenacity.wait_exponential(multiplier=cfg.backoff_initial_s, max=cfg.backoff_max_s),
            retry=tenacity.retry_if_exception_type(_Retryable), reraise=True,
        )

    async def generate(self, input_ids: list[int], gconfig: GenerationConfig, max_new_tokens: int,
                       key: str | None, adapter: str | None = None) -> Generated:
        """One generation with retries; each attempt picks a server and gets a fresh rid. The wait
        for a server, while all are down, has one ``server_wait_timeout_s`` for all attempts."""
        try:
            return await self._generate(input_ids, gconfig, max_new_tokens, key, adapter)
        except _Retryable as e:  # the episode's reason names the bound, not a private class
            raise ServerError(
                f"generate failed on all {self.config.max_attempts} attempts (RemoteEngineConfig.max_attempts; "
                f"servers kept failing or dropping the request); last error: {e}", e.status_code) from e

    async def _generate(self, input_ids: list[int], gconfig: GenerationConfig, max_new_tokens: int,
                        key: str | None, adapter: str | None) -> Generated:
        deadline: float | None = None
        async for attempt in self._retrying():
            with attempt:
                if deadline is None and not self.up_servers():
                    deadline = self.wait_deadline()
                s = await self.pick(key, deadline)
                job = GenerateJob(input_ids, gconfig, max_new_tokens, uuid.uuid4().hex, adapter)
                s.outstanding += 1
                try:
                    out: Generated = await self.within(s, "generate", self.config.request_timeout_s,
                                                       self.protocol.generate, job)
                    return out
                finally:
                    s.outstanding -= 1
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def fan_out(self, servers: Sequence[Server], call: Callable[[Server], Awaitable[Any]]) -> list[Any]:
        """Run ``call`` on every server concurrently; return results or ``EngineError``s, in order."""
        async def one(s: Server) -> Any:
            try:
                return await call(s)
            except EngineError as e:
                return e

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(s)) for s in servers]
        return [t.result() for t in tasks]

    async def on_each(self, servers: Sequence[Server], what: str, limit: float,
                      op: Callable[..., Awaitable[Any]], *args: Any) -> list[Any]:
        """``op(link, *args)`` on every server at once, each under ``limit``; results or errors, in order."""
        return await self.fan_out(servers, lambda s: self.within(s, what, limit, op, *args))

    def check_all(self, servers: Sequence[Server], results: list[Any], what: str, *,
                  all_may_fail: bool = False) -> None:
        """Retryable failures mark their server down (it resyncs when back); others raise, and so
        does every server failing unless ``all_may_fail`` (the caller then waits for one to return)."""
        failed = [(s, r) for s, r in zip(servers, results, strict=True) if isinstance(r, Exception)]
        for s, r in failed:
            if isinstance(r, _Retryable):
                self.mark_down(s, f"{what} failed: {r}")
        hard = [(s, r) for s, r in failed if not isinstance(r, _Retryable)]
        if hard or (len(failed) == len(servers) and not all_may_fail):
            detail = "; ".join(f"{s.address}: {r}" for s, r in (hard or failed))
            raise ServerError(f"{what} failed on {len(hard or failed)} of {len(servers)} server(s): {detail}")

    # ------------------------------------------------------------------ pause / resume
    @property
    def paused(self) -> bool:
        return self._paused is not None

    async def pause_all(self) -> None:
        """Pause every healthy server; a failure is logged (its requests still end when it dies)."""
        self._paused = self.up_servers()
        results = await self.on_each(self._paused, "pause", self.config.control_timeout_s, self.protocol.pause)
        for s, r in zip(self._paused, results, strict=True):
            if isinstance(r, Exception):
                log.warning("pause of %s failed: %s", s.address, r)

    async def resume_paused(self) -> None:
        """Resume the servers :meth:`pause_all` paused; one that fails is marked down."""
        servers = self._paused or []
        results = await self.on_each(servers, "resume", self.config.control_timeout_s, self.protocol.resume)
        self._paused = None
        for s, r in zip(servers, results, strict=True):
            if isinstance(r, Exception):
                self.mark_down(s, f"resume failed: {r}")

    # ------------------------------------------------------------------ health probe and rejoin
    async def _probe_loop(self) -> None:
        """Background: while some server is down, probe the down ones every ``probe_interval_s``;
        while a call waits for a server, at once and then with backoff from ``backoff_initial_s``."""
        delay = self.config.probe_interval_s
        while True:
            await self._some_down.wait()
            woken = await self._sleep_unless_woken(delay)
            waiting = any(n > 0 for n in self._waiting.values())
            if self.paused and not waiting:
                delay = self.config.probe_interval_s
                continue  # never health-check servers we paused (SGLang answers 503 after ~20 s)
            await self.fan_out([s for s in self.servers if not s.up], self._probe)
            if all(s.up for s in self.servers):
                self._some_down.clear()
            delay = self._next_probe_delay(delay, woken, waiting)

    async def _sleep_unless_woken(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; True (early) when a call started waiting for a server."""
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            return False
        self._wake.clear()
        return True

    def _next_probe_delay(self, delay: float, woken: bool, waiting: bool) -> float:
        cfg = self.config
        if not waiting:
            return cfg.probe_interval_s
        return cfg.backoff_initial_s if woken else min(2 * delay, cfg.probe_interval_s)

    async def _probe(self, s: Server) -> None:
        if not await self._healthy(s, self.config.health_timeout_s):
            return
        try:
            await self._check_server(s)
            await self._resync(s)
        except (EngineError, ConfigError) as e:
            s.last_error = f"rejoin failed: {e}"
            log.warning("server %s is healthy but could not rejoin: %s", s.address, e)
            return
        log.info("server %s is healthy again; it rejoins", s.address)
        await self._mark_up(s)

    def on_rejoin(self, step: Callable[[Server], Awaitable[None]]) -> None:
        """Run ``await step(server)`` whenever a server rejoins: after its weights caught up, before
        it counts as up. An :class:`EngineError` keeps it down (the probe tries again later)."""
        self._rejoin_steps.append(step)

    async def _resync(self, s: Server) -> None:
        await self._resync_weights(s)
        for step in self._rejoin_steps:
            await step(s)

    async def _resync_weights(self, s: Server) -> None:
        """Bring a returning server to the weights the others have: re-apply the last disk update
        unless the server reports its version (always, for an update without a version)."""
        cfg = self.config
        if self._expected_version is not None:
            have = await self.within(s, "weight_version", cfg.control_timeout_s, self.protocol.weight_version)
            if have == self._expected_version:
                s.weights = self._last_disk
                return
            if self._last_disk is None:
                raise EngineError(f"{s.address} has weight version {have!r}, expected {self._expected_version!r}, "
                                  "and the last update was not from disk; restart it from the latest checkpoint")
        elif self._last_disk is None:
            return  # no update yet, or a broadcast without a version: nothing to check
        update = self._last_disk
        await self.within(s, "update_weights_from_disk", cfg.request_timeout_s,
                          self.protocol.update_weights_from_disk, update.path, update.version)
        s.weights = update

    # ------------------------------------------------------------------ weights
    async def update_from_disk(self, path: str, version: int | None, limit: float) -> None:
        """Every healthy server loads ``path``. Remembered first, so a server that is down now loads
        it when it returns, before it serves. While no server is up (none at the start, or every one
        failed to connect), waits for one, up to ``server_wait_timeout_s``; one that returns has
        loaded ``path`` by the time it counts as up."""
        what = "update_weights_from_disk"
        update = self._last_disk = _DiskUpdate(path, version)
        self._expected_version = version
        deadline = self.wait_deadline()
        while True:
            servers = [s for s in await self.await_servers(what, deadline) if s.weights is not update]
            if not servers:
                return
            results = await self.on_each(servers, what, limit, self.protocol.update_weights_from_disk, path, version)
            for s, r in zip(servers, results, strict=True):
                if not isinstance(r, Exception):
                    s.weights = update
            self.check_all(servers, results, what, all_may_fail=True)

    def weight_update_world_size(self) -> int:
        """World size of the ``"nccl"`` weight-update group: the trainer (rank 0) + every server
        TP rank (server i's ranks start at 1 + the TP sizes of the servers before it)."""
        return 1 + sum(s.tp_size for s in self.up_servers())

    async def _init_group(self, meta: WeightUpdateMeta, servers: list[Server]) -> None:
        world = 1 + sum(s.tp_size for s in servers)
        offsets = itertools.accumulate((s.tp_size for s in servers), initial=1)  # one more than servers
        groups = {s.address: WeightGroup(meta.master_address, meta.master_port, meta.group_name,
                                         self.config.dist_backend, offset, world)
                  for s, offset in zip(servers, offsets, strict=False)}
        results = await self.fan_out(servers, lambda s: self.within(
            s, "init_weight_group", meta.timeout_s, self.protocol.init_weight_group, groups[s.address]))
        self.check_all(servers, results, "init_weight_group")
        self._group = (meta.master_address, meta.master_port, meta.group_name)

    async def update_from_distributed(self, meta: WeightUpdateMeta) -> None:
        """Every healthy server joins the group (once) and receives the trainer's broadcast of
        ``meta.state_dict`` (names, dtypes and shapes are read; meta tensors are fine)."""
        assert meta.state_dict
        servers = await self.await_servers("update_weights_from_distributed")
        if self._group != (meta.master_address, meta.master_port, meta.group_name):
            await self._init_group(meta, servers)
        sd = meta.state_dict
        spec = BroadcastSpec(list(sd), [str(t.dtype).removeprefix("torch.") for t in sd.values()],
                             [list(t.shape) for t in sd.values()], meta.group_name, meta.version)
        results = await self.on_each(servers, "update_weights_from_distributed", meta.timeout_s,
                                      self.protocol.update_weights_from_distributed, spec)
        self._last_disk, self._expected_version = None, meta.version
        self.check_all(servers, results, "update_weights_from_distributed")

    # ------------------------------------------------------------------ views
    def stats(self) -> dict[str, Any]:
        return {"servers": {s.address: {"up": s.up, "outstanding": s.outstanding, "last_error": s.last_error}
                            for s in self.servers}, "sticky": len(self._sticky), "time": time.time()}
