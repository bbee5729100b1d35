"""The HTTP inference client: :class:`RemoteEngine` over a server pool, and the server-protocol
contract (:class:`ServerProtocol`, registered by name in :data:`PROTOCOLS`) that each protocol
adapter implements (SGLang's in ``sglang.py``).

Not here: the servers themselves (``serve/``, SGLang, vLLM), the trainer's side of a broadcast.
"""

from agentflow.engines.remote._pool import RemoteEngineConfig
from agentflow.engines.remote.engine import RemoteEngine, RemoteSGLangEngine
from agentflow.engines.remote.protocol import (
           PROTOCOLS,
           BroadcastSpec,
           Generated,
           GenerateJob,
           ServerLink,
           ServerProtocol,
           WeightGroup,
           resolve_protocol,
)

__all__ = ["PROTOCOLS", "BroadcastSpec", "GenerateJob", "Generated", "RemoteEngine", "RemoteEngineConfig",
           "RemoteSGLangEngine", "ServerLink", "ServerProtocol", "WeightGroup", "resolve_protocol"]
