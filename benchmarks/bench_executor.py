"""Executor throughput, admission latency and how both scale, with an instant FakeEngine.

Prints one JSON line per measurement. Each throughput figure comes with a baseline measured in
the same process: the same episodes run by a bare asyncio.TaskGroup + Semaphore (no staleness
control, no buffer), so the ratio shows what the executor's bookkeeping costs.

The scaling table runs 10^3 ... 10^6 episodes while the replay buffer holds 10^2 ... 10^5 groups
throughout (a resident backlog filed under a newer version, so the oldest-first consumer takes
the fresh episodes and the backlog stays): episodes/s of every cell over the smallest cell's
(ratio; goal >= 0.8). Then the cost of one consumer step: 512 groups taken from 10^3 and from
10^5 buffered groups (goal under 10 ms).

    python benchmarks/bench_executor.py                 # everything (~15 min on 2 busy cores)
    python benchmarks/bench_executor.py --quick         # ~1 min: up to 10^4 episodes and held groups
    python benchmarks/bench_executor.py --only scaling --max-episodes 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from dataclasses import dataclass

from agentflow import GenerationConfig, Group, ModelRequest, ReplayBuffer, Rollout, RolloutConfig, Trajectory
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


# ---------------------------------------------------------------------------- scaling
_BACKLOG_VERSION = 10**6  # newer than any version a run reaches: the backlog is consumed last


def _backlog_group(i: int) -> Group:
    traj = Trajectory([1, 2, 3], [0, 1, 1], [0.0, -0.1, -0.1], [-1, 0, 0], reward=1.0)
    g = Group(f"held-{i}", [traj])
    g.min_version = _BACKLOG_VERSION + i % 64  # spread over 64 versions: the heap has work to do
    return g


def _consume_fresh(buffer: ReplayBuffer, n: int, batch: int, held: int, marks: list[tuple[int, float]]) -> None:
    """Take ``n`` groups in batches, each batch once ``batch`` fresh groups are in (never the backlog);
    append (groups consumed, process CPU seconds) to ``marks`` after every batch.

    Waits on the buffer's own condition (notified by every put): no polling.
    """
    consumed = 0
    while consumed < n:
        k = min(batch, n - consumed)
        with buffer._cond:  # benchmark only: block until k fresh groups were put
            buffer._cond.wait_for(lambda need=consumed + k: buffer.stats.put >= need, timeout=600)
        groups = buffer.get_groups(k, timeout=60)
        assert not any(g.group_id.startswith("held-") for g in groups), "took the backlog: ordering broke"
        consumed += len(groups)
        marks.append((consumed, time.process_time()))
    assert len(buffer) == held


def _window_rate(marks: list[tuple[int, float]], lo: float, hi: float) -> float:
    """Episodes per CPU second between the marks nearest to fractions ``lo`` and ``hi`` of the run."""
    n = marks[-1][0]
    a = min(marks, key=lambda m: abs(m[0] - lo * n))
    b = min(marks, key=lambda m: abs(m[0] - hi * n))
    return (b[0] - a[0]) / (b[1] - a[1]) if b[1] > a[1] else float("nan")


@dataclass(frozen=True, slots=True)
class ScalingRun:
    wall_eps: float  # episodes per wall second, whole run
    cpu_eps: float  # episodes per CPU second of this process (all threads), whole run
    early_cpu_eps: float  # the same over 10%..20% of the run
    late_cpu_eps: float  # the same over 90%..100% of the run: the per-episode cost at full size


async def run_scaling(episodes: int, held: int, *, concurrency: int = 256, batch: int = 256) -> ScalingRun:
    """Submit -> executor -> buffer -> consumer thread, with ``held`` groups resident in the buffer throughout."""
    cfg = RolloutConfig(max_staleness=10**9, max_concurrent=concurrency, consumer_batch_size=batch,
                        buffer_size=held + 4 * batch)
    async with FakeEngine(rollout=cfg) as engine:
        rollout = Rollout.of(engine)
        for i in range(held):
            rollout.buffer.put_nowait(_backlog_group(i))
        wf = SingleTurn()
        t0, c0 = time.perf_counter(), time.process_time()
        marks: list[tuple[int, float]] = [(0, c0)]
        thread = threading.Thread(target=_consume_fresh, args=(rollout.buffer, episodes, batch, held, marks))
        thread.start()
        for i in range(episodes):
            await rollout.wait_for_room(2 * concurrency)
            rollout.submit(i, wf)
        await asyncio.to_thread(thread.join)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if episodes < 20 * batch:  # too few batches for windows: the whole run is both
        return ScalingRun(episodes / wall, episodes / cpu, episodes / cpu, episodes / cpu)
    return ScalingRun(episodes / wall, episodes / cpu, _window_rate(marks, 0.1, 0.2), _window_rate(marks, 0.9, 1.0))


def _reps(episodes: int) -> int:
    """Best of this many runs: about 30,000 episodes per cell, at least one run."""
    return max(1, min(10, 30_000 // episodes))


async def scaling_table(episode_sizes: list[int], held_sizes: list[int]) -> None:
    """Every (episodes, held) cell against the smallest. CPU time is the criterion on a shared
    machine (other processes steal wall time, not this process's CPU time); wall time is printed too.
    Repetitions go round-robin over the cells, so a slow spell of the machine hits all of them.
    ``late_vs_early``: the per-episode CPU rate in the last 10% of a run over the rate at 10-20% of
    the same run (same process, minutes apart at most): below 1 would mean the cost grows with the run."""
    await run_scaling(2_000, 100)  # warm-up: first-call costs stay out of the smallest cell
    cells = [(n, held) for held in held_sizes for n in episode_sizes]
    runs: dict[tuple[int, int], list[ScalingRun]] = {c: [] for c in cells}
    for rep in range(max(_reps(n) for n, _ in cells)):
        for n, held in cells:
            if rep < _reps(n):
                runs[n, held].append(await run_scaling(n, held))
    base = None
    for cell in cells:
        rs = runs[cell]
        wall, cpu = max(r.wall_eps for r in rs), max(r.cpu_eps for r in rs)
        early, late = max(r.early_cpu_eps for r in rs), max(r.late_cpu_eps for r in rs)
        base = base or (wall, cpu)
        print(json.dumps({"bench": "executor_scaling", "episodes": cell[0], "buffered_groups": cell[1],
                          "episodes_per_cpu_s": round(cpu), "cpu_ratio_vs_smallest": round(cpu / base[1], 3),
                          "late_vs_early": round(late / early, 3),
                          "late_cpu_ratio_vs_smallest": round(late / base[1], 3),
                          "episodes_per_s": round(wall), "wall_ratio_vs_smallest": round(wall / base[0], 3),
                          "reps": len(rs)}), flush=True)


def consumer_take(held: int, k: int = 512, reps: int = 7) -> float:
    """Best-of-``reps`` seconds to take ``k`` groups from a buffer holding ``held`` (put back between reps)."""
    buf = ReplayBuffer(RolloutConfig(max_staleness=10**9, buffer_size=held + k))
    traj = Trajectory([1, 2], [0, 1], [0.0, -0.1], [-1, 0])
    for i in range(held):
        g = Group(str(i), [traj])
        g.min_version = i % 8
        buf.put_nowait(g)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        groups = buf.get_groups(k, timeout=60)
        best = min(best, time.perf_counter() - t0)
        for g in groups:
            buf.put_nowait(g)
    return best


def consumer_table() -> None:
    small, big = consumer_take(1_000), consumer_take(100_000)
    print(json.dumps({"bench": "consumer_take", "groups_taken": 512, "from_1e3_ms": round(small * 1e3, 3),
                      "from_1e5_ms": round(big * 1e3, 3), "ratio": round(big / small, 2)}), flush=True)


# ---------------------------------------------------------------------------- main
async def throughput_and_latency(quick: bool) -> None:
    n = 5_000 if quick else 40_000
    reps = 1 if quick else 3
    for name, wf in (("single_turn", SingleTurn()), ("four_turn", FourTurn())):
        m = n if name == "single_turn" else n // 4
        ex = max([await run_executor(wf, m, 256, 256) for _ in range(reps)])
        base = max([await run_baseline(wf, m, 256) for _ in range(reps)])
        print(json.dumps({"bench": "executor_throughput", "workflow": name, "episodes": m,
                          "episodes_per_s": round(ex), "baseline_episodes_per_s": round(base),
                          "ratio_vs_baseline": round(ex / base, 3)}), flush=True)
    lat = await admission_latency(2_000 if quick else 10_000, 32)
    print(json.dumps({"bench": "admission_latency", "concurrency": 32, "mean_gen_latency_ms": 2.0,
                      **{k: round(v, 1) for k, v in lat.items()}}), flush=True)


async def main(args: argparse.Namespace) -> None:
    top = 10_000 if args.quick else args.max_episodes
    episodes = [n for n in (1_000, 10_000, 100_000, 1_000_000) if n <= top]
    held = [h for h in (100, 1_000, 10_000, 100_000) if h <= (10_000 if args.quick else args.max_held)]
    if args.only in (None, "throughput"):
        await throughput_and_latency(args.quick)
    if args.only in (None, "consumer"):
        consumer_table()
    if args.only in (None, "scaling"):
        await scaling_table(episodes, held)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["throughput", "consumer", "scaling"])
    parser.add_argument("--max-episodes", type=int, default=1_000_000)
    parser.add_argument("--max-held", type=int, default=100_000)
    asyncio.run(main(parser.parse_args()))
