"""A single-turn verifiers environment: "What is 7 + 5?", reward 1 for exactly the number.

Written in verifiers' own format (a package whose ``__all__`` exports its ``Taskset``; rewards are
``@vf.reward`` methods of its ``Task``); nothing in it is agentflow's.
Taskset options (``env_args``): ``num_tasks``, ``seed``.
"""

import random

import verifiers.v1 as vf

__all__ = ["ArithmeticTaskset"]


class ArithmeticData(vf.TaskData):
    answer: str


class ArithmeticTask(vf.Task[ArithmeticData]):
    @vf.reward(weight=1.0)
    async def exact(self, trace: vf.Trace) -> float:
        return float(trace.last_reply.strip() == self.data.answer)


class ArithmeticConfig(vf.TasksetConfig):
    num_tasks: int = 100
    seed: int = 0


class ArithmeticTaskset(vf.Taskset[ArithmeticTask, ArithmeticConfig]):
    def load(self) -> list[ArithmeticTask]:
        rng = random.Random(self.config.seed)
        tasks = []
        for i in range(self.config.num_tasks):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            data = ArithmeticData(
                id=f"add-{i}", prompt=f"What is {a} + {b}? Answer with only the number.", answer=str(a + b)
            )
            tasks.append(ArithmeticTask(data, self.config.task))
        return tasks
