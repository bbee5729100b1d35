"""``RemoteEngine``: an ``InferenceEngine`` that generates on HTTP inference servers.

Two parts it does not implement itself: a :class:`~agentflow.engines.remote._pool.ServerPool`
(health, retries, routing, sticky sessions, failover, rejoin, deadlines, fan-out) and a protocol
adapter (:class:`~agentflow.engines.remote.protocol.ServerProtocol`, chosen by name from
:data:`~agentflow.engines.remote.protocol.PROTOCOLS`, e.g. ``"sglang"``) that speaks the servers' routes.
What this module adds on top:

- **Pause is invisible to workflows**: ``pause()`` pauses every server; aborted requests come back
  with their partial output and each ``agenerate`` waits for ``resume()``, then asks for the rest
  (prompt + tokens so far, ``max_new_tokens`` reduced), at most ``max_resumes`` times.
- **Versions**: each token carries the version the server reports for it, else the engine's own
  version at the time of the answer.
- **Weights**: ``"disk"`` and ``"nccl"`` updates go to the pool; ``"mem"`` is refused.
- **LoRA** (``_adapters.py``): an adapter update (``meta.adapter``) loads the adapter on every
  server through the protocol's adapter methods; each request's adapter is named in its generation job.

:class:`RemoteSGLangEngine` is ``RemoteEngine`` bound to SGLang's protocol. Not here: launching
the servers (``agentflow serve`` or ``python -m sglang.launch_server``), the trainer's broadcast side.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from agentflow import InferenceEngine, ModelRequest, ModelResponse, RolloutConfig, StopReason, WeightUpdateMeta
from agentflow.engines.remote._adapters import RemoteAdapters
from agentflow.engines.remote._pool import RemoteEngineConfig, Server, ServerPool
from agentflow.engines.remote.protocol import Generated, ServerProtocol, resolve_protocol
from agentflow.errors import EngineError

__all__ = ["RemoteEngine", "RemoteEngineConfig", "RemoteSGLangEngine"]


@dataclass(slots=True)
class _Partial:
    """Tokens of one ``agenerate`` collected over its attempts."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    first_token_at: float | None = None

    def add(self, out: Generated, version: int, now: float) -> None:
        """Append one attempt's output; tokens without a reported version get ``version``."""
        self.tokens += out.tokens
        self.logprobs += out.logprobs
        self.versions += [version if v is None else v for v in out.versions]
        if out.tokens and self.first_token_at is None:
            self.first_token_at = now


class RemoteEngine(InferenceEngine):
    """Generates on one or more servers that speak ``protocol`` (see the module docstring).

    Args:
        addresses: ``"host:port"`` or ``"http://host:port"`` of each server.
        tokenizer: optional; kept for workflows that ask the engine for it.
        protocol: a name registered in ``PROTOCOLS`` (``"sglang"``) or an adapter object.
        rollout: rollout configuration of the owned executor.
        config: deadlines, retries, routing.
        transport: an ``httpx.AsyncBaseTransport`` to use instead of the network (tests).
    """

    def __init__(
        self, addresses: Sequence[str], tokenizer: Any = None, *, protocol: str | ServerProtocol = "sglang",
        rollout: RolloutConfig | None = None, config: RemoteEngineConfig | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(rollout)
        self.tokenizer = tokenizer
        self.config = config or RemoteEngineConfig()
        self.pool = ServerPool(addresses, resolve_protocol(protocol), self.config, transport)
        self.adapters = RemoteAdapters(self.pool)

    @property
    def servers(self) -> list[Server]:
        return self.pool.servers

    async def initialize(self) -> None:
        await self.pool.open()

    async def destroy(self) -> None:
        await self.pool.close()

    # ------------------------------------------------------------------ generation
    async def agenerate(self, req: ModelRequest) -> ModelResponse:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        limit = req.gconfig.max_new_tokens
        key = str(req.metadata.get(self.config.sticky_key, req.rid))
        got = _Partial()
        for _ in range(self.config.max_resumes + 1):
            await self.wait_until_resumed()
            out = await self.pool.generate(list(req.input_ids) + got.tokens, req.gconfig, limit - len(got.tokens), key,
                                           adapter=self.adapters.served_name(req))
            got.add(out, self.get_version(), loop.time())
            if out.finish == "abort" and len(got.tokens) < limit:
                continue  # paused or aborted: wait for resume, then ask for the rest
            stop_reason: StopReason = "length" if out.finish == "abort" else out.finish
            end = loop.time()
            return ModelResponse(
                input_tokens=list(req.input_ids), output_tokens=got.tokens, output_logprobs=got.logprobs,
                output_versions=got.versions, stop_reason=stop_reason, latency=end - t0,
                ttft=(got.first_token_at or end) - t0,
            )
        raise EngineError(
            f"request {req.rid} was aborted {self.config.max_resumes + 1} times without finishing; something "
            "keeps aborting it (pause loops, a server-side abort); raise RemoteEngineConfig.max_resumes"
        )

    # ------------------------------------------------------------------ pause / resume
    async def _interrupt(self) -> None:
        await self.pool.pause_all()

    async def _continue(self) -> None:
        await self.pool.resume_paused()

    # ------------------------------------------------------------------ weights
    async def aupdate_weights(self, meta: WeightUpdateMeta) -> None:
        if meta.adapter is not None:
            await self.adapters.update(meta)
        elif meta.type == "disk":
            assert meta.path is not None  # WeightUpdateMeta checks it
            await self.pool.update_from_disk(meta.path, meta.version, meta.timeout_s)
        elif meta.type == "nccl":
            if not meta.state_dict:
                raise EngineError("WeightUpdateMeta(type='nccl') needs state_dict={name: tensor} (meta tensors are "
                                  "fine): its names, dtypes and shapes, in the order the trainer broadcasts them")
            await self.pool.update_from_distributed(meta)
        else:
            raise EngineError(f"{type(self).__name__} cannot load weights of type {meta.type!r}: servers live in "
                              "other processes; use type='disk' (a checkpoint directory every server can read) "
                              "or type='nccl' (broadcast from the trainer)")

    def weight_update_world_size(self) -> int:
        """World size of the ``"nccl"`` weight-update group: the trainer (rank 0) + every server
        TP rank (server i's ranks start at 1 + the TP sizes of the servers before it)."""
        return self.pool.weight_update_world_size()

    def weight_update_backend(self) -> str | None:
        """The servers' side of the ``"nccl"`` group (``RemoteEngineConfig.dist_backend``)."""
        return self.config.dist_backend

    # ------------------------------------------------------------------ views
    def stats(self) -> dict[str, Any]:
        return self.pool.stats()


class RemoteSGLangEngine(RemoteEngine):
    """:class:`RemoteEngine` on SGLang-protocol servers: real SGLang or ``agentflow serve``.

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
        super().__init__(addresses, tokenizer, protocol="sglang", rollout=rollout, config=config,
                         transport=transport)
