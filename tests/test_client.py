"""OpenAIClient: real ChatCompletion objects, tool calls, token-in/token-out recording, export."""

from __future__ import annotations

import json

import openai
import pytest
from openai.types.chat import ChatCompletion

from agentflow import GenerationConfig, ModelRequest, OpenAIClient
from agentflow._toolcalls import ParsedOutput, QwenToolParser, ToolCall, get_tool_parser
from agentflow.errors import ConfigError, EngineTimeout, TrajectoryError
from agentflow.testing import FakeEngine, byte_tokenizer

TOK = byte_tokenizer()
EOS = TOK.eos_token_id
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


def enc(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


def turn(text: str) -> list[int]:
    """The tokens of ``text`` followed by the end-of-turn token, as a model would sample them."""
    return [*enc(text), EOS]


class Script:
    """FakeEngine reply function: returns scripted outputs in order and keeps the requests."""

    def __init__(self, *outputs: list[int]) -> None:
        self.outputs = list(outputs)
        self.requests: list[ModelRequest] = []

    def __call__(self, req: ModelRequest) -> list[int]:
        self.requests.append(req)
        return self.outputs.pop(0)


def client_for(*outputs: list[int], **kwargs) -> tuple[OpenAIClient, Script, FakeEngine]:
    script = Script(*outputs)
    engine = FakeEngine(reply=script, logprob=-0.25)
    return OpenAIClient(engine, TOK, **kwargs), script, engine


async def test_plain_completion_is_a_real_chat_completion():
    client, script, _ = client_for(turn("Hello there."))
    out = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert isinstance(out, ChatCompletion) and isinstance(client, openai.AsyncOpenAI)
    choice = out.choices[0]
    assert choice.message.content == "Hello there." and choice.message.tool_calls is None
    assert choice.finish_reason == "stop" and out.model == "m" and out.id.startswith("chatcmpl-")
    prompt = script.requests[0].input_ids
    assert TOK.decode(prompt) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == len("Hello there.") + 1
    # The round trip through JSON (what the proxy sends) validates too.
    assert ChatCompletion.model_validate_json(out.model_dump_json()) == out


async def test_length_finish_and_parameters_reach_the_engine():
    client, script, _ = client_for(enc("abcd"))
    out = await client.chat.completions.create(
        messages=[{"role": "user", "content": "x"}], temperature=0.3, top_p=0.9, max_tokens=4,
        stop=["###"], extra_body={"top_k": 5}, logprobs=True,
    )
    g = script.requests[0].gconfig
    assert (g.temperature, g.top_p, g.top_k, g.max_new_tokens, g.stop) == (0.3, 0.9, 5, 4, ("###",))
    assert g.stop_token_ids == (EOS,)
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.content == "abcd"
    lps = out.choices[0].logprobs.content
    assert [t.token for t in lps] == list("abcd") and {t.logprob for t in lps} == {-0.25}


async def test_stop_string_is_cut_from_content_but_kept_in_tokens():
    client, _, _ = client_for(enc("answer###"))
    out = await client.chat.completions.create(messages=[{"role": "user", "content": "x"}], stop="###")
    assert out.choices[0].message.content == "answer"
    assert client.get_completion(out.id).output_ids == enc("answer###")


async def test_openai_sentinels_are_treated_as_not_given():
    client, script, _ = client_for(turn("ok"), gconfig=GenerationConfig(temperature=0.7, max_new_tokens=9))
    await client.chat.completions.create(
        messages=[{"role": "user", "content": "x"}], temperature=openai.NOT_GIVEN, tools=openai.omit
    )
    g = script.requests[0].gconfig
    assert g.temperature == 0.7 and g.max_new_tokens == 9


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"stream": "yes"}, "stream must be true or false"),
        ({"stream_options": {"include_usage": True}}, "only allowed with stream=True"),
        ({"stream": True, "stream_options": {"chunk_size": 3}}, "stream_options must be"),
        ({"n": 2}, "n=2"),
        ({"seed": 1}, "seed=1"),
        ({"tool_choice": "required"}, "tool_choice='required'"),
        ({"foo": 1}, "unknown parameter 'foo'"),
        ({"max_tokens": 3, "max_completion_tokens": 4}, "disagree"),
        ({"messages": []}, "non-empty list"),
        ({"max_tokens": "many", "temperature": "hot"}, "max_tokens must be an integer"),
        ({"stop": [1]}, "stop must be"),
        ({"temperature": -1.0}, "temperature must be"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role in"),
    ],
)
async def test_unsupported_parameters_fail_loud(kwargs, needle):
    client, script, _ = client_for(enc("x"))
    kwargs = {"messages": [{"role": "user", "content": "x"}], **kwargs}
    with pytest.raises(ConfigError, match=needle):
        await client.chat.completions.create(**kwargs)
    assert script.requests == []


