"""A calculator agent that knows nothing of agentflow: it uses only the official `openai` package.

agentflow runs it once per episode (`AgentCommandWorkflow`, `examples/agent_command.yaml`) with
OPENAI_BASE_URL and OPENAI_API_KEY pointing at a fresh proxy session and the task as JSON on stdin;
it prints its final answer, which the workflow's reward function scores. Run by hand against any
OpenAI-compatible server:

    echo '{"prompt": "What is 12 * 34?"}' | OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=k \
        python examples/openai_agent.py

With AGENTFLOW_REWARD_URL set and --self-reward, it posts its own reward instead (1 when its
answer equals the task's "answer").
"""

from __future__ import annotations

import ast
import json
import operator
import os
import sys
import urllib.request

from openai import OpenAI

TOOLS = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
}}]
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculate(expression: str) -> str:
    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported expression: {expression!r}")

    try:
        value = ev(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError) as e:
        return f"error: {e}"
    return str(int(value) if float(value).is_integer() else value)


def solve(client: OpenAI, task: dict, max_turns: int = 3) -> str:
    messages = [{"role": "system", "content": "Use the calculator, then answer with only the number."},
                {"role": "user", "content": task["prompt"]}]
    for _ in range(max_turns):
        reply = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS, max_tokens=64)
        message = reply.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            return message.content or ""
        for call in message.tool_calls:
            args = json.loads(call.function.arguments or "{}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": calculate(args.get("expression", ""))})
    return ""


def post_reward(reward: float) -> None:
    req = urllib.request.Request(os.environ["AGENTFLOW_REWARD_URL"], data=json.dumps({"reward": reward}).encode(),
                                 headers={"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}",
                                          "Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).close()


def main() -> None:
    task = json.loads(sys.stdin.read() or os.environ.get("AGENTFLOW_TASK", "{}"))
    answer = solve(OpenAI(), task)  # reads OPENAI_BASE_URL and OPENAI_API_KEY
    if "--self-reward" in sys.argv:
        post_reward(float(answer.strip() == str(task.get("answer", "")).strip()))
    print(answer)


if __name__ == "__main__":
    main()
