"""Tools for tool-using agents: a registry that turns typed functions into OpenAI tool schemas
and calls them with the model's arguments, plus two built-ins.

- :class:`ToolRegistry`: ``register`` a function (sync or async) with type hints and a
  Google-style docstring; :meth:`ToolRegistry.schemas` gives the OpenAI ``tools=[...]`` list
  (description from the docstring's first paragraph, parameter descriptions from ``Args:``);
  :meth:`ToolRegistry.call` validates the model's JSON arguments and always returns a string:
  bad JSON, an unknown tool, missing/unexpected/mistyped arguments or an exception raised by the
  tool become an ``"Error: ..."`` message the model can read. Only :class:`EnvError` (the
  environment itself failed, e.g. the sandbox could not start) propagates, to reject the episode.
- :func:`calculator`: arithmetic on numbers with ``+ - * / // % **``, parentheses and a few math
  functions, evaluated by walking the ``ast`` (no ``eval``), with bounds on exponent size.
- :func:`python_tool`: runs code in :mod:`agentflow.envs.sandbox` and returns its output.

Not here: the conversation loop (``workflows/tool_use.py``), tool-call parsing (the client).
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import re
import types
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from agentflow.envs.sandbox import SandboxLimits, SandboxPool, default_pool
from agentflow.errors import ConfigError, EnvError

__all__ = ["Tool", "ToolRegistry", "calculator", "default_tools", "python_tool", "tool_from_function"]

ToolFn = Callable[..., "str | Awaitable[str]"]
_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                               list: "array", tuple: "array", dict: "object"}


@dataclass(frozen=True, slots=True)
class Tool:
    """A callable the model may invoke: its name, description, JSON-schema parameters, function."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: ToolFn

    def schema(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


# ------------------------------------------------------------------------------------ schemas
def _json_schema(hint: Any) -> dict[str, Any]:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _json_schema(options[0]) if len(options) == 1 else {"anyOf": [_json_schema(a) for a in options]}
    if origin in (list, tuple, Iterable) or hint in (list, tuple):
        return {"type": "array", **({"items": _json_schema(args[0])} if args else {})}
    if origin is dict or hint is dict:
        return {"type": "object"}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    raise ConfigError(f"tool parameter type {hint!r} has no JSON-schema equivalent; expected str, int, "
                      "float, bool, list[...], dict, Literal[...] or Optional of those")


def _doc_sections(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """(description, {param: description}) from a Google-style docstring."""
    doc = inspect.getdoc(fn) or ""
    description = doc.split("\n\n")[0].replace("\n", " ").strip()
    params: dict[str, str] = {}
    m = re.search(r"^Args:\n((?:[ \t]+.*\n?)+)", doc, re.MULTILINE)
    if m:
        current = None
        for line in m.group(1).splitlines():
            head = re.match(r"\s+(\w+)(?:\s*\(.*?\))?:\s*(.*)", line)
            if head and (current is None or len(line) - len(line.lstrip()) <= 4):
                current = head.group(1)
                params[current] = head.group(2).strip()
            elif current:
                params[current] = f"{params[current]} {line.strip()}".strip()
    return description, params


def tool_from_function(fn: ToolFn, *, name: str | None = None, description: str | None = None) -> Tool:
    """Build a :class:`Tool` from a typed function; every parameter needs a type hint."""
    hints = typing.get_type_hints(fn)
    doc, param_docs = _doc_sections(fn)
    props: dict[str, Any] = {}
    required = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ConfigError(f"tool {fn.__name__}: *args/**kwargs cannot be described to the model; "
                              "expected named parameters only")
        if p.name not in hints:
            raise ConfigError(f"tool {fn.__name__}: parameter {p.name!r} has no type hint; add one")
        props[p.name] = {**_json_schema(hints[p.name]), **({"description": param_docs[p.name]}
                                                            if p.name in param_docs else {})}
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    params = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    return Tool(name or fn.__name__, description or doc or fn.__name__, params, fn)


# ------------------------------------------------------------------------------------ validation
_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _type_ok(value: Any, schema: dict[str, Any]) -> bool:
    if "enum" in schema:
        return value in schema["enum"]
    if "anyOf" in schema:
        return any(_type_ok(value, s) for s in schema["anyOf"])
    if not _CHECKS.get(schema.get("type", ""), lambda v: True)(value):
        return value is None  # Optional parameters accept null
    if schema.get("type") == "array" and "items" in schema:
        return all(_type_ok(v, schema["items"]) for v in value)
    return True


def _argument_problems(tool: Tool, args: dict[str, Any]) -> list[str]:
    props, required = tool.parameters["properties"], tool.parameters["required"]
    problems = [f"missing required argument {k!r}" for k in required if k not in args]
    problems += [f"unexpected argument {k!r} (expected one of {sorted(props)})" for k in args if k not in props]
    problems += [
        f"argument {k!r} should be {props[k].get('type', props[k].get('enum', 'valid'))}, got {json.dumps(v)[:60]}"
        for k, v in args.items() if k in props and not _type_ok(v, props[k])
    ]
    return problems


class ToolRegistry:
    """Named tools; ``call`` never raises for the model's mistakes (see the module docstring)."""

    def __init__(self, tools: Iterable[Tool | ToolFn] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, tool: Tool | ToolFn) -> Tool:
        t = tool if isinstance(tool, Tool) else tool_from_function(tool)
        if t.name in self._tools:
            raise ConfigError(f"a tool named {t.name!r} is already registered; pick another name")
        self._tools[t.name] = t
        return t

    def register(self, fn: ToolFn | None = None, *, name: str | None = None, description: str | None = None) -> Any:
        """Decorator (``@registry.register`` or ``@registry.register(name=...)``); returns ``fn``."""
        def deco(f: ToolFn) -> ToolFn:
            self.add(tool_from_function(f, name=name, description=description))
            return f
        return deco(fn) if fn is not None else deco

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self._tools.values()]

    async def call(self, name: str, arguments: str | dict[str, Any] | None) -> str:
        """Run tool ``name`` with the model's ``arguments`` (JSON text or a dict); return its output
        or an ``"Error: ..."`` string. Raises only :class:`EnvError` from the tool itself."""
        tool = self._tools.get(name)
        if tool is None:
            return f"Error: unknown tool {name!r}; available tools: {', '.join(self._tools) or 'none'}"
        args, problem = _decode_arguments(arguments)
        if problem:
            return f"Error: {problem}"
        problems = _argument_problems(tool, args)
        if problems:
            return f"Error: bad arguments for {name}: " + "; ".join(problems)
        try:
            out = tool.fn(**args)
            if inspect.isawaitable(out):
                out = await out
        except EnvError:
            raise
        except Exception as e:  # the tool failed on the model's input: tell the model
            return f"Error: {name} raised {type(e).__name__}: {e}"
        return out if isinstance(out, str) else json.dumps(out, default=str)


def _decode_arguments(arguments: str | dict[str, Any] | None) -> tuple[dict[str, Any], str | None]:
    if arguments is None or arguments == "":
        return {}, None
    if isinstance(arguments, dict):
        return arguments, None
    try:
        args = json.loads(arguments)
    except (json.JSONDecodeError, TypeError) as e:
        return {}, f"arguments are not valid JSON ({e}); expected an object like {{\"name\": value}}"
    if not isinstance(args, dict):
        return {}, f"arguments must be a JSON object, got {type(args).__name__}"
    return args, None


# ------------------------------------------------------------------------------------ calculator
_CALC_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_CALC_FUNCS: dict[str, Callable[..., Any]] = {
    "abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt, "log": math.log,
    "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan,
    "floor": math.floor, "ceil": math.ceil, "factorial": math.factorial,
}
_CALC_NAMES = {"pi": math.pi, "e": math.e}
_MAX_DIGITS = 10_000


def _calc(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CALC_NAMES:
        return _CALC_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _calc(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _CALC_BINOPS:
        left, right = _calc(node.left), _calc(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 1 and math.log10(abs(left) + 1) * abs(right) > _MAX_DIGITS:
            raise ValueError(f"result of {left} ** {right} would exceed {_MAX_DIGITS} digits")
        return _CALC_BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALC_FUNCS:
        if node.keywords:
            raise ValueError("keyword arguments are not supported")
        fn_args = [_calc(a) for a in node.args]
        if node.func.id == "factorial" and fn_args and fn_args[0] > 1000:
            raise ValueError("factorial argument must be <= 1000")
        return _CALC_FUNCS[node.func.id](*fn_args)
    raise ValueError(f"unsupported expression element {type(node).__name__}; allowed: numbers, "
                     f"+ - * / // % **, parentheses, {', '.join(sorted(_CALC_FUNCS))}, pi, e")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return the result.

    Args:
        expression: e.g. "(12 + 7) * 3 / 2" or "sqrt(2) ** 2"; supports + - * / // % **,
            parentheses, abs, round, min, max, sqrt, log, exp, sin, cos, tan, floor, ceil,
            factorial, pi and e.
    """
    if len(expression) > 500:
        raise ValueError(f"expression is {len(expression)} characters; the limit is 500")
    value = _calc(ast.parse(expression.strip(), mode="eval").body)
    if isinstance(value, complex):
        raise ValueError(f"the result {value} is complex; only real results are supported")
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


# ------------------------------------------------------------------------------------ python
def python_tool(limits: SandboxLimits | None = None, *, pool: SandboxPool | None = None) -> Tool:
    """The ``python`` tool: runs the code in the sandbox and returns stdout (and stderr, status)."""
    lim = limits or SandboxLimits(timeout_s=10.0, memory_mb=512, max_output_bytes=16 * 1024)

    async def python(code: str) -> str:
        """Run a Python script in a fresh sandbox (no network, no files kept) and return what it printed.

        Args:
            code: the complete script; print() the values you need to see.
        """
        r = await (pool or default_pool()).run(code, limits=lim)
        parts = [r.stdout.rstrip()] if r.stdout.strip() else []
        if r.stderr.strip():
            parts.append(f"[stderr]\n{r.stderr.rstrip()}")
        if r.status != "ok":
            parts.append(f"[status: {r.status}, exit code {r.exit_code}]")
        return "\n".join(parts) or "(no output)"

    return tool_from_function(python)


def default_tools(limits: SandboxLimits | None = None) -> ToolRegistry:
    """A registry with ``calculator`` and ``python``."""
    return ToolRegistry([calculator, python_tool(limits)])
