"""LoRA for :class:`~agentflow.engines.remote.RemoteEngine`: adapter-only weight updates, the
adapter of each generation, and the adapters of a server that rejoins. Every server operation is a
method of the protocol adapter (``load_adapter``, ``unload_adapter``, ``set_weight_version``), so
this works on any protocol that serves LoRA and fails with a clear error on one that does not.

An adapter update (``WeightUpdateMeta.adapter`` set, ``type="disk"``: a PEFT adapter directory
every server can read) loads the adapter on every healthy server under a new served name per
version, ``<adapter>-v<version>`` (servers refuse to load a name twice), moves the servers' weight
version (without aborting anything), then unloads the previous version's name (the server waits
for its requests in flight). Requests aborted by the pause are re-issued by the engine after
``resume()`` and carry the new name, so the tokens after an update come from the new adapter and
carry the new version. While every server is down the update waits for one
(``server_wait_timeout_s``), like a full-weight disk update.

Rejoin: the current adapters (served name and directory) and version are remembered before an
update is sent. When a server comes back (restarted, or only unreachable for a while) the pool's
rejoin runs :meth:`RemoteAdapters.catch_up` before the server counts as up: it unloads every name
this engine had loaded there or serves now (a failure is fine: a restarted server has none), loads
the current adapters and sets the current version. A server that was down during an update
therefore gets that update's adapter, and never the stale one, before it serves a request.

Which adapter a request uses: ``ModelRequest.metadata["lora"]`` (an adapter name; None = the base
model); without the key, the first adapter this engine loaded. A name this engine never loaded is
sent as is (an adapter the server got from its own command line).

Not here: HTTP, retries and routing (the pool), any route (the protocol adapters), the server side
(``engines/serve/_lora.py``), adapters loaded on a server by someone else: a restarted server gets
those from its own command line, not from here.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

from agentflow import ModelRequest, WeightUpdateMeta
from agentflow.engines._lora import LORA_KEY
from agentflow.engines.remote.protocol import LORA_METHODS
from agentflow.errors import EngineError

if TYPE_CHECKING:
    from agentflow.engines.remote._pool import Server, ServerPool

__all__ = ["RemoteAdapters"]

log = logging.getLogger("agentflow.remote")
_UNSET = object()


class RemoteAdapters:
    """The adapters a remote engine serves: adapter name -> its served name on the servers (the
    current version's), the default, and what a rejoining server must load (each served name's
    directory and the version)."""

    def __init__(self, pool: ServerPool) -> None:
        self.pool = pool
        self.served: dict[str, str] = {}
        self.default: str | None = None
        self.paths: dict[str, str] = {}  # served name -> adapter directory (current ones)
        self.version: int | None = None
        self.held: dict[str, set[str]] = {}  # server address -> served names loaded there
        self._rejoin_registered = False

    def served_name(self, req: ModelRequest) -> str | None:
        name = req.metadata.get(LORA_KEY, _UNSET)
        if name is _UNSET:
            name = self.default
        if not name:
            return None
        return self.served.get(str(name), str(name))

    def _check_protocol(self) -> None:
        protocol = self.pool.protocol
        missing = [m for m in LORA_METHODS if not callable(getattr(protocol, m, None))]
        if missing:
            raise EngineError(
                f"the {protocol.name} protocol adapter ({type(protocol).__name__}) cannot serve LoRA adapters: it "
                f"has no {', '.join(missing)}. Train full weights (no train.lora) with this protocol, or use one "
                "that serves adapters (sglang, vllm)"
            )
        if not self._rejoin_registered:
            self.pool.on_rejoin(self.catch_up)
            self._rejoin_registered = True

    async def update(self, meta: WeightUpdateMeta) -> None:
        """Load ``meta``'s adapter directory on every healthy server (see the module docstring)."""
        self._check_protocol()
        if meta.type != "disk" or not meta.path:
            raise EngineError(
                f"a remote engine loads LoRA adapters from files every server can read; got an adapter update of "
                f"type {meta.type!r}. Set trainer.weight_update=disk so the trainer writes the adapter directory"
            )
        assert meta.adapter is not None
        tag = meta.version if meta.version is not None else uuid.uuid4().hex[:8]
        served = f"{meta.adapter}-v{tag}"
        old = self.served.get(meta.adapter)
        before = (dict(self.served), self.default, dict(self.paths), self.version)
        # remembered first: a server that rejoins from now on loads this one
        self.served[meta.adapter] = served
        self.paths = {n: p for n, p in self.paths.items() if n != old}
        self.paths[served] = meta.path
        if self.default is None:
            self.default = meta.adapter
        if meta.version is not None:
            self.version = meta.version
        protocol = self.pool.protocol
        servers = await self.pool.await_servers("load_adapter")
        results = await self.pool.on_each(servers, "load_adapter", meta.timeout_s, protocol.load_adapter, served,
                                          meta.path)
        try:
            self.pool.check_all(servers, results, "load_adapter")
        except EngineError:
            self.served, self.default, self.paths, self.version = before
            raise
        for s in servers:
            if s.up:
                self.held.setdefault(s.address, set()).add(served)
        servers = [s for s in servers if s.up]
        if meta.version is not None and servers:
            results = await self.pool.on_each(servers, "set_weight_version", meta.timeout_s,
                                              protocol.set_weight_version, meta.version)
            self.pool.check_all(servers, results, "set_weight_version")
        if old is not None and old != served:
            await self._unload(servers, old, meta.timeout_s)

    async def catch_up(self, server: Server) -> None:
        """(Rejoin.) Give ``server`` exactly the current adapters and version; raises EngineError."""
        if not self.paths:
            return
        limit = self.pool.config.request_timeout_s
        protocol = self.pool.protocol
        for name in sorted(self.held.get(server.address, set()) | set(self.paths)):
            await self._unload([server], name, limit, quiet=True)
        self.held[server.address] = set()  # what failed to unload was not there (a restarted server)
        for name, path in self.paths.items():
            await self.pool.within(server, "load_adapter", limit, protocol.load_adapter, name, path)
            self.held.setdefault(server.address, set()).add(name)
        if self.version is not None:
            await self.pool.within(server, "set_weight_version", limit, protocol.set_weight_version, self.version)
        log.info("server %s rejoined with LoRA adapter(s) %s at version %s", server.address, sorted(self.paths),
                 self.version)

    async def _unload(self, servers: list[Any], name: str, limit: float, quiet: bool = False) -> None:
        results = await self.pool.on_each(servers, "unload_adapter", limit, self.pool.protocol.unload_adapter, name)
        for s, r in zip(servers, results, strict=True):
            if not isinstance(r, Exception):
                self.held.get(s.address, set()).discard(name)
            elif not quiet:
                log.warning("unloading the previous adapter version %r on %s failed: %s", name, s.address, r)
