"""A tool-calling verifiers environment: "What is 12 * 34?" with a ``multiply`` tool (an MCP server).

Written in verifiers' own format: the taskset's ``toolsets`` start one MCP tool server for the run
(``vf_tools/server.py``, a ``vf.Toolset``); verifiers' bundled chat program (the ``null`` harness)
offers its tools to the model as OpenAI ``tools``, runs the calls the model makes and sends the
results back as ``tool`` messages. Reward 1 for exactly the product as the final reply.
Taskset options (``env_args``): ``num_tasks``, ``seed``. Run it with the ``null`` harness
(``env_config: {agent: {harness: {id: null}, max_turns: 3}}``).
"""

import random

import verifiers.v1 as vf

from vf_tools.server import MultiplyToolset

__all__ = ["MultiplyTaskset"]


class MultiplyData(vf.TaskData):
    answer: str


class MultiplyTask(vf.Task[MultiplyData]):
    @vf.reward(weight=1.0)
    async def exact(self, trace: vf.Trace) -> float:
        return float(trace.last_reply.strip() == self.data.answer)


class MultiplyConfig(vf.TasksetConfig):
    num_tasks: int = 100
    seed: int = 0
    tools: vf.SharedToolsetConfig = vf.SharedToolsetConfig()


class MultiplyTaskset(vf.Taskset[MultiplyTask, MultiplyConfig]):
    def load(self) -> list[MultiplyTask]:
        rng = random.Random(self.config.seed)
        tasks = []
        for i in range(self.config.num_tasks):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            prompt = f"What is {a} * {b}? Use the multiply tool, then answer with only the number."
            tasks.append(MultiplyTask(MultiplyData(id=f"mul-{i}", prompt=prompt, answer=str(a * b)), self.config.task))
        return tasks

    @classmethod
    def toolsets(cls, config: MultiplyConfig) -> list[vf.Toolset]:
        return [MultiplyToolset(config.tools)]
