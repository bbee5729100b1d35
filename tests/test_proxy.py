"""The OpenAI-compatible proxy: the official openai client against it, key isolation, rewards, binds."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import openai
import pytest

from agentflow import ModelRequest
from agentflow.errors import ConfigError, PromptTooLong, ServerError
from agentflow.proxy import ProxyServer
from agentflow.testing import FakeEngine, byte_tokenizer

pytestmark = pytest.mark.integration

TOK = byte_tokenizer()
EOS = TOK.eos_token_id
TOOLS = [{"type": "function", "function": {"name": "add", "description": "a+b", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
ADMIN = "admin-" + "x" * 32


def turn(text: str) -> list[int]:
    return [*TOK.encode(text, add_special_tokens=False), EOS]


def by_last_message(req: ModelRequest) -> list[int]:
    """Answer from the conversation: a tool call to a question, the result to a tool response,
    malformed JSON when asked to break."""
    text = TOK.decode(req.input_ids)
    last = text.rsplit("<|im_start|>", 2)[-2]
    if "<tool_response>" in last:
        return turn("The sum is " + last.split("<tool_response>\n")[1].split("\n")[0] + ".")
    if "break" in last:
        return turn('<tool_call>\n{"name": "add", "arguments": {a: 1}\n</tool_call>')
    return turn('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')


@pytest.fixture
async def proxy():
    engine = FakeEngine(reply=by_last_message)
    async with engine, ProxyServer(engine, TOK, admin_key=ADMIN) as server:
        yield server


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def tool_episode(session, question: str = "What is 1+2?") -> list:
    """An agent written for the OpenAI SDK: call the tool, answer, report its reward over HTTP."""
    async with openai.AsyncOpenAI(base_url=session.base_url, api_key=session.api_key, max_retries=0) as client:
        msgs: list = [{"role": "user", "content": question}]
        first = await client.chat.completions.create(model="agentflow", messages=msgs, tools=TOOLS)
        outs = [first]
        if first.choices[0].finish_reason == "tool_calls":
            call = first.choices[0].message.tool_calls[0]
            args = json.loads(call.function.arguments)
            msgs += [first.choices[0].message, {"role": "tool", "tool_call_id": call.id,
                                                "content": str(args["a"] + args["b"])}]
            outs.append(await client.chat.completions.create(model="agentflow", messages=msgs, tools=TOOLS))
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{session.base_url}/sessions/{session.id}/reward", json={"reward": 1.0},
                            headers=auth(session.api_key))
        r.raise_for_status()
    return outs


async def test_official_openai_client_runs_a_tool_episode(proxy):
    session = proxy.new_session()
    first, second = await tool_episode(session)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "add"
    assert second.choices[0].message.content == "The sum is 3." and second.choices[0].finish_reason == "stop"
    assert session.stats["continued"] == 1 and session.stats["template_drift"] == 0
    (traj,) = session.export_trajectories(style="concat")
    assert traj.reward == 1.0
    recs = session.client.records
    assert [t for t, m in zip(traj.input_ids, traj.loss_mask, strict=True) if m] == (
        recs[0].output_ids + recs[1].output_ids
    )
    assert [t.reward for t in session.export_trajectories()] == [0.0, 1.0]


async def test_models_and_session_info(proxy):
    session = proxy.new_session()
    async with openai.AsyncOpenAI(base_url=session.base_url, api_key=session.api_key) as client:
        models = await client.models.list()
    assert [m.id for m in models.data] == ["agentflow"]
    await tool_episode(session)
    async with httpx.AsyncClient() as http:
        info = (await http.get(f"{session.base_url}/sessions/{session.id}", headers=auth(session.api_key))).json()
    assert info["completion_ids"] == [r.id for r in session.client.records] and info["stats"]["completions"] == 2


async def test_keys_are_isolated(proxy):
    a, b = proxy.new_session(), proxy.new_session()
    await tool_episode(a)
    async with httpx.AsyncClient(base_url=a.base_url) as http:
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert (await http.post("/chat/completions", json=chat)).status_code == 401
        assert (await http.post("/chat/completions", json=chat, headers=auth("af-guess"))).status_code == 401
        assert (await http.get("/models", headers=auth("nope"))).status_code == 401
        # b's key cannot reward or read a's session.
        r = await http.post(f"/sessions/{a.id}/reward", json={"reward": 5.0}, headers=auth(b.api_key))
        assert r.status_code == 403 and b.id in r.json()["error"]["message"]
        assert (await http.get(f"/sessions/{a.id}", headers=auth(b.api_key))).status_code == 403
        # The admin key may reward any session but cannot chat.
        r = await http.post(f"/sessions/{a.id}/reward", json={"reward": 0.5}, headers=auth(ADMIN))
        assert r.status_code == 200
        assert (await http.post("/chat/completions", json=chat, headers=auth(ADMIN))).status_code == 403
    assert [t.reward for t in a.export_trajectories()] == [0.0, 0.5] and b.client.records == []
    proxy.close_session(a)
    async with openai.AsyncOpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError, match="revoked"):
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])


async def test_sessions_over_http_need_the_admin_key(proxy):
    async with httpx.AsyncClient(base_url=proxy.base_url) as http:
        assert (await http.post("/sessions", headers=auth(proxy.new_session().api_key))).status_code == 403
        created = (await http.post("/sessions", headers=auth(ADMIN))).json()
    assert {s.id for s in proxy.sessions} >= {created["id"]}
    (session,) = [s for s in proxy.sessions if s.id == created["id"]]
    await tool_episode(session)
    assert session.client.stats["completions"] == 2


async def test_malformed_tool_call_does_not_break_the_episode(proxy):
    session = proxy.new_session()
    async with openai.AsyncOpenAI(base_url=session.base_url, api_key=session.api_key) as client:
        msgs: list = [{"role": "user", "content": "please break"}]
        bad = await client.chat.completions.create(model="m", messages=msgs, tools=TOOLS)
        assert bad.choices[0].message.tool_calls is None and "<tool_call>" in bad.choices[0].message.content
        msgs += [bad.choices[0].message, {"role": "user", "content": "That was invalid. What is 1+2?"}]
        good = await client.chat.completions.create(model="m", messages=msgs, tools=TOOLS)
    assert good.choices[0].finish_reason == "tool_calls"
    assert session.stats["tool_parse_failures"] == 1 and session.stats["continued"] == 1


async def test_bad_requests_get_openai_errors(proxy):
    session = proxy.new_session()
    async with openai.AsyncOpenAI(base_url=session.base_url, api_key=session.api_key, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError, match=r"seed=3 is refused by agentflow's proxy"):
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], seed=3)
        with pytest.raises(openai.BadRequestError, match="unknown parameter 'foo'"):
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], extra_body={"foo": 1}
            )
    async with httpx.AsyncClient(base_url=session.base_url, headers=auth(session.api_key)) as http:
        assert (await http.post("/chat/completions", content=b"{not json")).status_code == 400
        r = await http.post(f"/sessions/{session.id}/reward", json={"reward": 1.0, "completion_id": "zzz"})
        assert r.status_code == 400 and "unknown completion id" in r.json()["error"]["message"]
        assert (await http.post(f"/sessions/{session.id}/reward", json={"score": 1})).status_code == 400


async def test_concurrent_sessions_record_only_their_own_turns(proxy):
    sessions = [proxy.new_session() for _ in range(8)]
    async with asyncio.TaskGroup() as tg:
        for i, s in enumerate(sessions):
            tg.create_task(tool_episode(s, question=f"What is 1+2? (#{i})"))
    for i, s in enumerate(sessions):
        recs = s.client.records
        assert len(recs) == 2 and f"(#{i})" in recs[0].messages[0]["content"]
        assert s.export_trajectories(style="concat")[0].reward == 1.0


async def test_serve_as_a_task_of_the_callers_task_group():
    engine = FakeEngine(reply=by_last_message)
    proxy = ProxyServer(engine, TOK)
    async with engine, asyncio.TaskGroup() as tg:
        proxy.bind()
        tg.create_task(proxy.serve())
        first, _ = await tool_episode(proxy.new_session())
        assert first.choices[0].finish_reason == "tool_calls"
        proxy.stop()


def test_non_loopback_bind_needs_an_admin_key():
    engine = FakeEngine()
    for host in ("0.0.0.0", "192.168.1.10", "example.com", "::"):
        with pytest.raises(ConfigError, match="non-loopback"):
            ProxyServer(engine, TOK, host=host)
    with pytest.raises(ConfigError, match="at least 16"):
        ProxyServer(engine, TOK, host="0.0.0.0", admin_key="short")
    ProxyServer(engine, TOK, host="0.0.0.0", admin_key=ADMIN)  # allowed, deliberately
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        ProxyServer(engine, TOK, host=host)
    with pytest.raises(ConfigError, match="not listening"):
        _ = ProxyServer(engine, TOK).base_url


async def test_accepted_connections_disable_nagle(proxy):
    """Regression: a listening socket made with proto 0 left Nagle on; with delayed ACKs every
    response then waited ~40 ms (benchmarks/bench_proxy.py: 47 ms -> 3 ms per request)."""
    session = proxy.new_session()
    async with httpx.AsyncClient(base_url=session.base_url, headers=auth(session.api_key)) as http:
        assert (await http.get("/models")).status_code == 200
        conns = list(proxy._server.server_state.connections)
        assert conns
        for conn in conns:
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.parametrize(("error", "status", "code"), [
    (PromptTooLong("prompt has 900 tokens; expected fewer than max_seq_len=512"), 400, "context_length_exceeded"),
    (ServerError("POST /generate answered 400: the input is longer than the context length", 400), 400, None),
    (ServerError("POST /generate answered 500: boom", 500), 502, None),
])
async def test_the_agents_bad_input_is_a_400_and_an_engine_failure_a_502(error, status, code):
    def reply(req: ModelRequest) -> list[int]:
        raise error

    async with FakeEngine(reply=reply) as engine, ProxyServer(engine, TOK, admin_key=ADMIN) as server:
        session = server.new_session()
        async with openai.AsyncOpenAI(base_url=session.base_url, api_key=session.api_key, max_retries=0) as client:
            with pytest.raises(openai.APIStatusError) as info:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == status and info.value.code == code
    assert str(error) in info.value.message
