"""Environment throughput: sandbox executions per second, and math_reward checks per second.

Prints one JSON object per line. Each sandbox row runs ``--n`` trivial scripts (``print(1)``) at a
given concurrency through a :class:`SandboxPool`, and beside it, in the same process, the same
number of bare ``python -I -c 'print(1)'`` subprocesses (no limits, no isolation) as the baseline,
so ``ratio_vs_bare`` is comparable across noisy runs. Usage::

    python benchmarks/bench_envs.py --n 40 --concurrency 1 2 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

from agentflow.envs.math import math_reward, shutdown_verifier_pool
from agentflow.envs.sandbox import SandboxLimits, SandboxPool, detect_isolation


async def _bare(code: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    await proc.communicate()


async def _timed_batch(make, n: int, concurrency: int) -> tuple[float, list[float]]:
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []

    async def one() -> None:
        async with sem:
            t0 = time.perf_counter()
            await make()
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(n):
            tg.create_task(one())
    return time.perf_counter() - t0, lat


async def bench_sandbox(n: int, concurrency: int) -> dict:
    pool = SandboxPool(concurrency, SandboxLimits(timeout_s=10.0, memory_mb=256))

    async def sandboxed() -> None:
        r = await pool.run("print(1)")
        assert r.ok, r

    wall, lat = await _timed_batch(sandboxed, n, concurrency)
    bare_wall, bare_lat = await _timed_batch(lambda: _bare("print(1)"), n, concurrency)
    lat.sort()
    return {
        "bench": "sandbox_exec", "n": n, "concurrency": concurrency,
        "exec_per_s": round(n / wall, 2), "p50_ms": round(1000 * statistics.median(lat), 1),
        "p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))], 1),
        "bare_exec_per_s": round(n / bare_wall, 2), "bare_p50_ms": round(1000 * statistics.median(bare_lat), 1),
        "ratio_vs_bare": round((n / wall) / (n / bare_wall), 3),
    }


async def bench_math(n: int) -> list[dict]:
    rows = []
    for kind, completion, answer in (("numeric_inline", "The answer is 72.", "72"),
                                     ("symbolic_pool", "\\boxed{\\frac{2}{4}}", "\\frac{1}{2}")):
        await math_reward(completion, answer, timeout_s=60)  # warm the workers
        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(n):
                tg.create_task(math_reward(completion, answer, timeout_s=60))
        wall = time.perf_counter() - t0
        rows.append({"bench": "math_reward", "kind": kind, "n": n, "checks_per_s": round(n / wall, 1)})
    shutdown_verifier_pool()
    return rows


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40, help="executions per row")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--math-n", type=int, default=200, help="math_reward checks per row (0 = skip)")
    args = ap.parse_args()
    iso = await detect_isolation()
    print(json.dumps({"bench": "env", "cpus": os.cpu_count(), "namespaces": bool(iso.unshare),
                      "landlock_abi": iso.landlock_abi, "seccomp": iso.seccomp, "euid": os.geteuid()}))
    for c in args.concurrency:
        print(json.dumps(await bench_sandbox(args.n, c)), flush=True)
    if args.math_n:
        for row in await bench_math(args.math_n):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
