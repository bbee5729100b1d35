"""agentflow: asynchronous reinforcement learning for LLM agents.

The public API is exactly ``__all__`` (a test checks it): the contracts (:class:`InferenceEngine`,
:class:`TrainEngine`, :class:`Trajectory`, ...), the rollout machinery (:class:`Rollout` with its
executor, buffer and staleness manager), and the pieces of a training loop (:class:`Trainer`,
:class:`PromptSource`, :class:`Checkpointer`, :class:`MetricsLogger`, :func:`evaluate`; the PPO step
is :func:`agentflow.algo.ppo_step`). Importing this package is light: it does not import torch,
transformers, sglang or the sandbox; names that need heavy dependencies are imported on first use.

Not here: engines (``agentflow.engines``), workflows, environments, the ``agentflow train`` recipe
(``agentflow.recipe``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agentflow._buffer import BufferStats, Group, ReplayBuffer
from agentflow._checkpoint import Checkpointer
from agentflow._data import PromptSource
from agentflow._engine_api import (
    FinetuneSpec,
    InferenceEngine,
    MicroBatchSpec,
    RolloutWorkflow,
    SaveLoadMeta,
    Scheduling,
    TrainEngine,
    WeightUpdateMeta,
)
from agentflow._executor import WorkflowExecutor
from agentflow._metrics import MetricsLogger
from agentflow._rollout import Rollout
from agentflow._rollout_config import RolloutConfig, StalePolicy
from agentflow._staleness import StalenessManager, StalenessStats, staleness_capacity
from agentflow._trainer import EvalSpec, Trainer, TrainerConfig, evaluate
from agentflow._types import GenerationConfig, ModelRequest, ModelResponse, StopReason, Trajectory
from agentflow.errors import (
    AgentflowError,
    CheckpointError,
    ConfigError,
    EngineError,
    EngineTimeout,
    EnvError,
    PromptTooLong,
    SandboxError,
    ServerError,
    TrajectoryError,
    WorkflowError,
)

if TYPE_CHECKING:
    from agentflow.client import OpenAIClient
    from agentflow.proxy import ProxyServer

__version__ = "0.1.0"

__all__ = ["AgentflowError", "BufferStats", "CheckpointError", "Checkpointer", "ConfigError", "EngineError",
           "EngineTimeout", "EnvError", "EvalSpec", "FinetuneSpec", "GenerationConfig", "Group", "InferenceEngine",
           "MetricsLogger", "MicroBatchSpec", "ModelRequest", "ModelResponse", "OpenAIClient", "PromptSource",
           "PromptTooLong", "ProxyServer", "ReplayBuffer", "Rollout", "RolloutConfig", "RolloutWorkflow",
           "SandboxError", "SaveLoadMeta", "Scheduling", "ServerError", "StalePolicy", "StalenessManager",
           "StalenessStats", "StopReason", "TrainEngine", "Trainer", "TrainerConfig", "Trajectory",
           "TrajectoryError", "WeightUpdateMeta", "WorkflowError", "WorkflowExecutor", "evaluate",
           "staleness_capacity"]

_LAZY = {"OpenAIClient": "agentflow.client", "ProxyServer": "agentflow.proxy"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agentflow' has no attribute {name!r}")
