"""Untrained success on the calculator task: SmolLM2-135M-Instruct, held-out problems, temperature 1.

For each prompt design (``envs/calculator.py``: ``PROMPTS``) it runs ``--n`` held-out problems x
``--samples`` conversations through :class:`CalculatorAgentWorkflow` on a LocalEngine configured
as ``agentflow train`` configures it (``InferenceSpec().local``; ``--max-seq-len`` overrides the
length), and prints one JSON object per line: exact success rate with its 95% Wilson interval,
first-reply call rate and parseable-call rate, rate of episodes where a call returned a number,
mean model turns, mean tool calls, the client's template-drift counter (must be 0), tokens per
episode (whole sequence / sampled), and seconds per episode (wall time of the design's batch
divided by its episodes; the engine decodes up to 64 rows at once). ``--workflow tool_use`` runs
the repository's :class:`ToolUseWorkflow` instead (``tools=`` schemas, ``role: tool`` results) and
reports how its episodes end with SmolLM2's chat template. Usage::

    python benchmarks/bench_tool_task.py --prompts one_shot two_shot --n 64 --samples 2
    python benchmarks/bench_tool_task.py --workflow tool_use --n 16 --samples 1

Measured 2026-11-30 (held-out seed 0, T=1, 40 new tokens per turn, 3 turns at most; 95% Wilson
intervals; template drift 0 in every row):

| design | episodes | success | first reply: a call / a parseable call |
| --- | --- | --- | --- |
| zero_shot (system prompt only) | 64 | 0.0% [0, 5.7] | 0% / 0% |
| one_shot_tool_role (result as ``role: tool``) | 128 | 2.3% [0.8, 6.7] | 42% / 3.1% |
| one_shot_add (the worked example is an addition) | 128 | 3.1% [1.2, 7.8] | 42% / 4.7% |
| **one_shot** (chosen) | 128 | **10.2% [6.0, 16.6]** | 48% / 12.5% |
| two_shot (1 group of 2 failed, likely the 320-token limit in a 3rd turn) | 62 | 62.9% [50.5, 73.8] | 84% / 73% |

Not here: training (``benchmarks/train_tool_task.py``), step cost (``bench_tool_task_cost.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import statistics
import time
from typing import Any

from agentflow import GenerationConfig, Trajectory
from agentflow.envs.calculator import PROMPTS, calculator_tasks, final_answer_reward
from agentflow.envs.tasks import Task


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def build_engine(model: Any, tokenizer: Any, max_seq_len: int, seed: int) -> Any:
    """The LocalEngine as the recipe builds it, with this benchmark's sequence length and seed."""
    from agentflow.engines.local import LocalEngine
    from agentflow.recipe.config import InferenceSpec, _default_rollout

    local = dataclasses.replace(InferenceSpec().local, max_seq_len=max_seq_len, seed=seed)
    return LocalEngine(model, tokenizer, rollout=_default_rollout(), config=local)


async def _gather(workflow: Any, engine: Any, tasks: list[Task], concurrency: int) -> tuple[list[Any], list[str]]:
    """Run one episode per task; return the outputs and the error of each failed episode."""
    sem = asyncio.Semaphore(concurrency)
    outs: list[Any] = []
    errors: list[str] = []

    async def one(task: Task) -> None:
        async with sem:
            try:
                outs.append(await workflow.arun_episode(engine, task))
            except Exception as e:  # counted and reported: the benchmark measures failures too
                errors.append(f"{type(e).__name__}: {str(e)[:160]}")

    async with asyncio.TaskGroup() as tg:
        for t in tasks:
            tg.create_task(one(t))
    return outs, errors


def summarize(trajs: list[Trajectory], wall: float) -> dict[str, Any]:
    """The JSON row of one design from its trajectories."""
    n = len(trajs)
    wins = sum(t.reward >= 1.0 for t in trajs)
    lo, hi = wilson(wins, n)
    mean = lambda xs: round(statistics.fmean(xs), 4) if xs else float("nan")  # noqa: E731
    info = [t.info for t in trajs]
    return {
        "episodes": n, "success": mean([float(t.reward >= 1.0) for t in trajs]), "successes": wins,
        "success_ci95": [round(lo, 4), round(hi, 4)],
        "call_rate": mean([float(i["call_attempted"]) for i in info]),
        "parseable_call_rate": mean([float(i["call_parsed"]) for i in info]),
        "tool_returned_rate": mean([float(i["called"]) for i in info]),
        "mean_turns": mean([i["turns"] for i in info]), "mean_tool_calls": mean([i["tool_calls"] for i in info]),
        "template_drift": sum(i["template_drift"] for i in info),
        "template_not_prefix": sum(i["template_not_prefix"] for i in info),
        "tokens_per_episode": mean([len(t) for t in trajs]),
        "sampled_tokens_per_episode": mean([sum(t.loss_mask) for t in trajs]),
        "wall_s": round(wall, 1), "seconds_per_episode": round(wall / max(n, 1), 3),
    }


