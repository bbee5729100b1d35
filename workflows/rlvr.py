"""RLVR: one prompt, a group of sampled answers, a verifiable reward each (single turn).

prompt (chat template) -> ``n_samples`` x ``engine.agenerate`` (concurrently) -> decode ->
reward (async, with a deadline) -> one :class:`Trajectory` per sample, all in one group.

A reward that raises or misses its deadline is a *rejected sample*, never a silent 0: it is left
out of the group and its reason is recorded in the other samples' ``info["rejected"]``; when
every sample is rejected the episode raises :class:`EnvError` (the executor counts the reason).
Synchronous reward functions run inline on the loop, so keep them instant (the built-in
arithmetic and countdown rewards are); anything slow must be async (like ``math_reward``).

Not here: advantages (the trainer), multi-turn conversations (``multi_turn.py``).
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from dataclasses import dataclass, field
from typing import Any

from agentflow import GenerationConfig, InferenceEngine, ModelRequest, ModelResponse, Trajectory
from agentflow.envs.tasks import RewardFn, Task
from agentflow.errors import ConfigError, EnvError

__all__ = ["RLVRConfig", "RLVRWorkflow", "score"]


@dataclass(frozen=True, slots=True)
class RLVRConfig:
    """Attributes:
        gconfig: sampling; ``n_samples`` answers per prompt. Its stop tokens default to eos.
        reward_timeout_s: deadline of one reward call.
        truncated_reward: reward of a sample cut at ``max_new_tokens`` (no stop token), instead of
            scoring its text; None scores it like any other. Setting it (e.g. 0) keeps the policy
            from being paid for answers it never finished.
        chat_template_kwargs: extra chat-template variables (e.g. ``enable_thinking``).
    """

    gconfig: GenerationConfig = field(default_factory=lambda: GenerationConfig(n_samples=4, max_new_tokens=64))
    reward_timeout_s: float = 10.0
    truncated_reward: float | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.reward_timeout_s > 0:
            raise ConfigError(f"reward_timeout_s must be > 0 seconds, got {self.reward_timeout_s}")


async def score(reward_fn: RewardFn, completion: str, task: Task, timeout_s: float) -> float:
    """Call ``reward_fn`` under a deadline; raise :class:`EnvError` if it fails or times out."""
    try:
        async with asyncio.timeout(timeout_s):
            value = reward_fn(completion, task)
            if inspect.isawaitable(value):
                value = await value
    except TimeoutError as e:
        raise EnvError(f"reward for task {task.id!r} took longer than {timeout_s}s") from e
    except EnvError:
        raise
    except Exception as e:
        raise EnvError(f"reward for task {task.id!r} raised {type(e).__name__}: {e}") from e
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EnvError(f"reward_fn must return a number, got {type(value).__name__} for task {task.id!r}")
    return float(value)


class RLVRWorkflow:
    """Single-turn RL with verifiable rewards. ``data``: a :class:`Task` or a mapping for
    :meth:`Task.from_data`. Returns the group's accepted trajectories."""

    def __init__(self, tokenizer: Any, reward_fn: RewardFn, config: RLVRConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.config = config or RLVRConfig()
        g = self.config.gconfig
        if not g.stop_token_ids and tokenizer.eos_token_id is not None:
            g = g.new(stop_token_ids=(tokenizer.eos_token_id,))
        self.gconfig = g.new(n_samples=1)  # one request per sample

    def prompt_ids(self, task: Task) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            task.messages(), tokenize=False, add_generation_prompt=True, **self.config.chat_template_kwargs
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def completion_text(self, resp: ModelResponse) -> str:
        return self.tokenizer.decode(resp.output_tokens, skip_special_tokens=True)

    async def _sample(self, engine: InferenceEngine, prompt: list[int], task: Task) -> tuple[ModelResponse, str]:
        resp = await engine.agenerate(ModelRequest(input_ids=prompt, gconfig=self.gconfig))
        return resp, self.completion_text(resp)

    async def _reward(self, text: str, task: Task) -> float | EnvError:
        try:
            return await score(self.reward_fn, text, task, self.config.reward_timeout_s)
        except EnvError as e:
            return e

    async def arun_episode(self, engine: InferenceEngine, data: Any) -> list[Trajectory]:
        task = Task.from_data(data)
        prompt = self.prompt_ids(task)
        n = self.config.gconfig.n_samples
        async with asyncio.TaskGroup() as tg:
            samples = [tg.create_task(self._sample(engine, prompt, task)) for _ in range(n)]
        done = [s.result() for s in samples]
        async with asyncio.TaskGroup() as tg:
            scored = [tg.create_task(self._reward(text, task)) for _, text in done]
        rewards = [s.result() for s in scored]
        if self.config.truncated_reward is not None:
            rewards = [self.config.truncated_reward if resp.stop_reason == "length" else r
                       for (resp, _), r in zip(done, rewards, strict=True)]
        rejected = [str(r) for r in rewards if isinstance(r, EnvError)]
        if len(rejected) == n:
            raise EnvError(f"all {n} samples of task {task.id!r} were rejected: {rejected[0]}")
        group = uuid.uuid4().hex
        return [
            Trajectory.from_response(resp, r, prompt_ids=prompt, group_id=group,
                                     info={"task_id": task.id, "completion": text, "rejected": rejected,
                                           "finish_reason": resp.stop_reason})
            for (resp, text), r in zip(done, rewards, strict=True) if not isinstance(r, EnvError)
        ]
