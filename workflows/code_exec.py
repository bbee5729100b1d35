"""Code execution, two ways: write-a-program-and-run-the-tests, or tool-integrated reasoning.

``mode="tests"``: prompt -> ``n_samples`` programs (``engine.agenerate``) -> the last fenced code
block of each -> the sandbox runs it against the task's tests -> reward = fraction of tests passed
(or 1.0 only if all pass, ``reward="all"``) -> one trajectory per sample, one group. Tests come in
``task.info``: ``"tests"`` (Python statements such as ``assert f(2) == 4``, all run in one sandbox
process after the program) and/or ``"io_tests"`` (``{"input", "output"}`` pairs: stdin in, stdout
compared line by line, one sandbox run each).

``mode="tir"``: the model reasons in text and may write a ```` ```python ```` block and then
```` ```output ````; generation stops there (stop string), the sandbox runs the block, and its
output is appended (loss mask 0) as ```` ```output\\n...\\n``` ```` before generation continues, up
to ``max_executions`` times. The reward is ``reward_fn`` on the whole generated text.

Against reward hacking in ``"tests"`` mode: the harness reads a random nonce and the tests from
stdin *before* running the program, runs the program in its own namespace, catches ``SystemExit``
and writes the verdict with ``os.write`` after the nonce, so a program that exits early, prints a
fake verdict or replaces ``sys.stdout`` fails. (Code that digs the nonce out of the harness's frames
with introspection is not prevented.) A sandbox failure (:class:`SandboxError`) rejects the sample.

Not here: the sandbox itself (:mod:`agentflow.envs.sandbox`), math rewards (:mod:`agentflow.envs.math`).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from agentflow import GenerationConfig, InferenceEngine, ModelRequest, Trajectory
from agentflow.envs.sandbox import SandboxLimits, SandboxPool, SandboxResult, default_pool
from agentflow.envs.tasks import RewardFn, Task
from agentflow.errors import ConfigError, EnvError
from agentflow.workflows.rlvr import score

__all__ = ["CodeExecConfig", "CodeExecWorkflow", "extract_code", "run_tests"]

_HARNESS = r'''
import json, os, sys
def _agentflow_harness():
    nonce = sys.stdin.readline().strip()
    spec = json.loads(sys.stdin.readline())
    scope = {"__name__": "__main__"}
    passed = [False] * len(spec["tests"])
    try:
        exec(compile(spec["code"], "solution.py", "exec"), scope)
    except BaseException as e:
        sys.stderr.write("solution failed: %r\n" % (e,))
    else:
        for i, test in enumerate(spec["tests"]):
            try:
                exec(compile(test, "test_%d.py" % i, "exec"), scope)
                passed[i] = True
            except BaseException as e:
                sys.stderr.write("test %d failed: %r\n" % (i, e))
    os.write(1, ("\n" + nonce + json.dumps(passed) + "\n").encode())
_agentflow_harness()
'''
_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)
_TIR_BLOCK = re.compile(r"```python[ \t]*\n(.*?)```\s*(?:```output\s*)?$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class CodeExecConfig:
    """Attributes:
        mode: ``"tests"`` (programs judged by tests) or ``"tir"`` (code interleaved with reasoning).
        reward: ``"fraction"`` of tests passed, or ``"all"`` (1.0 only when every test passes).
        gconfig: sampling; ``n_samples`` programs per task in ``"tests"`` mode.
        limits: sandbox limits of one execution.
        max_executions: code blocks executed per episode in ``"tir"`` mode.
        max_output_chars: executed output appended to the context (the rest is cut) in ``"tir"``.
        max_total_tokens: ``"tir"`` stops executing when the sequence reaches this length.
        reward_timeout_s: deadline of ``reward_fn`` in ``"tir"`` mode.
    """

    mode: Literal["tests", "tir"] = "tests"
    reward: Literal["fraction", "all"] = "fraction"
    gconfig: GenerationConfig = field(default_factory=lambda: GenerationConfig(n_samples=4, max_new_tokens=512))
    limits: SandboxLimits = field(default_factory=lambda: SandboxLimits(timeout_s=10.0, max_output_bytes=64 * 1024))
    max_executions: int = 4
    max_output_chars: int = 1000
    max_total_tokens: int = 4096
    reward_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in ("tests", "tir"):
            problems.append(f"mode must be 'tests' or 'tir', got {self.mode!r}")
        if self.reward not in ("fraction", "all"):
            problems.append(f"reward must be 'fraction' or 'all', got {self.reward!r}")
        if self.max_executions < 0:
            problems.append(f"max_executions must be >= 0, got {self.max_executions}")
        ConfigError.check(problems)


def extract_code(text: str) -> str:
    """The last fenced code block (```python or plain ```), else the whole text."""
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else text


def _same_output(got: str, expected: str) -> bool:
    norm = lambda s: [line.rstrip() for line in s.strip().splitlines()]  # noqa: E731
    return norm(got) == norm(expected)


async def run_tests(code: str, task: Task, limits: SandboxLimits, pool: SandboxPool) -> list[bool]:
    """Pass/fail per test of ``task`` (``tests`` first, then ``io_tests``). Raises EnvError when
    the task has no tests and SandboxError when the sandbox cannot run."""
    tests, io_tests = list(task.info.get("tests", [])), list(task.info.get("io_tests", []))
    if not tests and not io_tests:
        raise EnvError(f"task {task.id!r} has no tests; expected info['tests'] (assert statements) or "
                       "info['io_tests'] ([{'input': ..., 'output': ...}])")
    async with asyncio.TaskGroup() as tg:
        unit = tg.create_task(_unit_tests(code, tests, limits, pool)) if tests else None
        io = [tg.create_task(pool.run(code, stdin=t["input"], limits=limits)) for t in io_tests]
    verdicts = unit.result() if unit else []
    return verdicts + [r.result().ok and _same_output(r.result().stdout, t["output"])
                       for r, t in zip(io, io_tests, strict=True)]


async def _unit_tests(code: str, tests: list[str], limits: SandboxLimits, pool: SandboxPool) -> list[bool]:
    nonce = secrets.token_hex(16)
    stdin = nonce + "\n" + json.dumps({"code": code, "tests": tests}) + "\n"
    result = await pool.run(_HARNESS, stdin=stdin, limits=limits)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(nonce):
            passed = json.loads(line[len(nonce):])
            return [bool(p) for p in passed] if len(passed) == len(tests) else [False] * len(tests)
    return [False] * len(tests)  # killed, flooded its output or exited before the verdict


def _format_output(r: SandboxResult, limit: int) -> str:
    """What the model sees: stdout, plus the last stderr line and the status when it failed."""
    parts = [r.stdout.rstrip("\n")] if r.stdout.strip() else []
    if not r.ok:
        last = r.stderr.strip().splitlines()[-1:]
        parts.append(f"{last[0] if last else ''} [{r.status}]".strip())
    text = "\n".join(parts)
    return text if len(text) <= limit else text[:limit] + "\n...[truncated]"


class CodeExecWorkflow:
    """Code episodes in the sandbox (see the module docstring). ``reward_fn`` is needed for ``"tir"``."""

    def __init__(
        self,
        tokenizer: Any,
        config: CodeExecConfig | None = None,
        *,
        reward_fn: RewardFn | None = None,
        pool: SandboxPool | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config or CodeExecConfig()
        if self.config.mode == "tir" and reward_fn is None:
            raise ConfigError("mode='tir' needs a reward_fn(text, task) to score the final answer")
        self.reward_fn = reward_fn
        self._pool = pool
        g = self.config.gconfig.new(n_samples=1)
        if not g.stop_token_ids and tokenizer.eos_token_id is not None:
            g = g.new(stop_token_ids=(tokenizer.eos_token_id,))
        if self.config.mode == "tir" and "```output" not in g.stop:
            g = g.new(stop=(*g.stop, "```output"))
        self.gconfig = g

    @property
    def pool(self) -> SandboxPool:
        return self._pool or default_pool()

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _prompt(self, task: Task) -> list[int]:
        return self._encode(self.tokenizer.apply_chat_template(task.messages(), tokenize=False,
                                                               add_generation_prompt=True))

    async def arun_episode(self, engine: InferenceEngine, data: Any) -> list[Trajectory] | Trajectory:
        task = Task.from_data(data)
        if self.config.mode == "tir":
            return await self._tir_episode(engine, task)
        prompt = self._prompt(task)
        async with asyncio.TaskGroup() as tg:
            runs = [tg.create_task(self._program(engine, prompt, task)) for _ in range(self.config.gconfig.n_samples)]
        group = uuid.uuid4().hex
        return [t.result().with_(group_id=group) for t in runs]

    # ------------------------------------------------------------------ mode "tests"
    async def _program(self, engine: InferenceEngine, prompt: list[int], task: Task) -> Trajectory:
        resp = await engine.agenerate(ModelRequest(input_ids=prompt, gconfig=self.gconfig))
        text = self.tokenizer.decode(resp.output_tokens, skip_special_tokens=True)
        passed = await run_tests(extract_code(text), task, self.config.limits, self.pool)
        frac = sum(passed) / len(passed)
        reward = frac if self.config.reward == "fraction" else float(all(passed))
        return Trajectory.from_response(resp, reward, prompt_ids=prompt,
                                        info={"task_id": task.id, "passed": passed, "completion": text})

    # ------------------------------------------------------------------ mode "tir"
    def _code_to_run(self, output_ids: list[int], text: str) -> str | None:
        """The python block the model just closed (generation stopped at ```output), if any."""
        if output_ids and output_ids[-1] in self.gconfig.stop_token_ids:
            return None  # the model ended its turn
        m = _TIR_BLOCK.search(text)
        return m.group(1) if m else None

    async def _tir_episode(self, engine: InferenceEngine, task: Task) -> Trajectory:
        cfg, prompt = self.config, self._prompt(task)
        traj: Trajectory | None = None
        executions = 0
        while True:
            seq = prompt if traj is None else traj.input_ids
            resp = await engine.agenerate(ModelRequest(input_ids=seq, gconfig=self.gconfig))
            traj = Trajectory.from_response(resp, prompt_ids=seq) if traj is None else traj.extend([], resp)
            text = self.tokenizer.decode(resp.output_tokens, skip_special_tokens=True)
            code = self._code_to_run(resp.output_tokens, text)
            if code is None or executions >= cfg.max_executions or len(traj) >= cfg.max_total_tokens:
                break
            executions += 1
            result = await self.pool.run(code, limits=cfg.limits)
            head = "\n" if text.rstrip().endswith("```output") else "```output\n"
            traj = traj.extend(self._encode(f"{head}{_format_output(result, cfg.max_output_chars)}\n```\n"))
        generated = self.tokenizer.decode(traj.input_ids[len(prompt):], skip_special_tokens=True)
        assert self.reward_fn is not None
        reward = await score(self.reward_fn, generated, task, cfg.reward_timeout_s)
        return traj.with_(reward=reward, info={"task_id": task.id, "executions": executions})
