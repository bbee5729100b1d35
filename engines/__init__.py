"""agentflow.engines: inference engines (local transformers; remote HTTP servers through a protocol
adapter, SGLang's by default), the SGLang-protocol server and the FSDP2 train engine. Each is
imported on first use, so importing this package stays light.

Not here: the engine contracts (``agentflow._engine_api``), rollout (:class:`agentflow.Rollout`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig
    from agentflow.engines.local import LocalEngine, LocalEngineConfig
    from agentflow.engines.model_loading import load_model
    from agentflow.engines.remote import RemoteEngine, RemoteEngineConfig, RemoteSGLangEngine

__all__ = [
    "FSDPEngine",
    "FSDPEngineConfig",
    "LocalEngine",
    "LocalEngineConfig",
    "RemoteEngine",
    "RemoteEngineConfig",
    "RemoteSGLangEngine",
    "load_model",
]

_LAZY = {
    "LocalEngine": "agentflow.engines.local",
    "LocalEngineConfig": "agentflow.engines.local",
    "RemoteEngine": "agentflow.engines.remote",
    "RemoteSGLangEngine": "agentflow.engines.remote",
    "RemoteEngineConfig": "agentflow.engines.remote",
    "FSDPEngine": "agentflow.engines.fsdp",
    "FSDPEngineConfig": "agentflow.engines.fsdp",
    "load_model": "agentflow.engines.model_loading",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agentflow.engines' has no attribute {name!r}")
