"""VerifiersWorkflow: verifiers environments (single-turn, multi-turn, tools) trained through the proxy.

The environments are the packages in ``examples/verifiers/``, run by the real ``verifiers`` in its
own virtual environment (``scripts/verifiers_env.sh`` builds it; ``AGENTFLOW_VERIFIERS_PYTHON``
points at another). Without it the tests that run an environment skip and say so; the
configuration checks run everywhere.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from agentflow import ConfigError, GenerationConfig, ModelRequest, ModelResponse, RolloutConfig, WorkflowError
from agentflow.recipe.config import DataSpec, WorkflowSpec
from agentflow.testing import FakeEngine, byte_tokenizer
from agentflow.workflows.verifiers import (
    PYTHON_VARIABLE,
    VerifiersConfig,
    VerifiersWorkflow,
    default_venv,
    find_python,
    task_index,
    verifiers_rows,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENVS = str(ROOT / "examples" / "verifiers")
TOK = byte_tokenizer()
EOS = TOK.eos_token_id
NULL_HARNESS = {"agent": {"harness": {"id": "null"}, "max_turns": 3}}


def _verifiers_python() -> str | None:
    for path in (os.environ.get(PYTHON_VARIABLE), str(default_venv() / "bin" / "python")):
        if path and os.access(path, os.X_OK):
            return path
    return None


PY = _verifiers_python()
needs_verifiers = pytest.mark.skipif(
    PY is None,
    reason=f"no verifiers environment: build it with `bash scripts/verifiers_env.sh` (creates {default_venv()}/) "
    f"or set {PYTHON_VARIABLE} to a Python with verifiers installed",
)


def turn(text: str) -> list[int]:
    return [*TOK.encode(text, add_special_tokens=False), EOS]


class Recorder(FakeEngine):
    """A FakeEngine whose reply is computed from the prompt's text; keeps every response."""

    def __init__(self, reply, **kw) -> None:
        super().__init__(reply=lambda req: turn(reply(TOK.decode(req.input_ids))), **kw)
        self.responses: list[ModelResponse] = []

    async def agenerate(self, req: ModelRequest) -> ModelResponse:
        resp = await super().agenerate(req)
        self.responses.append(resp)
        return resp


def trained(traj) -> list[int]:
    return [t for t, m in zip(traj.input_ids, traj.loss_mask, strict=True) if m]


def masked_text(traj) -> str:
    return TOK.decode([t for t, m in zip(traj.input_ids, traj.loss_mask, strict=True) if not m])


def workflow(env: str, **options) -> VerifiersWorkflow:
    return VerifiersWorkflow(TOK, None, env=env, env_path=[ENVS], python=PY, **options)


# ---------------------------------------------------------------------------------------- configuration
def test_bad_options_say_what_was_expected():
    with pytest.raises(ConfigError, match=r"env must name a verifiers environment .* got ''"):
        VerifiersConfig()
    with pytest.raises(ConfigError, match="rollouts_per_example must be an integer >= 1"):
        VerifiersConfig(env="x", rollouts_per_example=0)
    with pytest.raises(ConfigError, match="give the taskset's fields as env_args"):
        VerifiersConfig(env="x", env_config={"taskset": {"num_tasks": 3}})


def test_a_missing_verifiers_environment_says_how_to_build_one(tmp_path):
    with pytest.raises(ConfigError, match=r"no Python at .*nope/bin/python.*scripts/verifiers_env\.sh"):
        find_python(str(tmp_path / "nope" / "bin" / "python"))


def test_the_recipe_knows_the_workflow_and_its_rows():
    from agentflow.recipe import build

    rows = verifiers_rows(DataSpec(task="verifiers", size=3, eval_size=2))
    assert [r["index"] for r in rows.eval] == [0, 1] and [r["index"] for r in rows.train] == [2, 3, 4]
    assert build.task_data(DataSpec(task="verifiers", size=1, eval_size=1)).train == [
        {"id": "vf-1", "index": 1, "split": "train"}
    ]
    spec = WorkflowSpec("verifiers", {"env": "vf_arithmetic", "python": sys.executable})
    wf = build.workflow(spec, TOK, None, GenerationConfig(n_samples=3))
    assert wf.n == 3 and wf.config.gconfig.n_samples == 1
    with pytest.raises(ConfigError, match=r"no Python at missing/python \(workflow\.options\.python\)"):
        build.workflow(
            WorkflowSpec("verifiers", {"env": "x", "python": "missing/python"}), TOK, None, GenerationConfig()
        )
    with pytest.raises(ConfigError, match=r"workflow\.options\.nope: unknown option of workflow 'verifiers'"):
        build.workflow(
            WorkflowSpec("verifiers", {"env": "x", "nope": 1, "python": sys.executable}), TOK, None, GenerationConfig()
        )


