"""The in-process inference engine: a transformers model decoding in a worker thread with
continuous batching, per-token log-probs and versions, pause and weight updates in memory or from
disk, and LoRA adapters beside the base weights.

Not here: the HTTP client (``remote/``), training (``fsdp/``).
"""

from agentflow.engines.local.engine import LocalEngine, LocalEngineConfig

__all__ = ["LocalEngine", "LocalEngineConfig"]
