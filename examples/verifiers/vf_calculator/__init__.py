"""The calculator task as a verifiers environment: two-digit multiplication, solved with a tool.

Written in verifiers' own format (``import verifiers.v1 as vf``; nothing from agentflow), the same
task as agentflow's built-in calculator run: the model is asked "What is 47 * 83?", calls the
calculator as text (``<tool_call>{"name": "calculator", "arguments": {"expression": "47 * 83"}}</tool_call>``),
the environment answers with a user turn ``Result: 3901``, and the model answers with only the
number. SmolLM2's chat template has no tool role and renders no tool schemas, so the environment
(its ``Env.run``) plays the tool, turn by turn, through a verifiers ``Interaction``.

- :class:`CalculatorTaskset`: the held-out problems first (``num_heldout``, distinct pairs from the
  held-out split), then ``num_train`` problems drawn from the training split; an unordered pair
  ``{a, b}`` belongs to one split only (a CRC32 hash), so held-out problems are never trained on.
- :class:`CalculatorTask`: the rubric: ``correct`` = 1.0 only for exactly the product after a
  calculator call that returned a number.
- :class:`CalculatorEnv`: the tool loop (at most ``max_calls`` calls, then the answer).
- :class:`ChatHarness`: one chat completion per segment, in process (verifiers' harness contract
  allows a loop in process as long as every model call goes through the interception endpoint);
  it saves starting a chat program per turn.
"""

import ast
import json
import operator
import random
import re
import zlib

import httpx
import verifiers.v1 as vf

__all__ = ["CalculatorEnv", "CalculatorTaskset", "ChatHarness"]

SYSTEM_PROMPT = (
    'You can use a calculator. To use it, reply with only <tool_call>{"name": "calculator", "arguments": '
    '{"expression": "..."}}</tool_call> and you will get the result. Then answer with only the number.'
)
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def _call(expression: str) -> str:
    return f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}</tool_call>'


# one worked example (a pair from the training split): question -> call -> result -> the number
EXAMPLE = [
    {"role": "user", "content": "What is 23 * 41?"},
    {"role": "assistant", "content": _call("23 * 41")},
    {"role": "user", "content": "Result: 943"},
    {"role": "assistant", "content": "943"},
]


def is_heldout_pair(a: int, b: int) -> bool:
    lo, hi = sorted((a, b))
    return zlib.crc32(f"{lo}*{hi}".encode()) % 10 == 0


def calculate(expression: str) -> str:
    """``+ - * / // %`` and unary minus over numbers (no names, no calls); raises ValueError otherwise."""

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported expression {expression!r}")

    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    value = ev(ast.parse(expression.strip(), mode="eval").body)
    return str(int(value)) if float(value).is_integer() else str(value)


def parse_call(reply: str) -> str | None:
    """The expression of a well-formed calculator call in ``reply``, else None."""
    match = _CALL.search(reply)
    if match is None:
        return None
    try:
        call = json.loads(match.group(1))
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):  # OpenAI style: the arguments as a JSON string
            arguments = json.loads(arguments)
        expression = arguments["expression"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    ok = call.get("name") == "calculator" and isinstance(expression, str) and expression.strip()
    return expression if ok else None


class CalculatorData(vf.TaskData):
    answer: str


class CalculatorTask(vf.Task[CalculatorData]):
    @vf.reward(weight=1.0)
    async def correct(self, trace: vf.Trace) -> float:
        called = trace.info.get("calls_ok", 0) > 0
        return float(called and trace.last_reply.strip() == self.data.answer)


class CalculatorConfig(vf.TasksetConfig):
    num_heldout: int = 64
    num_train: int = 5000
    seed: int = 0


class CalculatorTaskset(vf.Taskset[CalculatorTask, CalculatorConfig]):
    def load(self) -> list[CalculatorTask]:
        pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
        heldout = [p for p in pairs if is_heldout_pair(*p)]
        train = [p for p in pairs if not is_heldout_pair(*p)]
        rng = random.Random(self.config.seed)
        chosen = rng.sample(heldout, self.config.num_heldout)
        chosen += [rng.choice(train) for _ in range(self.config.num_train)]
        return [self._task(i, a, b) for i, (a, b) in enumerate(chosen)]

    def _task(self, i: int, a: int, b: int) -> CalculatorTask:
        prompt = [*EXAMPLE, {"role": "user", "content": f"What is {a} * {b}?"}]
        data = CalculatorData(id=f"mul-{i}", prompt=prompt, system_prompt=SYSTEM_PROMPT, answer=str(a * b))
        return CalculatorTask(data, self.config.task)


class CalculatorEnvConfig(vf.EnvConfig):
    agent: vf.AgentConfig = vf.AgentConfig()
    max_calls: int = 1


class CalculatorEnv(vf.Env[CalculatorEnvConfig]):
    async def run(self, task: vf.Task, agents: vf.Agents) -> None:
        async with agents.agent.interaction(task) as chat:
            segment = await chat.turn()
            calls_ok = 0
            for _ in range(self.config.max_calls):
                expression = None if segment.terminated else parse_call(segment.last_reply)
                if expression is None:
                    break  # the final answer, or a malformed call: the episode ends
                try:
                    result, calls_ok = calculate(expression), calls_ok + 1
                except (ValueError, SyntaxError, ArithmeticError, RecursionError) as e:
                    result = f"Error: {type(e).__name__}: {e}"
                segment = await chat.turn(f"Result: {result}")
            chat.trace.info["calls_ok"] = calls_ok


class ChatHarnessConfig(vf.HarnessConfig):
    connect_timeout_s: float = 30.0
    """Deadline to reach the endpoint; a reply may take as long as the episode's own deadline allows."""


class ChatHarness(vf.Harness[ChatHarnessConfig]):
    """One chat completion per segment, sent to the interception endpoint from this process."""

    APPENDS_SYSTEM_PROMPT = True
    SUPPORTS_RESUME = True
    EXECUTES_CODE = False
    NEEDS_CONTAINER = False

    async def launch(self, ctx, trace, runtime, endpoint, secret, mcp_urls, data, tool_interception_url=None):
        system, prompt = self.resolve_prompt(data)
        messages = [{"role": "system", "content": system}] if system else []
        if isinstance(prompt, str):
            messages.append({"role": "user", "content": prompt})
        else:
            messages += [_wire(m) for m in prompt or [] if not (system and m.role == "system")]
        timeout = httpx.Timeout(None, connect=self.config.connect_timeout_s)
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.post(
                f"{endpoint.rstrip('/')}/chat/completions",
                json={"model": ctx.model, "messages": messages},
                headers={"Authorization": f"Bearer {secret}"},
            )
        if response.status_code != 200:
            return vf.ProgramResult(exit_code=1, stdout="", stderr=f"HTTP {response.status_code}: {response.text}")
        return vf.ProgramResult(exit_code=0, stdout=response.text, stderr="")


def _wire(message) -> dict:
    """A verifiers message as chat JSON (text content)."""
    content = message.content
    if not isinstance(content, str):
        content = "".join(getattr(part, "text", "") or "" for part in content or [])
    return {"role": message.role, "content": content}
