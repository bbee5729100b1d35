"""How much a train step and a generation round slow each other when they run on two different cores.

The remote layout puts generation (an ``agentflow serve`` process) on one core and the trainer on
another, and asynchrony is worth what the two can do at the same time. On a virtual machine two
cores may share a physical core, caches or memory bandwidth, so running both at once is not free.
This measures it: the trainer's process pinned to one core trains ``--steps`` steps of one batch
(``ppo_update``, ``--groups`` x ``--n-samples`` sequences of the addition task's shape) while a
child process pinned to the other core generates rounds of the same shape with ``LocalEngine``,
or sits idle. Three phases per repetition, alternating so machine noise hits all alike: training
alone, both at once, generation alone. One JSON line per phase, then a summary: median train step
and generation round, each alone and beside the other, and the slow-downs (beside / alone). Near 1
means the cores are independent; asynchrony can then hide the shorter of the two entirely.

    python benchmarks/bench_core_contention.py                                   # tiny model
    python benchmarks/bench_core_contention.py --model smollm2-135m --mixed-precision --reps 3
    python benchmarks/bench_core_contention.py --model smollm2-135m --mixed-precision --reps 1 --profile 10
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import multiprocessing as mp
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_shared_prefix import batch_from_args, load

from agentflow import GenerationConfig, ModelRequest
from agentflow.algo import AlgoConfig, ppo_update, token_advantages
from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig
from agentflow.engines.local import LocalEngine, LocalEngineConfig

IDLE, BUSY, STOP = 0, 1, 2


def _generator(model_name: str, prompts: list[list[int]], answer: int, core: int | None, state, go, rounds) -> None:
    """The child: generate rounds while ``go`` is set and ``state`` is BUSY, tagging each round with
    its phase; it waits on ``go`` in between and leaves once ``state`` is STOP."""
    import torch

    if core is not None:
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    model, tok = load(model_name)
    cfg = LocalEngineConfig(max_batch_size=len(prompts), ignore_eos=True, max_seq_len=len(prompts[0]) + answer + 8)

    async def loop() -> None:
        gen = GenerationConfig(max_new_tokens=answer, greedy=True)
        async with LocalEngine(model, tok, config=cfg) as engine:
            await asyncio.gather(*[engine.agenerate(ModelRequest(p, gen)) for p in prompts])  # warm-up
            rounds.put(("ready", 0, 0.0))
            while True:
                await asyncio.to_thread(go.wait)
                if state[0] == STOP:
                    return
                phase, t = state[1], time.perf_counter()
                await asyncio.gather(*[engine.agenerate(ModelRequest(p, gen)) for p in prompts])
                if state[1] == phase:  # a round that straddles two phases counts for neither
                    rounds.put(("round", phase, time.perf_counter() - t))

    asyncio.run(loop())


def _phases(args, train_steps, state, go) -> tuple[dict[str, list[float]], dict[int, str]]:
    """Run the three phases ``--reps`` times; returns the train step times (alone / beside
    generation) and which phase id was which (the child tags its rounds with the id)."""
    steps: dict[str, list[float]] = {"alone": [], "both": []}
    names: dict[int, str] = {}
    for rep in range(args.reps):
        for name in ("train_alone", "both", "gen_alone"):
            phase = len(names) + 1
            names[phase] = name
            state[1] = phase
            state[0] = IDLE if name == "train_alone" else BUSY
            if name != "train_alone":
                go.set()
            time.sleep(0.1 if name == "train_alone" else 0.5)  # let the child's first round start
            t0 = time.perf_counter()
            times: list[float] = []
            if name == "gen_alone":
                time.sleep(max(sum(steps["both"][-args.steps:]), 5.0))
            else:
                times = train_steps()
                steps["alone" if name == "train_alone" else "both"].extend(times)
            state[0] = IDLE
            go.clear()
            print(json.dumps({"bench": "core_contention", "rep": rep, "phase": name, "model": args.model,
                              "mixed_precision": args.mixed_precision, "wall_s": round(time.perf_counter() - t0, 3),
                              "train_step_s": [round(x, 3) for x in times]}), flush=True)
    return steps, names


def main() -> None:
    def extra(p) -> None:
        p.add_argument("--reps", type=int, default=3, help="repetitions of the three phases")
        p.add_argument("--mixed-precision", action="store_true", help="train in bf16 over fp32 master weights")
        p.add_argument("--profile", type=_count, default=0, metavar="N",
                       help="first profile one train step alone (torch.profiler) and print its N costliest ops")

    args, model, tok, trajs = batch_from_args(__doc__ or "", extra)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < 2:
        raise SystemExit(f"bench_core_contention pins to 2 cores; this process may use {len(cores) or 'unknown'}")
    gen_core, train_core = cores[0], cores[1]
    os.sched_setaffinity(0, {train_core})
    import torch

    torch.set_num_threads(1)
    algo = AlgoConfig()
    items = token_advantages(trajs, algo)
    train = FSDPEngine(FSDPEngineConfig(lr=1e-6, device="cpu", mixed_precision=args.mixed_precision),
                       model=copy.deepcopy(model), tokenizer=tok)
    train.initialize()
    prompts = [t.input_ids[: args.prompt] for t in trajs]

    ctx = mp.get_context("spawn")
    state = ctx.Array("i", [IDLE, -1])  # (what the child does, the phase id its rounds count for)
    go = ctx.Event()
    rounds = ctx.Queue()
    child = ctx.Process(target=_generator, args=(args.model, prompts, args.answer, gen_core, state, go, rounds),
                        daemon=True)
    child.start()
    if rounds.get(timeout=600)[0] != "ready":
        raise SystemExit("the generator process did not start")

    def train_steps() -> list[float]:
        out = []
        for _ in range(args.steps):
            t = time.perf_counter()
            ppo_update(train, algo, items, max_tokens_per_mb=8192, version=0)
            out.append(time.perf_counter() - t)
        return out

    train_steps()  # warm-up, generator idle
    if args.profile:
        _profile_step(train, algo, items, args.profile)
    try:
        steps, names = _phases(args, train_steps, state, go)
        time.sleep(1.0)  # the round in flight, if any, reports
    finally:
        state[0] = STOP
        go.set()
    gens = _generation_rounds(rounds, names)
    child.join(timeout=30)
    train.destroy()
    if not gens["alone"] or not gens["both"]:
        raise SystemExit(f"too few generation rounds to compare (alone {len(gens['alone'])}, beside training "
                         f"{len(gens['both'])}): raise --steps so a phase outlasts a round")
    med = {f"{kind}_{where}": statistics.median(v)
           for kind, d in (("train_step", steps), ("gen_round", gens)) for where, v in d.items()}
    print(json.dumps({
        "bench": "core_contention_summary", "model": args.model, "mixed_precision": args.mixed_precision,
        "cores": {"generation": gen_core, "train": train_core}, "groups": args.groups, "n_samples": args.n_samples,
        "prompt": args.prompt, "answer": args.answer, "reps": args.reps,
        "gen_rounds": {k: len(v) for k, v in gens.items()}, **{k: round(v, 3) for k, v in med.items()},
        "train_slowdown": round(med["train_step_both"] / med["train_step_alone"], 3),
        "gen_slowdown": round(med["gen_round_both"] / med["gen_round_alone"], 3)}))


def _count(text: str) -> int:
    """``--profile N``: a whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 (ops to list; 0 = no profile), got {text!r}")
    return int(text)


def _generation_rounds(rounds, names: dict[int, str]) -> dict[str, list[float]]:
    """The generator's round times, by where they ran: ``alone`` or ``both`` (beside training)."""
    gens: dict[str, list[float]] = {"alone": [], "both": []}
    while not rounds.empty():
        kind, phase, sec = rounds.get()
        if kind == "round" and names.get(phase) in ("both", "gen_alone"):
            gens["both" if names[phase] == "both" else "alone"].append(sec)
    return gens


def _profile_step(train, algo, items, top: int) -> None:
    """One JSON line: the step's wall time and its ``top`` ops by own CPU time (the generator idles)."""
    from torch.profiler import ProfilerActivity, profile

    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ppo_update(train, algo, items, max_tokens_per_mb=8192, version=0)
    wall = time.perf_counter() - t
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    print(json.dumps({"bench": "core_contention_profile", "step_s": round(wall, 3), "ops": [
        {"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count} for e in ops]}))


if __name__ == "__main__":
    main()