async def test_timeout_is_honoured():
    engine = FakeEngine(latency=5.0)
    client = OpenAIClient(engine, TOK)
    with pytest.raises(EngineTimeout, match=r"timeout=0\.01"):
        await client.chat.completions.create(messages=[{"role": "user", "content": "x"}], timeout=0.01)


# ------------------------------------------------------------------------------------------ tool calls
async def test_tool_call_is_parsed_into_openai_tool_calls():
    client, _, _ = client_for(turn("Let me add. " + CALL))
    out = await client.chat.completions.create(messages=[{"role": "user", "content": "1+2"}], tools=TOOLS)
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and msg.content == "Let me add."
    (call,) = msg.tool_calls
    assert call.type == "function" and call.function.name == "add" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"a": 1, "b": 2}
    assert client.stats["tool_calls"] == 1 and client.stats["tool_parse_failures"] == 0


async def test_tool_calls_are_not_parsed_without_tools_or_with_tool_choice_none():
    client, _, _ = client_for(turn(CALL), turn(CALL))
    a = await client.chat.completions.create(messages=[{"role": "user", "content": "x"}])
    b = await client.chat.completions.create(
        messages=[{"role": "user", "content": "x"}], tools=TOOLS, tool_choice="none"
    )
    for out in (a, b):
        assert out.choices[0].message.content == CALL and out.choices[0].message.tool_calls is None


async def test_malformed_tool_call_is_content_and_counted_and_the_episode_goes_on():
    bad = '<tool_call>\n{"name": "add", "arguments": {a: 1}\n</tool_call>'
    client, script, _ = client_for(turn(bad), turn("Sorry, 3."))
    msgs = [{"role": "user", "content": "1+2"}]
    out = await client.chat.completions.create(messages=msgs, tools=TOOLS)
    assert out.choices[0].message.content == bad and out.choices[0].message.tool_calls is None
    assert out.choices[0].finish_reason == "stop" and client.stats["tool_parse_failures"] == 1
    msgs += [out.choices[0].message, {"role": "user", "content": "Invalid tool call; answer directly."}]
    out2 = await client.chat.completions.create(messages=msgs, tools=TOOLS)
    assert out2.choices[0].message.content == "Sorry, 3." and client.stats["continued"] == 1
    first = client.get_completion(out.id)
    assert script.requests[1].input_ids[: len(first.prompt_ids) + len(first.output_ids)] == (
        first.prompt_ids + first.output_ids
    )


def test_qwen_parser_cases():
    p = QwenToolParser()
    text = 'a <tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call> b '
    two = p.parse(text + '<tool_call>{"name": "g"}</tool_call>')
    assert two.content == "a  b" and [c.name for c in two.tool_calls] == ["f", "g"]
    assert [json.loads(c.arguments) for c in two.tool_calls] == [{"x": 1}, {}] and two.error is None
    for bad, why in [
        ('<tool_call>{"name": "f"', "unbalanced"),
        ('<tool_call>{"arguments": {}}</tool_call>', "non-empty string"),
        ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "JSON object"),
        ("<tool_call>not json</tool_call>", "not valid JSON"),
    ]:
        out = p.parse(bad)
        assert out.content == bad and out.tool_calls == () and why in out.error
    assert p.parse("plain").content == "plain" and p.parse("").content is None


async def test_tool_parser_is_pluggable():
    class Upper:
        def parse(self, text: str) -> ParsedOutput:
            return ParsedOutput(content=None, tool_calls=(ToolCall(name=text.upper(), arguments="{}", id="c1"),))

    client, _, _ = client_for(turn("shout"), tool_parser=Upper())
    out = await client.chat.completions.create(messages=[{"role": "user", "content": "x"}], tools=TOOLS)
    assert out.choices[0].message.tool_calls[0].function.name == "SHOUT"
    with pytest.raises(ConfigError, match="unknown"):
        get_tool_parser("mistral-v9")
    with pytest.raises(ConfigError, match="parse"):
        get_tool_parser(42)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ token-in, token-out
