"""What overlapping generation with training saves when both share one machine's cores.

An asynchronous run in one process generates the next batch (LocalEngine's worker thread) while
the trainer's thread updates the weights; a synchronous run does one, then the other. This runs the
same work both ways: ``--steps`` rounds, each one rollout batch (G prompts x n samples, prompt and
answer lengths of the addition task by default) and one ``ppo_update`` on a batch of that shape.
Sequential: generate, then train, round by round. Overlapped: the train thread runs its steps while
the event loop generates its rounds. The two layouts alternate ``--reps`` times so machine noise
hits both alike. One JSON line per repetition, then a summary: median wall seconds of each layout
and the speed-up (sequential / overlapped). On a CPU machine whose cores both sides already fill,
the speed-up is near 1: the overlap saves only the time one side leaves the cores idle.

    python benchmarks/bench_overlap.py                                  # tiny model, seconds
    python benchmarks/bench_overlap.py --model smollm2-135m --steps 3 --reps 2
"""

from __future__ import annotations

import asyncio
import copy
import json
import pathlib
import statistics
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_shared_prefix import batch_from_args

from agentflow import GenerationConfig, ModelRequest
from agentflow.algo import AlgoConfig, ppo_update, token_advantages
from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig
from agentflow.engines.local import LocalEngine, LocalEngineConfig


async def generate_round(engine: LocalEngine, prompts: list[list[int]], answer: int) -> float:
    t0 = time.perf_counter()
    cfg = GenerationConfig(max_new_tokens=answer, greedy=True)
    await asyncio.gather(*[engine.agenerate(ModelRequest(p, cfg)) for p in prompts])
    return time.perf_counter() - t0


async def sequential(engine: LocalEngine, train: FSDPEngine, algo: AlgoConfig, items: list, prompts: list[list[int]],
                     answer: int, steps: int) -> dict[str, float]:
    t0, gen_s, train_s = time.perf_counter(), 0.0, 0.0
    for _ in range(steps):
        gen_s += await generate_round(engine, prompts, answer)
        t = time.perf_counter()
        await asyncio.to_thread(ppo_update, train, algo, items, max_tokens_per_mb=8192, version=0)
        train_s += time.perf_counter() - t
    return {"wall_s": time.perf_counter() - t0, "gen_s": gen_s, "train_s": train_s}


async def overlapped(engine: LocalEngine, train: FSDPEngine, algo: AlgoConfig, items: list, prompts: list[list[int]],
                     answer: int, steps: int) -> dict[str, float]:
    done: dict[str, float] = {}

    def train_steps() -> None:
        t = time.perf_counter()
        for _ in range(steps):
            ppo_update(train, algo, items, max_tokens_per_mb=8192, version=0)
        done["train_s"] = time.perf_counter() - t

    t0 = time.perf_counter()
    worker = threading.Thread(target=train_steps, name="bench-train")
    worker.start()
    gen_s = 0.0
    for _ in range(steps):
        gen_s += await generate_round(engine, prompts, answer)
    await asyncio.to_thread(worker.join)
    return {"wall_s": time.perf_counter() - t0, "gen_s": gen_s, "train_s": done["train_s"]}


async def run() -> None:
    args, model, tok, trajs = batch_from_args(
        __doc__ or "", lambda p: p.add_argument("--reps", type=int, default=3, help="alternations of the two layouts"))
    reps = args.reps
    algo = AlgoConfig()
    items = token_advantages(trajs, algo)
    train = FSDPEngine(FSDPEngineConfig(lr=1e-6, device="cpu"), model=copy.deepcopy(model), tokenizer=tok)
    train.initialize()
    prompts = [t.input_ids[: args.prompt] for t in trajs]
    cfg = LocalEngineConfig(max_batch_size=len(prompts), ignore_eos=True, max_seq_len=args.prompt + args.answer + 8)
    results: dict[str, list[float]] = {"sequential": [], "overlapped": []}
    async with LocalEngine(model, tok, config=cfg) as engine:
        await sequential(engine, train, algo, items, prompts, args.answer, 1)  # warm-up
        for rep in range(reps):
            for name, fn in (("sequential", sequential), ("overlapped", overlapped)):
                r = await fn(engine, train, algo, items, prompts, args.answer, args.steps)
                results[name].append(r["wall_s"])
                print(json.dumps({"bench": "overlap", "layout": name, "rep": rep, "model": args.model,
                                  "threads": args.threads, **{k: round(v, 3) for k, v in r.items()}}), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(json.dumps({"bench": "overlap_speedup", "model": args.model, "threads": args.threads, "steps": args.steps,
                      "reps": reps, "groups": args.groups, "n_samples": args.n_samples, "prompt": args.prompt,
                      "answer": args.answer, "sequential_s": round(med["sequential"], 3),
                      "overlapped_s": round(med["overlapped"], 3),
                      "speedup": round(med["sequential"] / med["overlapped"], 3)}))
    train.destroy()


if __name__ == "__main__":
    asyncio.run(run())
