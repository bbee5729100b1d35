"""LoRA for :class:`~agentflow.engines.remote.RemoteSGLangEngine`: adapter-only weight updates over
SGLang's ``/load_lora_adapter`` and the adapter of each ``/generate`` (``lora_path``).

An adapter update (``WeightUpdateMeta.adapter`` set, ``type="disk"``: a PEFT adapter directory
every server can read) loads the adapter on every server under a new served name per version,
``<adapter>-v<version>`` (SGLang refuses to load a name twice), moves the engine's weight version
with ``/update_weight_version`` (without aborting anything), then unloads the previous version's
name (SGLang waits for its requests in flight). Requests aborted by the pause are re-issued by the
engine after ``resume()`` and carry the new name, so the tokens after an update come from the new
adapter and carry the new version.

Which adapter a request uses: ``ModelRequest.metadata["lora"]`` (an adapter name; None = the base
model); without the key, the first adapter this engine loaded. A name this engine never loaded is
sent as is (an adapter the server got from ``--lora-paths``).

Not here: HTTP, retries and routing (the remote engine), the server side (``_lora_serve.py``).
A server that restarts and rejoins does not get the adapters back (restart it with ``--lora-paths``).
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
    """Adapter name -> its served name on the servers (the current version's), and the default."""

    served: dict[str, str] = field(default_factory=dict)
    default: str | None = None

    def served_name(self, req: ModelRequest) -> str | None:
        name = req.metadata.get(LORA_KEY, _UNSET)
        if name is _UNSET:
            name = self.default
        if not name:
            return None
        return self.served.get(str(name), str(name))


def remote_adapters(engine: Any) -> RemoteAdapters:
    """The engine's adapter table (created on first use)."""
    table = getattr(engine, "_lora_adapters", None)
    if table is None:
        table = RemoteAdapters()
        engine._lora_adapters = table
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
    servers = engine.pool.up_servers()
    await _on_all(engine, servers, "/load_lora_adapter",
                  {"lora_name": served, "lora_path": meta.path, "pinned": False}, meta.timeout_s)
    if meta.version is not None:
        await _on_all(engine, servers, "/update_weight_version",
                      {"new_version": str(meta.version), "abort_all_requests": False}, meta.timeout_s)
    old = table.served.get(meta.adapter)
    table.served[meta.adapter] = served
    if table.default is None:
        table.default = meta.adapter
    if old is not None and old != served:
        await _unload_quietly(engine, servers, old, meta.timeout_s)


async def _post_each(engine: Any, servers: list[Any], path: str, body: dict[str, Any], limit: float) -> list[Any]:
    """``POST path body`` on every server under the pool's deadline; results or errors, in order."""
    return await engine.pool._on_each(servers, path, limit, lambda link: link.call("POST", path, body))


async def _on_all(engine: Any, servers: list[Any], path: str, body: dict[str, Any], limit: float) -> None:
    engine.pool._check_all(servers, await _post_each(engine, servers, path, body, limit), path)


async def _unload_quietly(engine: Any, servers: list[Any], name: str, limit: float) -> None:
    results = await _post_each(engine, servers, "/unload_lora_adapter", {"lora_name": name}, limit)
    for s, r in zip(servers, results, strict=True):
        if isinstance(r, Exception):
            log.warning("unloading the previous adapter version %r on %s failed: %s", name, s.address, r)