async def tool_episode(client: OpenAIClient) -> list[ChatCompletion]:
    msgs: list = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2?"}]
    first = await client.chat.completions.create(messages=msgs, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    msgs += [first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "3"}]
    second = await client.chat.completions.create(messages=msgs, tools=TOOLS)
    return [first, second]


async def test_multi_turn_appends_only_the_new_messages_tokens():
    client, script, _ = client_for(turn(CALL), turn("It is 3."))
    first, _ = await tool_episode(client)
    rec1 = client.get_completion(first.id)
    p2 = script.requests[1].input_ids
    sampled = rec1.prompt_ids + rec1.output_ids
    assert p2[: len(sampled)] == sampled
    delta = TOK.decode(p2[len(sampled):])
    assert delta == "\n<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    rec2 = client.records[1]
    assert rec2.parent == rec1.id and rec2.delta_ids == p2[len(sampled):]
    assert client.stats["template_drift"] == 0 and client.stats["continued"] == 1


async def test_history_is_never_retemplated_and_drift_is_counted():
    # The model writes compact JSON; the template would render `{"name": "add", ...}` with spaces.
    compact = '<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>'
    client, script, _ = client_for(turn(compact), turn("3"))
    first, _ = await tool_episode(client)
    assert client.stats["template_drift"] == 1 and client.stats["continued"] == 1
    rec1 = client.get_completion(first.id)
    sampled = rec1.prompt_ids + rec1.output_ids
    p2 = script.requests[1].input_ids
    assert p2[: len(sampled)] == sampled  # the compact JSON the model sampled, not the re-rendered one
    assert TOK.decode(p2[len(sampled):]).startswith("\n<|im_start|>user\n<tool_response>\n3")


async def test_a_cut_reply_is_closed_by_masked_template_tokens():
    client, _, _ = client_for(enc("partial"), turn("done"), gconfig=GenerationConfig(max_new_tokens=7))
    msgs: list = [{"role": "user", "content": "x"}]
    first = await client.chat.completions.create(messages=msgs)
    assert first.choices[0].finish_reason == "length"
    msgs += [{"role": "assistant", "content": "partial"}, {"role": "user", "content": "go on"}]
    await client.chat.completions.create(messages=msgs)
    delta = TOK.decode(client.records[1].delta_ids)
    assert delta == "<|im_end|>\n<|im_start|>user\ngo on<|im_end|>\n<|im_start|>assistant\n"
    assert client.stats["template_drift"] == 0


async def test_an_edited_reply_starts_a_new_conversation():
    client, _, _ = client_for(turn("A"), turn("B"))
    msgs: list = [{"role": "user", "content": "x"}]
    await client.chat.completions.create(messages=msgs)
    await client.chat.completions.create(
        messages=[*msgs, {"role": "assistant", "content": "edited"}, {"role": "user", "content": "y"}]
    )
    assert [r.parent for r in client.records] == [None, None] and client.stats["continued"] == 0


# ------------------------------------------------------------------------------------------ export
async def test_export_individual_has_exactly_the_sampled_ids_and_rewards():
    client, script, engine = client_for(turn(CALL), turn("It is 3."))
    first = await client.chat.completions.create(messages=[{"role": "user", "content": "1+2?"}], tools=TOOLS)
    engine.set_version(3)
    msgs = [{"role": "user", "content": "1+2?"}, first.choices[0].message,
            {"role": "tool", "tool_call_id": "x", "content": "3"}]
    second = await client.chat.completions.create(messages=msgs, tools=TOOLS)
    client.set_reward(first.id, 0.5)
    client.set_last_reward(2.0)
    trajs = client.export_trajectories()
    assert [t.reward for t in trajs] == [0.5, 2.0]
    for t, req, out in zip(trajs, script.requests, (first, second), strict=True):
        rec = client.get_completion(out.id)
        assert t.input_ids == req.input_ids + rec.output_ids and t.info["completion_id"] == out.id
        p = len(req.input_ids)
        assert t.loss_mask == [0] * p + [1] * len(rec.output_ids)
        assert t.logprobs == [0.0] * p + [-0.25] * len(rec.output_ids)
    assert set(trajs[0].versions[-5:]) == {0} and set(trajs[1].versions[-5:]) == {3}
    discounted = client.export_trajectories(discount=0.5)
    assert [t.reward for t in discounted] == [0.5 + 0.5 * 2.0, 2.0]


