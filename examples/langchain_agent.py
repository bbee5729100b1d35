"""A LangChain agent (ChatOpenAI with a bound tool), trained by `agentflow train` unchanged:

    pip install 'agentflow-rl[agents]'
    agentflow train examples/langchain.yaml

Each episode runs a short tool loop with `langchain_openai.ChatOpenAI` whose async client is
agentflow's in-process `OpenAIClient` (`workflow.options.responses_api=true` for LangChain's
Responses API path): call the model with the tool bound, run the tool calls, call again, until it
answers. The client records the exact sampled tokens; the reward is the task's reward on the
final answer. Only async LangChain calls are served in process (`ainvoke`, `astream`).
"""

from __future__ import annotations

from typing import Any

from agentflow import GenerationConfig, OpenAIClient
from agentflow.envs.tasks import Task
from agentflow.envs.tools import calculator as evaluate_expression
from agentflow.workflows.rlvr import score

SYSTEM = ("You can use a calculator. To use it, reply with only <tool_call>{\"name\": \"calculator\", "
          "\"arguments\": {\"expression\": \"...\"}}</tool_call> and you will get the result. "
          "Then answer with only the number.")


class CalculatorChain:
    def __init__(self, tokenizer: Any, reward_fn: Any, gconfig: GenerationConfig,
                 responses_api: bool = False, max_turns: int = 3) -> None:
        from langchain_core import messages, tools
        from langchain_openai import ChatOpenAI

        self.messages, self.ChatOpenAI = messages, ChatOpenAI
        self.tokenizer, self.reward_fn = tokenizer, reward_fn
        self.gconfig, self.responses_api, self.max_turns = gconfig.new(n_samples=1), responses_api, max_turns

        @tools.tool
        def calculator(expression: str) -> str:
            """Evaluate an arithmetic expression such as 47 * 83."""
            return evaluate_expression(expression)

        self.tool = calculator

    async def _answer(self, llm: Any, question: str) -> str:
        m = self.messages
        history: list[Any] = [m.SystemMessage(SYSTEM), m.HumanMessage(question)]
        for _ in range(self.max_turns):
            reply = await llm.ainvoke(history)
            history.append(reply)
            if not reply.tool_calls:
                return reply.text
            history += [m.ToolMessage(self.tool.invoke(call["args"]), tool_call_id=call["id"])
                        for call in reply.tool_calls]
        return ""

    async def arun_episode(self, engine: Any, data: Any) -> Any:
        task = Task.from_data(data)
        client = OpenAIClient(engine, self.tokenizer, gconfig=self.gconfig)
        llm = self.ChatOpenAI(model="policy", api_key="unused", async_client=client.chat.completions,
                              root_async_client=client, use_responses_api=self.responses_api, max_retries=0,
                              max_tokens=self.gconfig.max_new_tokens)
        answer = await self._answer(llm.bind_tools([self.tool]), task.prompt)
        client.set_last_reward(await score(self.reward_fn, answer, task, 10.0))
        return client.export_trajectories(style="concat")
