"""The proxy's other APIs: Anthropic's Messages API with the real ``anthropic`` SDK, vLLM's tokens-only
route, sessions by ``X-Session-ID`` with one run key, and refused sampling parameters that say what to do."""

from __future__ import annotations

import dataclasses
import json

import httpx
import openai
import pytest
from _agent_helpers import TOK, SampleEngine, assert_trained_on_samples, turn

from agentflow.proxy import ProxyLimits, ProxyServer

anthropic = pytest.importorskip("anthropic")

TOOLS = [
    {
        "name": "add",
        "description": "a+b",
        "input_schema": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    }
]
QUESTION = [{"role": "user", "content": "What is 1+2?"}]


@pytest.fixture
async def served():
    engine = SampleEngine()
    async with engine, ProxyServer(engine, TOK) as proxy:
        yield engine, proxy


def sdk(session) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=session.root_url, api_key=session.api_key, max_retries=0)


def as_params(message) -> dict:
    """An assistant turn to send back, as an anthropic agent does (``message.content`` blocks)."""
    return {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]}


async def tool_round_trip(client, first) -> object:
    (use,) = [b for b in first.content if b.type == "tool_use"]
    result = {"type": "tool_result", "tool_use_id": use.id, "content": str(use.input["a"] + use.input["b"])}
    return await client.messages.create(
        model="m",
        max_tokens=64,
        system="You add.",
        tools=TOOLS,
        messages=[*QUESTION, as_params(first), {"role": "user", "content": [result]}],
    )


# ---------------------------------------------------------------------------------------- Messages API
async def test_anthropic_sdk_tool_round_trip_trains_on_exactly_the_sampled_tokens(served):
    engine, proxy = served
    session = proxy.new_session()
    async with sdk(session) as client:
        first = await client.messages.create(
            model="m", max_tokens=64, system="You add.", tools=TOOLS, messages=QUESTION
        )
        assert first.stop_reason == "tool_use" and first.type == "message" and first.role == "assistant"
        (use,) = first.content
        assert (use.type, use.name, use.input) == ("tool_use", "add", {"a": 1, "b": 2})
        second = await tool_round_trip(client, first)
    assert second.stop_reason == "end_turn" and second.content[0].text == "The sum is 3."
    assert second.usage.input_tokens == len(engine.responses[1].input_tokens)
    async with sdk(session) as client:  # counting renders the prompt the same way and records nothing
        counted = await client.messages.count_tokens(model="m", system="You add.", tools=TOOLS, messages=QUESTION)
    assert counted.input_tokens == len(engine.responses[0].input_tokens) and len(session.client.records) == 2
    assert second.usage.output_tokens == len(engine.responses[1].output_tokens)
    rec = session.client.records
    assert [r.id for r in rec] == [first.id, second.id] and rec[1].parent == first.id  # chained, not re-templated
    assert session.stats["template_drift"] == 0
    assert_trained_on_samples(session.client, engine, chains=1)
    (concat,) = session.export_trajectories(style="concat")
    tool_text = TOK.decode([t for t, m in zip(concat.input_ids, concat.loss_mask, strict=True) if not m])
    assert "<tool_response>\n3\n</tool_response>" in tool_text  # the tool result is masked prompt


async def test_anthropic_sdk_plain_create_and_both_streams_match_the_recording(served):
    engine, proxy = served
    engine.reply = lambda req: turn("Hello there")
    session = proxy.new_session()
    async with sdk(session) as client:
        plain = await client.messages.create(model="m", max_tokens=32, messages=[{"role": "user", "content": "hi"}])
        async with client.messages.stream(
            model="m",
            max_tokens=32,
            messages=[{"role": "user", "content": "yo"}],
            extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 5},
        ) as stream:
            texts = [t async for t in stream.text_stream]
            streamed = await stream.get_final_message()
        raw = await client.messages.create(
            model="m", max_tokens=32, stream=True, messages=[{"role": "user", "content": "hey"}]
        )
        kinds = [event.type async for event in raw]
    assert plain.content[0].text == "Hello there" and plain.stop_reason == "end_turn"
    assert "".join(texts) == "Hello there" and streamed.content[0].text == "Hello there"
    assert streamed.id == session.client.records[1].id and streamed.usage.output_tokens == len(turn("Hello there"))
    assert kinds == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert session.client.records[1].output_ids == engine.responses[1].output_tokens
    assert_trained_on_samples(session.client, engine, chains=3)


