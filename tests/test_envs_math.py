"""Answer extraction and math_reward (inline fast path, math-verify in the process pool)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agentflow.envs import math as m
from agentflow.errors import EnvError


@pytest.mark.parametrize(("text", "expected"), [
    ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\sqrt{2}}", "\\sqrt{2}"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("#### 1,234.", "1234"),
    ("The answer is 42.", "42"),
    ("The answer is: $7$", "7"),
    ("I think 3, then maybe -5.5", "-5.5"),
    ("no numbers here", None),
    ("\\boxed{unclosed", None),
])
def test_extract_answer(text, expected):
    assert m.extract_answer(text) == expected


def test_numbers_equal_is_none_for_non_numbers():
    assert m.numbers_equal("1,000", "1000.0") is True
    assert m.numbers_equal("3", "4") is False
    assert m.numbers_equal("\\frac{1}{2}", "0.5") is None


async def test_math_reward_numeric_fast_path():
    assert await m.math_reward("The answer is 72.", "72") == 1.0
    assert await m.math_reward("#### 71", "72") == 0.0
    assert await m.math_reward("\\boxed{ x + 1 }", "x+1") == 1.0


async def test_math_reward_symbolic_uses_math_verify_without_blocking_the_loop():
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async with asyncio.TaskGroup() as tg:
        t = tg.create_task(ticker())
        got = await m.math_reward("so \\boxed{0.5}", "\\frac{1}{2}", timeout_s=60)
        wrong = await m.math_reward("so \\boxed{\\frac{2}{3}}", "\\frac{1}{2}", timeout_s=60)
        t.cancel()
    assert (got, wrong) == (1.0, 0.0)
    assert ticks > 0  # the loop kept running while the worker verified


async def test_math_reward_timeout_raises_env_error_not_zero():
    m._verifier_pool()  # warm the pool so the deadline measures verification only
    with pytest.raises(EnvError, match="timeout_s=1e-06"):
        await m.math_reward("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", timeout_s=1e-6)


def test_math_verify_equal_refuses_unparsable_reference():
    with pytest.raises(EnvError, match="could not parse the reference"):
        m.math_verify_equal("\\boxed{1}", "$$")


async def test_math_reward_from_a_worker_thread():
    # math-verify's signal.alarm would fail outside the main thread; the pool runs it elsewhere
    out: list[float] = []

    def in_thread():
        out.append(asyncio.run(m.math_reward("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", timeout_s=60)))

    t = threading.Thread(target=in_thread)
    t.start()
    await asyncio.to_thread(t.join)
    assert out == [1.0]
