"""Tool registry: schemas from type hints and docstrings; calls never crash on the model's input."""

from __future__ import annotations

from typing import Literal

import pytest

from agentflow.envs.sandbox import SandboxLimits
from agentflow.envs.tools import ToolRegistry, calculator, default_tools, tool_from_function
from agentflow.errors import ConfigError, EnvError


def lookup(city: str, units: Literal["c", "f"] = "c", days: int = 1, tags: list[str] | None = None) -> str:
    """Look up the weather.

    Args:
        city: the city name.
        units: temperature units,
            Celsius or Fahrenheit.
        days: how many days ahead.
    """
    return f"{city}:{units}:{days}:{tags}"


def test_schema_from_hints_and_docstring():
    schema = tool_from_function(lookup).schema()
    assert schema["type"] == "function"
    fn = schema["function"]
    assert fn["name"] == "lookup" and fn["description"] == "Look up the weather."
    props = fn["parameters"]["properties"]
    assert props["city"] == {"type": "string", "description": "the city name."}
    assert props["units"] == {"enum": ["c", "f"], "description": "temperature units, Celsius or Fahrenheit."}
    assert props["days"]["type"] == "integer" and props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert fn["parameters"]["required"] == ["city"] and fn["parameters"]["additionalProperties"] is False


def test_untyped_or_variadic_functions_are_refused():
    with pytest.raises(ConfigError, match="no type hint"):
        tool_from_function(lambda x: x)

    def var(*args: int) -> str:
        return ""

    with pytest.raises(ConfigError, match=r"\*args"):
        tool_from_function(var)


async def test_call_validates_arguments_and_never_raises():
    reg = ToolRegistry([lookup])
    assert await reg.call("lookup", '{"city": "Oslo", "days": 3}') == "Oslo:c:3:None"
    assert await reg.call("lookup", {"city": "Oslo", "tags": ["a"]}) == "Oslo:c:1:['a']"
    cases = {
        '{"city": 5}': "argument 'city' should be string, got 5",
        '{"city": "x", "days": "3"}': "argument 'days' should be integer",
        '{"city": "x", "days": true}': "argument 'days' should be integer",
        '{"city": "x", "units": "k"}': "argument 'units' should be ['c', 'f']",
        '{"town": "x"}': "missing required argument 'city'; unexpected argument 'town'",
        "{not json": "arguments are not valid JSON",
        "[1]": "arguments must be a JSON object, got list",
    }
    for args, message in cases.items():
        out = await reg.call("lookup", args)
        assert out.startswith("Error:") and message in out, out
    assert "unknown tool 'weather'; available tools: lookup" in await reg.call("weather", "{}")


async def test_tool_exceptions_become_messages_but_env_errors_propagate():
    reg = ToolRegistry()

    @reg.register
    def boom(x: int) -> str:
        """Fails."""
        raise KeyError(x)

    @reg.register(name="infra")
    async def broken(x: int) -> str:
        """The environment fails."""
        raise EnvError("sandbox down")

    assert await reg.call("boom", {"x": 1}) == "Error: boom raised KeyError: 1"
    with pytest.raises(EnvError, match="sandbox down"):
        await reg.call("infra", {"x": 1})
    with pytest.raises(ConfigError, match="already registered"):
        reg.add(boom)
    assert reg.names == ["boom", "infra"] and "boom" in reg and len(reg) == 2


@pytest.mark.parametrize(("expression", "result"), [
    ("(12 + 7) * 3 / 2", "28.5"), ("2 ** 10", "1024"), ("7 // 2 + 7 % 2", "4"), ("-3 + +4", "1"),
    ("sqrt(16) + abs(-2)", "6"), ("round(pi, 2)", "3.14"), ("max(1, 5, 3)", "5"), ("1e3 / 8", "125"),
])
def test_calculator(expression, result):
    assert calculator(expression) == result


@pytest.mark.parametrize(("expression", "message"), [
    ("9 ** 9 ** 9", "would exceed"), ("__import__('os').system('x')", "unsupported"),
    ("(1).__class__", "unsupported"), ("open('f')", "unsupported"), ("x + 1", "unsupported"),
    ("1 / 0", "division by zero"), ("factorial(10**6)", "<= 1000"), ("(-8) ** 0.5", "complex"),
    ("1 +", "invalid syntax"), ("1" * 600, "limit is 500"),
])
async def test_calculator_refuses_unsafe_or_huge_input(expression, message):
    out = await default_tools().call("calculator", {"expression": expression})
    assert out.startswith("Error: calculator raised") and message in out, out


async def test_python_tool_runs_in_the_sandbox_and_reports_failures():
    reg = default_tools(SandboxLimits(timeout_s=1.0, memory_mb=256, max_output_bytes=4096))
    assert await reg.call("python", {"code": "print(sum(range(5)))"}) == "10"
    out = await reg.call("python", {"code": "import os\nprint(os.environ.get('HOME'))\n1/0"})
    assert "ZeroDivisionError" in out and "[status: error, exit code 1]" in out
    assert "[status: timeout" in await reg.call("python", {"code": "while True: pass"})
    assert await reg.call("python", {"code": "x = 1"}) == "(no output)"
