"""Calculator agent: a group of short tool-using conversations per prompt, for chat templates with
no tool role (SmolLM2).

One conversation: :func:`~agentflow.envs.calculator.prompt_messages` -> the model replies (through
:class:`agentflow.OpenAIClient`, so the sampled tokens are recorded exactly) -> if the reply holds a
well-formed calculator call, the workflow runs it and appends the result as a *user* turn
(``Result: N``, the task's ``result_format``) -> the model replies again ... until a reply without
a ``<tool_call>`` tag (the final answer), a malformed call (the episode ends unanswered) or
``max_turns`` replies. Reward: :func:`~agentflow.envs.calculator.calculator_reward` (the final
answer must be exactly right and a call must have returned a number).

Why not :class:`~agentflow.workflows.tool_use.ToolUseWorkflow`: it passes ``tools=`` and sends
results as ``role: tool`` messages, and the client turns a call into ``tool_calls`` with no text.
SmolLM2's template renders neither the tool schemas nor the ``tool_calls`` field, so the re-rendered
history would not match the sampled tokens. Here the client's tool parser is off: each reply goes
back verbatim as assistant text, and the template re-renders exactly what was sampled
(``info["template_drift"]`` counts any mismatch; it must stay 0). Tool results and prompts have
loss mask 0; the group's trajectories share one group id (GRPO).

Per trajectory ``info``: ``turns`` (model replies), ``tool_calls`` (calls run), ``called`` (a call
returned a number), ``call_attempted`` / ``call_parsed`` (first reply), ``finished`` (a final answer
was given), ``answer``, ``template_drift``, ``transcript``.

Not here: the task and its prompt (``envs/calculator.py``), tool-call parsing (``_toolcalls``).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

from agentflow import GenerationConfig, InferenceEngine, Trajectory
from agentflow.client import OpenAIClient
from agentflow.envs.calculator import (
    final_answer_reward,
    parse_tool_call,
    prompt_messages,
    result_message,
    run_calculator,
)
from agentflow.envs.tasks import RewardFn, Task
from agentflow.errors import ConfigError
from agentflow.workflows.rlvr import score

__all__ = ["CalculatorAgentConfig", "CalculatorAgentWorkflow", "EpisodeLog"]


@dataclass(frozen=True, slots=True)
class CalculatorAgentConfig:
    """Attributes:
        max_turns: model replies per conversation (2 = one call, then the answer).
        require_tool_call: reward 0 unless a calculator call returned a number.
        max_calls_per_turn: calls run from one reply (more are ignored).
        reward_timeout_s: deadline of the answer check.
    """

    max_turns: int = 3
    require_tool_call: bool = True
    max_calls_per_turn: int = 1
    reward_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        problems = []
        if self.max_turns < 1:
            problems.append(f"max_turns must be >= 1, got {self.max_turns}")
        if self.max_calls_per_turn < 1:
            problems.append(f"max_calls_per_turn must be >= 1, got {self.max_calls_per_turn}")
        if problems:
            raise ConfigError(problems)


@dataclass(slots=True)
class EpisodeLog:
    """What happened in one conversation."""

    messages: list[dict[str, Any]]
    prompt_len: int = 0
    turns: int = 0
    tool_outputs: list[tuple[str, bool]] = field(default_factory=list)
    call_attempted: bool = False
    call_parsed: bool = False
    answer: str = ""
    finished: bool = False


class CalculatorAgentWorkflow:
    """``gconfig.n_samples`` calculator conversations per prompt; ``data`` is a calculator
    :class:`Task` (or a mapping for :meth:`Task.from_data`).

    ``reward_fn`` checks the final answer (default :func:`final_answer_reward`, exact); the tool
    condition is applied on top of it (``require_tool_call``); with the defaults the reward is
    :func:`~agentflow.envs.calculator.calculator_reward`. Extra keyword options build the
    :class:`CalculatorAgentConfig`, so ``workflow.options`` in a recipe config can set them.
    """

    def __init__(
        self,
        tokenizer: Any,
        gconfig: GenerationConfig | None = None,
        reward_fn: RewardFn | None = None,
        config: CalculatorAgentConfig | None = None,
        **options: Any,
    ) -> None:
        if config is not None and options:
            raise ConfigError(f"give either config or options, not both; got options {sorted(options)}")
        self.tokenizer = tokenizer
        self.config = config or CalculatorAgentConfig(**options)
        g = gconfig or GenerationConfig(n_samples=1, max_new_tokens=40)
        self.n_samples = g.n_samples
        self.gconfig = g.new(n_samples=1)
        self.reward_fn = reward_fn or final_answer_reward

    async def arun_episode(self, engine: InferenceEngine, data: Any) -> list[Trajectory]:
        task = Task.from_data(data)
        async with asyncio.TaskGroup() as tg:
            runs = [tg.create_task(self._conversation(engine, task)) for _ in range(self.n_samples)]
        group = uuid.uuid4().hex
        return [r.result().with_(group_id=group) for r in runs]

    async def _conversation(self, engine: InferenceEngine, task: Task) -> Trajectory:
        client = OpenAIClient(engine, self.tokenizer, gconfig=self.gconfig, tool_parser="none")
        messages = prompt_messages(task)
        log = EpisodeLog(messages, prompt_len=len(messages))
        for _ in range(self.config.max_turns):
            completion = await client.chat.completions.create(
                messages=log.messages, max_tokens=self.gconfig.max_new_tokens
            )
            log.turns += 1
            if not self._step(log, task, completion.choices[0].message.content or ""):
                break
        reward = await self._reward(log, task)
        client.set_last_reward(reward)
        (traj,) = client.export_trajectories(1.0, "concat")  # one conversation, one leaf
        return traj.with_(info={**traj.info, **self._info(log, task, client)})

    def _step(self, log: EpisodeLog, task: Task, text: str) -> bool:
        """Record one reply; run its call and append the result. True if the conversation goes on."""
        log.messages.append({"role": "assistant", "content": text})  # verbatim: the sampled text
        call = parse_tool_call(text)
        if log.turns == 1:
            log.call_attempted, log.call_parsed = call.attempted, call.parsed
        if not call.attempted:
            log.answer, log.finished = text, True
            return False
        if not call.parsed:
            return False  # a malformed call ends the episode unanswered
        outputs = [run_calculator(e) for e in call.expressions[: self.config.max_calls_per_turn]]
        log.tool_outputs += outputs
        log.messages.append(result_message(task, "\n".join(out for out, _ in outputs)))
        return True

    async def _reward(self, log: EpisodeLog, task: Task) -> float:
        """:func:`calculator_reward` with this workflow's answer check (``score`` adds a deadline)."""
        if self.config.require_tool_call and not any(ok for _, ok in log.tool_outputs):
            return 0.0
        return await score(self.reward_fn, log.answer, task, self.config.reward_timeout_s)

    @staticmethod
    def _info(log: EpisodeLog, task: Task, client: OpenAIClient) -> dict[str, Any]:
        return {
            "task_id": task.id, "turns": log.turns, "tool_calls": len(log.tool_outputs),
            "called": any(ok for _, ok in log.tool_outputs), "call_attempted": log.call_attempted,
            "call_parsed": log.call_parsed, "finished": log.finished, "answer": log.answer,
            "template_drift": client.stats["template_drift"],
            "template_not_prefix": client.stats["template_not_prefix"],
            "transcript": log.messages[log.prompt_len:],
        }
