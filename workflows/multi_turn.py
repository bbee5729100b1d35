"""Multi-turn feedback and retry: answer, hear "wrong, try again", answer again (up to k turns).

prompt -> generate -> reward; while the reward is below ``success_threshold`` and turns remain:
append a user feedback turn (loss mask 0) -> generate again on the whole conversation -> reward.
The episode's reward is ``reward * turn_discount ** (turns used - 1)``, so a first-try answer is
worth most. The result is ONE trajectory: every sampled token (mask 1, its log-prob and version)
and every prompt/feedback token (mask 0), exactly the tokens the engine saw (token-in, token-out:
the history is never re-templated; only the feedback turn's tokens are rendered and appended).

A reward that fails or misses its deadline rejects the episode (:class:`EnvError`).
Not here: tools (``tool_use.py``), agents written against the OpenAI API (``agent.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agentflow import GenerationConfig, InferenceEngine, ModelRequest, Trajectory
from agentflow.envs.tasks import RewardFn, Task
from agentflow.errors import ConfigError, WorkflowError
from agentflow.workflows.rlvr import score

__all__ = ["MultiTurnConfig", "MultiTurnWorkflow"]


@dataclass(frozen=True, slots=True)
class MultiTurnConfig:
    """Attributes:
        max_turns: answers allowed (1 = plain RLVR with one sample).
        turn_discount: reward factor per extra turn.
        feedback: the user message after a wrong answer.
        success_threshold: a reward at or above it ends the episode.
        gconfig: sampling per turn (``n_samples`` is ignored: one conversation per episode).
        reward_timeout_s: deadline of one reward call.
        max_total_tokens: stop retrying when the conversation would exceed this length.
    """

    max_turns: int = 3
    turn_discount: float = 0.9
    feedback: str = "Your answer is incorrect. Please think again and give a corrected answer."
    success_threshold: float = 1.0
    gconfig: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=64))
    reward_timeout_s: float = 10.0
    max_total_tokens: int = 4096

    def __post_init__(self) -> None:
        problems = []
        if self.max_turns < 1:
            problems.append(f"max_turns must be >= 1, got {self.max_turns}")
        if not 0 < self.turn_discount <= 1:
            problems.append(f"turn_discount must be in (0, 1], got {self.turn_discount}")
        if not self.reward_timeout_s > 0:
            problems.append(f"reward_timeout_s must be > 0, got {self.reward_timeout_s}")
        ConfigError.check(problems)


class MultiTurnWorkflow:
    """Feedback-and-retry episodes; ``data`` is a :class:`Task` (or a mapping for it)."""

    def __init__(self, tokenizer: Any, reward_fn: RewardFn, config: MultiTurnConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.config = config or MultiTurnConfig()
        g = self.config.gconfig.new(n_samples=1)
        if not g.stop_token_ids and tokenizer.eos_token_id is not None:
            g = g.new(stop_token_ids=(tokenizer.eos_token_id,))
        self.gconfig = g

    def _render(self, messages: list[dict[str, str]], generation: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def feedback_ids(self, messages: list[dict[str, str]], reply: str, ended_with_eos: bool) -> list[int]:
        """Tokens to append after the sampled reply: the rest of the assistant turn the template
        would write (e.g. the newline after ``<|im_end|>``, or the whole end-of-turn when the reply
        was cut by the length limit), then the feedback turn and the next generation prompt."""
        history = self._render([*messages, {"role": "assistant", "content": reply}], generation=False)
        full = self._render([*messages, {"role": "assistant", "content": reply},
                             {"role": "user", "content": self.config.feedback}], generation=True)
        if not full.startswith(history):
            raise WorkflowError("the chat template does not render a conversation as a prefix of its "
                                "continuation; expected an append-only template (ChatML, Llama 3, Qwen)")
        eos = self.tokenizer.eos_token or ""
        at = history.rfind(eos) if eos else -1
        glue = "" if at < 0 else history[at + len(eos) if ended_with_eos else at:]
        return self._encode(glue + full[len(history):])

    async def arun_episode(self, engine: InferenceEngine, data: Any) -> Trajectory:
        cfg, task = self.config, Task.from_data(data)
        messages = task.messages()
        prompt = self._encode(self._render(messages, generation=True))
        traj: Trajectory | None = None
        seq, rewards = prompt, []
        for turn in range(cfg.max_turns):
            resp = await engine.agenerate(ModelRequest(input_ids=seq, gconfig=self.gconfig))
            traj = Trajectory.from_response(resp, prompt_ids=seq) if traj is None else traj.extend([], resp)
            reply = self.tokenizer.decode(resp.output_tokens, skip_special_tokens=True)
            rewards.append(await score(self.reward_fn, reply, task, cfg.reward_timeout_s))
            if rewards[-1] >= cfg.success_threshold or turn == cfg.max_turns - 1:
                break
            ended = bool(resp.output_tokens) and resp.output_tokens[-1] in self.gconfig.stop_token_ids
            delta = self.feedback_ids(messages, reply, ended)
            if len(traj) + len(delta) + self.gconfig.max_new_tokens > cfg.max_total_tokens:
                break
            messages = [*messages, {"role": "assistant", "content": reply},
                        {"role": "user", "content": cfg.feedback}]
            traj = traj.extend(delta)
            seq = traj.input_ids
        assert traj is not None
        reward = rewards[-1] * cfg.turn_discount ** (len(rewards) - 1)
        return traj.with_(reward=reward, info={"task_id": task.id, "turns": len(rewards), "turn_rewards": rewards,
                                               "finish_reason": resp.stop_reason})
