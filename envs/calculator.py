"""The calculator task: two-digit multiplication that a small model solves only with a tool call.

An episode is a short conversation: the model is asked "What is 47 * 83?", calls the calculator
(``<tool_call>{"name": "calculator", "arguments": {"expression": "47 * 83"}}</tool_call>``, the
Qwen/Hermes format that :mod:`agentflow._toolcalls` parses), gets the result back as a *user* turn
(``Result: 3901``; SmolLM2's chat template has no tool role and does not render tool schemas, so
the tool is described in the system prompt), then answers with only the number. Success needs at
least two model turns.

- :func:`calculator_tasks`: ``n`` problems, deterministic by seed, from the ``train`` or the
  ``heldout`` split. The splits are disjoint by construction: an unordered pair ``{a, b}`` belongs
  to exactly one split (a CRC32 hash of the pair), so ``a * b`` and ``b * a`` never straddle them,
  whatever the seeds.
- :data:`PROMPTS` / :class:`PromptDesign`: system prompt, worked-example turns and the format of the
  tool's result. :data:`DEFAULT_PROMPT` (``one_shot``) is the chosen design; the others are the
  alternatives measured against it (``benchmarks/bench_tool_task.py``).
- :func:`prompt_messages`: the chat messages of a task (system, worked example, question).
- :func:`parse_tool_call` / :func:`run_calculator`: one turn's call, and the tool's answer.
- :func:`calculator_reward`: 1.0 only if a calculator call returned a number during the episode AND
  the final answer is exactly the right number; :func:`final_answer_reward` is the answer check alone
  (a :data:`~agentflow.envs.tasks.RewardFn`).

Not here: the conversation loop (``workflows/calculator_agent.py``), the calculator itself
(:func:`agentflow.envs.tools.calculator`), registration in the recipe's task list.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from agentflow._toolcalls import QwenToolParser
from agentflow.envs.tasks import Task
from agentflow.envs.tools import calculator
from agentflow.errors import EnvError

__all__ = [
    "DEFAULT_PROMPT",
    "PROMPTS",
    "SYSTEM_PROMPT",
    "PromptDesign",
    "ToolCallTurn",
    "calculator_reward",
    "calculator_tasks",
    "final_answer_reward",
    "is_heldout_pair",
    "parse_tool_call",
    "prompt_messages",
    "result_message",
    "run_calculator",
]

Split = Literal["train", "heldout"]
_LO, _HI = 10, 99  # two-digit operands
_HELDOUT_BUCKETS = 10  # one pair in ten is held out (about 410 of the 4,095 unordered pairs)


# ------------------------------------------------------------------------------------ problems
def is_heldout_pair(a: int, b: int) -> bool:
    """Whether the unordered pair ``{a, b}`` is in the held-out split (stable across runs and Pythons)."""
    lo, hi = sorted((a, b))
    return zlib.crc32(f"{lo}*{hi}".encode()) % _HELDOUT_BUCKETS == 0


def _split_pairs(split: Split) -> list[tuple[int, int]]:
    if split not in ("train", "heldout"):
        raise EnvError(f"split must be 'train' or 'heldout', got {split!r}")
    want = split == "heldout"
    return [(a, b) for a in range(_LO, _HI + 1) for b in range(_LO, _HI + 1) if is_heldout_pair(a, b) == want]


def calculator_tasks(
    n: int, *, seed: int = 0, split: Split = "train", prompt: str | PromptDesign = "one_shot"
) -> list[Task]:
    """``n`` problems ``"What is a * b?"`` with ``a, b`` in [10, 99], drawn with replacement from
    ``split`` by ``seed``. Each Task carries the prompt design's system message and, in
    ``info["context"]``, its worked-example turns; render with :func:`prompt_messages`."""
    if n < 0:
        raise EnvError(f"calculator_tasks: n must be >= 0, got {n}")
    design = _design(prompt)
    pairs = _split_pairs(split)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.choice(pairs)
        info = {"a": a, "b": b, "op": "*", "split": split, "prompt_design": design.name,
                "context": [dict(m) for m in design.example], "result_format": design.result_format,
                "result_role": design.result_role}
        out.append(Task(f"calc-{split}-{seed}-{i}", f"What is {a} * {b}?", str(a * b), design.system, info))
    return out


# ------------------------------------------------------------------------------------ prompts
SYSTEM_PROMPT = (
    'You can use a calculator. To use it, reply with only <tool_call>{"name": "calculator", "arguments": '
    '{"expression": "..."}}</tool_call> and you will get the result. Then answer with only the number.'
)


def _call(expression: str) -> str:
    return f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}</tool_call>'


def _worked(question: str, expression: str, result_format: str = "Result: {result}",
            result_role: str = "user") -> tuple[dict[str, str], ...]:
    """One worked example: question -> call -> result -> the number, as four chat turns."""
    result = calculator(expression)
    return (
        {"role": "user", "content": question},
        {"role": "assistant", "content": _call(expression)},
        {"role": result_role, "content": result_format.format(result=result)},
        {"role": "assistant", "content": result},
    )


@dataclass(frozen=True, slots=True)
class PromptDesign:
    """How a calculator task is put to the model.

    Attributes:
        name: the key in :data:`PROMPTS`.
        system: the system message (describes the tool: SmolLM2's template ignores ``tools=``).
        example: worked-example chat turns shown before the question.
        result_format: the turn carrying the tool's output; ``{result}`` is replaced.
        result_role: its role: ``user`` (default) or ``tool`` (SmolLM2's template renders any role
            name as ``<|im_start|>tool``, a role the model never saw in training).
    """

    name: str
    system: str
    example: tuple[Mapping[str, str], ...] = ()
    result_format: str = "Result: {result}"
    result_role: Literal["user", "tool"] = "user"

    def __post_init__(self) -> None:
        problems = []
        if "{result}" not in self.result_format:
            problems.append(f"result_format must contain '{{result}}', got {self.result_format!r}")
        if self.result_role not in ("user", "tool"):
            problems.append(f"result_role must be 'user' or 'tool', got {self.result_role!r}")
        if problems:
            raise EnvError("; ".join(problems))


# The worked examples use fixed pairs from the train split (checked in tests), never a held-out one.
_MUL_1 = _worked("What is 23 * 41?", "23 * 41")
_MUL_2 = _worked("What is 67 * 18?", "67 * 18")
_ADD_1 = _worked("What is 352 + 479?", "352 + 479")

PROMPTS: dict[str, PromptDesign] = {
    d.name: d
    for d in (
        PromptDesign("zero_shot", SYSTEM_PROMPT),
        PromptDesign("one_shot", SYSTEM_PROMPT, _MUL_1),
        PromptDesign("two_shot", SYSTEM_PROMPT, _MUL_1 + _MUL_2),
        PromptDesign("one_shot_add", SYSTEM_PROMPT, _ADD_1),
        PromptDesign("one_shot_tool_role", SYSTEM_PROMPT, _worked("What is 23 * 41?", "23 * 41", "{result}", "tool"),
                     "{result}", "tool"),
    )
}
DEFAULT_PROMPT = "one_shot"


def _design(prompt: str | PromptDesign) -> PromptDesign:
    if isinstance(prompt, PromptDesign):
        return prompt
    if prompt not in PROMPTS:
        raise EnvError(f"unknown calculator prompt design {prompt!r}; expected one of {sorted(PROMPTS)}")
    return PROMPTS[prompt]


def prompt_messages(task: Task) -> list[dict[str, str]]:
    """System message, worked-example turns (``info["context"]``), then the question."""
    head = [{"role": "system", "content": task.system}] if task.system else []
    context = task.info.get("context") or ()
    for i, m in enumerate(context):
        if not isinstance(m, Mapping) or m.get("role") not in ("user", "assistant", "tool") or not isinstance(
            m.get("content"), str
        ):
            raise EnvError(f"task {task.id!r}: info['context'][{i}] must be a user/assistant/tool message with "
                           f"string content, got {m!r:.120}")
        head.append({"role": str(m["role"]), "content": str(m["content"])})
    return [*head, {"role": "user", "content": task.prompt}]


def result_message(task: Task, tool_output: str) -> dict[str, str]:
    """The turn that gives the tool's output back to the model (a user turn unless the design says tool)."""
    fmt = str(task.info.get("result_format") or "Result: {result}")
    role = str(task.info.get("result_role") or "user")
    if role not in ("user", "tool"):
        raise EnvError(f"task {task.id!r}: info['result_role'] must be 'user' or 'tool', got {role!r}")
    return {"role": role, "content": fmt.format(result=tool_output)}


# ------------------------------------------------------------------------------------ tool calls
@dataclass(frozen=True, slots=True)
class ToolCallTurn:
    """What one model turn asked for.

    Attributes:
        attempted: the turn contains a ``<tool_call>`` tag.
        expressions: the calculator expressions of its well-formed calls (empty if none parsed).
        error: why the call could not be used (malformed JSON, another tool, no expression), or None.
    """

    attempted: bool
    expressions: tuple[str, ...] = ()
    error: str | None = None

    @property
    def parsed(self) -> bool:
        return bool(self.expressions) and self.error is None


_PARSER = QwenToolParser()


def parse_tool_call(text: str) -> ToolCallTurn:
    """The calculator calls in one reply; never raises on model output."""
    out = _PARSER.parse(text)
    if "<tool_call>" not in text:
        return ToolCallTurn(False)
    if out.error is not None:
        return ToolCallTurn(True, error=out.error)
    if not out.tool_calls:
        return ToolCallTurn(True, error="no complete <tool_call>...</tool_call>")
    expressions = []
    for call in out.tool_calls:
        expr = _expression_of(call.name, call.arguments)
        if not isinstance(expr, tuple):
            return ToolCallTurn(True, error=expr)
        expressions.append(expr[0])
    return ToolCallTurn(True, tuple(expressions))


def _expression_of(name: str, arguments: str) -> tuple[str] | str:
    """``(expression,)`` or a string saying what is wrong with the call."""
    import json

    if name != "calculator":
        return f"unknown tool {name!r}; the only tool is 'calculator'"
    args: Any = json.loads(arguments)  # the parser already re-serialised it as valid JSON
    expr = args.get("expression") if isinstance(args, dict) else None
    if not isinstance(expr, str) or not expr.strip():
        return f'calculator needs a string "expression" argument, got {arguments[:80]}'
    return (expr,)


def run_calculator(expression: str) -> tuple[str, bool]:
    """``(output, ok)``: the calculator's result, or ``"Error: ..."`` and False for a bad expression."""
    try:
        return calculator(expression), True
    except (ValueError, TypeError, ZeroDivisionError, OverflowError, SyntaxError, RecursionError) as e:
        return f"Error: {type(e).__name__}: {e}", False


# ------------------------------------------------------------------------------------ rewards
def final_answer_reward(completion: str, task: Task) -> float:
    """1.0 if the final reply is exactly the answer (surrounding whitespace ignored), else 0.0."""
    return float(completion.strip() == task.answer.strip())


def calculator_reward(
    final_answer: str, task: Task, tool_outputs: Sequence[tuple[str, bool]], *, require_tool_call: bool = True
) -> float:
    """1.0 only if the final answer is exactly right and (by default) a calculator call returned a
    number during the episode (``tool_outputs``: ``(output, ok)`` per call, as
    :func:`run_calculator` returns them). A failed or missing call earns nothing even when the
    number is right: the task is to use the tool, and a 135M model never gets these products right
    without it, so the condition costs nothing on honest episodes and closes the obvious shortcut."""
    if require_tool_call and not any(ok for _, ok in tool_outputs):
        return 0.0
    return final_answer_reward(final_answer, task)
