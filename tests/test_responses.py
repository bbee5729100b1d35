"""The Responses API in process and through the proxy: real Response objects and stream events, the same
rendering and token-in/token-out chaining as chat completions, clear errors for what is not served."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from _agent_helpers import (
    CHAT_TOOLS,
    RESPONSES_TOOLS,
    TOK,
    SampleEngine,
    assert_trained_on_samples,
    by_last_message,
    turn,
)
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseStreamEvent,
)

from agentflow import OpenAIClient
from agentflow.client import ResponseNotFound
from agentflow.errors import ConfigError
from agentflow.proxy import ProxyServer

INSTRUCTIONS = "You add numbers with the add tool."
QUESTION = "What is 1+2?"
TEXT_EVENTS = ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
               "response.output_text.done", "response.content_part.done", "response.output_item.done"]
CALL_EVENTS = ["response.output_item.added", "response.function_call_arguments.delta",
               "response.function_call_arguments.done", "response.output_item.done"]


async def final_of(stream) -> tuple[Response, list]:
    """(the response of the terminal event, all events); checks the sequence numbers."""
    async with stream:
        events = [e async for e in stream]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    return events[-1].response, events


async def create(client, stream: bool, **kwargs) -> Response:
    out = await client.responses.create(model="agentflow", stream=stream, **kwargs)
    return (await final_of(out))[0] if stream else out


def tool_outputs(response: Response) -> list[dict]:
    return [{"type": "function_call_output", "call_id": item.call_id,
             "output": str(sum(json.loads(item.arguments).values()))}
            for item in response.output if item.type == "function_call"]


async def tool_episode(client, stream: bool, chained: bool) -> list[Response]:
    """Question -> function call -> function_call_output -> answer, with the history resent as
    items (as the Agents SDK does) or through previous_response_id."""
    kw = {"instructions": INSTRUCTIONS, "tools": RESPONSES_TOOLS}
    first = await create(client, stream, input=QUESTION, **kw)
    outputs = tool_outputs(first)
    if chained:
        second = await create(client, stream, input=outputs, previous_response_id=first.id, **kw)
    else:
        history = [{"role": "user", "content": QUESTION}, *(i.model_dump(exclude_none=True) for i in first.output)]
        second = await create(client, stream, input=[*history, *outputs], **kw)
    return [first, second]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("chained", [False, True], ids=["items", "previous_response_id"])
async def test_function_call_then_output_then_answer_in_process(stream, chained):
    engine = SampleEngine()
    client = OpenAIClient(engine, TOK)
    first, second = await tool_episode(client, stream, chained)
    assert isinstance(first, Response) and first.status == "completed" and first.instructions == INSTRUCTIONS
    (call,) = first.output
    assert isinstance(call, ResponseFunctionToolCall) and call.name == "add" and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"a": 1, "b": 2}
    (msg,) = second.output
    assert isinstance(msg, ResponseOutputMessage) and msg.content[0].type == "output_text"
    assert second.output_text == "The sum is 3." and second.status == "completed"
    recs = client.records
    assert [r.id for r in recs] == [first.id, second.id] and recs[1].parent == first.id
    assert second.usage.input_tokens == len(recs[1].prompt_ids) and second.usage.output_tokens == len(
        recs[1].output_ids)
    # The function output entered the prompt as masked tokens after the recorded ones.
    assert TOK.decode(recs[1].delta_ids) == "\n<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n" \
                                           "<|im_start|>assistant\n"
    assert client.stats["template_drift"] == 0
    assert_trained_on_samples(client, engine, chains=1)


async def test_streamed_events_are_the_sequence_the_agents_sdk_consumes():
    engine = SampleEngine(reply=lambda req: turn("Let me add. " + '<tool_call>\n{"name": "add", "arguments": '
                                                  '{"a": 1, "b": 2}}\n</tool_call>'))
    client = OpenAIClient(engine, TOK)
    final, events = await final_of(await client.responses.create(input=QUESTION, tools=RESPONSES_TOOLS, stream=True))
    assert [e.type for e in events] == ["response.created", "response.in_progress", *TEXT_EVENTS, *CALL_EVENTS,
                                        "response.completed"]
    assert isinstance(events[-1], ResponseCompletedEvent) and final.id == client.records[0].id
    msg, call = final.output
    deltas = {e.type: e for e in events}
    assert deltas["response.output_text.delta"].delta == "Let me add." == msg.content[0].text
    assert deltas["response.output_text.delta"].item_id == msg.id
    assert deltas["response.function_call_arguments.delta"].delta == call.arguments
    assert deltas["response.function_call_arguments.done"].output_index == 1
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert added[1].name == "add" and added[1].arguments == "" and added[1].call_id == call.call_id


async def test_text_and_call_items_resent_as_history_continue_the_conversation():
    """A reply of text + call comes back as a message item and a function_call item: they are one
    assistant turn, so the next request continues the recorded tokens."""
    def reply(req):
        return by_last_message(req) if "<tool_response>" in TOK.decode(req.input_ids) else turn(
            "Let me add.<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call>")

    engine = SampleEngine(reply=reply)
    client = OpenAIClient(engine, TOK)
    first = await client.responses.create(input=QUESTION, tools=RESPONSES_TOOLS)
    assert [item.type for item in first.output] == ["message", "function_call"]
    history = [{"role": "user", "content": QUESTION}, *(i.model_dump(exclude_none=True) for i in first.output)]
    second = await client.responses.create(input=[*history, *tool_outputs(first)], tools=RESPONSES_TOOLS)
    assert second.output_text == "The sum is 3." and client.stats["template_drift"] == 0
    assert_trained_on_samples(client, engine, chains=1)


async def test_in_process_events_equal_what_the_sdk_parses_from_the_proxy_bytes():
    client = OpenAIClient(SampleEngine(reply=lambda req: turn("Let me add.<tool_call>\n{\"name\": \"add\", "
                                                                  "\"arguments\": {\"a\": 1}}\n</tool_call>")), TOK)
    stream = await client.responses.create(input=QUESTION, tools=RESPONSES_TOOLS, stream=True,
                                           include=["message.output_text.logprobs"])
    parsed = openai.AsyncStream(cast_to=ResponseStreamEvent, response=stream.response, client=client)
    sdk_events, (_, events) = [e async for e in parsed], await final_of(stream)
    assert [type(e) for e in sdk_events] == [type(e) for e in events] and sdk_events == events


async def test_responses_and_chat_render_the_same_prompt_tokens():
    """The Responses mapping goes through the chat template exactly as the chat messages would."""
    prompts = []
    for api in ("chat", "responses"):
        engine = SampleEngine()
        client = OpenAIClient(engine, TOK)
        if api == "responses":
            await tool_episode(client, stream=False, chained=False)
        else:
            msgs = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
            first = await client.chat.completions.create(messages=msgs, tools=CHAT_TOOLS)
            call = first.choices[0].message.tool_calls[0]
            msgs += [first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "3"}]
            await client.chat.completions.create(messages=msgs, tools=CHAT_TOOLS)
        prompts.append([r.input_tokens for r in engine.responses])
    assert prompts[0] == prompts[1]


async def test_input_items_roles_and_content_parts():
    engine = SampleEngine(reply=lambda req: turn("ok"))
    client = OpenAIClient(engine, TOK)
    items = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be terse."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi "}, {"type": "input_text", "text": "there"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Hello", "annotations": []}]},
        {"role": "user", "content": "Bye"},
    ]
    out = await client.responses.create(input=items, instructions="sys", max_output_tokens=7, temperature=0.5,
                                        top_p=0.9, include=["message.output_text.logprobs"], store=False)
    prompt = TOK.decode(engine.responses[0].input_tokens)
    assert prompt == ("<|im_start|>system\nsys<|im_end|>\n<|im_start|>developer\nBe terse.<|im_end|>\n"
                      "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
                      "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert (out.max_output_tokens, out.temperature, out.top_p, out.store) == (7, 0.5, 0.9, False)
    assert [lp.logprob for lp in out.output[0].content[0].logprobs] == engine.responses[0].output_logprobs
    with pytest.raises(ConfigError, match=r"previous_response_id=.* is unknown"):  # store=False: not kept
        await client.responses.create(input="again", previous_response_id=out.id)


async def test_cut_reply_is_incomplete():
    def cut(req):  # as an engine does: at most max_new_tokens, no end-of-turn token -> "length"
        return turn("a long answer")[: req.gconfig.max_new_tokens]

    client = OpenAIClient(SampleEngine(reply=cut), TOK)
    out = await client.responses.create(input=QUESTION, max_output_tokens=4)
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    assert out.output_text == "a lo"
    final, events = await final_of(await client.responses.create(input=QUESTION, max_output_tokens=4, stream=True))
    assert events[-1].type == "response.incomplete" and final.status == "incomplete"


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"tools": [{"type": "web_search"}]}, ["tools[0] has type 'web_search'", "function tools only"]),
        ({"reasoning": {"effort": "high"}}, ["reasoning=", "chat_template_kwargs"]),
        ({"background": True}, ["background=True", "foreground"]),
        ({"include": ["reasoning.encrypted_content"]}, ["include=", "message.output_text.logprobs"]),
        ({"n": 2}, ["n is not a Responses parameter"]),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}}, ["text=", "Structured output"]),
        ({"tool_choice": "required"}, ["tool_choice='required'", "'auto', 'none'"]),
        ({"input": [{"type": "reasoning", "id": "r", "summary": []}]}, ["input[0] has type 'reasoning'",
                                                                        "function_call_output"]),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         ["input[0].content[0] has type 'input_image'", "input_text"]),
        ({"input": [{"role": "tool", "content": "x"}]}, ["role 'tool'"]),
        ({"previous_response_id": "resp_nope"}, ["previous_response_id='resp_nope' is unknown"]),
        ({"max_output_tokens": "many"}, ["max_output_tokens must be an integer"]),
        ({"stream_options": {"include_obfuscation": False}}, ["only allowed with stream=True"]),
        ({"frobnicate": 1}, ["unknown Responses parameter 'frobnicate'"]),
    ],
)
async def test_unsupported_requests_name_the_parameter(kwargs, needles):
    engine = SampleEngine()
    client = OpenAIClient(engine, TOK)
    with pytest.raises(ConfigError) as err:
        await client.responses.create(**{"input": QUESTION, **kwargs})
    for needle in needles:
        assert needle in str(err.value)
    assert engine.n_calls == 0


# ------------------------------------------------------------------------------------------ proxy
@pytest.fixture
async def proxy():
    engine = SampleEngine()
    async with engine, ProxyServer(engine, TOK) as server:
        yield server


@pytest.mark.integration
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("chained", [False, True], ids=["items", "previous_response_id"])
async def test_function_call_episode_through_the_proxy(proxy, stream, chained):
    session = proxy.new_session()
    async with openai.AsyncOpenAI(base_url=session.base_url, api_key=session.api_key, max_retries=0) as sdk:
        first, second = await tool_episode(sdk, stream, chained)
    assert first.output[0].type == "function_call" and second.output_text == "The sum is 3."
    assert [r.id for r in session.client.records] == [first.id, second.id]
    async with httpx.AsyncClient() as http:  # rewards address responses by their id
        r = await http.post(f"{session.base_url}/sessions/{session.id}/reward", json={
            "reward": 1.0, "completion_id": second.id}, headers={"Authorization": f"Bearer {session.api_key}"})
        r.raise_for_status()
    (traj,) = session.export_trajectories(style="concat")
    assert traj.reward == 1.0
    assert_trained_on_samples(session.client, proxy.engine, chains=1)


@pytest.mark.integration
async def test_proxy_sends_response_events_and_names_itself_in_errors(proxy):
    session = proxy.new_session()
    other = proxy.new_session()
    headers = {"Authorization": f"Bearer {session.api_key}"}
    async with httpx.AsyncClient(base_url=session.base_url, headers=headers) as http:
        r = await http.post("/responses", json={"model": "m", "input": QUESTION, "stream": True})
        bad = await http.post("/responses", json={"model": "m", "input": QUESTION, "tools": [{"type": "file_search"}]})
    assert r.headers["content-type"].startswith("text/event-stream")
    blocks = r.text.removesuffix("\n\n").split("\n\n")
    assert [b.split("\n")[0] for b in blocks[:2]] == ["event: response.created", "event: response.in_progress"]
    last_event, last_data = blocks[-1].split("\n")
    assert last_event == "event: response.completed"
    assert json.loads(last_data.removeprefix("data: "))["response"]["id"] == session.client.records[0].id
    assert bad.status_code == 400
    message = bad.json()["error"]["message"]
    assert "agentflow's proxy serves function tools only" in message and "OpenAIClient" not in message
    # previous_response_id resolves within its session only.
    async with openai.AsyncOpenAI(base_url=other.base_url, api_key=other.api_key, max_retries=0) as sdk:
        with pytest.raises(openai.BadRequestError, match="is unknown to agentflow's proxy"):
            await sdk.responses.create(model="m", input="x", previous_response_id=session.client.records[0].id)


async def test_stored_responses_are_retrieved_and_deleted_in_process():
    async with SampleEngine() as engine:
        client = OpenAIClient(engine, TOK)
        first = await create(client, False, input=QUESTION, tools=RESPONSES_TOOLS)
        unstored = await create(client, False, input=QUESTION, store=False)
        assert await client.responses.retrieve(first.id) == first
        with pytest.raises(ResponseNotFound, match="is unknown to agentflow's OpenAIClient"):
            await client.responses.retrieve(unstored.id)
        with pytest.raises(ConfigError, match="'stream' is not supported"):
            await client.responses.retrieve(first.id, stream=True)
        assert await client.responses.delete(first.id) is None
        with pytest.raises(ConfigError, match=r"previous_response_id=.* is unknown"):
            await create(client, False, input=tool_outputs(first), previous_response_id=first.id)
        assert [r.id for r in client.records] == [first.id, unstored.id]  # deleting keeps what was recorded


@pytest.mark.integration
async def test_stored_responses_through_the_proxy_stay_in_their_session(proxy):
    session, other = proxy.new_session(), proxy.new_session()
    async with (openai.AsyncOpenAI(base_url=session.base_url, api_key=session.api_key, max_retries=0) as sdk,
                openai.AsyncOpenAI(base_url=other.base_url, api_key=other.api_key, max_retries=0) as stranger):
        first = await create(sdk, True, input=QUESTION, tools=RESPONSES_TOOLS)
        got = await sdk.responses.retrieve(first.id)
        assert isinstance(got, Response) and got.id == first.id and got.output == first.output
        with pytest.raises(openai.NotFoundError, match="is unknown to agentflow's proxy"):
            await stranger.responses.retrieve(first.id)
        await sdk.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.delete(first.id)
