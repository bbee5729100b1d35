"""Streamed chat completions: real openai.AsyncStream in process, server-sent events through the proxy,
recorded exactly like non-streamed completions."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from _agent_helpers import CHAT_TOOLS, TOK, SampleEngine, assert_trained_on_samples, turn
from openai.types.chat import ChatCompletionChunk

from agentflow import OpenAIClient
from agentflow.errors import ConfigError
from agentflow.proxy import ProxyServer

QUESTION = [{"role": "user", "content": "What is 1+2?"}]


async def collect(stream) -> list[ChatCompletionChunk]:
    async with stream:
        return [chunk async for chunk in stream]


def assemble(chunks: list[ChatCompletionChunk]) -> dict:
    """The message a streaming consumer rebuilds from deltas (content concatenated, tool calls by index)."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or ():
                call = calls.setdefault(tc.index, {"id": "", "type": "", "function": {"name": "", "arguments": ""}})
                call["id"] += tc.id or ""
                call["type"] += tc.type or ""
                call["function"]["name"] += (tc.function and tc.function.name) or ""
                call["function"]["arguments"] += (tc.function and tc.function.arguments) or ""
            finish = choice.finish_reason or finish
    msg = {"role": "assistant", "content": content or None}
    if calls:
        msg["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {"message": msg, "finish_reason": finish}


async def test_stream_is_a_real_async_stream_with_openai_chunks():
    client = OpenAIClient(SampleEngine(reply=lambda req: turn("Hello there.")), TOK)
    stream = await client.chat.completions.create(
        model="m", messages=QUESTION, stream=True, stream_options={"include_usage": True}
    )
    assert isinstance(stream, openai.AsyncStream) and stream.response.status_code == 200
    assert stream.response.content.endswith(b"data: [DONE]\n\n")
    chunks = await collect(stream)
    assert all(isinstance(c, ChatCompletionChunk) and c.object == "chat.completion.chunk" for c in chunks)
    (rec,) = client.records
    assert {c.id for c in chunks} == {rec.id} and {c.model for c in chunks} == {"m"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:2]] == ["Hello there."]
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None, None, "stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage.prompt_tokens == len(rec.prompt_ids)
    assert last.usage.completion_tokens == len(rec.output_ids) == len("Hello there.") + 1


