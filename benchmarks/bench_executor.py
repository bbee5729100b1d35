"""Executor throughput and admission latency with an instant FakeEngine.

Prints one JSON line per measurement. Each throughput figure comes with a baseline measured in
the same process: the same episodes run by a bare asyncio.TaskGroup + Semaphore (no staleness
control, no buffer), so the ratio shows what the executor's bookkeeping costs.

    python benchmarks/bench_executor.py            # full
    python benchmarks/bench_executor.py --quick    # ~10 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time

from agentflow import GenerationConfig, ModelRequest, Rollout, RolloutConfig, Trajectory
from agentflow.testing import FakeEngine, random_latency

G = GenerationConfig(max_new_tokens=16)
PROMPT = list(range(3, 35))


class SingleTurn:
    async def arun_episode(self, engine, data):
        resp = await engine.agenerate(ModelRequest(PROMPT, G))
        return Trajectory.from_response(resp, reward=1.0)


class FourTurn:
    async def arun_episode(self, engine, data):
        traj = None
        ids = list(PROMPT)
        for _ in range(4):
            resp = await engine.agenerate(ModelRequest(ids, G))
            turn = Trajectory.from_response(resp) if traj is None else traj.extend([7, 8, 9], resp)
            traj = turn
            ids = [*traj.input_ids, 7, 8, 9]
        return traj.with_(reward=1.0)


async def run_executor(workflow, n: int, concurrency: int, batch: int) -> float:
    """Episodes/s through submit -> executor -> buffer -> a consumer thread."""
    cfg = RolloutConfig(max_staleness=10**9, max_concurrent=concurrency, consumer_batch_size=batch,
                        buffer_size=n + 1)
    async with FakeEngine(rollout=cfg) as engine:
        consumed = 0

        def consumer():
            nonlocal consumed
            while consumed < n:
                consumed += len(Rollout.of(engine).buffer.get_batch(min(batch, n - consumed), timeout=60))

        t0 = time.perf_counter()
        thread = threading.Thread(target=consumer)
        thread.start()
        for i in range(n):
            engine.submit(i, workflow)
        await asyncio.to_thread(thread.join)
        return n / (time.perf_counter() - t0)


async def run_baseline(workflow, n: int, concurrency: int) -> float:
    """The same episodes with a bare TaskGroup + Semaphore: no admission control, no buffer."""
    engine = FakeEngine()
    sem = asyncio.Semaphore(concurrency)
    out = []

    async def one(i):
        async with sem:
            out.append(await workflow.arun_episode(engine, i))

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for i in range(n):
            tg.create_task(one(i))
    return n / (time.perf_counter() - t0)


async def admission_latency(n: int, concurrency: int) -> dict[str, float]:
    """Slot freed (episode end) -> next queued episode starts, with random generation latencies."""
    cfg = RolloutConfig(max_staleness=10**9, max_concurrent=concurrency, buffer_size=n + 1)
    async with FakeEngine(latency=random_latency(0.002, seed=0), rollout=cfg) as engine:
        for i in range(n):
            engine.submit(i, SingleTurn())
        await engine.wait(n, timeout=120)
        lat = sorted(Rollout.of(engine).executor.admission_latencies)
    return {
        "median_us": statistics.median(lat) * 1e6,
        "p90_us": lat[int(0.9 * len(lat))] * 1e6,
        "p99_us": lat[int(0.99 * len(lat))] * 1e6,
        "samples": len(lat),
    }


async def main(quick: bool) -> None:
    n = 5_000 if quick else 40_000
    reps = 1 if quick else 3
    for name, wf in (("single_turn", SingleTurn()), ("four_turn", FourTurn())):
        m = n if name == "single_turn" else n // 4
        ex = max([await run_executor(wf, m, 256, 256) for _ in range(reps)])
        base = max([await run_baseline(wf, m, 256) for _ in range(reps)])
        print(json.dumps({"bench": "executor_throughput", "workflow": name, "episodes": m,
                          "episodes_per_s": round(ex), "baseline_episodes_per_s": round(base),
                          "ratio_vs_baseline": round(ex / base, 3)}))
    lat = await admission_latency(2_000 if quick else 10_000, 32)
    print(json.dumps({"bench": "admission_latency", "concurrency": 32, "mean_gen_latency_ms": 2.0,
                      **{k: round(v, 1) for k, v in lat.items()}}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    asyncio.run(main(parser.parse_args().quick))