async def test_anthropic_stream_of_a_tool_call_sends_input_json_deltas(served):
    _, proxy = served
    session = proxy.new_session()
    async with (
        sdk(session) as client,
        client.messages.stream(model="m", max_tokens=64, tools=TOOLS, messages=QUESTION) as stream,
    ):
        events = [e async for e in stream]
        final = await stream.get_final_message()
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert [d.type for d in deltas] == ["input_json_delta"] and json.loads(deltas[0].partial_json) == {"a": 1, "b": 2}
    assert final.stop_reason == "tool_use" and final.content[0].input == {"a": 1, "b": 2}
    assert final.id == session.client.records[0].id


async def test_anthropic_stop_sequences_and_max_tokens_give_their_stop_reasons(served):
    engine, proxy = served
    plain_generate = engine.agenerate

    async def stop_on_strings(req):  # as a real engine: "stop" when a stop string ended the text
        resp = await plain_generate(req)
        hit = any(TOK.decode(resp.output_tokens).endswith(s) for s in req.gconfig.stop)
        return dataclasses.replace(resp, stop_reason="stop") if hit else resp

    engine.agenerate = stop_on_strings
    session = proxy.new_session()
    async with sdk(session) as client:
        engine.reply = lambda req: TOK.encode("abc END", add_special_tokens=False)
        stopped = await client.messages.create(
            model="m", max_tokens=64, stop_sequences=["END"], messages=[{"role": "user", "content": "go"}]
        )
        engine.reply = lambda req: TOK.encode("abc", add_special_tokens=False)
        cut = await client.messages.create(model="m", max_tokens=3, messages=[{"role": "user", "content": "go"}])
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "END")
    assert stopped.content[0].text == "abc "
    assert (cut.stop_reason, cut.stop_sequence) == ("max_tokens", None)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "has type 'image'"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "only custom tools"),
        ({"tool_choice": {"type": "any"}}, "tool_choice="),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking="),
        ({"max_tokens": 0}, "max_tokens is required"),
        ({"messages": [{"role": "system", "content": "x"}]}, "the system prompt goes in 'system'"),
    ],
)
async def test_anthropic_bad_input_is_a_400_in_anthropics_error_shape(served, extra, needle):
    _, proxy = served
    session = proxy.new_session()
    body = {"model": "m", "max_tokens": 16, "messages": QUESTION, **extra}
    async with sdk(session) as client:
        with pytest.raises(anthropic.BadRequestError) as info:
            await client.messages.create(**body)
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "invalid_request_error"
    assert needle in info.value.body["error"]["message"] and not session.client.records


# ---------------------------------------------------------------------------------------- tokens-only route
async def test_tokens_only_route_answers_as_vllm_and_records_token_exact_chains(served):
    engine, proxy = served
    engine.reply = lambda req: turn("ok")
    session = proxy.new_session()
    prompt = TOK.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    headers = {"Authorization": f"Bearer {session.api_key}"}
    async with httpx.AsyncClient(base_url=session.root_url, headers=headers) as http:
        r = await http.post(
            "/inference/v1/generate",
            json={
                "model": "m",
                "token_ids": prompt,
                "request_id": "rollout-1",
                "sampling_params": {"max_tokens": 16, "temperature": 1.0, "logprobs": 0, "skip_special_tokens": False},
            },
        )
        first = r.json()
        follow = [*prompt, *first["choices"][0]["token_ids"], *TOK.encode("\nagain", add_special_tokens=False)]
        second = (await http.post("/inference/v1/generate", json={"token_ids": follow, "sampling_params": {}})).json()
    assert r.status_code == 200 and first["request_id"] == "rollout-1" and first["prompt_token_ids"] == prompt
    (choice,) = first["choices"]
    sampled = engine.responses[0]
    assert choice["token_ids"] == sampled.output_tokens and choice["finish_reason"] == "stop"
    assert [c["token"] for c in choice["logprobs"]["content"]] == [f"token_id:{t}" for t in sampled.output_tokens]
    assert [c["logprob"] for c in choice["logprobs"]["content"]] == sampled.output_logprobs
    assert second["usage"]["prompt_tokens"] == len(follow)
    rec = session.client.records
    assert rec[1].parent == rec[0].id and rec[1].delta_ids == follow[len(prompt) + len(sampled.output_tokens) :]
    assert_trained_on_samples(session.client, engine, chains=1)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"token_ids": []}, "token_ids must be a non-empty list"),
        ({"token_ids": [1, 10**6]}, "token_ids[1] is 1000000; expected integers in [0, "),
        ({"token_ids": [1], "sampling_params": {"min_p": 0.1}}, "sampling parameter min_p=0.1 is refused by"),
        ({"token_ids": [1], "sampling_params": {"n": 4}}, "n=4"),
        ({"token_ids": [1], "sampling_params": {"bogus": 1}}, "sampling_params.bogus is not known"),
        ({"token_ids": [1], "stream": True}, "stream=true is not served"),
    ],
)
async def test_tokens_only_route_bad_input_names_the_field(served, body, needle):
    _, proxy = served
    session = proxy.new_session()
    async with httpx.AsyncClient(
        base_url=session.root_url, headers={"Authorization": f"Bearer {session.api_key}"}
    ) as http:
        r = await http.post("/inference/v1/generate", json=body)
    assert r.status_code == 400 and needle in r.json()["error"]["message"] and not session.client.records


