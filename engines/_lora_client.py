"""LoRA for :class:`~agentflow.engines.remote.RemoteSGLangEngine`: adapter-only weight updates over
SGLang's ``/load_lora_adapter``, the adapter of each ``/generate`` (``lora_path``), and the
adapters of a server that rejoins.

An adapter update (``WeightUpdateMeta.adapter`` set, ``type="disk"``: a PEFT adapter directory
every server can read) loads the adapter on every healthy server under a new served name per
version, ``<adapter>-v<version>`` (SGLang refuses to load a name twice), moves the servers' weight
version with ``/update_weight_version`` (without aborting anything), then unloads the previous
version's name (SGLang waits for its requests in flight). Requests aborted by the pause are
re-issued by the engine after ``resume()`` and carry the new name, so the tokens after an update
come from the new adapter and carry the new version. While every server is down the update waits
for one (``server_wait_timeout_s``), like a full-weight disk update.

Rejoin: the current adapters (served name and directory) and version are remembered before an
update is sent. When a server comes back (restarted, or only unreachable for a while) the pool's
rejoin runs :func:`_catch_up` before the server counts as up: it unloads every name this engine
had loaded there or serves now (a failure is fine: a restarted server has none), loads the
current adapters and sets the current version. A server that was down during an update therefore
gets that update's adapter, and never the stale one, before it serves a request.

Which adapter a request uses: ``ModelRequest.metadata["lora"]`` (an adapter name; None = the base
model); without the key, the first adapter this engine loaded. A name this engine never loaded is
sent as is (an adapter the server got from ``--lora-paths``).

Not here: HTTP, retries and routing (the remote engine and its pool), the server side
(``_lora_serve.py``), adapters loaded on a server by someone else (``--lora-paths``, other
clients): a restarted server gets those from its own command line, not from here.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from agentflow._engine_api import WeightUpdateMeta
from agentflow._types import ModelRequest
from agentflow.engines._lora import LORA_KEY
from agentflow.errors import EngineError

__all__ = ["RemoteAdapters", "remote_adapters", "update_remote_adapter"]

log = logging.getLogger("agentflow.remote")
_UNSET = object()


@dataclass(slots=True)
class RemoteAdapters:
    """Adapter name -> its served name on the servers (the current version's), the default, and
    what a rejoining server must load: each served name's directory and the version."""

    served: dict[str, str] = field(default_factory=dict)
    default: str | None = None
    paths: dict[str, str] = field(default_factory=dict)  # served name -> adapter directory (current ones)
    version: int | None = None
    held: dict[str, set[str]] = field(default_factory=dict)  # server address -> served names loaded there

    def served_name(self, req: ModelRequest) -> str | None:
        name = req.metadata.get(LORA_KEY, _UNSET)
        if name is _UNSET:
            name = self.default
        if not name:
            return None
        return self.served.get(str(name), str(name))


def remote_adapters(engine: Any) -> RemoteAdapters:
    """The engine's adapter table (created on first use; registers the rejoin catch-up)."""
    table = getattr(engine, "_lora_adapters", None)
    if table is None:
        table = RemoteAdapters()
        engine._lora_adapters = table

        async def catch_up(server: Any) -> None:
            await _catch_up(engine, table, server)

        engine.pool.on_rejoin(catch_up)
    return table


async def update_remote_adapter(engine: Any, meta: WeightUpdateMeta) -> None:
    """Load ``meta``'s adapter directory on every healthy server (see the module docstring)."""
    if meta.type != "disk" or not meta.path:
        raise EngineError(
            f"RemoteSGLangEngine loads LoRA adapters from files (SGLang's /load_lora_adapter); got an adapter update "
            f"of type {meta.type!r}. Set trainer.weight_update=disk so the trainer writes the adapter directory"
        )
    assert meta.adapter is not None
    table = remote_adapters(engine)
    tag = meta.version if meta.version is not None else uuid.uuid4().hex[:8]
    served = f"{meta.adapter}-v{tag}"
    old = table.served.get(meta.adapter)
    before = (dict(table.served), table.default, dict(table.paths), table.version)
    # remembered first: a server that rejoins from now on loads this one
    table.served[meta.adapter] = served
    table.paths = {n: p for n, p in table.paths.items() if n != old}
    table.paths[served] = meta.path
    if table.default is None:
        table.default = meta.adapter
    if meta.version is not None:
        table.version = meta.version
    servers = await engine.pool.await_servers("load_lora_adapter")
    try:
        await _on_all(engine, servers, "/load_lora_adapter",
                      {"lora_name": served, "lora_path": meta.path, "pinned": False}, meta.timeout_s)
    except EngineError:
        table.served, table.default, table.paths, table.version = before
        raise
    for s in servers:
        if s.up:
            table.held.setdefault(s.address, set()).add(served)
    servers = [s for s in servers if s.up]
    if meta.version is not None and servers:
        await _on_all(engine, servers, "/update_weight_version",
                      {"new_version": str(meta.version), "abort_all_requests": False}, meta.timeout_s)
    if old is not None and old != served:
        await _unload_quietly(engine, table, servers, old, meta.timeout_s)


async def _catch_up(engine: Any, table: RemoteAdapters, server: Any) -> None:
    """(Rejoin.) Give ``server`` exactly the current adapters and version; raises EngineError."""
    if not table.paths:
        return
    limit = engine.config.request_timeout_s
    for name in sorted(table.held.get(server.address, set()) | set(table.paths)):
        await _unload_quietly(engine, table, [server], name, limit, quiet=True)
    table.held[server.address] = set()  # what failed to unload was not there (a restarted server)
    for name, path in table.paths.items():
        await engine.pool.within(server, "load_lora_adapter", limit, lambda link, n=name, p=path: link.call(
            "POST", "/load_lora_adapter", {"lora_name": n, "lora_path": p, "pinned": False}))
        table.held.setdefault(server.address, set()).add(name)
    if table.version is not None:
        version = {"new_version": str(table.version), "abort_all_requests": False}
        await engine.pool.within(server, "update_weight_version", limit,
                                 lambda link: link.call("POST", "/update_weight_version", version))
    log.info("server %s rejoined with LoRA adapter(s) %s at version %s", server.address, sorted(table.paths),
             table.version)


async def _post_each(engine: Any, servers: list[Any], path: str, body: dict[str, Any], limit: float) -> list[Any]:
    """``POST path body`` on every server under the pool's deadline; results or errors, in order."""
    return await engine.pool._on_each(servers, path, limit, lambda link: link.call("POST", path, body))


async def _on_all(engine: Any, servers: list[Any], path: str, body: dict[str, Any], limit: float) -> None:
    engine.pool._check_all(servers, await _post_each(engine, servers, path, body, limit), path)


async def _unload_quietly(engine: Any, table: RemoteAdapters, servers: list[Any], name: str, limit: float,
                          quiet: bool = False) -> None:
    results = await _post_each(engine, servers, "/unload_lora_adapter", {"lora_name": name}, limit)
    for s, r in zip(servers, results, strict=True):
        if not isinstance(r, Exception):
            table.held.get(s.address, set()).discard(name)
        elif not quiet:
            log.warning("unloading the previous adapter version %r on %s failed: %s", name, s.address, r)