async def test_export_concat_masks_tool_tokens_and_keeps_branches():
    client, _, _ = client_for(turn(CALL), turn("It is 3."), turn("Three."))
    first, second = await tool_episode(client)
    # A second branch from the same first turn (e.g. a retried tool), then rewards.
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2?"},
            first.choices[0].message, {"role": "tool", "tool_call_id": "x", "content": "three"}]
    third = await client.chat.completions.create(messages=msgs, tools=TOOLS)
    client.set_reward(second.id, 1.0)
    client.set_reward(third.id, -1.0)
    trajs = client.export_trajectories(style="concat")
    assert [t.reward for t in trajs] == [1.0, -1.0]
    recs = {r.id: r for r in client.records}
    r1 = recs[first.id]
    for t, leaf in zip(trajs, (second, third), strict=True):
        r2 = recs[leaf.id]
        assert t.input_ids == r2.prompt_ids + r2.output_ids
        lens = [len(r1.prompt_ids), len(r1.output_ids), len(r2.delta_ids), len(r2.output_ids)]
        assert t.loss_mask == [0] * lens[0] + [1] * lens[1] + [0] * lens[2] + [1] * lens[3]
        policy = [tok for tok, m in zip(t.input_ids, t.loss_mask, strict=True) if m]
        assert policy == r1.output_ids + r2.output_ids  # exactly the sampled ids
        assert t.info["completion_ids"] == [first.id, leaf.id]


async def test_reward_and_export_errors_are_clear():
    client, _, _ = client_for(turn("a"))
    with pytest.raises(TrajectoryError, match="no completion recorded"):
        client.set_last_reward(1.0)
    out = await client.chat.completions.create(messages=[{"role": "user", "content": "x"}])
    with pytest.raises(TrajectoryError, match="unknown completion id 'nope'"):
        client.set_reward("nope", 1.0)
    for bad in (float("nan"), "1", True):
        with pytest.raises(TrajectoryError, match="finite number"):
            client.set_reward(out.id, bad)  # type: ignore[arg-type]
    with pytest.raises(TrajectoryError, match="style"):
        client.export_trajectories(style="flat")  # type: ignore[arg-type]
    with pytest.raises(TrajectoryError, match="discount"):
        client.export_trajectories(discount=1.5)
    with pytest.raises(TrajectoryError, match="individual"):
        client.export_trajectories(discount=0.9, style="concat")
    assert client.get_reward(out.id) is None


def test_tokenizer_without_chat_template_is_refused():
    tok = byte_tokenizer()
    tok.chat_template = None
    with pytest.raises(ConfigError, match="chat_template"):
        OpenAIClient(FakeEngine(), tok)


# ------------------------------------------------------------------------------------------ real engine
async def test_local_engine_with_the_tiny_model(tiny):
    local = pytest.importorskip("agentflow.engines.local", reason="engines/local/engine.py not available")
    model, tok = tiny
    config = local.LocalEngineConfig(max_batch_size=4, max_seq_len=512)
    async with local.LocalEngine(model, tok, config=config) as engine:
        client = OpenAIClient(engine, tok, gconfig=GenerationConfig(max_new_tokens=12, temperature=1.0))
        msgs: list = [{"role": "user", "content": "hello"}]
        first = await client.chat.completions.create(messages=msgs, tools=TOOLS)
        assert isinstance(first, ChatCompletion) and first.choices[0].finish_reason in ("stop", "length")
        msgs += [first.choices[0].message, {"role": "user", "content": "again"}]
        second = await client.chat.completions.create(messages=msgs, tools=TOOLS, temperature=0)
    r1, r2 = client.records
    sampled = r1.prompt_ids + r1.output_ids
    assert r2.parent == r1.id and r2.prompt_ids[: len(sampled)] == sampled
    assert second.usage.prompt_tokens == len(r2.prompt_ids) and len(r2.output_ids) >= 1
    for rec in (r1, r2):
        assert len(rec.logprobs) == len(rec.output_ids) and all(lp <= 0 for lp in rec.logprobs)
        assert set(rec.versions) == {0}
    (traj,) = client.export_trajectories(style="concat")
    assert [t for t, m in zip(traj.input_ids, traj.loss_mask, strict=True) if m] == r1.output_ids + r2.output_ids
