"""The server pool: a set of HTTP inference servers used as one, whatever protocol they speak.

One ``httpx.AsyncClient`` (opened in :meth:`ServerPool.open`, closed in :meth:`ServerPool.close`)
reaches every server; a :class:`~agentflow.engines.protocols.ServerProtocol` adapter says which
routes and bodies each operation is. The pool does:

- **Health**: ``open`` waits up to ``startup_timeout_s`` for the servers; those not healthy yet are
  marked down. A background probe (one task in the pool's own ``TaskGroup``, asleep while every
  server is up, silent while paused) health-checks down servers every ``probe_interval_s``.
- **Routing**: least outstanding requests across healthy servers, ties round robin; sticky per key
  (a conversation goes back to the server that holds its prefix cache), least recently used keys
  forgotten after ``max_sticky``.
- **Failures**: a connection error or a 5xx is retried with exponential backoff (tenacity), each
  attempt on a server picked afresh with a fresh ``uuid4().hex`` request id. A server that fails to
  connect or answers 503 is marked down; a 4xx is the caller's error and is not retried.
- **Rejoin**: a server that is healthy again is first brought to the weights the others have (the
  last disk update is re-applied if it missed it; a missed broadcast update keeps it down).
- **Fan-out**: pause, resume and weight updates go to every healthy server at once; a server
  that failed with a retryable error is marked down, any other failure raises.
- **Deadlines**: every adapter call runs under one (:class:`RemoteEngineConfig`, or the weight
  update's ``timeout_s``).

Not here: any route or JSON body (the adapters), the resume-after-abort loop of a generation and
token versions (``engines/remote.py``), launching servers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import tenacity

from agentflow._engine_api import WeightUpdateMeta
from agentflow._types import GenerationConfig
from agentflow.engines.protocols import BroadcastSpec, Generated, GenerateJob, ServerProtocol, WeightGroup
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
        server_wait_timeout_s: how long a request waits for any healthy server when all are down.
        probe_interval_s: pause between health probes of down servers.
        max_attempts: attempts per call on connection errors and 5xx (with exponential backoff).
        backoff_initial_s, backoff_max_s: the backoff's first and largest wait.
        max_resumes: abort-and-resume cycles one ``agenerate`` may go through before it fails.
        sticky_key: ``ModelRequest.metadata`` key that names a conversation (sticky routing).
        max_sticky: conversations remembered for sticky routing (least recently used dropped).
        max_connections: HTTP connection pool size.
        dist_backend: backend of the ``"nccl"`` weight-update group (``"gloo"`` for CPU tests).
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
        ConfigError.check(problems)


@dataclass(slots=True)
class Server:
    """One server's state as the pool sees it."""

    address: str
    up: bool = False
    outstanding: int = 0
    tp_size: int = 1
    last_error: str = ""


