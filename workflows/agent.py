"""Any OpenAI-API agent as a workflow: ``async def run(client, data) -> reward``.

Per episode: a fresh :class:`agentflow.OpenAIClient` over the engine (an ``openai.AsyncOpenAI``,
so agents written for the OpenAI SDK run unchanged) -> ``await agent(client, data)`` -> the
returned reward is set on the last completion (unless the agent set rewards itself with
``client.set_reward``) -> ``client.export_trajectories(discount, style)``.

The agent returns a number, or None to reject the episode. Exceptions it raises reject the
episode too (the executor counts them). An episode without any completion is rejected.
Not here: tools (pass a :class:`~agentflow.envs.tools.ToolRegistry` to your agent yourself, or
use ``tool_use.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from agentflow import GenerationConfig, InferenceEngine, Trajectory
from agentflow.client import OpenAIClient
from agentflow.errors import ConfigError, WorkflowError

__all__ = ["Agent", "AgentConfig", "AgentWorkflow"]

Agent = Callable[[OpenAIClient, Any], Awaitable["float | None"]]


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Attributes:
        gconfig: the client's default sampling (the agent's request parameters override it).
        style: ``"individual"`` (one trajectory per completion) or ``"concat"`` (one per conversation).
        discount: per-completion discount for ``"individual"``.
        tool_parser: the client's tool-call format.
        chat_template_kwargs: extra chat-template variables.
    """

    gconfig: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=256))
    style: Literal["individual", "concat"] = "individual"
    discount: float = 1.0
    tool_parser: str = "qwen"
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.discount <= 1:
            raise ConfigError(f"discount must be in [0, 1], got {self.discount}")


class AgentWorkflow:
    """Wraps ``agent(client, data) -> reward | None`` as a rollout workflow."""

    def __init__(self, agent: Agent, tokenizer: Any, config: AgentConfig | None = None) -> None:
        self.agent = agent
        self.tokenizer = tokenizer
        self.config = config or AgentConfig()

    async def arun_episode(self, engine: InferenceEngine, data: Any) -> list[Trajectory] | None:
        cfg = self.config
        client = OpenAIClient(engine, self.tokenizer, gconfig=cfg.gconfig, tool_parser=cfg.tool_parser,
                              chat_template_kwargs=cfg.chat_template_kwargs)
        reward = await self.agent(client, data)
        if reward is None:
            return None
        if not client.records:
            raise WorkflowError("the agent returned a reward but made no chat completion; expected at least "
                                "one client.chat.completions.create call per episode")
        if all(client.get_reward(r.id) is None for r in client.records):
            client.set_last_reward(reward)
        return client.export_trajectories(cfg.discount, cfg.style)
