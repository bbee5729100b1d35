"""Tool use: the model calls tools through the OpenAI chat API until it answers (or runs out of turns).

prompt -> ``client.chat.completions.create(messages, tools=registry.schemas())`` -> for each tool
call, ``registry.call`` (bad arguments come back to the model as an error message, see
:mod:`agentflow.envs.tools`) -> a ``tool`` message -> create again ... -> final answer ->
reward -> ``client.export_trajectories``. The client (:class:`agentflow.OpenAIClient`) records
exactly the sampled tokens; tool results enter the sequence with loss mask 0.

With ``style="concat"`` (default) the episode is one trajectory (prompt, sampled turns, tool
results); with ``"individual"`` one trajectory per model call, rewarded with the discounted return.
A reward that fails or times out rejects the episode (:class:`EnvError`).

Not here: tool-call parsing (the client's parser), sandboxing (the ``python`` tool does it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from agentflow import GenerationConfig, InferenceEngine, Trajectory
from agentflow.client import OpenAIClient
from agentflow.envs.tasks import RewardFn, Task
from agentflow.envs.tools import ToolRegistry
from agentflow.errors import ConfigError
from agentflow.workflows.rlvr import score

__all__ = ["ToolUseConfig", "ToolUseWorkflow"]


@dataclass(frozen=True, slots=True)
class ToolUseConfig:
    """Attributes:
        max_turns: model calls per episode (each may request several tools).
        gconfig: sampling of each call.
        style: export style (``"concat"`` one trajectory, ``"individual"`` one per call).
        discount: per-call discount for ``"individual"``.
        reward_timeout_s: deadline of the reward call.
        tool_parser: the client's tool-call format (``"qwen"`` = ``<tool_call>{json}</tool_call>``).
    """

    max_turns: int = 4
    gconfig: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=256))
    style: Literal["individual", "concat"] = "concat"
    discount: float = 1.0
    reward_timeout_s: float = 10.0
    tool_parser: str = "qwen"

    def __post_init__(self) -> None:
        problems = []
        if self.max_turns < 1:
            problems.append(f"max_turns must be >= 1, got {self.max_turns}")
        if self.style == "concat" and self.discount != 1.0:
            problems.append(f"discount={self.discount} needs style='individual'; concat uses discount 1.0")
        ConfigError.check(problems)


class ToolUseWorkflow:
    """Tool-calling episodes over a :class:`ToolRegistry`; ``data`` is a :class:`Task`."""

    def __init__(
        self, tokenizer: Any, tools: ToolRegistry, reward_fn: RewardFn, config: ToolUseConfig | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.tools = tools
        self.reward_fn = reward_fn
        self.config = config or ToolUseConfig()

    async def _run_tools(self, message: Any) -> list[dict[str, Any]]:
        """One ``tool`` message per call, in order (the model's mistakes become error text)."""
        return [
            {"role": "tool", "tool_call_id": call.id, "name": call.function.name,
             "content": await self.tools.call(call.function.name, call.function.arguments)}
            for call in message.tool_calls or []
        ]

    async def arun_episode(self, engine: InferenceEngine, data: Any) -> list[Trajectory]:
        cfg, task = self.config, Task.from_data(data)
        client = OpenAIClient(engine, self.tokenizer, gconfig=cfg.gconfig, tool_parser=cfg.tool_parser)
        messages: list[dict[str, Any]] = task.messages()
        answer, n_tool_calls = "", 0
        for _ in range(cfg.max_turns):
            completion = await client.chat.completions.create(
                messages=messages, tools=self.tools.schemas(), max_tokens=cfg.gconfig.max_new_tokens
            )
            message = completion.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if not message.tool_calls:
                answer = message.content or ""
                break
            results = await self._run_tools(message)
            n_tool_calls += len(results)
            messages += results
        reward = await score(self.reward_fn, answer, task, cfg.reward_timeout_s)
        client.set_last_reward(reward)
        trajs = client.export_trajectories(cfg.discount, cfg.style)
        info = {"task_id": task.id, "answer": answer, "tool_calls": n_tool_calls,
                "finished": bool(answer), "transcript": json.dumps(messages, default=str)[-4000:]}
        return [t.with_(info={**t.info, **info}) for t in trajs]
