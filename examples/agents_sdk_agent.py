"""An OpenAI Agents SDK agent, trained by `agentflow train` unchanged:

    pip install 'agentflow-rl[agents]'
    agentflow train examples/agents_sdk.yaml

Each episode is an `agents.Agent` with a function tool, run by `agents.Runner` over agentflow's
in-process `OpenAIClient` (the Responses API model by default; `workflow.options.api=chat_completions`
for the Chat Completions model). The client records every model call with the exact sampled
tokens; the episode's reward is the task's reward on the agent's final output. An agent run that
ends in an error the framework raises (a reply cut by the token limit, too many turns) scores 0 on
what it sampled, like a truncated answer elsewhere.
"""

from __future__ import annotations

from typing import Any, Literal

from agentflow import GenerationConfig, OpenAIClient
from agentflow.envs.tasks import Task
from agentflow.envs.tools import calculator as evaluate_expression
from agentflow.workflows.rlvr import score

INSTRUCTIONS = ("You can use a calculator. To use it, reply with only <tool_call>{\"name\": \"calculator\", "
                "\"arguments\": {\"expression\": \"...\"}}</tool_call> and you will get the result. "
                "Then answer with only the number.")


class CalculatorAgent:
    def __init__(self, tokenizer: Any, reward_fn: Any, gconfig: GenerationConfig,
                 api: Literal["responses", "chat_completions"] = "responses", max_turns: int = 3) -> None:
        import agents  # the OpenAI Agents SDK

        agents.set_tracing_disabled(True)
        self.agents, self.tokenizer, self.reward_fn = agents, tokenizer, reward_fn
        self.gconfig, self.api, self.max_turns = gconfig.new(n_samples=1), api, max_turns

    def _agent(self, client: OpenAIClient) -> Any:
        sdk = self.agents

        @sdk.function_tool
        def calculator(expression: str) -> str:
            """Evaluate an arithmetic expression such as 47 * 83."""
            return evaluate_expression(expression)

        model_cls = sdk.OpenAIResponsesModel if self.api == "responses" else sdk.OpenAIChatCompletionsModel
        return sdk.Agent(name="calculator", instructions=INSTRUCTIONS, tools=[calculator],
                         model=model_cls(model="policy", openai_client=client))

    async def arun_episode(self, engine: Any, data: Any) -> Any:
        task = Task.from_data(data)
        client = OpenAIClient(engine, self.tokenizer, gconfig=self.gconfig)
        try:
            result = await self.agents.Runner.run(self._agent(client), task.prompt, max_turns=self.max_turns)
            reward = await score(self.reward_fn, str(result.final_output), task, 10.0)
        except self.agents.exceptions.AgentsException:
            if not client.records:
                raise
            reward = 0.0  # the agent did not finish: it earns nothing for what it sampled
        client.set_last_reward(reward)
        return client.export_trajectories(style="concat")