class _Retryable(ServerError):
    """A failure worth another attempt (connection error, 5xx)."""


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
    """:class:`~agentflow.engines.protocols.ServerLink` for one server of a pool."""

    __slots__ = ("_pool", "_server", "address")

    def __init__(self, pool: ServerPool, server: Server) -> None:
        self._pool, self._server, self.address = pool, server, server.address

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        what = f"{method} {path} on {self.address}"
        try:
            r = await self._pool.client.request(method, f"{self.address}{path}", json=body)
        except httpx.TransportError as e:
            self._pool.mark_down(self._server, repr(e))
            raise _Retryable(f"{what} failed: {e!r}") from e
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
        self._client: httpx.AsyncClient | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._some_down = asyncio.Event()
        self._sticky: OrderedDict[str, Server] = OrderedDict()
        self._rr = itertools.count()
        self._paused: list[Server] | None = None  # the servers pause_all paused; None = not paused
        self._last_disk: tuple[str, int | None] | None = None  # (path, version) of the last disk update
        self._expected_version: int | None = None  # what a rejoining server must have; None = no check
        self._group: tuple[str, int, str] | None = None

    # ------------------------------------------------------------------ lifetime
    async def open(self) -> None:
        """Connect and wait for the servers (at least one must become healthy); start the probe."""
        cfg = self.config
        self._client = httpx.AsyncClient(
            transport=self._transport, timeout=httpx.Timeout(None, connect=cfg.connect_timeout_s),
            limits=httpx.Limits(max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_connections),
        )
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
    def client(self) -> httpx.AsyncClient:
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
            log.warning("server %s not healthy at start (%s); it joins when a probe sees it healthy",
                        s.address, s.last_error)
            self._some_down.set()
        for s in self.servers:
            if s.up:
                await self._read_tp_size(s)

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
        try:
            s.tp_size = int(await self.within(s, "tp_size", self.config.control_timeout_s, self.protocol.tp_size))
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

    async def pick(self, key: str | None) -> Server:
        """The server for ``key``; waits up to ``server_wait_timeout_s`` while every server is down."""
        s = self._choose(key)
        if s is not None:
            return s
        try:
            async with asyncio.timeout(self.config.server_wait_timeout_s), self._changed:
                await self._changed.wait_for(lambda: any(x.up for x in self.servers))
        except TimeoutError:
            detail = "; ".join(f"{x.address}: {x.last_error}" for x in self.servers)
            raise EngineError(
                f"every {self.protocol.name} server is down and none came back within server_wait_timeout_s="
                f"{self.config.server_wait_timeout_s}: {detail}. Restart them or check the network."
            ) from None
        s = self._choose(key)
        assert s is not None
        return s

    def mark_down(self, s: Server, why: str) -> None:
        if s.up:
            log.warning("server %s marked down: %s", s.address, why)
        s.up, s.last_error = False, why
        self._some_down.set()

    async def _mark_up(self, s: Server) -> None:
        async with self._changed:
            s.up, s.last_error = True, ""
            self._changed.notify_all()

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
        """One generation with retries; each attempt picks a server and gets a fresh rid."""
        async for attempt in self._retrying():
            with attempt:
                s = await self.pick(key)
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

    async def _on_each(self, servers: Sequence[Server], what: str, limit: float,
                       op: Callable[..., Awaitable[Any]], *args: Any) -> list[Any]:
        return await self.fan_out(servers, lambda s: self.within(s, what, limit, op, *args))

    def _check_all(self, servers: Sequence[Server], results: list[Any], what: str) -> None:
        """Retryable failures mark their server down (it resyncs when back); others, or all failing, raise."""
        failed = [(s, r) for s, r in zip(servers, results, strict=True) if isinstance(r, Exception)]
        for s, r in failed:
            if isinstance(r, _Retryable):
                self.mark_down(s, f"{what} failed: {r}")
        hard = [(s, r) for s, r in failed if not isinstance(r, _Retryable)]
        if hard or len(failed) == len(servers):
            detail = "; ".join(f"{s.address}: {r}" for s, r in (hard or failed))
            raise ServerError(f"{what} failed on {len(hard or failed)} of {len(servers)} server(s): {detail}")

    # ------------------------------------------------------------------ pause / resume
    @property
    def paused(self) -> bool:
        return self._paused is not None

    async def pause_all(self) -> None:
        """Pause every healthy server; a failure is logged (its requests still end when it dies)."""
        self._paused = self.up_servers()
        results = await self._on_each(self._paused, "pause", self.config.control_timeout_s, self.protocol.pause)
        for s, r in zip(self._paused, results, strict=True):
            if isinstance(r, Exception):
                log.warning("pause of %s failed: %s", s.address, r)

    async def resume_paused(self) -> None:
        """Resume the servers :meth:`pause_all` paused; one that fails is marked down."""
        servers = self._paused or []
        results = await self._on_each(servers, "resume", self.config.control_timeout_s, self.protocol.resume)
        self._paused = None
        for s, r in zip(servers, results, strict=True):
            if isinstance(r, Exception):
                self.mark_down(s, f"resume failed: {r}")

    # ------------------------------------------------------------------ health probe and rejoin
    async def _probe_loop(self) -> None:
        """Background: while some server is down, probe it every ``probe_interval_s``."""
        while True:
            await self._some_down.wait()
            await asyncio.sleep(self.config.probe_interval_s)
            if self.paused:
                continue  # never health-check servers we paused (SGLang answers 503 after ~20 s)
            down = [s for s in self.servers if not s.up]
            await self.fan_out(down, self._probe)
            if all(s.up for s in self.servers):
                self._some_down.clear()

    async def _probe(self, s: Server) -> None:
        if not await self._healthy(s, self.config.health_timeout_s):
            return
        try:
            await self._resync(s)
        except EngineError as e:
            s.last_error = f"rejoin failed: {e}"
            log.warning("server %s is healthy but could not rejoin: %s", s.address, e)
            return
        log.info("server %s is healthy again; it rejoins", s.address)
        await self._mark_up(s)

    async def _resync(self, s: Server) -> None:
        """Bring a returning server to the weights the others have (disk updates only)."""
        if self._expected_version is None:
            return
        cfg = self.config
        have = await self.within(s, "weight_version", cfg.control_timeout_s, self.protocol.weight_version)
        if have == self._expected_version:
            return
        if self._last_disk is None:
            raise EngineError(f"{s.address} has weight version {have!r}, expected {self._expected_version!r}, "
                              "and the last update was not from disk; restart it from the latest checkpoint")
        path, version = self._last_disk
        await self.within(s, "update_weights_from_disk", cfg.request_timeout_s,
                          self.protocol.update_weights_from_disk, path, version)

    # ------------------------------------------------------------------ weights
    async def update_from_disk(self, path: str, version: int | None, limit: float) -> None:
        """Every healthy server loads ``path``; remembered so a returning server catches up."""
        servers = self.up_servers()
        results = await self._on_each(servers, "update_weights_from_disk", limit,
                                      self.protocol.update_weights_from_disk, path, version)
        self._last_disk, self._expected_version = (path, version), version
        self._check_all(servers, results, "update_weights_from_disk")

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
        self._check_all(servers, results, "init_weight_group")
        self._group = (meta.master_address, meta.master_port, meta.group_name)

    async def update_from_distributed(self, meta: WeightUpdateMeta) -> None:
        """Every healthy server joins the group (once) and receives the trainer's broadcast of
        ``meta.state_dict`` (names, dtypes and shapes are read; meta tensors are fine)."""
        assert meta.state_dict
        servers = self.up_servers()
        if self._group != (meta.master_address, meta.master_port, meta.group_name):
            await self._init_group(meta, servers)
        sd = meta.state_dict
        spec = BroadcastSpec(list(sd), [str(t.dtype).removeprefix("torch.") for t in sd.values()],
                             [list(t.shape) for t in sd.values()], meta.group_name, meta.version)
        results = await self._on_each(servers, "update_weights_from_distributed", meta.timeout_s,
                                      self.protocol.update_weights_from_distributed, spec)
        self._last_disk, self._expected_version = None, meta.version
        self._check_all(servers, results, "update_weights_from_distributed")

    # ------------------------------------------------------------------ views
    def stats(self) -> dict[str, Any]:
        return {"servers": {s.address: {"up": s.up, "outstanding": s.outstanding, "last_error": s.last_error}
                            for s in self.servers}, "sticky": len(self._sticky), "time": time.time()}