async def test_streamed_tool_call_has_openai_deltas_and_the_episode_continues():
    engine = SampleEngine()
    client = OpenAIClient(engine, TOK)
    chunks = await collect(await client.chat.completions.create(messages=QUESTION, tools=CHAT_TOOLS, stream=True))
    opening = chunks[1].choices[0].delta.tool_calls[0]
    assert (opening.index, opening.type, opening.function.name, opening.function.arguments) == (
        0, "function", "add", "")
    assert opening.id.startswith("call_") and chunks[2].choices[0].delta.tool_calls[0].id is None
    first = assemble(chunks)
    assert first["finish_reason"] == "tool_calls" and first["message"]["content"] is None
    (call,) = first["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"a": 1, "b": 2}
    assert first["message"] == client.records[0].reply  # the stream carries exactly the recorded reply
    msgs = [*QUESTION, first["message"], {"role": "tool", "tool_call_id": call["id"], "content": "3"}]
    second = assemble(await collect(await client.chat.completions.create(messages=msgs, tools=CHAT_TOOLS,
                                                                         stream=True)))
    assert second["message"]["content"] == "The sum is 3." and second["finish_reason"] == "stop"
    assert client.stats["continued"] == 1 and client.stats["template_drift"] == 0
    assert_trained_on_samples(client, engine, chains=1)


async def test_streamed_and_plain_completions_are_recorded_identically():
    clients = []
    for stream in (False, True):
        engine = SampleEngine()
        client = OpenAIClient(engine, TOK)
        msgs: list = list(QUESTION)
        for _ in range(2):
            out = await client.chat.completions.create(messages=msgs, tools=CHAT_TOOLS, stream=stream)
            reply = assemble(await collect(out))["message"] if stream else out.choices[0].message
            call_id = client.records[-1].reply.get("tool_calls", [{"id": "-"}])[0]["id"]
            msgs += [reply, {"role": "tool", "tool_call_id": call_id, "content": "3"}]
        client.set_last_reward(1.0)
        clients.append(client)
    plain, streamed = ([(r.prompt_ids, r.delta_ids, r.output_ids, r.logprobs, r.versions, r.finish_reason,
                         r.parent is not None) for r in c.records] for c in clients)
    assert plain == streamed and clients[1].stats == clients[0].stats
    for style in ("individual", "concat"):
        a, b = (c.export_trajectories(style=style) for c in clients)
        assert [(t.input_ids, t.loss_mask, t.logprobs, t.versions, t.reward) for t in a] == [
            (t.input_ids, t.loss_mask, t.logprobs, t.versions, t.reward) for t in b]


async def test_stream_logprobs_and_early_close():
    engine = SampleEngine(reply=lambda req: turn("abc"))
    client = OpenAIClient(engine, TOK)
    stream = await client.chat.completions.create(messages=QUESTION, stream=True, logprobs=True)
    chunks = await collect(stream)
    lps = chunks[-1].choices[0].logprobs.content
    assert [t.token for t in lps] == ["a", "b", "c", "<|im_end|>"]
    assert [t.logprob for t in lps] == engine.responses[0].output_logprobs
    # Closing before reading ends the stream and leaves the completion recorded (it was generated in full).
    stream = await client.chat.completions.create(messages=QUESTION, stream=True)
    async for _ in stream:
        break
    await stream.close()
    assert [c async for c in stream] == [] and len(client.records) == 2


async def test_in_process_chunks_equal_what_the_sdk_parses_from_the_proxy_bytes():
    """The in-process stream yields validated objects; the SDK parsing the SSE bytes (``.response``,
    what the proxy sends) gets equal ones."""
    client = OpenAIClient(SampleEngine(), TOK)
    stream = await client.chat.completions.create(messages=QUESTION, tools=CHAT_TOOLS, stream=True, logprobs=True,
                                                  stream_options={"include_usage": True})
    assert stream.response.headers["content-type"].startswith("text/event-stream")
    parsed = openai.AsyncStream(cast_to=ChatCompletionChunk, response=stream.response, client=client)
    assert await collect(parsed) == await collect(stream)


async def test_sdk_surface_frameworks_use_in_process():
    """with_options/copy keep recording into the client; with_raw_response wraps replies and streams."""
    client = OpenAIClient(SampleEngine(reply=lambda req: turn("hi")), TOK)
    assert client.with_options(max_retries=0) is client and client.copy(timeout=3) is client
    raw = await client.with_raw_response.chat.completions.create(messages=QUESTION)
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/json"
    completion = raw.parse()
    assert completion.choices[0].message.content == "hi"
    assert json.loads(raw.http_response.content)["id"] == completion.id
    raw = await client.chat.completions.with_raw_response.create(messages=QUESTION, stream=True)
    assert [c.choices[0].delta.content for c in await collect(raw.parse()) if c.choices][1] == "hi"
    raw = await client.with_raw_response.responses.create(input="x")
    assert raw.parse().output_text == "hi" and len(client.records) == 3
    assert getattr(client, "with_streaming_response", None) is None  # not served: frameworks fall back


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"stream": 1}, "stream must be true or false"),
     ({"stream_options": {"include_usage": True}}, "only allowed with stream=True"),
     ({"stream": True, "n": 2}, "n=2")],
)
async def test_bad_stream_parameters_fail_before_generating(kwargs, needle):
    engine = SampleEngine()
    with pytest.raises(ConfigError, match=needle):
        await OpenAIClient(engine, TOK).chat.completions.create(messages=QUESTION, **kwargs)
    assert engine.n_calls == 0


# ------------------------------------------------------------------------------------------ proxy
@pytest.fixture
async def proxy():
    engine = SampleEngine()
    async with engine, ProxyServer(engine, TOK) as server:
        yield server


@pytest.mark.integration
async def test_streamed_tool_episode_through_the_proxy(proxy):
    session = proxy.new_session()
    async with openai.AsyncOpenAI(base_url=session.base_url, api_key=session.api_key, max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(model="agentflow", messages=QUESTION, tools=CHAT_TOOLS,
                                                   stream=True, stream_options={"include_usage": True})
        chunks = await collect(stream)
        first = assemble(chunks)
        assert chunks[-1].usage.completion_tokens == len(session.client.records[0].output_ids)
        call = first["message"]["tool_calls"][0]
        msgs = [*QUESTION, first["message"], {"role": "tool", "tool_call_id": call["id"], "content": "3"}]
        second = assemble(await collect(await sdk.chat.completions.create(
            model="agentflow", messages=msgs, tools=CHAT_TOOLS, stream=True)))
    assert first["message"] == session.client.records[0].reply and first["finish_reason"] == "tool_calls"
    assert second["message"]["content"] == "The sum is 3."
    assert_trained_on_samples(session.client, proxy.engine, chains=1)


@pytest.mark.integration
async def test_proxy_sends_server_sent_events_and_json_errors(proxy):
    session = proxy.new_session()
    headers = {"Authorization": f"Bearer {session.api_key}"}
    body = {"model": "m", "messages": QUESTION, "stream": True}
    async with httpx.AsyncClient(base_url=session.base_url, headers=headers) as http:
        r = await http.post("/chat/completions", json=body)
        bad = await http.post("/chat/completions", json={**body, "seed": 3})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])
    chunks = [ChatCompletionChunk.model_validate_json(e.removeprefix("data: ")) for e in events[:-2]]
    assert assemble(chunks)["message"] == session.client.records[0].reply
    assert bad.status_code == 400 and bad.headers["content-type"] == "application/json"
    message = bad.json()["error"]["message"]
    assert "seed=3 is refused by agentflow's proxy" in message and "OpenAIClient" not in message
