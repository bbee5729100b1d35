"""Built-in task datasets with verifiable answers, and a reward function for each.

- :func:`arithmetic_tasks`: "12 + 7 = ?" style questions (digits and operators configurable),
  deterministic by seed; :func:`arithmetic_reward` checks the last number of the completion.
- :func:`countdown_tasks`: reach a target with the given numbers, each used at most once, with
  ``+ - * /``; every instance is solvable (built from a random expression);
  :func:`countdown_reward` parses the model's expression with ``ast`` (no ``eval``), checks the
  numbers it uses and evaluates it exactly with fractions.
- :func:`load_gsm8k_jsonl`: GSM8K-format JSONL (``{"question": ..., "answer": "... #### 72"}``);
  a bad line raises :class:`EnvError` naming the file, the line and what was expected.
  :func:`gsm8k_reward` is :func:`agentflow.envs.math.math_reward` against the ``####`` answer.

A :class:`Task` is what the built-in workflows take as ``data`` (a mapping with the same keys
works too, see :meth:`Task.from_data`). :data:`TASKS` maps the names ``agentflow train`` accepts as
``data.task`` to builders of training and held-out rows with their rewards; a new task is one
function decorated with :func:`register_task`.

Not here: downloading datasets (bring the file), workflows (they take a task's rows as ``data``).
"""

from __future__ import annotations

import ast
import difflib
import json
import operator
import random
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

from agentflow.envs.math import extract_hash_answer, extract_last_number, math_reward, numbers_equal
from agentflow.errors import ConfigError, EnvError

__all__ = [
    "TASKS",
    "RewardFn",
    "Task",
    "TaskData",
    "TaskSpec",
    "arithmetic_reward",
    "arithmetic_tasks",
    "build_task",
    "countdown_reward",
    "countdown_tasks",
    "exact_answer_reward",
    "gsm8k_reward",
    "load_gsm8k_jsonl",
    "parse_gsm8k_line",
    "register_task",
    "shaped_answer_reward",
    "task_rows",
]


@dataclass(frozen=True, slots=True)
class Task:
    """One prompt with a verifiable answer.

    Attributes:
        id: unique within its dataset.
        prompt: the user message.
        answer: the reference answer (a number as text, or an expression for countdown).
        system: optional system message.
        info: task-specific data (countdown's ``numbers`` and ``target``, code tests, ...).
        shots: worked examples, ``(question, answer)`` pairs shown as earlier chat turns.
    """

    id: str
    prompt: str
    answer: str
    system: str | None = None
    info: Mapping[str, Any] = field(default_factory=dict)
    shots: tuple[tuple[str, str], ...] = ()

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        for question, answer in self.shots:
            head += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return [*head, {"role": "user", "content": self.prompt}]

    @classmethod
    def from_data(cls, data: Task | Mapping[str, Any]) -> Task:
        """Accept a Task, or a mapping with ``prompt`` (or ``question``) and ``answer``."""
        if isinstance(data, Task):
            return data
        if not isinstance(data, Mapping):
            raise EnvError(f"expected a Task or a mapping with 'prompt' and 'answer', got {type(data).__name__}")
        prompt = data.get("prompt", data.get("question"))
        if not isinstance(prompt, str):
            raise EnvError(f"task data needs a string 'prompt' (or 'question'); got keys {sorted(data)}")
        known = {"id", "prompt", "question", "answer", "system", "shots"}
        info = {**data.get("info", {}), **{k: v for k, v in data.items() if k not in known | {"info"}}}
        shots = tuple((str(q), str(a)) for q, a in data.get("shots") or ())
        return cls(str(data.get("id", "")), prompt, str(data.get("answer", "")), data.get("system"), info, shots)


RewardFn = Callable[[str, Task], "float | Awaitable[float]"]


# ------------------------------------------------------------------------------------ arithmetic
_OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def arithmetic_tasks(
    n: int,
    *,
    seed: int = 0,
    digits: int = 1,
    ops: Sequence[str] = ("+",),
    instruction: str = "Answer with only the number.",
) -> list[Task]:
    """``n`` questions ``"a op b = ?"`` with ``digits``-digit operands, reproducible by ``seed``."""
    bad = [o for o in ops if o not in _OPS]
    if bad or not ops or digits < 1 or n < 0:
        raise EnvError(f"arithmetic_tasks: expected n >= 0, digits >= 1 and ops from {sorted(_OPS)}; "
                       f"got n={n}, digits={digits}, ops={list(ops)}")
    rng = random.Random(seed)
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    out = []
    for i in range(n):
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(list(ops))
        prompt = f"What is {a} {op} {b}? {instruction}".strip()
        out.append(Task(f"arith-{seed}-{i}", prompt, str(_OPS[op](a, b)), info={"a": a, "b": b, "op": op}))
    return out


