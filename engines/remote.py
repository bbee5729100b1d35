"""``RemoteSGLangEngine``: an ``InferenceEngine`` that generates on SGLang(-protocol) HTTP servers.

Talks to real SGLang servers or to ``agentflow serve`` (the same protocol, see
``/work/shared/SGLANG_PROTOCOL.md``) through one ``httpx.AsyncClient`` opened in ``initialize`` and
closed in ``destroy``. What it does:

- **Routing**: least outstanding requests across healthy servers; sticky per conversation: a
  request whose ``metadata`` carries ``config.sticky_key`` (default ``"session"``) goes back to the
  server that served that key before (its prefix cache), else its own ``rid`` is the key.
- **Failures**: connection errors and 5xx are retried with exponential backoff (tenacity), each
  attempt with a fresh ``uuid4().hex`` rid (32 hex digits: never in flight twice, never a prefix
  of another, as SGLang's abort matching needs). A server that fails to connect (or answers 503)
  is marked down and the retry goes elsewhere; a background probe (one task in the engine's own
  ``TaskGroup``, asleep while every server is up) health-checks down servers and lets them rejoin,
  re-applying the last disk weight update first if they missed it. A paused engine probes nothing.
- **Pause**: ``pause()`` fans ``/pause_generation {"mode": "abort"}`` out; aborted requests come
  back (HTTP 200, partial output) and each ``agenerate`` waits for ``resume()`` and re-issues
  prompt + tokens so far with ``max_new_tokens`` reduced, so workflows never see the pause.
- **Versions**: each token carries the version that generated it: the server's per-token
  ``weight_versions`` spans or ``weight_version`` when they parse as ints, else the engine's own
  version at the time of the response.
- **LoRA** (``_lora_client.py``): an adapter update (``meta.adapter``) -> ``/load_lora_adapter``;
  each request's adapter goes in ``lora_path``.
- **Weights**: ``"disk"`` -> ``/update_weights_from_disk`` on every server; ``"nccl"`` ->
  ``/init_weights_update_group`` (once per group) + ``/update_weights_from_distributed`` while the
  trainer (rank 0) broadcasts the tensors of ``meta.state_dict`` in its order.

Every HTTP call runs under a deadline from :class:`RemoteEngineConfig`. Not here: launching the
servers (``agentflow serve`` or ``python -m sglang.launch_server``), the trainer's broadcast side.
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
from dataclasses import dataclass, field
from typing import Any

import httpx
import tenacity

from agentflow._engine_api import InferenceEngine, WeightUpdateMeta
from agentflow._rollout_config import RolloutConfig
from agentflow._types import ModelRequest, ModelResponse, StopReason
from agentflow.engines._lora_client import lora_request_fields, update_remote_adapter
from agentflow.errors import ConfigError, EngineError, EngineTimeout, ServerError

__all__ = ["RemoteEngineConfig", "RemoteSGLangEngine"]

log = logging.getLogger("agentflow.remote")


@dataclass(frozen=True, slots=True)
class RemoteEngineConfig:
    """Deadlines, retries and routing of :class:`RemoteSGLangEngine` (all times in seconds).

    Attributes:
        connect_timeout_s: TCP connect to a server.
        request_timeout_s: one ``/generate`` attempt (a long generation must fit).
        control_timeout_s: pause/continue/info/abort calls.
        health_timeout_s: one ``/health`` call (SGLang answers 503 only after ~20 s when unhealthy).
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
        if problems:
            raise ConfigError(problems)


@dataclass(slots=True)
class _Server:
    address: str
    up: bool = False
    outstanding: int = 0
    tp_size: int = 1
    last_error: str = ""


class _Retryable(ServerError):
    """A failure worth another attempt (connection error, 5xx)."""


@dataclass(slots=True)
class _Partial:
    """Tokens of one ``agenerate`` collected over its attempts."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    first_token_at: float | None = None


def _normalise(address: str) -> str:
    address = address.rstrip("/")
    return address if "://" in address else f"http://{address}"


def _error_text(r: httpx.Response) -> str:
    """Any of SGLang's error shapes: ``{"error": str | {"message"}}``, ``{"message"}``, or raw text."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if err is not None:
            return str(err)
        if "message" in body:
            return str(body["message"])
    return r.text[:500]


