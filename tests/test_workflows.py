"""Each built-in workflow end to end: scripted FakeEngine replies first, then LocalEngine + tiny model."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable

import pytest

from agentflow import GenerationConfig, ModelRequest, RolloutConfig, Trajectory
from agentflow.envs.sandbox import SandboxLimits
from agentflow.envs.tasks import Task, arithmetic_reward, arithmetic_tasks
from agentflow.envs.tools import default_tools
from agentflow.errors import ConfigError, EnvError, WorkflowError
from agentflow.testing import FakeEngine, byte_tokenizer
from agentflow.workflows import (
    AgentConfig,
    AgentWorkflow,
    CodeExecConfig,
    CodeExecWorkflow,
    MultiTurnConfig,
    MultiTurnWorkflow,
    RLVRConfig,
    RLVRWorkflow,
    ToolUseConfig,
    ToolUseWorkflow,
)

TOK = byte_tokenizer()
EOS = TOK.eos_token_id
FAST = SandboxLimits(timeout_s=5.0, memory_mb=256, max_output_bytes=16 * 1024)


def scripted(fn: Callable[[str], str], *, eos: bool = True, rollout: RolloutConfig | None = None) -> FakeEngine:
    """A FakeEngine whose reply is ``fn(decoded prompt)`` (+ eos), recording every prompt."""
    def reply(req: ModelRequest) -> list[int]:
        engine.prompts.append(list(req.input_ids))
        out = fn(TOK.decode(req.input_ids, skip_special_tokens=False))
        return list(TOK.encode(out, add_special_tokens=False)) + ([EOS] if eos else [])
    engine = FakeEngine(reply=reply, rollout=rollout)
    engine.prompts = []  # type: ignore[attr-defined]
    return engine


def decode(ids: list[int]) -> str:
    return TOK.decode(ids, skip_special_tokens=False)


def masked_text(traj: Trajectory, mask: int) -> str:
    return decode([t for t, m in zip(traj.input_ids, traj.loss_mask, strict=True) if m == mask])


def check(traj: Trajectory) -> None:
    assert len(traj.input_ids) == len(traj.loss_mask) == len(traj.logprobs) == len(traj.versions)
    assert all((v >= 0) == (m == 1) for v, m in zip(traj.versions, traj.loss_mask, strict=True))


# ------------------------------------------------------------------------------------ RLVR
TASK = arithmetic_tasks(1, seed=3)[0]


async def test_rlvr_group_of_samples_with_rewards():
    answers = itertools.cycle([TASK.answer, "no idea", TASK.answer, "0" if TASK.answer != "0" else "1"])
    engine = scripted(lambda _: next(answers))
    wf = RLVRWorkflow(TOK, arithmetic_reward, RLVRConfig(gconfig=GenerationConfig(n_samples=4, max_new_tokens=16)))
    trajs = await wf.arun_episode(engine, TASK)
    assert len(trajs) == 4 and len({t.group_id for t in trajs}) == 1
    assert sorted(t.reward for t in trajs) == [0.0, 0.0, 1.0, 1.0]
    for t in trajs:
        check(t)
        assert masked_text(t, 0).endswith("<|im_start|>assistant\n") and TASK.prompt in masked_text(t, 0)
        assert masked_text(t, 1).endswith("<|im_end|>") and t.info["completion"] in masked_text(t, 1)


async def test_rlvr_failed_reward_is_a_rejected_sample_not_zero():
    calls = itertools.count()

    def flaky(text: str, task: Task) -> float:
        if next(calls) % 2:
            raise RuntimeError("verifier crashed")
        return 1.0

    wf = RLVRWorkflow(TOK, flaky, RLVRConfig(gconfig=GenerationConfig(n_samples=4, max_new_tokens=8)))
    trajs = await wf.arun_episode(scripted(lambda _: "7"), TASK)
    assert len(trajs) == 2 and all(t.reward == 1.0 for t in trajs)
    assert len(trajs[0].info["rejected"]) == 2 and "verifier crashed" in trajs[0].info["rejected"][0]


async def test_rlvr_reward_timeout_rejects_with_reason():
    async def slow(text: str, task: Task) -> float:
        await asyncio.sleep(10)
        return 1.0

    cfg = RLVRConfig(gconfig=GenerationConfig(n_samples=2, max_new_tokens=8), reward_timeout_s=0.05)
    with pytest.raises(EnvError, match=r"took longer than 0\.05s"):
        await RLVRWorkflow(TOK, slow, cfg).arun_episode(scripted(lambda _: "7"), TASK)


async def test_rlvr_non_numeric_reward_is_rejected():
    wf = RLVRWorkflow(TOK, lambda text, task: "1.0", RLVRConfig(gconfig=GenerationConfig(n_samples=1)))
    with pytest.raises(EnvError, match="must return a number"):
        await wf.arun_episode(scripted(lambda _: "7"), TASK)


async def test_rlvr_through_the_executor_lands_in_the_buffer():
    tasks = arithmetic_tasks(3, seed=1)
    engine = scripted(lambda prompt: next(t.answer for t in tasks if t.prompt in prompt),
                      rollout=RolloutConfig(consumer_batch_size=3, max_staleness=0))
    wf = RLVRWorkflow(TOK, arithmetic_reward, RLVRConfig(gconfig=GenerationConfig(n_samples=2, max_new_tokens=8)))
    async with engine:
        trajs = await engine.rollout(tasks, wf)
    assert len(trajs) == 6 and all(t.reward == 1.0 for t in trajs)
    assert len({t.group_id for t in trajs}) == 3


async def test_rlvr_accepts_a_plain_mapping():
    wf = RLVRWorkflow(TOK, arithmetic_reward, RLVRConfig(gconfig=GenerationConfig(n_samples=1)))
    (t,) = await wf.arun_episode(scripted(lambda _: "5"), {"question": "2+3?", "answer": "5"})
    assert t.reward == 1.0


# ------------------------------------------------------------------------------------ multi-turn
async def test_multi_turn_retries_after_feedback_with_discount():
    replies = iter(["41", "42"])
    engine = scripted(lambda _: next(replies))
    task = Task("t", "What is 6 * 7?", "42")
    wf = MultiTurnWorkflow(TOK, arithmetic_reward, MultiTurnConfig(max_turns=3, turn_discount=0.5))
    traj = await wf.arun_episode(engine, task)
    check(traj)
    assert traj.reward == 0.5 and traj.info["turns"] == 2 and traj.info["turn_rewards"] == [0.0, 1.0]
    assert masked_text(traj, 1) == "41<|im_end|>42<|im_end|>"
    text = decode(traj.input_ids)
    assert text.count("<|im_start|>user\n") == 2 and wf.config.feedback in masked_text(traj, 0)
    assert "41<|im_end|>\n<|im_start|>user\n" + wf.config.feedback in text
    # token-in, token-out: the second request is exactly the first sequence plus the feedback turn
    first, second = engine.prompts
    assert second[: len(first)] == first and traj.input_ids[: len(second)] == second


async def test_multi_turn_stops_at_first_success_and_at_max_turns():
    task = Task("t", "What is 6 * 7?", "42")
    ok = await MultiTurnWorkflow(TOK, arithmetic_reward).arun_episode(scripted(lambda _: "42"), task)
    assert ok.reward == 1.0 and ok.info["turns"] == 1
    wrong = await MultiTurnWorkflow(TOK, arithmetic_reward, MultiTurnConfig(max_turns=3)).arun_episode(
        scripted(lambda _: "0"), task)
    assert wrong.reward == 0.0 and wrong.info["turns"] == 3


def test_multi_turn_config_is_validated():
    with pytest.raises(ConfigError, match="max_turns"):
        MultiTurnConfig(max_turns=0)


# ------------------------------------------------------------------------------------ tool use
def tool_call(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


async def test_tool_use_calls_the_calculator_then_answers():
    def reply(prompt: str) -> str:
        if "<tool_response>" not in prompt:
            return tool_call("calculator", {"expression": "12 * 7"})
        return "The answer is 84."

    engine = scripted(reply)
    wf = ToolUseWorkflow(TOK, default_tools(FAST), arithmetic_reward)
    (traj,) = await wf.arun_episode(engine, Task("t", "What is 12 * 7?", "84"))
    check(traj)
    assert traj.reward == 1.0 and traj.info["tool_calls"] == 1 and traj.info["answer"] == "The answer is 84."
    assert "<tool_response>\n84\n</tool_response>" in masked_text(traj, 0)
    assert "calculator" in masked_text(traj, 0)  # the tool schema is in the system prompt
    assert masked_text(traj, 1).startswith("<tool_call>") and masked_text(traj, 1).endswith("84.<|im_end|>")


async def test_tool_use_bad_arguments_reach_the_model_as_an_error():
    def reply(prompt: str) -> str:
        if "<tool_response>" not in prompt:
            return tool_call("calculator", {"expr": "1+1"})
        if prompt.count("<tool_response>") == 1:
            return tool_call("nonexistent", {})
        return "I give up: 2"

    wf = ToolUseWorkflow(TOK, default_tools(FAST), arithmetic_reward, ToolUseConfig(style="individual"))
    trajs = await wf.arun_episode(scripted(reply), Task("t", "1+1?", "2"))
    assert len(trajs) == 3 and trajs[-1].reward == 1.0
    transcript = trajs[-1].info["transcript"]
    assert "missing required argument 'expression'" in transcript and "unknown tool 'nonexistent'" in transcript


async def test_tool_use_runs_python_in_the_sandbox():
    def reply(prompt: str) -> str:
        if "<tool_response>" not in prompt:
            return tool_call("python", {"code": "print(sum(range(10)))"})
        return "45"

    (traj,) = await ToolUseWorkflow(TOK, default_tools(FAST), arithmetic_reward).arun_episode(
        scripted(reply), Task("t", "sum of 0..9?", "45"))
    assert traj.reward == 1.0 and "<tool_response>\n45\n</tool_response>" in masked_text(traj, 0)


async def test_tool_use_stops_after_max_turns_without_an_answer():
    wf = ToolUseWorkflow(TOK, default_tools(FAST), arithmetic_reward, ToolUseConfig(max_turns=2))
    (traj,) = await wf.arun_episode(scripted(lambda _: tool_call("calculator", {"expression": "1"})),
                                    Task("t", "?", "1"))
    assert traj.reward == 0.0 and not traj.info["finished"] and traj.info["tool_calls"] == 2


# ------------------------------------------------------------------------------------ code execution
ADD_TASK = Task("add", "Write add(a, b).", "", info={"tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0",
                                                              "assert add(10, 5) == 15"]})


@pytest.mark.parametrize(("program", "fraction"), [
    ("def add(a, b):\n    return a + b", 1.0),
    ("def add(a, b):\n    return 5", 1 / 3),
    ("def add(a, b):\n    return a - b", 0.0),
    ("import sys\nsys.exit(0)", 0.0),  # exiting early does not pass the tests
    ("import os\nos._exit(0)", 0.0),
    ("print('\\n' + '0' * 32 + '[true, true, true]')", 0.0),  # a forged verdict without the nonce
    ("while True:\n    pass", 0.0),
])
async def test_code_exec_tests_mode_rewards_pass_fraction(program, fraction):
    engine = scripted(lambda _: f"Here you go:\n```python\n{program}\n```")
    cfg = CodeExecConfig(gconfig=GenerationConfig(n_samples=1, max_new_tokens=256),
                         limits=SandboxLimits(timeout_s=2.0, memory_mb=256))
    (traj,) = await CodeExecWorkflow(TOK, cfg).arun_episode(engine, ADD_TASK)
    check(traj)
    assert traj.reward == pytest.approx(fraction)


async def test_code_exec_all_pass_reward_and_io_tests():
    task = Task("echo", "Read two ints, print their sum.", "", info={"io_tests": [
        {"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"}]})
    programs = iter(["a, b = map(int, input().split())\nprint(a + b)", "print(3)"])
    engine = scripted(lambda _: f"```python\n{next(programs)}\n```")
    cfg = CodeExecConfig(reward="all", gconfig=GenerationConfig(n_samples=2, max_new_tokens=256), limits=FAST)
    trajs = await CodeExecWorkflow(TOK, cfg).arun_episode(engine, task)
    assert sorted(t.reward for t in trajs) == [0.0, 1.0] and len({t.group_id for t in trajs}) == 1
    assert sorted(t.info["passed"] for t in trajs) == [[True, False], [True, True]]


async def test_code_exec_task_without_tests_is_rejected():
    engine = scripted(lambda _: "```python\nprint(1)\n```")
    cfg = CodeExecConfig(gconfig=GenerationConfig(n_samples=1))
    with pytest.raises(ExceptionGroup) as info:
        await CodeExecWorkflow(TOK, cfg).arun_episode(engine, Task("x", "?", ""))
    assert info.group_contains(EnvError, match="has no tests")


async def test_code_exec_tir_appends_masked_output_and_continues():
    def reply(prompt: str) -> str:
        if "```output" not in prompt:
            return "Let me compute.\n```python\nprint(6 * 7)\n```\n```output"
        return "So the answer is 42."

    engine = FakeEngine(reply=lambda req: _tir_reply(req, reply))
    cfg = CodeExecConfig(mode="tir", limits=FAST, gconfig=GenerationConfig(max_new_tokens=128))
    wf = CodeExecWorkflow(TOK, cfg, reward_fn=arithmetic_reward)
    traj = await wf.arun_episode(engine, Task("t", "What is 6 * 7? Use python.", "42"))
    check(traj)
    assert traj.reward == 1.0 and traj.info["executions"] == 1
    assert "```output" in masked_text(traj, 1) and masked_text(traj, 0).endswith("\n42\n```\n")
    assert masked_text(traj, 1).endswith("So the answer is 42.<|im_end|>")


def _tir_reply(req: ModelRequest, fn: Callable[[str], str]) -> list[int]:
    out = fn(TOK.decode(req.input_ids, skip_special_tokens=False))
    tail = [] if out.endswith("```output") else [EOS]  # a stop string ends the first, eos the second
    return list(TOK.encode(out, add_special_tokens=False)) + tail


async def test_code_exec_tir_reports_errors_to_the_model():
    def reply(prompt: str) -> str:
        if "```output" not in prompt:
            return "```python\n1 / 0\n```\n```output"
        return "It failed, answer 0"

    cfg = CodeExecConfig(mode="tir", limits=FAST, gconfig=GenerationConfig(max_new_tokens=128))
    wf = CodeExecWorkflow(TOK, cfg, reward_fn=arithmetic_reward)
    traj = await wf.arun_episode(FakeEngine(reply=lambda req: _tir_reply(req, reply)), Task("t", "?", "0"))
    assert "ZeroDivisionError: division by zero [error]" in masked_text(traj, 0)


def test_code_exec_tir_needs_a_reward_fn():
    with pytest.raises(ConfigError, match="reward_fn"):
        CodeExecWorkflow(TOK, CodeExecConfig(mode="tir"))


# ------------------------------------------------------------------------------------ agent
async def test_agent_workflow_runs_an_openai_agent_and_exports():
    async def agent(client, data):
        msgs = [{"role": "user", "content": data["question"]}]
        first = await client.chat.completions.create(model="policy", messages=msgs)
        msgs += [first.choices[0].message, {"role": "user", "content": "Are you sure?"}]
        second = await client.chat.completions.create(model="policy", messages=msgs)
        return float(second.choices[0].message.content.strip() == data["answer"])

    engine = scripted(lambda _: "4")
    trajs = await AgentWorkflow(agent, TOK).arun_episode(engine, {"question": "2+2?", "answer": "4"})
    assert len(trajs) == 2 and [t.reward for t in trajs] == [0.0, 1.0]
    (concat,) = await AgentWorkflow(agent, TOK, AgentConfig(style="concat")).arun_episode(
        engine, {"question": "2+2?", "answer": "4"})
    check(concat)
    assert concat.reward == 1.0 and "Are you sure?" in masked_text(concat, 0)
    assert masked_text(concat, 1) == "4<|im_end|>4<|im_end|>"


async def test_agent_returning_none_rejects_and_no_completion_is_an_error():
    async def refuses(client, data):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        return None

    async def lazy(client, data):
        return 1.0

    assert await AgentWorkflow(refuses, TOK).arun_episode(scripted(lambda _: "x"), {}) is None
    with pytest.raises(WorkflowError, match="no chat completion"):
        await AgentWorkflow(lazy, TOK).arun_episode(scripted(lambda _: "x"), {})


async def test_agent_rewards_set_by_the_agent_are_kept():
    async def agent(client, data):
        c = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "again"}])
        client.set_reward(c.id, 0.25)
        return 1.0

    trajs = await AgentWorkflow(agent, TOK).arun_episode(scripted(lambda _: "x"), {})
    assert [t.reward for t in trajs] == [0.25, 0.0]


# ------------------------------------------------------------------------------------ tiny LocalEngine
@pytest.fixture
def local_engine(tiny):
    local = pytest.importorskip("agentflow.engines.local", reason="engines/local/engine.py not available")
    model, tok = tiny
    return local.LocalEngine(model, tok, config=local.LocalEngineConfig(max_batch_size=4, max_seq_len=2048))


async def test_rlvr_and_multi_turn_on_the_tiny_local_engine(local_engine, tiny):
    _, tok = tiny
    task = arithmetic_tasks(1, seed=0)[0]
    g = GenerationConfig(n_samples=3, max_new_tokens=8, temperature=1.0)
    async with local_engine as engine:
        trajs = await RLVRWorkflow(tok, arithmetic_reward, RLVRConfig(gconfig=g)).arun_episode(engine, task)
        mt = await MultiTurnWorkflow(tok, arithmetic_reward, MultiTurnConfig(
            max_turns=2, gconfig=GenerationConfig(max_new_tokens=6))).arun_episode(engine, task)
    assert len(trajs) == 3 and len({t.group_id for t in trajs}) == 1
    for t in [*trajs, mt]:
        check(t)
        assert t.reward in (0.0, 1.0, 0.9) and t.n_policy_tokens >= 1
        assert all(lp <= 0 for lp, m in zip(t.logprobs, t.loss_mask, strict=True) if m)


async def test_tool_use_code_exec_and_agent_on_the_tiny_local_engine(local_engine, tiny):
    _, tok = tiny
    task = Task("t", "What is 1 + 1?", "2", info={"tests": ["assert True"]})

    async def agent(client, data):
        c = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6)
        return float(bool(c.choices[0].message.content))

    g = GenerationConfig(max_new_tokens=8)
    async with local_engine as engine:
        tu = await ToolUseWorkflow(tok, default_tools(FAST), arithmetic_reward,
                                   ToolUseConfig(max_turns=2, gconfig=g)).arun_episode(engine, task)
        ce = await CodeExecWorkflow(tok, CodeExecConfig(gconfig=g.new(n_samples=2), limits=FAST)).arun_episode(
            engine, task)
        tir = await CodeExecWorkflow(tok, CodeExecConfig(mode="tir", gconfig=g, limits=FAST),
                                     reward_fn=arithmetic_reward).arun_episode(engine, task)
        ag = await AgentWorkflow(agent, tok).arun_episode(engine, {})
    for t in [*tu, *ce, tir, *ag]:
        check(t)
        assert t.n_policy_tokens >= 1
    assert len(ce) == 2 and tir.info["executions"] == 0


async def test_rlvr_truncated_samples_get_the_truncated_reward():
    from agentflow import GenerationConfig
    from agentflow.envs.tasks import Task
    from agentflow.testing import FakeEngine, byte_tokenizer
    from agentflow.workflows.rlvr import RLVRConfig, RLVRWorkflow

    tok = byte_tokenizer()
    cfg = RLVRConfig(gconfig=GenerationConfig(n_samples=2, max_new_tokens=4), truncated_reward=-1.0)
    wf = RLVRWorkflow(tok, lambda text, task: 1.0, cfg)
    async with FakeEngine(reply=lambda req: [ord("7")] * 4) as engine:  # never stops: "length"
        trajs = await wf.arun_episode(engine, Task("t", "q", "7"))
    assert [t.reward for t in trajs] == [-1.0, -1.0]
