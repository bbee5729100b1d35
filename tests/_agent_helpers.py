"""Shared by the streaming, Responses and agent-framework tests: a scripted engine that keeps what
it sampled, and the check that exported trajectories train on exactly those samples."""

from __future__ import annotations

import dataclasses

from agentflow import ModelRequest, ModelResponse, OpenAIClient
from agentflow.testing import FakeEngine, byte_tokenizer

TOK = byte_tokenizer()
EOS = TOK.eos_token_id
CHAT_TOOLS = [{"type": "function", "function": {"name": "add", "description": "a+b", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
RESPONSES_TOOLS = [{"type": "function", **CHAT_TOOLS[0]["function"]}]
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


def turn(text: str) -> list[int]:
    """The tokens of ``text`` then the end-of-turn token, as a model samples them."""
    return [*TOK.encode(text, add_special_tokens=False), EOS]


def by_last_message(req: ModelRequest) -> list[int]:
    """A tool call to a question; to a tool response, the sentence "The sum is <result>."."""
    last = TOK.decode(req.input_ids).rsplit("<|im_start|>", 2)[-2]
    if "<tool_response>" in last:
        return turn("The sum is " + last.split("<tool_response>\n")[1].split("\n")[0] + ".")
    return turn(CALL)


class SampleEngine(FakeEngine):
    """FakeEngine that keeps every response and gives each sampled token its own log-prob."""

    def __init__(self, reply=by_last_message, **kwargs) -> None:
        super().__init__(reply=reply, **kwargs)
        self.responses: list[ModelResponse] = []

    async def agenerate(self, req: ModelRequest) -> ModelResponse:
        resp = await super().agenerate(req)
        base = len(self.responses)
        lps = [-(0.001 * (base + 1) + 0.01 * i) for i in range(len(resp.output_tokens))]
        resp = dataclasses.replace(resp, output_logprobs=lps)
        self.responses.append(resp)
        return resp


def assert_trained_on_samples(client: OpenAIClient, engine: SampleEngine, *, chains: int) -> None:
    """Every trained token is what the engine sampled, with its log-prob, and the episode's turns
    chained into ``chains`` conversations (token-in, token-out continuation worked)."""
    samples = engine.responses
    individual = client.export_trajectories()
    assert len(individual) == len(samples) == len(client.records)
    for t, s in zip(individual, samples, strict=True):
        p = len(s.input_tokens)
        assert t.input_ids == s.input_tokens + s.output_tokens
        assert t.loss_mask == [0] * p + [1] * len(s.output_tokens)
        assert t.logprobs == [0.0] * p + s.output_logprobs
    index = {r.id: i for i, r in enumerate(client.records)}
    concat = client.export_trajectories(style="concat")
    assert len(concat) == chains, [t.info for t in concat]
    for t in concat:
        chain = [samples[index[cid]] for cid in t.info["completion_ids"]]
        trained = [(tok, lp) for tok, lp, m in zip(t.input_ids, t.logprobs, t.loss_mask, strict=True) if m]
        assert trained == [(tok, lp) for s in chain for tok, lp in zip(s.output_tokens, s.output_logprobs, strict=True)]
        assert t.input_ids == chain[-1].input_tokens + chain[-1].output_tokens