# ---------------------------------------------------------------------------------------- X-Session-ID
async def test_one_run_key_and_x_session_id_reach_one_session_per_rollout(served):
    engine, proxy = served
    engine.reply = lambda req: turn("ok")
    named = proxy.new_session(header_id="rollout-a")
    async with openai.AsyncOpenAI(base_url=named.base_url, api_key=proxy.run_key, max_retries=0) as client:
        for rollout in ("rollout-a", "rollout-b", "rollout-a"):
            await client.chat.completions.create(model="m", messages=QUESTION, extra_headers={"X-Session-ID": rollout})
        with pytest.raises(openai.BadRequestError, match="X-Session-ID"):
            await client.chat.completions.create(model="m", messages=QUESTION)
    opened = proxy.session_for_header("rollout-b")
    assert len(named.client.records) == 2 and len(opened.client.records) == 1 and opened.header_id == "rollout-b"
    proxy.close_session(opened)
    with pytest.raises(Exception, match="no open session answers"):
        proxy.session_for_header("rollout-b")
    async with httpx.AsyncClient(base_url=named.root_url) as http:  # the run key over the tokens-only route too
        r = await http.post(
            "/inference/v1/generate",
            json={"token_ids": [5, 6]},
            headers={"Authorization": f"Bearer {proxy.run_key}", "X-Session-ID": "rollout-a"},
        )
    assert r.status_code == 200 and len(named.client.records) == 3


async def test_the_run_key_cannot_open_sessions_without_end():
    engine = SampleEngine(reply=lambda req: turn("ok"))
    async with engine, ProxyServer(engine, TOK, limits=ProxyLimits(max_sessions=3)) as proxy:
        headers = {"Authorization": f"Bearer {proxy.run_key}"}
        async with httpx.AsyncClient(base_url=proxy.base_url, headers=headers) as http:
            codes = [
                (
                    await http.post("/chat/completions", json={"messages": QUESTION}, headers={"X-Session-ID": f"r{i}"})
                ).status_code
                for i in range(4)
            ]
            bad = await http.post("/chat/completions", json={"messages": QUESTION}, headers={"X-Session-ID": "a\x7fb"})
    assert codes == [200, 200, 200, 413] and len(proxy.sessions) == 3
    assert bad.status_code == 400 and "printable" in bad.json()["error"]["message"]


# ---------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("param", "value"), [("min_p", 0.05), ("repetition_penalty", 1.1), ("min_tokens", 4), ("seed", 7)]
)
async def test_refused_sampling_parameters_name_the_proxy_the_parameter_and_the_fix(served, param, value):
    _, proxy = served
    session = proxy.new_session()
    async with openai.AsyncOpenAI(base_url=session.base_url, api_key=session.api_key, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="m", messages=QUESTION, extra_body={param: value})
        neutral = {"min_p": 0.0, "repetition_penalty": 1.0, "min_tokens": 0, "seed": None}[param]
        await client.chat.completions.create(model="m", messages=QUESTION, extra_body={param: neutral})
    message = info.value.body["message"]
    assert f"{param}={value!r} is refused by agentflow's proxy" in message
    assert "Accepted sampling parameters: temperature, top_p, top_k, max_tokens" in message
    assert f"remove {param} from the agent's request" in message
