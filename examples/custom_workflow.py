"""A custom workflow for `agentflow train`: answer, then get one chance to fix a wrong answer.

    agentflow train examples/custom_workflow.yaml

Any class with `async def arun_episode(self, engine, data)` works; `agentflow train` passes the
constructor whichever of `tokenizer`, `reward_fn` and `gconfig` it accepts, plus
`workflow.options`.
"""

from __future__ import annotations

import uuid

from agentflow import GenerationConfig, ModelRequest, Trajectory


class SecondChance:
    def __init__(self, tokenizer, reward_fn, gconfig: GenerationConfig, retry_discount: float = 0.5):
        self.tok = tokenizer
        self.reward_fn = reward_fn
        self.gconfig = gconfig.new(n_samples=1, stop_token_ids=(tokenizer.eos_token_id,))
        self.n = gconfig.n_samples
        self.retry_discount = retry_discount

    def _encode(self, messages) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok.encode(text, add_special_tokens=False)

    async def _one(self, engine, data) -> Trajectory:
        from agentflow.envs.tasks import Task

        task = Task.from_data(data)
        messages = task.messages()
        prompt = self._encode(messages)
        resp = await engine.agenerate(ModelRequest(prompt, self.gconfig))
        answer = self.tok.decode(resp.output_tokens, skip_special_tokens=True)
        reward = float(self.reward_fn(answer, task))
        traj = Trajectory.from_response(resp, reward)
        if reward > 0:
            return traj
        messages = [*messages, {"role": "assistant", "content": answer},
                    {"role": "user", "content": "That is not right. Try once more."}]
        full = self._encode(messages)
        feedback = full[len(traj.input_ids):] if full[: len(traj.input_ids)] == traj.input_ids else full
        retry = await engine.agenerate(ModelRequest(traj.input_ids + feedback, self.gconfig))
        answer = self.tok.decode(retry.output_tokens, skip_special_tokens=True)
        return traj.extend(feedback, retry).with_(reward=self.retry_discount * float(self.reward_fn(answer, task)))

    async def arun_episode(self, engine, data):
        group = uuid.uuid4().hex
        return [(await self._one(engine, data)).with_(group_id=group) for _ in range(self.n)]