def exact_answer_reward(completion: str, task: Task) -> float:
    """1.0 if ``completion`` is exactly the answer (surrounding whitespace ignored), else 0.0.

    The strict variant for "answer with only the number" prompts: right *and* well-formatted.
    """
    return float(completion.strip() == task.answer.strip())


def shaped_answer_reward(completion: str, task: Task) -> float:
    """1.0 for exactly the answer; a right answer inside other text earns less the more text surrounds it.

    ``0.5 * max(0, 1 - extra_chars / 10)`` for a completion whose last number is right: "11." earns
    0.45, "2 + 9 = 11" 0.1, "The answer is 11." 0, anything wrong 0. A training signal for "answer
    with only the number" prompts on small models, which are almost never exactly right at first:
    credit for being right teaches the arithmetic, the steep pull towards fewer extra characters
    teaches the format (a flat bonus lets the policy settle on a verbose template). Evaluate with
    :func:`exact_answer_reward`.
    """
    if exact_answer_reward(completion, task):
        return 1.0
    if not arithmetic_reward(completion, task):
        return 0.0
    extra = max(0, len(completion.strip()) - len(task.answer.strip()))
    return 0.5 * max(0.0, 1.0 - extra / 10)


def arithmetic_reward(completion: str, task: Task) -> float:
    """1.0 if the last number in ``completion`` equals the answer, else 0.0."""
    pred = extract_last_number(completion)
    return float(pred is not None and bool(numbers_equal(pred, task.answer)))


# ------------------------------------------------------------------------------------ countdown
_COUNTDOWN_PROMPT = (
    "Using the numbers {numbers}, create an expression that equals {target}. You may use + - * / and "
    "parentheses, and each number at most once. Put the expression in <answer></answer> tags."
)


def countdown_tasks(n: int, *, seed: int = 0, n_numbers: int = 3, max_number: int = 20) -> list[Task]:
    """``n`` solvable countdown instances: ``n_numbers`` numbers in [1, max_number] and a target
    built from a random expression over all of them (kept when it is a positive integer)."""
    if n_numbers < 2 or max_number < 2 or n < 0:
        raise EnvError(f"countdown_tasks: expected n >= 0, n_numbers >= 2, max_number >= 2; "
                       f"got n={n}, n_numbers={n_numbers}, max_number={max_number}")
    rng = random.Random(seed)
    out: list[Task] = []
    while len(out) < n:
        numbers = [rng.randint(1, max_number) for _ in range(n_numbers)]
        expr = _random_expression(rng, numbers)
        try:
            value = _eval_arith(ast.parse(expr, mode="eval").body)
        except EnvError:  # divided by a sub-expression that is 0: draw again
            continue
        if value.denominator != 1 or value <= 0:
            continue
        target = int(value)
        prompt = _COUNTDOWN_PROMPT.format(numbers=", ".join(map(str, numbers)), target=target)
        out.append(Task(f"countdown-{seed}-{len(out)}", prompt, expr, info={"numbers": numbers, "target": target}))
    return out