def _examples(trajs: list[Trajectory], k: int) -> list[Any]:
    return [{"reward": t.reward, "transcript": t.info["transcript"]} for t in trajs[:k]]


async def bench_design(engine: Any, tokenizer: Any, design: str, args: argparse.Namespace) -> dict[str, Any]:
    from agentflow.workflows.calculator_agent import CalculatorAgentWorkflow

    tasks = calculator_tasks(args.n, seed=args.data_seed, split="heldout", prompt=design)
    g = GenerationConfig(n_samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    wf = CalculatorAgentWorkflow(tokenizer, g, max_turns=args.max_turns)
    t0 = time.perf_counter()
    outs, errors = await _gather(wf, engine, tasks, args.concurrency)
    trajs = [t for group in outs for t in group]
    row = {"bench": "tool_task", "workflow": "calculator_agent", "prompt": design, "prompts": args.n,
           "samples": args.samples, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
           "max_turns": args.max_turns, "failed_episodes": len(errors),
           "failure_kinds": collections.Counter(errors).most_common(3), **summarize(trajs, time.perf_counter() - t0)}
    if args.show:
        row["examples"] = _examples(trajs, args.show)
    return row


def template_support(tokenizer: Any) -> dict[str, Any]:
    """Whether the chat template renders ``tools=`` schemas, an assistant ``tool_calls`` message and a
    ``tool`` role (what ToolUseWorkflow sends), checked by rendering them."""
    from agentflow.envs.tools import ToolRegistry, calculator

    schemas = ToolRegistry([calculator]).schemas()
    render = lambda msgs, **kw: tokenizer.apply_chat_template(msgs, tokenize=False, **kw)  # noqa: E731
    user = {"role": "user", "content": "What is 2 * 3?"}
    calls = {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2 * 3"}'}}]}
    try:
        calls_rendered: Any = "2 * 3" in render([user, calls])
    except Exception as e:  # the template cannot render it at all
        calls_rendered = f"{type(e).__name__}: {e}"
    return {"renders_tool_schemas": "calculator" in render([user], tools=schemas),
            "renders_tool_calls": calls_rendered,
            "tool_role_as": render([user, {"role": "tool", "content": "6"}]).split("\n")[-3:-1]}


async def bench_tool_use(engine: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The repository's ToolUseWorkflow on the same problems: system prompt + question, tools=[calculator]."""
    from agentflow.envs.tools import ToolRegistry, calculator
    from agentflow.workflows.tool_use import ToolUseConfig, ToolUseWorkflow

    tasks = calculator_tasks(args.n * args.samples, seed=args.data_seed, split="heldout", prompt="zero_shot")
    g = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    wf = ToolUseWorkflow(tokenizer, ToolRegistry([calculator]), final_answer_reward,
                         ToolUseConfig(max_turns=args.max_turns, gconfig=g))
    t0 = time.perf_counter()
    outs, errors = await _gather(wf, engine, tasks, args.concurrency)
    trajs = [t for group in outs for t in group]
    return {"bench": "tool_task", "workflow": "tool_use", **template_support(tokenizer),
            "episodes": len(tasks), "finished": len(trajs),
            "failed_episodes": len(errors), "failure_kinds": collections.Counter(errors).most_common(3),
            "success": round(statistics.fmean([t.reward for t in trajs]), 4) if trajs else None,
            "tool_calls": sum(t.info["tool_calls"] for t in trajs), "wall_s": round(time.perf_counter() - t0, 1)}


async def main_async(args: argparse.Namespace) -> None:
    from agentflow.recipe.build import model_and_tokenizer

    model, tokenizer = model_and_tokenizer(args.model)
    async with build_engine(model, tokenizer, args.max_seq_len, args.engine_seed) as engine:
        if args.workflow == "tool_use":
            print(json.dumps(await bench_tool_use(engine, tokenizer, args)), flush=True)
            return
        for design in args.prompts:
            print(json.dumps(await bench_design(engine, tokenizer, design, args)), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", nargs="+", default=["one_shot"], choices=sorted(PROMPTS))
    ap.add_argument("--workflow", choices=["calculator_agent", "tool_use"], default="calculator_agent")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=64, help="held-out problems")
    ap.add_argument("--samples", type=int, default=2, help="conversations per problem")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=40, help="per model turn")
    ap.add_argument("--max-turns", type=int, default=3)
    ap.add_argument("--max-seq-len", type=int, default=320)
    ap.add_argument("--concurrency", type=int, default=32, help="problems in flight")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--engine-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--show", type=int, default=0, help="include this many transcripts per row")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
