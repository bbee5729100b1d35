"""Request overhead of the OpenAI-compatible proxy vs the in-process OpenAIClient.

Both run over ``FakeEngine(latency=0)`` (the engine costs nothing), so the figures are the cost of
agentflow's own layers: templating, tokenising, recording and building the ChatCompletion
(in-process), plus HTTP, JSON and the openai SDK's request/response handling (proxy). Client and
server share this process and its event loop, as an agent coroutine talking to the proxy would.

Prints one JSON line per mode:
  {"bench": "proxy", "mode": ..., "requests": N, "concurrency": C, "req_per_s": ..., "mean_ms": ...,
   "p50_ms": ..., "p99_ms": ..., "overhead_ms": mean_ms - in-process mean_ms}

Usage: python benchmarks/bench_proxy.py [--requests 400] [--concurrency 16] [--output-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable

import httpx
import openai

from agentflow import GenerationConfig, ModelRequest, OpenAIClient
from agentflow.proxy import ProxyServer
from agentflow.testing import FakeEngine, byte_tokenizer

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a calculator."}, {"role": "user", "content": f"What is {i}+2?"}]


async def _timed(n: int, concurrency: int, call: Callable[[int], Awaitable[object]]) -> tuple[float, list[float]]:
    """Run ``call(i)`` for i < n with ``concurrency`` workers; (wall seconds, per-call seconds)."""
    lat: list[float] = []
    it = iter(range(n))

    async def worker() -> None:
        for i in it:
            t0 = time.perf_counter()
            await call(i)
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return time.perf_counter() - t0, lat


def _row(mode: str, n: int, c: int, wall: float, lat: list[float], base_ms: float | None) -> dict:
    lat_ms = sorted(x * 1e3 for x in lat)
    mean = statistics.fmean(lat_ms)
    return {
        "bench": "proxy", "mode": mode, "requests": n, "concurrency": c,
        "req_per_s": round(n / wall, 1), "mean_ms": round(mean, 3),
        "p50_ms": round(lat_ms[len(lat_ms) // 2], 3), "p99_ms": round(lat_ms[int(len(lat_ms) * 0.99) - 1], 3),
        "overhead_ms": None if base_ms is None else round(mean - base_ms, 3),
    }


async def main(n: int, concurrency: int, out_tokens: int) -> None:
    tok = byte_tokenizer()
    reply = [*tok.encode("x" * (out_tokens - 1), add_special_tokens=False), tok.eos_token_id]
    engine = FakeEngine(reply=lambda req: list(reply))
    gconfig = GenerationConfig(max_new_tokens=out_tokens)

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)

    async with engine, ProxyServer(engine, tok, gconfig=gconfig) as proxy:
        # Baselines: the engine alone, then the in-process client.
        req = ModelRequest(input_ids=tok.encode("hello", add_special_tokens=False), gconfig=gconfig)
        wall, lat = await _timed(n, 1, lambda i: engine.agenerate(req))
        emit(_row("engine_only", n, 1, wall, lat, None))
        local = OpenAIClient(engine, tok, gconfig=gconfig)
        await _timed(20, 1, lambda i: local.chat.completions.create(messages=_messages(i), tools=TOOLS))  # warm-up
        wall, lat = await _timed(n, 1, lambda i: local.chat.completions.create(messages=_messages(i), tools=TOOLS))
        base_ms = statistics.fmean(lat) * 1e3
        emit(_row("in_process", n, 1, wall, lat, base_ms))

        session = proxy.new_session()
        async with openai.AsyncOpenAI(base_url=session.base_url, api_key=session.api_key, max_retries=0) as sdk:
            def via_sdk(i: int) -> Awaitable[object]:
                return sdk.chat.completions.create(model="agentflow", messages=_messages(i), tools=TOOLS)

            await _timed(20, 1, via_sdk)
            for c in (1, concurrency):
                wall, lat = await _timed(n, c, via_sdk)
                emit(_row("proxy_openai_sdk", n, c, wall, lat, base_ms))

        headers = {"Authorization": f"Bearer {session.api_key}"}
        async with httpx.AsyncClient(base_url=session.base_url, headers=headers) as http:
            async def via_httpx(i: int) -> None:
                body = {"model": "agentflow", "messages": _messages(i), "tools": TOOLS}
                (await http.post("/chat/completions", json=body)).raise_for_status()

            for c in (1, concurrency):
                wall, lat = await _timed(n, c, via_httpx)
                emit(_row("proxy_httpx", n, c, wall, lat, base_ms))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--output-tokens", type=int, default=32)
    args = ap.parse_args()
    asyncio.run(main(args.requests, args.concurrency, args.output_tokens))
