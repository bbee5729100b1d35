"""agentflow.engines: one package per product, each imported on first use so importing this
package stays light:

- ``local/``: :class:`LocalEngine`, the in-process transformers inference engine;
- ``remote/``: :class:`RemoteEngine`, the HTTP client of inference servers (a server pool plus one
  adapter per server protocol: :class:`ServerProtocol`, registered in :data:`PROTOCOLS`);
- ``serve/``: ``agentflow serve``, SGLang's HTTP protocol over any agentflow inference engine;
- ``fsdp/``: :class:`FSDPEngine`, the FSDP2 train engine.

Shared by several of them: LoRA basics (``_lora.py``), the weight hand-off (``_handoff.py``: HF
checkpoints on disk, the broadcast group) and model loading (``model_loading.py``).

Not here: the engine contracts (:class:`agentflow.InferenceEngine`, :class:`agentflow.TrainEngine`),
rollout (:class:`agentflow.Rollout`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig
    from agentflow.engines.local import LocalEngine, LocalEngineConfig
    from agentflow.engines.model_loading import load_model
    from agentflow.engines.remote import PROTOCOLS, RemoteEngine, RemoteEngineConfig, RemoteSGLangEngine, ServerProtocol

__all__ = ["PROTOCOLS", "FSDPEngine", "FSDPEngineConfig", "LocalEngine", "LocalEngineConfig", "RemoteEngine",
           "RemoteEngineConfig", "RemoteSGLangEngine", "ServerProtocol", "load_model"]

_LAZY = {
    "LocalEngine": "agentflow.engines.local",
    "LocalEngineConfig": "agentflow.engines.local",
    "RemoteEngine": "agentflow.engines.remote",
    "RemoteSGLangEngine": "agentflow.engines.remote",
    "RemoteEngineConfig": "agentflow.engines.remote",
    "ServerProtocol": "agentflow.engines.remote",
    "PROTOCOLS": "agentflow.engines.remote",
    "FSDPEngine": "agentflow.engines.fsdp",
    "FSDPEngineConfig": "agentflow.engines.fsdp",
    "load_model": "agentflow.engines.model_loading",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agentflow.engines' has no attribute {name!r}")
