"""agentflow.workflows: built-in rollout workflows, one file each (prompt -> generate -> env step ->
reward -> trajectory readable top to bottom). Each is a class with ``async def arun_episode(self,
engine, data)`` and a frozen config. Imported on first use, so importing this package stays light.

- :class:`RLVRWorkflow` (``rlvr.py``): n samples per prompt, verifiable reward, one group;
- :class:`MultiTurnWorkflow` (``multi_turn.py``): wrong answer -> feedback turn -> retry;
- :class:`ToolUseWorkflow` (``tool_use.py``): OpenAI tool-calling loop over a tool registry;
- :class:`CodeExecWorkflow` (``code_exec.py``): programs judged by tests, or tool-integrated reasoning;
- :class:`AgentWorkflow` (``agent.py``): any ``async def run(client, data) -> reward`` agent.

Not here: environments and rewards (``agentflow.envs``), running episodes (:class:`agentflow.Rollout`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentflow.workflows.agent import AgentConfig, AgentWorkflow
    from agentflow.workflows.code_exec import CodeExecConfig, CodeExecWorkflow
    from agentflow.workflows.multi_turn import MultiTurnConfig, MultiTurnWorkflow
    from agentflow.workflows.rlvr import RLVRConfig, RLVRWorkflow
    from agentflow.workflows.tool_use import ToolUseConfig, ToolUseWorkflow

__all__ = [
    "AgentConfig",
    "AgentWorkflow",
    "CodeExecConfig",
    "CodeExecWorkflow",
    "MultiTurnConfig",
    "MultiTurnWorkflow",
    "RLVRConfig",
    "RLVRWorkflow",
    "ToolUseConfig",
    "ToolUseWorkflow",
]

_LAZY = {
    "AgentConfig": "agent", "AgentWorkflow": "agent",
    "CodeExecConfig": "code_exec", "CodeExecWorkflow": "code_exec",
    "MultiTurnConfig": "multi_turn", "MultiTurnWorkflow": "multi_turn",
    "RLVRConfig": "rlvr", "RLVRWorkflow": "rlvr",
    "ToolUseConfig": "tool_use", "ToolUseWorkflow": "tool_use",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"agentflow.workflows.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'agentflow.workflows' has no attribute {name!r}")
