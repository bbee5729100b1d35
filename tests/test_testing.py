"""The test doubles themselves."""

import asyncio

from agentflow import GenerationConfig, ModelRequest
from agentflow.testing import FakeEngine, byte_tokenizer, random_latency


async def test_fake_engine_stops_at_stop_tokens_and_tags_versions():
    async with FakeEngine(reply=lambda req: [5, 6, 7, 8]) as engine:
        engine.set_version(4)
        resp = await engine.agenerate(ModelRequest([1], GenerationConfig(stop_token_ids=(7,))))
    assert resp.output_tokens == [5, 6, 7]
    assert resp.output_versions == [4, 4, 4] and resp.stop_reason == "stop"


async def test_fake_engine_latency_is_honoured():
    async with FakeEngine(latency=0.05) as engine:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await engine.agenerate(ModelRequest([1]))
        assert loop.time() - t0 >= 0.045


def test_random_latency_is_seeded():
    a, b = random_latency(0.01, seed=3), random_latency(0.01, seed=3)
    assert [a() for _ in range(5)] == [b() for _ in range(5)]


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "héllo wörld 🚀 <|im_end|>"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[-1] == tok.eos_token_id == 258
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_model_builds_from_config(tiny):
    model, tok = tiny
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 2
