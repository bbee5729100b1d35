"""agentflow.engines: inference engines (local transformers, remote SGLang), the SGLang-protocol
server and the FSDP2 train engine. Each is imported on first use, so importing this package
stays light."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentflow.engines.fsdp import FSDPEngine
    from agentflow.engines.local import LocalEngine
    from agentflow.engines.remote import RemoteSGLangEngine

__all__ = ["FSDPEngine", "LocalEngine", "RemoteSGLangEngine"]

_LAZY = {
    "LocalEngine": "agentflow.engines.local",
    "RemoteSGLangEngine": "agentflow.engines.remote",
    "FSDPEngine": "agentflow.engines.fsdp",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agentflow.engines' has no attribute {name!r}")
