"""Built-in datasets: arithmetic, countdown, GSM8K JSONL; their rewards."""

from __future__ import annotations

import json

import pytest

from agentflow.envs.tasks import (
    Task,
    arithmetic_reward,
    arithmetic_tasks,
    countdown_reward,
    countdown_tasks,
    gsm8k_reward,
    load_gsm8k_jsonl,
)
from agentflow.errors import ConfigError, EnvError


def test_arithmetic_is_deterministic_and_verifiable():
    a, b = arithmetic_tasks(20, seed=5), arithmetic_tasks(20, seed=5)
    assert a == b and a != arithmetic_tasks(20, seed=6)
    for t in a:
        x, y = t.info["a"], t.info["b"]
        assert 0 <= x <= 9 and 0 <= y <= 9 and t.answer == str(x + y)
        assert t.prompt.endswith("Answer with only the number.")
        assert arithmetic_reward(t.answer, t) == 1.0
        assert arithmetic_reward(str(int(t.answer) + 1), t) == 0.0
    assert arithmetic_reward("no number", a[0]) == 0.0


def test_arithmetic_digits_and_ops():
    tasks = arithmetic_tasks(50, seed=0, digits=2, ops=("-", "*"))
    assert {t.info["op"] for t in tasks} == {"-", "*"}
    assert all(10 <= t.info["a"] <= 99 for t in tasks)
    assert all(int(t.answer) == eval(f"{t.info['a']} {t.info['op']} {t.info['b']}") for t in tasks)
    with pytest.raises(EnvError, match="ops from"):
        arithmetic_tasks(1, ops=("^",))


def test_countdown_instances_are_solvable_by_their_reference():
    tasks = countdown_tasks(30, seed=2, n_numbers=4)
    assert tasks == countdown_tasks(30, seed=2, n_numbers=4)
    for t in tasks:
        assert len(t.info["numbers"]) == 4 and t.info["target"] > 0
        assert countdown_reward(f"<answer>{t.answer}</answer>", t) == 1.0


@pytest.mark.parametrize(("completion", "reward"), [
    ("<answer>(3 + 5) * 2</answer>", 1.0),
    ("think... <answer>3*5+2-1</answer>", 1.0),
    ("<answer>(3 + 5) * 2 = 16</answer>", 1.0),
    ("<answer>8 * 2</answer>", 0.0),  # 8 is not given
    ("<answer>(3 + 3) * 2 + 4</answer>", 0.0),  # 3 used twice
    ("<answer>__import__('os')</answer>", 0.0),
    ("<answer>2 ** 4</answer>", 0.0),  # ** is not allowed
    ("<answer>5 / 0</answer>", 0.0),
    ("I can't", 0.0),
])
def test_countdown_reward_checks_numbers_and_value(completion, reward):
    task = Task("c", "", "", info={"numbers": [3, 5, 2, 1], "target": 16})
    assert countdown_reward(completion, task) == reward


def test_gsm8k_loader_reads_questions_and_final_answers(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [{"question": "Natalia sold 48 clips and half as many more. Total?", "answer": "48/2 = 24\n#### 72"},
            {"question": "q2", "answer": "#### 1,000"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    tasks = load_gsm8k_jsonl(path, instruction="Put the answer after ####.")
    assert [t.answer for t in tasks] == ["72", "1000"]
    assert tasks[0].prompt.endswith("Put the answer after ####.") and tasks[0].info["solution"].endswith("72")


@pytest.mark.parametrize(("line", "message"), [
    ('{"question": "q", "answer": "no marker"}', r"gsm\.jsonl:2: the answer has no '#### <final answer>'"),
    ('{"question": "q"}', r"gsm\.jsonl:2: missing or non-string field\(s\) \['answer'\]"),
    ("not json", r"gsm\.jsonl:2: not valid JSON"),
    ("[1, 2]", r"gsm\.jsonl:2: expected a JSON object, got list"),
])
def test_gsm8k_loader_names_file_and_line_of_bad_rows(tmp_path, line, message):
    path = tmp_path / "gsm.jsonl"
    path.write_text('{"question": "ok", "answer": "#### 1"}\n' + line + "\n")
    with pytest.raises(EnvError, match=message):
        load_gsm8k_jsonl(path)


def test_gsm8k_loader_missing_or_empty_file(tmp_path):
    with pytest.raises(EnvError, match="does not exist"):
        load_gsm8k_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EnvError, match="no examples"):
        load_gsm8k_jsonl(tmp_path / "empty.jsonl")


async def test_gsm8k_reward():
    t = Task("g", "q", "72")
    assert await gsm8k_reward("so it is 72.\n#### 72", t) == 1.0
    assert await gsm8k_reward("#### 70", t) == 0.0


def test_task_from_mapping():
    t = Task.from_data({"question": "q?", "answer": 5, "tests": ["assert 1"]})
    assert (t.prompt, t.answer, t.info["tests"]) == ("q?", "5", ["assert 1"])
    assert t.messages() == [{"role": "user", "content": "q?"}]
    with pytest.raises(EnvError, match="'prompt'"):
        Task.from_data({"answer": 1})


def test_exact_and_shaped_answer_rewards():
    from agentflow.envs.tasks import Task, exact_answer_reward, shaped_answer_reward

    t = Task("a", "What is 2 + 9? Answer with only the number.", "11")
    assert exact_answer_reward(" 11\n", t) == 1.0 and exact_answer_reward("11.", t) == 0.0
    assert shaped_answer_reward("11", t) == 1.0
    assert shaped_answer_reward("11.", t) == pytest.approx(0.45)
    assert shaped_answer_reward("2 + 9 = 11", t) == pytest.approx(0.1)
    assert shaped_answer_reward("The answer is 11.", t) == 0.0  # right, but buried in text
    assert shaped_answer_reward("12", t) == 0.0


def test_an_eval_size_beyond_the_distinct_problems_is_refused_at_start():
    from agentflow.recipe import load_recipe_config
    from agentflow.recipe.build import task_data

    cfg = load_recipe_config(overrides=["data.task=addition", "data.eval_size=100000"])
    with pytest.raises(ConfigError, match=r"data.eval_size=100000 is larger than the 100 distinct problems of "
                                          r"data.task='addition'; expected at most 100.*Lower data.eval_size"):
        task_data(cfg.data)
    cfg = load_recipe_config(overrides=["data.task=arithmetic", "data.eval_size=500",
                                        "data.options={digits: 1, ops: ['+', '-']}"])
    with pytest.raises(ConfigError, match=r"larger than the 200 distinct problems"):
        task_data(cfg.data)
    assert len(task_data(load_recipe_config(overrides=["data.task=addition", "data.eval_size=100"]).data).eval) == 100