def test_rows_of_another_task_are_refused_with_the_fix():
    assert task_index({"index": 4, "split": "train"}) == 4
    with pytest.raises(WorkflowError, match=r"got a row with \['answer', 'prompt'\]\. Set data.task: verifiers"):
        task_index({"prompt": "1 + 1?", "answer": "2"})


# ---------------------------------------------------------------------------------------- the environments
def _sum_reply(text: str) -> str:
    a, b = re.findall(r"What is (\d) \+ (\d)\?", text)[-1]
    return str(int(a) + int(b))


@needs_verifiers
@pytest.mark.integration
@pytest.mark.timeout(300)
async def test_a_single_turn_environment_is_trained_on_exactly_the_sampled_tokens():
    engine = Recorder(_sum_reply, logprob=-0.5)
    wf = workflow("vf_arithmetic", env_config=NULL_HARNESS, rollouts_per_example=2)
    async with engine, wf:
        trajs = await wf.arun_episode(engine, {"index": 0, "split": "train"})
    assert len(trajs) == 2 and len({t.group_id for t in trajs}) == 1
    assert [t.reward for t in trajs] == [1.0, 1.0]  # the environment's rubric (`exact`) scored them
    assert sorted(trained(t) for t in trajs) == sorted(r.output_tokens for r in engine.responses)
    assert all(t.info["env_rewards"] == {"exact": 1.0} and t.info["template_drift"] == 0 for t in trajs)


def _calculator_reply(text: str) -> str:
    question = text.rsplit("What is ", 1)[-1]
    if "Result: " in question:  # the environment answered the call: give the number
        return question.rsplit("Result: ", 1)[-1].split("<")[0].strip()
    a, b = re.match(r"(\d+) \* (\d+)", question).groups()
    return f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{a} * {b}"}}}}</tool_call>'


@needs_verifiers
@pytest.mark.integration
@pytest.mark.timeout(300)
async def test_a_multi_turn_environment_chains_its_turns_and_masks_its_replies():
    engine = Recorder(_calculator_reply, logprob=-0.25)
    wf = workflow("vf_calculator", env_args={"num_heldout": 2, "num_train": 2}, tool_parser="none")
    async with engine, wf:
        (traj,) = await wf.arun_episode(engine, {"index": 1, "split": "eval"})
    assert traj.reward == 1.0 and traj.info["turns"] == 2  # call, then the number: one conversation
    assert trained(traj) == [t for r in engine.responses for t in r.output_tokens]
    assert [lp for lp, m in zip(traj.logprobs, traj.loss_mask, strict=True) if m] == [-0.25] * len(trained(traj))
    product = TOK.decode(engine.responses[1].output_tokens[:-1])
    assert f"Result: {product}" in masked_text(traj)  # the environment's turn: in the context, outside the loss
    assert traj.info["template_drift"] == 0


def _multiply_reply(text: str) -> str:
    a, b = re.findall(r"What is (\d+) \* (\d+)\?", text)[-1]
    if "<tool_response>" in text:
        return str(int(a) * int(b))
    return f'<tool_call>\n{{"name": "multiply", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call>'


@needs_verifiers
@pytest.mark.integration
@pytest.mark.timeout(300)
async def test_a_tool_environment_runs_its_tool_server_and_masks_the_result():
    engine = Recorder(_multiply_reply)
    wf = workflow("vf_tools", env_config=NULL_HARNESS)
    async with engine, wf:
        (traj,) = await wf.arun_episode(engine, {"index": 2, "split": "train"})
    assert traj.reward == 1.0 and traj.info["tool_calls"] == 1  # the MCP server multiplied
    assert trained(traj) == [t for r in engine.responses for t in r.output_tokens]
    product = TOK.decode(engine.responses[1].output_tokens[:-1])
    assert f"<tool_response>\n{product}\n</tool_response>" in masked_text(traj)
    assert '"name": "multiply"' in masked_text(traj)  # the tool's schema, rendered from the MCP server's list


