"""``trainer.train_cpus``: the training thread runs on the CPUs named, the event loop keeps the
process's, the pool thread gets its CPUs back, and a list the process cannot use fails before the run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import threading

import pytest
from _trainer_helpers import NullTrainEngine

from agentflow import GenerationConfig, ModelRequest, RolloutConfig, Trajectory
from agentflow._data import PromptSource
from agentflow._metrics import MetricsLogger
from agentflow._trainer import Trainer, TrainerConfig
from agentflow.errors import ConfigError
from agentflow.recipe.config import load_recipe_config
from agentflow.testing import FakeEngine

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")

G = GenerationConfig(max_new_tokens=4)
REMOTE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "remote.yaml"


class _Workflow:
    async def arun_episode(self, engine, data):
        outs = await asyncio.gather(*[engine.agenerate(ModelRequest([1, 2, data["i"] % 50 + 3], G)) for _ in range(2)])
        return [Trajectory.from_response(o, reward=float(k)) for k, o in enumerate(outs)]


def _trainer(tmp_path, cpus, seen, metrics) -> Trainer:
    def step(trajs):
        seen.append((threading.get_ident(), os.sched_getaffinity(0)))
        return {"n": float(len(trajs))}

    return Trainer(
        TrainerConfig(total_steps=3, batch_timeout_s=10.0, checkpoint_every=0, weight_update="mem", train_cpus=cpus),
        engine=FakeEngine(rollout=RolloutConfig(max_staleness=1, consumer_batch_size=2, max_concurrent=4)),
        train_engine=NullTrainEngine(), train_step=step, workflow=_Workflow(),
        prompts=PromptSource([{"i": i} for i in range(100)], shuffle=False), run_dir=tmp_path, metrics=metrics,
        progress=False,
    )


async def test_the_training_thread_runs_on_its_cpus_and_the_loop_keeps_the_process(tmp_path):
    process = os.sched_getaffinity(0)
    mine = [max(process)]
    seen: list[tuple[int, set[int]]] = []
    with contextlib.closing(MetricsLogger(tmp_path)) as metrics:
        await asyncio.wait_for(_trainer(tmp_path, mine, seen, metrics).run(), 30)
    assert [cpus for _, cpus in seen] == [set(mine)] * 3
    assert os.sched_getaffinity(0) == process  # the event loop's thread
    thread = seen[0][0]
    # the training ran on a pool thread; once the run ended that thread has the process's CPUs again
    back = await asyncio.to_thread(lambda: (threading.get_ident(), os.sched_getaffinity(0)))
    if back[0] == thread:
        assert back[1] == process


async def test_without_train_cpus_nothing_is_pinned(tmp_path):
    process = os.sched_getaffinity(0)
    seen: list[tuple[int, set[int]]] = []
    with contextlib.closing(MetricsLogger(tmp_path)) as metrics:
        await asyncio.wait_for(_trainer(tmp_path, None, seen, metrics).run(), 30)
    assert [cpus for _, cpus in seen] == [process] * 3


def test_cpus_the_process_may_not_use_fail_before_the_run(tmp_path):
    outside = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ConfigError, match=rf"train_cpus=\[{outside}\] names CPUs this process may not use.*taskset"):
        with contextlib.closing(MetricsLogger(tmp_path)) as metrics:
            _trainer(tmp_path, [outside], [], metrics)


@pytest.mark.parametrize("bad", ["[]", "[1,1]", "[-1]", "[true]", "1"])
def test_a_bad_cpu_list_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="train_cpus"):
        load_recipe_config([REMOTE], [f"trainer.train_cpus={bad}"])


def test_several_ranks_refuse_one_cpu_list(tmp_path, monkeypatch):
    from agentflow.recipe.async_rl import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_recipe_config([REMOTE], [f"logging.run_dir={tmp_path / 'run'}", "trainer.train_cpus=[0]"])
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 ranks; pin each rank's process"):
        train(cfg)
