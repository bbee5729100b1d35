"""agentflow.envs: environments for RL episodes. Everything here imports only the standard
library and ``agentflow`` (math-verify is imported on first symbolic check), so importing it is light.

- :mod:`~agentflow.envs.math`: answer extraction and ``math_reward`` (math-verify in a process pool);
- :mod:`~agentflow.envs.sandbox`: ``run_python`` in a locked-down subprocess;
- :mod:`~agentflow.envs.tools`: a tool registry (OpenAI schemas), ``calculator``, ``python``;
- :mod:`~agentflow.envs.tasks`: arithmetic, countdown and GSM8K-format tasks with their rewards.

Not here: workflows (``agentflow.workflows``), downloading datasets or models.
"""

from agentflow.envs.math import extract_answer, math_reward
from agentflow.envs.sandbox import Isolation, SandboxLimits, SandboxPool, SandboxResult, detect_isolation, run_python
from agentflow.envs.tasks import (
    RewardFn,
    Task,
    arithmetic_reward,
    arithmetic_tasks,
    countdown_reward,
    countdown_tasks,
    gsm8k_reward,
    load_gsm8k_jsonl,
)
from agentflow.envs.tools import Tool, ToolRegistry, calculator, default_tools, python_tool, tool_from_function

__all__ = [
    "Isolation",
    "RewardFn",
    "SandboxLimits",
    "SandboxPool",
    "SandboxResult",
    "Task",
    "Tool",
    "ToolRegistry",
    "arithmetic_reward",
    "arithmetic_tasks",
    "calculator",
    "countdown_reward",
    "countdown_tasks",
    "default_tools",
    "detect_isolation",
    "extract_answer",
    "gsm8k_reward",
    "load_gsm8k_jsonl",
    "math_reward",
    "python_tool",
    "run_python",
    "tool_from_function",
]