def _random_expression(rng: random.Random, numbers: list[int]) -> str:
    terms = [str(x) for x in rng.sample(numbers, len(numbers))]
    while len(terms) > 1:
        i = rng.randrange(len(terms) - 1)
        op = rng.choice("+-*/")
        terms[i : i + 2] = [f"({terms[i]} {op} {terms[i + 1]})"]
    return terms[0][1:-1] if terms[0].startswith("(") else terms[0]


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval_arith(node: ast.AST) -> Fraction:
    """Exact value of an expression of integers, + - * / and unary minus; EnvError otherwise."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_arith(node.left), _eval_arith(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise EnvError("division by zero")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval_arith(node.operand)
    raise EnvError(f"only integers, + - * / and parentheses are allowed, got {ast.dump(node)[:80]}")


def _numbers_used(node: ast.AST) -> list[int]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and type(n.value) is int]


def _countdown_expression(completion: str) -> str | None:
    tagged = re.findall(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    text = tagged[-1] if tagged else (completion.strip().splitlines() or [""])[-1]
    text = text.split("=")[0].strip()
    return text or None


def countdown_reward(completion: str, task: Task) -> float:
    """1.0 if the expression in ``<answer>`` tags (else the last line) uses each given number at
    most once and evaluates exactly to the target; 0.0 otherwise (unparsable included)."""
    expr = _countdown_expression(completion)
    if expr is None or len(expr) > 200:
        return 0.0
    try:
        tree = ast.parse(expr.replace("×", "*").replace("÷", "/"), mode="eval").body
        value = _eval_arith(tree)
    except (SyntaxError, EnvError, RecursionError):
        return 0.0
    available = Counter(int(x) for x in task.info["numbers"])
    used = Counter(_numbers_used(tree))
    return float(all(used[k] <= available[k] for k in used) and value == task.info["target"])


# ------------------------------------------------------------------------------------ GSM8K
def parse_gsm8k_line(line: str, *, where: str, index: int) -> Task:
    """One GSM8K JSONL line as a Task; ``where`` (``file:line``) goes into every error message."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise EnvError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); expected one object "
                       'per line like {"question": "...", "answer": "... #### 72"}') from None
    if not isinstance(row, dict):
        raise EnvError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("question", "answer") if not isinstance(row.get(k), str)]
    if missing:
        raise EnvError(f"{where}: missing or non-string field(s) {missing}; expected string 'question' and "
                       f"'answer', got keys {sorted(row)}")
    final = extract_hash_answer(row["answer"])
    if not final:
        raise EnvError(f"{where}: the answer has no '#### <final answer>' line; got {row['answer'][-80:]!r}")
    return Task(str(row.get("id", f"gsm8k-{index}")), row["question"], final,
                info={"solution": row["answer"]})


def load_gsm8k_jsonl(path: str | Path, *, instruction: str = "") -> list[Task]:
    """Read GSM8K-format JSONL; blank lines are skipped; ``instruction`` is appended to each question."""
    path = Path(path)
    if not path.is_file():
        raise EnvError(f"GSM8K file {str(path)!r} does not exist; expected a JSONL file path")
    tasks = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                t = parse_gsm8k_line(line, where=f"{path}:{lineno}", index=len(tasks))
                tasks.append(Task(t.id, f"{t.prompt} {instruction}".strip(), t.answer, t.system, t.info))
    if not tasks:
        raise EnvError(f"GSM8K file {str(path)!r} has no examples; expected at least one JSON line")
    return tasks


async def gsm8k_reward(completion: str, task: Task, *, timeout_s: float = 10.0) -> float:
    """:func:`math_reward` against the task's final answer (raises EnvError on timeout)."""
    return await math_reward(completion, task.answer, timeout_s=timeout_s)


# ------------------------------------------------------------------------------------ the task registry
class TaskSpec(Protocol):
    """What a task builder reads (``agentflow train``'s ``data`` section satisfies it)."""

    task: str
    path: str | None
    size: int
    eval_size: int
    seed: int
    system: str | None
    shots: int
    train_reward: str
    options: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class TaskData:
    """Training and held-out rows (mappings :meth:`Task.from_data` reads) and their rewards.

    Attributes:
        train: training rows.
        eval: held-out rows.
        reward: what training optimises.
        eval_reward: what evaluation reports.
    """

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    reward: RewardFn
    eval_reward: RewardFn


TaskBuilder = Callable[[TaskSpec], TaskData]
TASKS: dict[str, TaskBuilder] = {}
_EVAL_SEED_OFFSET = 10_007  # held-out prompts come from another seed
_SHOT_SEED_OFFSET = 20_011  # so do worked examples


def register_task(name: str) -> Callable[[TaskBuilder], TaskBuilder]:
    """Decorator: make ``builder(spec) -> TaskData`` available as ``data.task=<name>``."""

    def deco(builder: TaskBuilder) -> TaskBuilder:
        if name in TASKS:
            raise EnvError(f"task {name!r} is already registered (by {TASKS[name].__qualname__})")
        TASKS[name] = builder
        return builder

    return deco


def build_task(spec: TaskSpec) -> TaskData:
    """The rows and rewards of ``spec.task`` (a name in :data:`TASKS`)."""
    builder = TASKS.get(spec.task)
    if builder is None:
        close = difflib.get_close_matches(spec.task, TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"data.task must be one of {', '.join(sorted(TASKS))}; got {spec.task!r}{hint}")
    return builder(spec)


