"""examples/agents_sdk_agent.py and examples/langchain_agent.py: framework agents as agentflow workflows,
episode by episode (token for token) and under `agentflow train`."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
from _agent_helpers import CALL, TOK, SampleEngine, turn

from agentflow import GenerationConfig
from agentflow.envs.tasks import Task

ROOT = pathlib.Path(__file__).resolve().parents[1]
CALC_CALL = CALL.replace('"add"', '"calculator"').replace('{"a": 1, "b": 2}', '{"expression": "1 + 2"}')


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def calculator_script(req) -> list[int]:
    """A calculator call to the question; the tool's result, as the answer, to the result."""
    last = TOK.decode(req.input_ids).rsplit("<|im_start|>", 2)[-2]
    if "<tool_response>" in last:
        return turn(last.split("<tool_response>\n")[1].split("\n")[0])
    return turn(CALC_CALL)


def exact(completion: str, task: Task) -> float:
    return float(completion.strip() == task.answer)


def _check(trajs, engine) -> None:
    (traj,) = trajs
    assert traj.reward == 1.0
    trained = [(t, lp) for t, lp, m in zip(traj.input_ids, traj.logprobs, traj.loss_mask, strict=True) if m]
    sampled = [(t, lp) for r in engine.responses for t, lp in zip(r.output_tokens, r.output_logprobs, strict=True)]
    assert trained == sampled and len(engine.responses) == 2  # the call, then the answer


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
async def test_the_agents_sdk_example_trains_on_the_sampled_tokens(api):
    pytest.importorskip("agents")
    workflow = _load("agents_sdk_agent").CalculatorAgent(TOK, exact, GenerationConfig(max_new_tokens=64), api=api)
    engine = SampleEngine(reply=calculator_script)
    async with engine:
        _check(await workflow.arun_episode(engine, {"prompt": "What is 1 + 2?", "answer": "3"}), engine)


@pytest.mark.parametrize("responses_api", [False, True])
async def test_the_langchain_example_trains_on_the_sampled_tokens(responses_api):
    pytest.importorskip("langchain_openai")
    workflow = _load("langchain_agent").CalculatorChain(TOK, exact, GenerationConfig(max_new_tokens=64),
                                                         responses_api=responses_api)
    engine = SampleEngine(reply=calculator_script)
    async with engine:
        _check(await workflow.arun_episode(engine, {"prompt": "What is 1 + 2?", "answer": "3"}), engine)


@pytest.mark.integration
@pytest.mark.timeout(400)
@pytest.mark.parametrize("example", ["agents_sdk", "langchain"])
def test_agentflow_train_runs_the_framework_examples(tmp_path, example):
    pytest.importorskip("agents" if example == "agents_sdk" else "langchain_openai")
    out = subprocess.run(
        [sys.executable, "-m", "agentflow", "train", f"examples/{example}.yaml", "model.path=tiny",
         "trainer.total_steps=2", "trainer.eval_every=0", "data.size=16", "rollout.consumer_batch_size=2",
         "rollout.episodes_per_item=2", "rollout.max_staleness=0", "generation.max_new_tokens=8",
         f"logging.run_dir={tmp_path / 'run'}", "logging.progress=false"],
        capture_output=True, text=True, timeout=380, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "train/loss" in r]) == 2
