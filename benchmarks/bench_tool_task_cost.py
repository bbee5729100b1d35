"""What one train step of the calculator task costs, relative to the default addition step.

The development machine is shared, so absolute seconds drift with its load; ratios measured side by
side do not (much). In one process, alternating ``--reps`` times, this times:

- the rollout of one step's batch (``--prompts`` x ``--samples``) of the default addition run
  (RLVRWorkflow, 8 new tokens) and of the calculator task (CalculatorAgentWorkflow, ``--max-new-tokens``
  per turn, ``--max-turns``), on the recipe's LocalEngine;
- the train step on each of those batches (``agentflow.algo.ppo_step``: proximal forward + PPO update,
  shared prompts), and on a batch shaped like a *trained* calculator policy (every conversation a
  call, the result and the answer: lengths from the tokenizer, random tokens).

Prints one JSON line per timing and a summary with the median seconds and the ratios to addition.
Multiply a ratio by a quiet-machine addition figure (README: ~14 s per step, rollout and training
overlapped) to estimate the calculator step. Usage::

    python benchmarks/bench_tool_task_cost.py --reps 2

Not here: learning curves (``train_tool_task.py``), untrained success (``bench_tool_task.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from agentflow import GenerationConfig, Trajectory
from agentflow.algo import ppo_step
from agentflow.envs.calculator import calculator_tasks, prompt_messages, result_message
from agentflow.recipe import TrainRecipeConfig, load_recipe_config
from agentflow.recipe import build as recipe

sys.path.insert(0, str(Path(__file__).parent))
from bench_shared_prefix import make_batch


def solved_shape(tokenizer: Any) -> tuple[int, int]:
    """(prompt tokens, tokens after the prompt) of a solved calculator conversation."""
    task = calculator_tasks(1, seed=0)[0]
    a, b = task.info["a"], task.info["b"]
    call = f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{a} * {b}"}}}}</tool_call>'
    msgs = prompt_messages(task)
    done = [*msgs, {"role": "assistant", "content": call}, result_message(task, task.answer),
            {"role": "assistant", "content": task.answer}]
    def n(m: list[dict[str, str]], gen: bool) -> int:
        text = tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)
        return len(tokenizer.encode(text, add_special_tokens=False))

    prompt = n(msgs, True)
    return prompt, n(done, False) - prompt


async def rollout(engine: Any, workflow: Any, rows: list[Any]) -> tuple[float, list[Trajectory]]:
    t0 = time.perf_counter()
    groups = await asyncio.gather(*(workflow.arun_episode(engine, r) for r in rows))
    return time.perf_counter() - t0, [t for g in groups for t in g]


def train_step(engine: Any, cfg: TrainRecipeConfig, trajs: list[Trajectory]) -> float:
    t0 = time.perf_counter()
    ppo_step(engine, cfg.algo, trajs, max_tokens_per_mb=cfg.trainer.max_tokens_per_mb,
             minibatches=cfg.trainer.ppo_minibatches)
    return time.perf_counter() - t0


def build(args: argparse.Namespace) -> tuple[Any, ...]:
    from agentflow.workflows.calculator_agent import CalculatorAgentWorkflow

    addition = Path(__file__).resolve().parents[1] / "examples" / "addition.yaml"  # the addition run
    cfg = load_recipe_config([str(addition)], [f"trainer.max_tokens_per_mb={args.max_tokens_per_mb}",
                                               f"trainer.total_steps={2 * args.reps * 3}"])
    model, tok = recipe.model_and_tokenizer("smollm2-135m")
    local = dataclasses.replace(cfg.inference.local, max_seq_len=320)
    engine = recipe.inference_engine(dataclasses.replace(cfg, inference=dataclasses.replace(
        cfg.inference, local=local)), model, tok)
    train_engine = recipe.train_engine(cfg, copy.deepcopy(model), tok)
    add = recipe.task_data(cfg.data)
    add_wf = recipe.workflow(cfg.workflow, tok, add.reward, GenerationConfig(n_samples=args.samples, max_new_tokens=8))
    calc_wf = CalculatorAgentWorkflow(tok, GenerationConfig(n_samples=args.samples,
                                                            max_new_tokens=args.max_new_tokens),
                                      max_turns=args.max_turns)
    return cfg, tok, engine, train_engine, add.train, add_wf, calc_wf


def emit(rows: list[dict[str, Any]], **row: Any) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


async def main_async(args: argparse.Namespace) -> None:
    cfg, tok, engine, train_engine, add_rows, add_wf, calc_wf = build(args)
    p, r = solved_shape(tok)
    trained = make_batch(args.prompts, args.samples, p, r, vocab=tok.vocab_size, seed=0)
    out: list[dict[str, Any]] = []
    async with engine:
        for rep in range(args.reps):
            calc_rows = calculator_tasks(args.prompts, seed=100 + rep)
            for name, wf, rows in (("addition", add_wf, add_rows[rep * args.prompts:][: args.prompts]),
                                   ("calculator", calc_wf, calc_rows)):
                gen_s, trajs = await rollout(engine, wf, rows)
                emit(out, task=name, part="rollout", rep=rep, seconds=round(gen_s, 2),
                     tokens=sum(len(t) for t in trajs), sampled=sum(sum(t.loss_mask) for t in trajs))
                emit(out, task=name, part="train", rep=rep, seconds=round(train_step(train_engine, cfg, trajs), 2),
                     tokens=sum(len(t) for t in trajs))
            emit(out, task="calculator_trained_shape", part="train", rep=rep, prompt=p, after_prompt=r,
                 seconds=round(train_step(train_engine, cfg, trained), 2), tokens=sum(len(t) for t in trained))
    print(json.dumps(summary(out, args)), flush=True)
    train_engine.destroy()


def summary(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    med = {}
    for row in rows:
        med.setdefault(f"{row['task']}/{row['part']}", []).append(row["seconds"])
    med = {k: round(statistics.median(v), 2) for k, v in med.items()}
    base = {part: med[f"addition/{part}"] for part in ("rollout", "train")}
    ratios = {k: round(v / base[k.split("/")[1]], 2) for k, v in med.items() if not k.startswith("addition")}
    return {"summary": True, "prompts": args.prompts, "samples": args.samples,
            "max_tokens_per_mb": args.max_tokens_per_mb, "median_s": med, "ratio_to_addition": ratios}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--max-turns", type=int, default=2)
    ap.add_argument("--max-tokens-per-mb", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