def _as_int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _token_versions(meta: dict[str, Any], n: int, fallback: int) -> list[int]:
    spans = meta.get("weight_versions")
    if isinstance(spans, list) and spans:
        out = [fallback] * n
        for s in spans:
            v = _as_int(s.get("version"))
            for i in range(max(0, int(s.get("start", 0))), min(n, int(s.get("end", 0)))):
                out[i] = fallback if v is None else v
        return out
    v = _as_int(meta.get("weight_version"))
    return [fallback if v is None else v] * n


class RemoteSGLangEngine(InferenceEngine):
    """Generates on one or more SGLang-protocol servers (see the module docstring).

    Args:
        addresses: ``"host:port"`` or ``"http://host:port"`` of each server.
        tokenizer: optional; kept for workflows that ask the engine for it.
        rollout: rollout configuration of the owned executor.
        config: deadlines, retries, routing.
        transport: an ``httpx.AsyncBaseTransport`` to use instead of the network (tests).
    """

    def __init__(
        self, addresses: Sequence[str], tokenizer: Any = None, *, rollout: RolloutConfig | None = None,
        config: RemoteEngineConfig | None = None, transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(rollout)
        if isinstance(addresses, str) or not addresses:
            raise ConfigError(f"addresses must be a non-empty list of 'host:port' strings, got {addresses!r}")
        self.tokenizer = tokenizer
        self.config = config or RemoteEngineConfig()
        self.servers = [_Server(_normalise(a)) for a in addresses]
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._some_down = asyncio.Event()
        self._sticky: OrderedDict[str, _Server] = OrderedDict()
        self._rr = itertools.count()
        self._paused_servers: list[_Server] = []
        self._last_disk_update: dict[str, Any] | None = None
        self._expected_version: str | None = None
        self._group: tuple[str, int, str] | None = None

    # ------------------------------------------------------------------ lifetime
    async def initialize(self) -> None:
        cfg = self.config
        self._client = httpx.AsyncClient(
            transport=self._transport, timeout=httpx.Timeout(None, connect=cfg.connect_timeout_s),
            limits=httpx.Limits(max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_connections),
        )
        try:
            await self._await_startup()
        except BaseException:
            await self._client.aclose()
            raise
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._probe_task = self._tg.create_task(self._probe_loop())

    async def destroy(self) -> None:
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

    async def _await_startup(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.config.startup_timeout_s
        async with asyncio.TaskGroup() as tg:
            for s in self.servers:
                tg.create_task(self._wait_healthy(s, deadline))
        down = [s for s in self.servers if not s.up]
        if len(down) == len(self.servers):
            detail = "; ".join(f"{s.address}: {s.last_error or 'not healthy'}" for s in down)
            raise EngineError(
                f"no SGLang server became healthy within startup_timeout_s={self.config.startup_timeout_s}: "
                f"{detail}. Start them first (`agentflow serve --port N` or `python -m sglang.launch_server`) "
                "or raise RemoteEngineConfig.startup_timeout_s."
            )
        for s in down:
            log.warning("server %s not healthy at start (%s); it joins when a probe sees it healthy",
                        s.address, s.last_error)
            self._some_down.set()
        for s in self.servers:
            if s.up:
                await self._read_tp_size(s)

    async def _wait_healthy(self, s: _Server, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        delay = self.config.backoff_initial_s
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return
            if await self._health_ok(s, min(left, self.config.health_timeout_s)):
                s.up = True
                return
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))  # server still starting
            delay = min(2 * delay, self.config.backoff_max_s)

    async def _health_ok(self, s: _Server, limit: float) -> bool:
        try:
            async with asyncio.timeout(limit):
                r = await self.client.get(f"{s.address}/health")
        except (httpx.HTTPError, TimeoutError) as e:
            s.last_error = repr(e)
            return False
        s.last_error = "" if r.status_code == 200 else f"/health answered {r.status_code}"
        return r.status_code == 200

    async def _read_tp_size(self, s: _Server) -> None:
        try:
            info = await self._control(s, "GET", "/get_server_info")
            s.tp_size = int(info.get("tp_size") or 1)
        except (EngineError, ValueError, TypeError) as e:
            log.warning("could not read tp_size of %s (%r); assuming 1", s.address, e)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise EngineError("RemoteSGLangEngine is not started: use `async with engine:` first")
        return self._client

    # ------------------------------------------------------------------ routing
    def _choose(self, key: str | None) -> _Server | None:
        up = [s for s in self.servers if s.up]
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

    async def _pick(self, key: str | None) -> _Server:
        s = self._choose(key)
        if s is not None:
            return s
        try:
            async with asyncio.timeout(self.config.server_wait_timeout_s), self._changed:
                await self._changed.wait_for(lambda: any(x.up for x in self.servers))
        except TimeoutError:
            detail = "; ".join(f"{x.address}: {x.last_error}" for x in self.servers)
            raise EngineError(
                f"every SGLang server is down and none came back within server_wait_timeout_s="
                f"{self.config.server_wait_timeout_s}: {detail}. Restart them or check the network."
            ) from None
        s = self._choose(key)
        assert s is not None
        return s

    def _mark_down(self, s: _Server, why: str) -> None:
        if s.up:
            log.warning("server %s marked down: %s", s.address, why)
        s.up, s.last_error = False, why
        self._some_down.set()

    async def _mark_up(self, s: _Server) -> None:
        async with self._changed:
            s.up, s.last_error = True, ""
            self._changed.notify_all()

    # ------------------------------------------------------------------ HTTP
    async def _send(self, s: _Server, method: str, path: str, body: Any, limit: float) -> httpx.Response:
        """One call with a deadline; connection errors and 5xx become :class:`_Retryable`."""
        try:
            async with asyncio.timeout(limit):
                r = await self.client.request(method, f"{s.address}{path}", json=body)
        except TimeoutError as e:
            raise EngineTimeout(f"{method} {path} on {s.address} took longer than {limit} s (the configured "
                                "deadline); raise it in RemoteEngineConfig or check the server") from e
        except httpx.TransportError as e:
            self._mark_down(s, repr(e))
            raise _Retryable(f"{method} {path} on {s.address} failed: {e!r}") from e
        if r.status_code >= 500:
            if r.status_code == 503:
                self._mark_down(s, "answered 503")
            raise _Retryable(f"{method} {path} on {s.address} answered {r.status_code}: {_error_text(r)}",
                             r.status_code)
        return r

    async def _control(self, s: _Server, method: str, path: str, body: Any = None,
                       limit: float | None = None) -> dict[str, Any]:
        r = await self._send(s, method, path, body, limit or self.config.control_timeout_s)
        if r.status_code >= 400:
            raise ServerError(f"{method} {path} on {s.address} answered {r.status_code}: {_error_text(r)}",
                              r.status_code)
        return r.json() if r.content and r.headers.get("content-type", "").startswith("application/json") else {}

    def _retrying(self) -> tenacity.AsyncRetrying:
        cfg = self.config
        return tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(cfg.max_attempts),
            wait=tenacity.wait_exponential(multiplier=cfg.backoff_initial_s, max=cfg.backoff_max_s),
            retry=tenacity.retry_if_exception_type(_Retryable), reraise=True,
        )

    async def _generate_call(self, payload: dict[str, Any], key: str | None) -> dict[str, Any]:
        """POST /generate with retries; each attempt picks a server and gets a fresh rid."""
        async for attempt in self._retrying():
            with attempt:
                s = await self._pick(key)
                s.outstanding += 1
                try:
                    r = await self._send(s, "POST", "/generate", {**payload, "rid": uuid.uuid4().hex},
                                         self.config.request_timeout_s)
                finally:
                    s.outstanding -= 1
                if r.status_code >= 400:
                    raise ServerError(f"/generate on {s.address} answered {r.status_code}: {_error_text(r)}",
                                      r.status_code)
                body: dict[str, Any] = r.json()
                return body
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    # ------------------------------------------------------------------ generation
    async def agenerate(self, req: ModelRequest) -> ModelResponse:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        g = req.gconfig
        key = str(req.metadata.get(self.config.sticky_key, req.rid))
        got = _Partial()
        stop_reason: StopReason | None = None
        for _ in range(self.config.max_resumes + 1):
            await self.wait_until_resumed()
            payload = {
                "input_ids": list(req.input_ids) + got.tokens,
                "sampling_params": {
                    "max_new_tokens": g.max_new_tokens - len(got.tokens),
                    "temperature": 0.0 if g.is_greedy else g.temperature, "top_p": g.top_p,
                    "top_k": g.top_k if g.top_k > 0 else -1, "stop": list(g.stop) or None,
                    "stop_token_ids": list(g.stop_token_ids) or None,
                },
                "return_logprob": True, "stream": False, **lora_request_fields(self, req),
            }
            body = await self._generate_call(payload, key)
            finish = self._absorb(body, got, loop.time())
            if finish == "abort" and len(got.tokens) < g.max_new_tokens:
                continue  # paused or aborted: wait for resume, then ask for the rest
            stop_reason = "length" if finish == "abort" else finish
            break
        if stop_reason is None:
            raise EngineError(
                f"request {req.rid} was aborted {self.config.max_resumes + 1} times without finishing; "
                "something keeps aborting it (pause loops, /abort_request); raise RemoteEngineConfig.max_resumes"
            )
        end = loop.time()
        return ModelResponse(
            input_tokens=list(req.input_ids), output_tokens=got.tokens, output_logprobs=got.logprobs,
            output_versions=got.versions, stop_reason=stop_reason, latency=end - t0,
            ttft=(got.first_token_at or end) - t0,
        )

    def _absorb(self, body: dict[str, Any], got: _Partial, now: float) -> StopReason:
        """Append one response's tokens; return its finish type (stop / length / abort)."""
        ids = [int(t) for t in body.get("output_ids") or []]
        meta = body.get("meta_info") or {}
        lps = meta.get("output_token_logprobs") or []
        if len(lps) != len(ids):
            raise ServerError(f"server sent {len(ids)} output_ids but {len(lps)} output_token_logprobs; "
                              "expected one [logprob, token_id, text] triple per token (return_logprob=true)")
        got.tokens += ids
        got.logprobs += [float("-inf") if t[0] is None else float(t[0]) for t in lps]  # null = non-finite
        got.versions += _token_versions(meta, len(ids), self.get_version())
        if ids and got.first_token_at is None:
            got.first_token_at = now
        finish = meta.get("finish_reason") or {}
        kind = finish.get("type")
        if kind not in ("stop", "length", "abort"):
            raise ServerError(f"unexpected finish_reason {finish!r}; expected type stop, length or abort")
        return kind  # type: ignore[no-any-return]  # checked just above

    # ------------------------------------------------------------------ pause / resume
    async def _fan_out(self, servers: Sequence[_Server], call: Callable[[_Server], Awaitable[Any]]) -> list[Any]:
        """Run ``call`` on every server concurrently; return results or exceptions, in order."""
        async def one(s: _Server) -> Any:
            try:
                return await call(s)
            except EngineError as e:
                return e

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(s)) for s in servers]
        return [t.result() for t in tasks]

    async def _interrupt(self) -> None:
        self._paused_servers = [s for s in self.servers if s.up]
        results = await self._fan_out(
            self._paused_servers, lambda s: self._control(s, "POST", "/pause_generation", {"mode": "abort"}))
        for s, r in zip(self._paused_servers, results, strict=True):
            if isinstance(r, Exception):
                log.warning("pause of %s failed: %s", s.address, r)

    async def _continue(self) -> None:
        servers, self._paused_servers = self._paused_servers, []
        results = await self._fan_out(servers, lambda s: self._control(s, "POST", "/continue_generation", {}))
        for s, r in zip(servers, results, strict=True):
            if isinstance(r, Exception):
                self._mark_down(s, f"continue failed: {r}")

    # ------------------------------------------------------------------ health probe
    async def _probe_loop(self) -> None:
        """Background: while some server is down, probe it every ``probe_interval_s``."""
        while True:
            await self._some_down.wait()
            await asyncio.sleep(self.config.probe_interval_s)
            if self.paused:
                continue  # never health-check servers we paused (SGLang answers 503 after ~20 s)
            down = [s for s in self.servers if not s.up]
            await self._fan_out(down, self._probe)
            if all(s.up for s in self.servers):
                self._some_down.clear()

    async def _probe(self, s: _Server) -> None:
        if not await self._health_ok(s, self.config.health_timeout_s):
            return
        try:
            await self._resync(s)
        except EngineError as e:
            s.last_error = f"rejoin failed: {e}"
            log.warning("server %s is healthy but could not rejoin: %s", s.address, e)
            return
        log.info("server %s is healthy again; it rejoins", s.address)
        await self._mark_up(s)

    async def _resync(self, s: _Server) -> None:
        """Bring a returning server to the weights the others have (disk updates only)."""
        if self._expected_version is None:
            return
        info = await self._control(s, "GET", "/get_model_info")
        if str(info.get("weight_version")) == self._expected_version:
            return
        if self._last_disk_update is None:
            raise EngineError(f"{s.address} has weight_version {info.get('weight_version')!r}, expected "
                              f"{self._expected_version!r}, and the last update was not from disk; restart it "
                              "from the latest checkpoint")
        await self._control(s, "POST", "/update_weights_from_disk", self._last_disk_update,
                            limit=self.config.request_timeout_s)

    # ------------------------------------------------------------------ weights
    async def aupdate_weights(self, meta: WeightUpdateMeta) -> None:
        if meta.adapter is not None:
            await update_remote_adapter(self, meta)
        elif meta.type == "disk":
            await self._update_from_disk(meta)
        elif meta.type == "nccl":
            await self._update_from_distributed(meta)
        else:
            raise EngineError(f"RemoteSGLangEngine cannot load weights of type {meta.type!r}: servers live in "
                              "other processes; use type='disk' (a checkpoint directory every server can read) "
                              "or type='nccl' (broadcast from the trainer)")

    def _check_all(self, servers: Sequence[_Server], results: list[Any], what: str) -> None:
        failed = [(s, r) for s, r in zip(servers, results, strict=True) if isinstance(r, Exception)]
        for s, r in failed:
            if isinstance(r, _Retryable):
                self._mark_down(s, f"{what} failed: {r}")  # it resyncs when it comes back
        hard = [(s, r) for s, r in failed if not isinstance(r, _Retryable)]
        if hard or len(failed) == len(servers):
            detail = "; ".join(f"{s.address}: {r}" for s, r in (hard or failed))
            raise ServerError(f"{what} failed on {len(hard or failed)} of {len(servers)} server(s): {detail}")

    async def _update_from_disk(self, meta: WeightUpdateMeta) -> None:
        version = None if meta.version is None else str(meta.version)
        body = {"model_path": meta.path, "weight_version": version, "abort_all_requests": False,
                "flush_cache": True}
        servers = [s for s in self.servers if s.up]
        results = await self._fan_out(
            servers, lambda s: self._control(s, "POST", "/update_weights_from_disk", body, limit=meta.timeout_s))
        self._last_disk_update, self._expected_version = body, version
        self._check_all(servers, results, "/update_weights_from_disk")

    def weight_update_world_size(self) -> int:
        """World size of the ``"nccl"`` weight-update group: the trainer (rank 0) + every server
        TP rank (server i's ranks start at 1 + the TP sizes of the servers before it)."""
        return 1 + sum(s.tp_size for s in self.servers if s.up)

    async def _init_group(self, meta: WeightUpdateMeta, servers: list[_Server]) -> None:
        world = 1 + sum(s.tp_size for s in servers)
        offsets = list(itertools.accumulate([1] + [s.tp_size for s in servers[:-1]]))

        def call(s: _Server) -> Awaitable[Any]:
            body = {"master_address": meta.master_address, "master_port": meta.master_port,
                    "rank_offset": offsets[servers.index(s)], "world_size": world,
                    "group_name": meta.group_name, "backend": self.config.dist_backend}
            return self._control(s, "POST", "/init_weights_update_group", body, limit=meta.timeout_s)

        self._check_all(servers, await self._fan_out(servers, call), "/init_weights_update_group")
        self._group = (meta.master_address, meta.master_port, meta.group_name)

    async def _update_from_distributed(self, meta: WeightUpdateMeta) -> None:
        if not meta.state_dict:
            raise EngineError("WeightUpdateMeta(type='nccl') needs state_dict={name: tensor} (meta tensors are "
                              "fine): its names, dtypes and shapes, in the order the trainer broadcasts them")
        servers = [s for s in self.servers if s.up]
        if self._group != (meta.master_address, meta.master_port, meta.group_name):
            await self._init_group(meta, servers)
        sd = meta.state_dict
        body = {"names": list(sd), "dtypes": [str(t.dtype).removeprefix("torch.") for t in sd.values()],
                "shapes": [list(t.shape) for t in sd.values()], "group_name": meta.group_name,
                "weight_version": None if meta.version is None else str(meta.version), "flush_cache": True}
        results = await self._fan_out(
            servers, lambda s: self._control(s, "POST", "/update_weights_from_distributed", body,
                                             limit=meta.timeout_s))
        self._last_disk_update, self._expected_version = None, body["weight_version"]
        self._check_all(servers, results, "/update_weights_from_distributed")

    # ------------------------------------------------------------------ views
    def stats(self) -> dict[str, Any]:
        return {"servers": {s.address: {"up": s.up, "outstanding": s.outstanding, "last_error": s.last_error}
                            for s in self.servers}, "sticky": len(self._sticky), "time": time.time()}
