"""The calculator task (envs/calculator.py) and its workflow (workflows/calculator_agent.py).

Fast: no model. The workflow runs on a scripted FakeEngine with the byte tokenizer and a plain
ChatML template like SmolLM2's (no tool schemas, no tool_calls field, any role name).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from agentflow import GenerationConfig, ModelRequest, Trajectory
from agentflow.envs.calculator import (
    DEFAULT_PROMPT,
    PROMPTS,
    PromptDesign,
    calculator_reward,
    calculator_tasks,
    final_answer_reward,
    is_heldout_pair,
    parse_tool_call,
    prompt_messages,
    result_message,
    run_calculator,
)
from agentflow.envs.tasks import Task
from agentflow.errors import ConfigError, EnvError
from agentflow.testing import FakeEngine, byte_tokenizer
from agentflow.workflows.calculator_agent import CalculatorAgentConfig, CalculatorAgentWorkflow


def call(expression: str) -> str:
    return f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}</tool_call>'


def pair(t: Task) -> frozenset[int]:
    return frozenset((t.info["a"], t.info["b"]))


# ------------------------------------------------------------------------------------ problems
def test_tasks_are_deterministic_by_seed_and_right():
    a, b = calculator_tasks(50, seed=3), calculator_tasks(50, seed=3)
    assert a == b and a != calculator_tasks(50, seed=4)
    for t in a:
        x, y = t.info["a"], t.info["b"]
        assert 10 <= x <= 99 and 10 <= y <= 99
        assert t.prompt == f"What is {x} * {y}?" and t.answer == str(x * y)
    assert len({t.id for t in a}) == 50


def test_heldout_split_is_disjoint_from_train_whatever_the_seeds():
    train = {pair(t) for seed in range(3) for t in calculator_tasks(2000, seed=seed, split="train")}
    heldout = {pair(t) for seed in range(3) for t in calculator_tasks(500, seed=seed, split="heldout")}
    assert train and heldout and not train & heldout  # unordered pairs: a*b and b*a stay together
    assert all(is_heldout_pair(*p) for p in heldout if len(p) == 2)
    assert is_heldout_pair(12, 34) == is_heldout_pair(34, 12)
    n_heldout = sum(is_heldout_pair(a, b) for a in range(10, 100) for b in range(a, 100))
    assert 300 < n_heldout < 520  # about one unordered pair in ten


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(EnvError, match="split must be"):
        calculator_tasks(1, split="test")  # type: ignore[arg-type]
    with pytest.raises(EnvError, match="n must be >= 0"):
        calculator_tasks(-1)
    with pytest.raises(EnvError, match="unknown calculator prompt design 'nope'"):
        calculator_tasks(1, prompt="nope")
    with pytest.raises(EnvError, match=r"\{result\}"):
        PromptDesign("x", "system", result_format="Result:")
    with pytest.raises(EnvError, match="result_role"):
        PromptDesign("x", "system", result_role="assistant")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_every_design_renders_system_example_question(name):
    design = PROMPTS[name]
    task = calculator_tasks(1, seed=1, split="heldout", prompt=name)[0]
    msgs = prompt_messages(task)
    assert msgs[0] == {"role": "system", "content": design.system}
    assert msgs[-1] == {"role": "user", "content": task.prompt}
    assert msgs[1:-1] == [dict(m) for m in design.example]
    assert len(msgs) == 2 + 4 * (len(design.example) // 4)
    assert result_message(task, "42")["content"] == design.result_format.format(result="42")
    assert result_message(task, "42")["role"] == design.result_role


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_worked_examples_are_correct_calls_on_train_pairs(name):
    example = PROMPTS[name].example
    for i in range(0, len(example), 4):
        question, reply, result, answer = example[i : i + 4]
        parsed = parse_tool_call(reply["content"])
        assert parsed.parsed and run_calculator(parsed.expressions[0]) == (answer["content"], True)
        assert answer["content"] in result["content"]
        a, _, b = parsed.expressions[0].split()
        assert question["content"] == f"What is {parsed.expressions[0]}?"
        assert not is_heldout_pair(int(a), int(b))  # never show a held-out problem


def test_default_design_is_one_shot():
    assert DEFAULT_PROMPT == "one_shot" and len(PROMPTS[DEFAULT_PROMPT].example) == 4
    assert calculator_tasks(1)[0].info["prompt_design"] == "one_shot"


def test_context_messages_are_validated():
    task = Task("t", "q?", "1", "sys", {"context": [{"role": "robot", "content": "x"}]})
    with pytest.raises(EnvError, match=r"info\['context'\]\[0\]"):
        prompt_messages(task)


# ------------------------------------------------------------------------------------ tool calls
@pytest.mark.parametrize(
    ("text", "attempted", "expressions", "error"),
    [
        (call("47 * 83"), True, ("47 * 83",), None),
        ("3901", False, (), None),
        ("47 * 83", False, (), None),
        ('<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}', True, (), "unbalanced"),
        ('<tool_call>{"name": "calculator", "arguments": {"square": 9}}</tool_call>', True, (), "expression"),
        ('<tool_call>{"name": "search", "arguments": {"q": "x"}}</tool_call>', True, (), "unknown tool"),
        ("<tool_call>not json</tool_call>", True, (), "not valid JSON"),
    ],
)
def test_parse_tool_call(text, attempted, expressions, error):
    out = parse_tool_call(text)
    assert out.attempted == attempted and out.expressions == expressions
    assert (out.error is None) if error is None else (error in out.error)
    assert out.parsed == bool(expressions)


def test_run_calculator_returns_errors_as_text():
    assert run_calculator("47 * 83") == ("3901", True)
    out, ok = run_calculator("47 x 83")
    assert not ok and out.startswith("Error: SyntaxError")
    assert run_calculator("1 / 0")[1] is False


# ------------------------------------------------------------------------------------ reward
def test_reward_needs_the_exact_number_and_a_successful_call():
    task = calculator_tasks(1, seed=0)[0]
    good, bad = [(task.answer, True)], [("Error: SyntaxError: x", False)]
    assert calculator_reward(task.answer, task, good) == 1.0
    assert calculator_reward(f" {task.answer}\n", task, good) == 1.0
    assert calculator_reward(f"The answer is {task.answer}.", task, good) == 0.0
    assert calculator_reward(str(int(task.answer) + 1), task, good) == 0.0
    assert calculator_reward(task.answer, task, []) == 0.0  # right number, no tool: nothing
    assert calculator_reward(task.answer, task, bad) == 0.0
    assert calculator_reward(task.answer, task, [], require_tool_call=False) == 1.0
    assert final_answer_reward(task.answer, task) == 1.0


# ------------------------------------------------------------------------------------ workflow
# A plain ChatML template like SmolLM2's: no tool schemas, no tool_calls field, any role name.
PLAIN_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOK = byte_tokenizer()
TOK.chat_template = PLAIN_CHATML
EOS = TOK.eos_token_id


def scripted(fn: Callable[[str], str], *, eos: bool = True) -> FakeEngine:
    """A FakeEngine whose reply is ``fn(decoded prompt)`` (+ eos), cut at ``max_new_tokens``."""
    def reply(req: ModelRequest) -> list[int]:
        out = fn(TOK.decode(req.input_ids, skip_special_tokens=False))
        ids = list(TOK.encode(out, add_special_tokens=False)) + ([EOS] if eos else [])
        return ids[: req.gconfig.max_new_tokens]
    return FakeEngine(reply=reply)


def text_with_mask(traj: Trajectory, mask: int) -> str:
    return TOK.decode([t for t, m in zip(traj.input_ids, traj.loss_mask, strict=True) if m == mask],
                      skip_special_tokens=False)


def calls_then_answers(task: Task, answer: str | None = None) -> Callable[[str], str]:
    a, b = task.info["a"], task.info["b"]

    def reply(prompt: str) -> str:
        asked = prompt.rsplit(task.prompt, 1)[1]  # the conversation after the question
        return answer or task.answer if "Result:" in asked else call(f"{a} * {b}")
    return reply


def workflow(n: int = 1, max_new_tokens: int = 200, **options) -> CalculatorAgentWorkflow:
    return CalculatorAgentWorkflow(TOK, GenerationConfig(n_samples=n, max_new_tokens=max_new_tokens), **options)


async def test_call_then_answer_is_rewarded_and_tool_output_is_masked():
    task = calculator_tasks(1, seed=2, split="heldout")[0]
    trajs = await workflow(n=3).arun_episode(scripted(calls_then_answers(task)), task)
    assert len(trajs) == 3 and len({t.group_id for t in trajs}) == 1
    for traj in trajs:
        info = traj.info
        assert traj.reward == 1.0 and info["turns"] == 2 and info["tool_calls"] == 1 and info["called"]
        assert info["call_attempted"] and info["call_parsed"] and info["finished"]
        assert info["template_drift"] == 0 and info["template_not_prefix"] == 0
        sampled, context = text_with_mask(traj, 1), text_with_mask(traj, 0)
        assert sampled == call(f"{task.info['a']} * {task.info['b']}") + "<|im_end|>" + task.answer + "<|im_end|>"
        assert f"<|im_start|>user\nResult: {task.answer}<|im_end|>" in context  # the tool output, mask 0
        assert info["transcript"][-1] == {"role": "assistant", "content": task.answer}


async def test_right_number_without_a_call_earns_nothing():
    task = calculator_tasks(1, seed=2)[0]
    (traj,) = await workflow().arun_episode(scripted(lambda _: task.answer), task)
    assert traj.reward == 0.0 and traj.info["turns"] == 1 and not traj.info["call_attempted"]
    assert traj.info["finished"] and traj.info["answer"] == task.answer
    (free,) = await workflow(require_tool_call=False).arun_episode(scripted(lambda _: task.answer), task)
    assert free.reward == 1.0


async def test_malformed_call_ends_the_episode_unanswered():
    task = calculator_tasks(1, seed=2)[0]
    (traj,) = await workflow().arun_episode(scripted(lambda _: "<tool_call>{oops</tool_call>"), task)
    assert traj.reward == 0.0 and traj.info["turns"] == 1
    assert traj.info["call_attempted"] and not traj.info["call_parsed"] and not traj.info["finished"]


async def test_bad_expression_comes_back_as_an_error_and_earns_nothing():
    task = calculator_tasks(1, seed=2)[0]

    def reply(prompt: str) -> str:
        return task.answer if "Result:" in prompt.rsplit(task.prompt, 1)[1] else call("47 x 83")

    (traj,) = await workflow().arun_episode(scripted(reply), task)
    assert traj.reward == 0.0 and traj.info["tool_calls"] == 1 and not traj.info["called"]
    assert "Result: Error: SyntaxError" in text_with_mask(traj, 0)


async def test_calling_forever_stops_at_max_turns():
    task = calculator_tasks(1, seed=2)[0]
    (traj,) = await workflow(max_turns=3).arun_episode(scripted(lambda _: call("1 + 1")), task)
    assert traj.info["turns"] == 3 and traj.info["tool_calls"] == 3 and not traj.info["finished"]
    assert traj.reward == 0.0


async def test_reply_cut_by_length_keeps_the_sampled_tokens_without_drift():
    task = calculator_tasks(1, seed=2)[0]
    expr = f"{task.info['a']} * {task.info['b']}"
    n_call = len(TOK.encode(call(expr), add_special_tokens=False))

    def reply(prompt: str) -> str:  # the answer is long and will be cut at max_new_tokens
        return "x" * 200 if "Result:" in prompt.rsplit(task.prompt, 1)[1] else call(expr)

    (traj,) = await workflow(max_new_tokens=n_call + 1).arun_episode(scripted(reply), task)
    assert traj.info["template_drift"] == 0 and traj.info["turns"] == 2 and traj.reward == 0.0
    assert sum(traj.loss_mask) == (n_call + 1) * 2


async def test_tool_role_design_renders_results_as_a_tool_turn():
    task = calculator_tasks(1, seed=2, prompt="one_shot_tool_role")[0]

    def reply(prompt: str) -> str:
        return task.answer if "<|im_start|>tool" in prompt.rsplit(task.prompt, 1)[1] else call("2 * 3")

    (traj,) = await workflow().arun_episode(scripted(reply), task)
    assert "<|im_start|>tool\n6<|im_end|>" in text_with_mask(traj, 0) and traj.info["template_drift"] == 0


def test_workflow_options_are_validated():
    with pytest.raises(ConfigError, match="max_turns"):
        CalculatorAgentConfig(max_turns=0)
    with pytest.raises(ConfigError, match="either config or options"):
        CalculatorAgentWorkflow(TOK, config=CalculatorAgentConfig(), max_turns=2)
    with pytest.raises(TypeError):
        CalculatorAgentWorkflow(TOK, no_such_option=1)


def test_tasks_survive_the_recipe_row_round_trip():
    """The recipe hands workflows plain dicts (``Task.from_data``); the context must survive."""
    task = calculator_tasks(1, seed=5)[0]
    row = json.loads(json.dumps({"id": task.id, "prompt": task.prompt, "answer": task.answer,
                                 "system": task.system, "info": dict(task.info)}))
    assert prompt_messages(Task.from_data(row)) == prompt_messages(task)