# ---------------------------------------------------------------------------------------- failures
@needs_verifiers
@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_an_unknown_environment_fails_when_the_workflow_starts_quoting_verifiers():
    wf = workflow("vf_no_such_env")
    with pytest.raises(ConfigError, match=r"verifiers could not load .*'vf_no_such_env'.*not found"):
        async with wf:  # agentflow train enters the workflow before any episode
            pass
    with pytest.raises(ConfigError, match="vf_no_such_env"):  # not retried episode by episode
        await wf.arun_episode(FakeEngine(), {"index": 0})


BROKEN = """
import verifiers.v1 as vf

__all__ = ["BrokenTaskset"]


class BrokenTask(vf.Task):
    @vf.reward
    async def verdict(self, trace: vf.Trace) -> float:
        return "excellent"  # not a number


class BrokenTaskset(vf.Taskset[BrokenTask, vf.TasksetConfig]):
    def load(self):
        return [BrokenTask(vf.TaskData(prompt="Say hi."), self.config.task)]
"""


@needs_verifiers
@pytest.mark.integration
@pytest.mark.timeout(300)
async def test_a_rubric_that_returns_a_non_number_rejects_the_group_with_its_error(tmp_path):
    (tmp_path / "vf_broken").mkdir()
    (tmp_path / "vf_broken" / "__init__.py").write_text(BROKEN)
    engine = FakeEngine(rollout=RolloutConfig(max_consecutive_rejections=None))
    wf = VerifiersWorkflow(TOK, None, env="vf_broken", env_path=[str(tmp_path)], python=PY, env_config=NULL_HARNESS)
    async with engine, wf:
        with pytest.raises(WorkflowError, match=r"task 0, rollout 1 of 1 failed in the environment: .*excellent"):
            await wf.arun_episode(engine, {"index": 0})
        with pytest.raises(WorkflowError, match="asks for task 5 but verifiers environment 'vf_broken' has 1 tasks"):
            await wf.arun_episode(engine, {"index": 5})


# ---------------------------------------------------------------------------------------- agentflow train
TRAIN_CASES = {
    "single_turn": [
        "workflow.options.env=vf_arithmetic",
        "workflow.options.env_config={agent: {harness: {id: 'null'}, max_turns: 1}}",
    ],
    "multi_turn": [
        "workflow.options.env=vf_calculator",
        "workflow.options.env_args={num_heldout: 2, num_train: 8}",
        "workflow.options.tool_parser=none",
    ],
    "tools": [
        "workflow.options.env=vf_tools",
        "workflow.options.env_config={agent: {harness: {id: 'null'}, max_turns: 2}}",
    ],
}


@needs_verifiers
@pytest.mark.integration
@pytest.mark.timeout(600)
# The environments' episodes are covered above without the CLI; the end-to-end runs are slow-only
# (the default run stays under 10 minutes; CI runs -m slow after it).
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_agentflow_train_runs_a_verifiers_environment(case, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentflow",
            "train",
            str(ROOT / "examples" / "tiny.yaml"),
            "data.task=verifiers",
            "workflow.name=verifiers",
            *TRAIN_CASES[case],
            "model.path=tiny",
            "trainer.total_steps=2",
            "trainer.eval_every=0",
            "data.size=8",
            "data.eval_size=2",
            "generation.n_samples=2",
            "rollout.consumer_batch_size=2",
            "rollout.max_staleness=0",
            "generation.max_new_tokens=8",
            "inference.local.max_seq_len=2048",
            f"workflow.options.python={PY}",
            f"workflow.options.env_path=[{ENVS}]",
            f"logging.run_dir={tmp_path / 'run'}",
            "logging.progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=580,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert len(steps) == 2 and all(r["rollout/episodes"] == 2 * 2 for r in steps)
    assert all("rollout/template_drift" in r for r in steps)  # counted (the tiny model's bytes may drift)
