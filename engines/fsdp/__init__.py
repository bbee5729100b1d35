"""The FSDP2 train engine: packed micro-batches, per-token log-probs, decoupled-PPO steps, HF
checkpoints and weight hand-off to inference engines, LoRA.

Not here: inference (``local/``, ``remote/``), the loss (:mod:`agentflow.algo`).
"""

from agentflow.engines.fsdp.engine import FSDPEngine, FSDPEngineConfig

__all__ = ["FSDPEngine", "FSDPEngineConfig"]