def task_rows(items: Sequence[Task], system: str | None, shots: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """Tasks as plain rows (what checkpoints store), with a default system message and worked examples."""
    return [{"id": t.id, "prompt": t.prompt, "answer": t.answer, "system": t.system or system,
             "info": dict(t.info), "shots": [list(s) for s in shots or t.shots]} for t in items]


def _generated(spec: TaskSpec, make: Callable[[int, int], list[Task]], reward: RewardFn,
               eval_reward: RewardFn | None = None, shots: Sequence[tuple[str, str]] = ()) -> TaskData:
    """Training and held-out rows of a generated task (held-out from another seed)."""
    def rows(items: list[Task]) -> list[dict[str, Any]]:
        return task_rows(items, spec.system, shots)

    return TaskData(rows(make(spec.size, spec.seed)), rows(make(spec.eval_size, spec.seed + _EVAL_SEED_OFFSET)),
                    reward, eval_reward or reward)


def _arithmetic_problem_count(digits: int = 1, ops: Sequence[str] = ("+",)) -> int:
    """How many distinct questions :func:`arithmetic_tasks` can draw (``digits``-digit operand pairs
    times operators)."""
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    return (hi - lo + 1) ** 2 * len(set(ops))


def _check_eval_size(spec: TaskSpec, distinct: int) -> None:
    """Held-out rows are drawn with replacement: more than the task's distinct problems only
    repeats them (and makes every evaluation that much longer)."""
    if spec.eval_size > distinct:
        raise ConfigError(f"data.eval_size={spec.eval_size} is larger than the {distinct} distinct problems of "
                          f"data.task={spec.task!r}; expected at most {distinct} (more only repeats problems and "
                          "slows every evaluation). Lower data.eval_size.")


@register_task("addition")
def _addition(spec: TaskSpec) -> TaskData:
    """One-digit a + b; reported reward 1 only for exactly the number (``train_reward`` picks training's)."""
    _check_eval_size(spec, _arithmetic_problem_count(1, ("+",)))

    def make(n: int, seed: int) -> list[Task]:
        return arithmetic_tasks(n, seed=seed, digits=1, ops=("+",), **spec.options)

    shots = [(t.prompt, t.answer) for t in make(spec.shots, spec.seed + _SHOT_SEED_OFFSET)]
    train = shaped_answer_reward if spec.train_reward == "shaped" else exact_answer_reward
    return _generated(spec, make, train, exact_answer_reward, shots)


@register_task("arithmetic")
def _arithmetic(spec: TaskSpec) -> TaskData:
    _check_eval_size(spec, _arithmetic_problem_count(spec.options.get("digits", 1), spec.options.get("ops", ("+",))))
    return _generated(spec, lambda n, seed: arithmetic_tasks(n, seed=seed, **spec.options), arithmetic_reward)


@register_task("countdown")
def _countdown(spec: TaskSpec) -> TaskData:
    return _generated(spec, lambda n, seed: countdown_tasks(n, seed=seed, **spec.options), countdown_reward)


@register_task("gsm8k")
def _gsm8k(spec: TaskSpec) -> TaskData:
    """A GSM8K-format JSONL file at ``spec.path``; its last ``eval_size`` rows are held out."""
    if not spec.path:
        raise ConfigError("data.task=gsm8k needs data.path=<file.jsonl>; got none")
    items = load_gsm8k_jsonl(spec.path, **spec.options)
    if len(items) <= spec.eval_size:
        raise ConfigError(f"{spec.path} has {len(items)} rows; need more than data.eval_size={spec.eval_size}")
    return TaskData(task_rows(items[: -spec.eval_size], spec.system), task_rows(items[-spec.eval_size:], spec.system),
                    gsm8k_reward, gsm8k_reward)


@register_task("calculator")
def _calculator(spec: TaskSpec) -> TaskData:
    """Two-digit multiplication with a calculator tool (:mod:`agentflow.envs.calculator`); held out:
    a disjoint set of operand pairs. ``options.prompt`` picks the prompt design (default ``one_shot``)."""
    from agentflow.envs.calculator import calculator_tasks, final_answer_reward

    prompt = spec.options.get("prompt", "one_shot")
    train = calculator_tasks(spec.size, seed=spec.seed, split="train", prompt=prompt)
    heldout = calculator_tasks(spec.eval_size, seed=spec.seed + 1, split="heldout", prompt=prompt)
    return TaskData(task_rows(train, spec.system), task_rows(heldout, spec.system), final_answer_reward,
                    final_answer_reward)
