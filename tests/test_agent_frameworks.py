"""Agent frameworks on agentflow, in process and through the proxy: the OpenAI Agents SDK (Responses and
Chat Completions models, Runner.run and Runner.run_streamed) and LangChain's ChatOpenAI (chat and
Responses, ainvoke and astream, bind_tools). Each episode calls a tool and answers; the exported
trajectories must train on exactly the tokens and log-probs the engine sampled, as one conversation."""

from __future__ import annotations

import contextlib

import openai
import pytest
from _agent_helpers import TOK, SampleEngine, assert_trained_on_samples

from agentflow import OpenAIClient
from agentflow.errors import ConfigError
from agentflow.proxy import ProxyServer

QUESTION = "What is 1+2?"
ANSWER = "The sum is 3."


@contextlib.asynccontextmanager
async def served(where: str):
    """(engine, recording client, what the agent gets): the client itself, or an SDK client on a proxy session."""
    engine = SampleEngine()
    if where == "in_process":
        yield engine, OpenAIClient(engine, TOK), None
        return
    async with ProxyServer(engine, TOK) as proxy:
        session = proxy.new_session()
        yield engine, session.client, session


WHERE = ["in_process", pytest.param("proxy", marks=pytest.mark.integration)]  # the proxy runs a server


# ------------------------------------------------------------------------------------------ OpenAI Agents SDK
@pytest.fixture(scope="module")
def agents():
    sdk = pytest.importorskip("agents", reason="the OpenAI Agents SDK (openai-agents) is not installed")
    sdk.set_tracing_disabled(True)
    return sdk


def calculator(agents, model, calls: list):
    @agents.function_tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    return agents.Agent(name="calculator", instructions="Use the add tool.", tools=[add], model=model)


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("api", ["responses", "chat_completions"])
@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
async def test_openai_agents_sdk(agents, where, api, streamed):
    async with served(where) as (engine, client, session):
        sdk = client if session is None else openai.AsyncOpenAI(
            base_url=session.base_url, api_key=session.api_key, max_retries=0)
        model_cls = agents.OpenAIResponsesModel if api == "responses" else agents.OpenAIChatCompletionsModel
        calls: list = []
        agent = calculator(agents, model_cls(model="agentflow", openai_client=sdk), calls)
        if streamed:
            result = agents.Runner.run_streamed(agent, QUESTION)
            deltas = [e.data.delta async for e in result.stream_events()
                      if e.type == "raw_response_event" and e.data.type == "response.output_text.delta"]
            assert "".join(deltas) == ANSWER
        else:
            result = await agents.Runner.run(agent, QUESTION)
        if session is not None:
            await sdk.close()
    assert result.final_output == ANSWER and calls == [(1, 2)]
    assert client.stats["continued"] == 1 and client.stats["tool_calls"] == 1
    assert_trained_on_samples(client, engine, chains=1)


# ------------------------------------------------------------------------------------------ LangChain
@pytest.fixture(scope="module")
def langchain():
    chat_models = pytest.importorskip("langchain_openai", reason="langchain-openai is not installed")
    messages = pytest.importorskip("langchain_core.messages", reason="langchain-core is not installed")
    tools = pytest.importorskip("langchain_core.tools")
    return chat_models, messages, tools


def chat_openai(langchain, client: OpenAIClient, session, responses_api: bool, http):
    chat_models = langchain[0]
    common = {"model": "agentflow", "use_responses_api": responses_api, "max_retries": 0}
    if session is not None:
        return chat_models.ChatOpenAI(base_url=session.base_url, api_key=session.api_key,
                                      http_async_client=http, **common)
    # In process: the agentflow client is the async client (sync calls are not served).
    return chat_models.ChatOpenAI(api_key="unused", async_client=client.chat.completions,
                                  root_async_client=client, **common)


async def langchain_episode(langchain, llm, streamed: bool):
    _, messages, tools = langchain
    calls: list = []

    @tools.tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    bound = llm.bind_tools([add])
    history = [messages.HumanMessage(QUESTION)]
    for _ in range(3):
        if streamed:
            ai = None
            async for chunk in bound.astream(history):
                ai = chunk if ai is None else ai + chunk
        else:
            ai = await bound.ainvoke(history)
        history.append(ai)
        if not ai.tool_calls:
            return ai, calls
        for tc in ai.tool_calls:
            history.append(messages.ToolMessage(str(add.invoke(tc["args"])), tool_call_id=tc["id"]))
    raise AssertionError("the episode did not end")


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("api", ["chat_completions", "responses"])
@pytest.mark.parametrize("streamed", [False, True], ids=["ainvoke", "astream"])
async def test_langchain_chat_openai(langchain, where, api, streamed):
    async with served(where) as (engine, client, session), openai.DefaultAsyncHttpxClient() as http:
        llm = chat_openai(langchain, client, session, api == "responses", http)
        final, calls = await langchain_episode(langchain, llm, streamed)
    assert final.text == ANSWER and calls == [(1, 2)]
    assert client.stats["continued"] == 1
    assert_trained_on_samples(client, engine, chains=1)


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
async def test_agents_sdk_settings_agentflow_cannot_honour_fail_clearly(agents, api):
    """A structured output type needs constrained decoding: the error names the parameter and the fix."""
    pydantic = pytest.importorskip("pydantic")

    class Sum(pydantic.BaseModel):
        value: int

    async with served("in_process") as (engine, client, _):
        model_cls = agents.OpenAIResponsesModel if api == "responses" else agents.OpenAIChatCompletionsModel
        agent = agents.Agent(name="calculator", output_type=Sum, model=model_cls(model="m", openai_client=client))
        with pytest.raises(ConfigError) as err:
            await agents.Runner.run(agent, QUESTION)
    param = "text=" if api == "responses" else "response_format="
    assert param in str(err.value) and "output type" in str(err.value) and engine.n_calls == 0
