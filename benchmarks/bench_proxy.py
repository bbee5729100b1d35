"""Request overhead of the OpenAI-compatible proxy vs the in-process OpenAIClient, per API and stream mode.

Both run over ``FakeEngine(latency=0)`` (the engine costs nothing), so the figures are the cost of
agentflow's own layers: templating, tokenising, recording and building the ChatCompletion
(in-process), plus HTTP, JSON and the openai SDK's request/response handling (proxy). Client and
server share this process and its event loop, as an agent coroutine talking to the proxy would.

Four variants run in process and through the proxy with the official SDK: chat completions
(the baseline), chat completions with ``stream=True`` (every chunk read), the Responses API, and
the Responses API streamed (every event read). The variants of a group alternate in ``--rounds``
rounds so that load changes on a shared machine hit them alike; ``ratio_vs_chat`` is a variant's
mean over its group's non-streamed chat mean, measured in the same process (``p50_ratio_vs_chat``:
the same with medians, steadier under load).

A second proxy group compares the other routes with chat completions in the same rounds:
Anthropic's Messages API with the official ``anthropic`` SDK (plain, and streamed with every event
read), and vLLM's tokens-only route (``/inference/v1/generate``) with plain httpx beside chat
completions with plain httpx (an SDK-free pair: ``ratio_vs_chat`` of the tokens route is over
``proxy_httpx_chat``). Skipped without the ``anthropic`` package.

Prints one JSON line per mode:
  {"bench": "proxy", "mode": ..., "api": "chat" | "responses", "stream": bool, "requests": N,
   "concurrency": C, "req_per_s": ..., "mean_ms": ..., "p50_ms": ..., "p99_ms": ...,
   "overhead_ms": mean_ms - in-process chat mean_ms, "ratio_vs_chat": ..., "p50_ratio_vs_chat": ...}

Usage: python benchmarks/bench_proxy.py [--requests 400] [--concurrency 16] [--output-tokens 32] [--rounds 4]

``--hostile`` instead measures the proxy under hostile clients (default ``ProxyLimits``), each case
with the event loop's longest block seen by a probe task (a 2 ms sleep loop) and the process's RSS
growth: a ``previous_response_id`` chain of 0.9 MB bodies (17 turns, or until refused), one request
of 30,000 ``input`` items, a chain of 1,000 tiny turns (or until refused), and 300 half-sent
request heads (how many are still open after ``header_timeout_s`` + 1 s). Bodies are sent
pre-encoded with httpx, so the client's own encoding is not measured. One JSON line per case:
  {"bench": "proxy_hostile", "case": ..., "statuses": {...}, "wall_s": ..., "loop_block_ms": ...,
   "rss_growth_mib": ..., ...}
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

try:
    import anthropic
except ImportError:  # the Messages API rows need it
    anthropic = None

from agentflow import GenerationConfig, ModelRequest, OpenAIClient
from agentflow.proxy import ProxyServer
from agentflow.testing import FakeEngine, byte_tokenizer

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
RESPONSES_TOOLS = [{"type": "function", "name": "add", "parameters": {"type": "object"}}]
INSTRUCTIONS = "You are a calculator."


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": f"What is {i}+2?"}]


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


Call = Callable[[int], Awaitable[object]]
# (mode suffix, api, stream) of the four variants; "" is the non-streamed chat baseline.
VARIANTS = [("", "chat", False), ("_stream", "chat", True), ("_responses", "responses", False),
            ("_responses_stream", "responses", True)]


def _row(mode: str, n: int, c: int, wall: float, lat: list[float], base_ms: float | None, **extra: object) -> dict:
    lat_ms = sorted(x * 1e3 for x in lat)
    mean = statistics.fmean(lat_ms)
    return {
        "bench": "proxy", "mode": mode, **extra, "requests": n, "concurrency": c,
        "req_per_s": round(n / wall, 1), "mean_ms": round(mean, 3),
        "p50_ms": round(lat_ms[len(lat_ms) // 2], 3), "p99_ms": round(lat_ms[int(len(lat_ms) * 0.99) - 1], 3),
        "overhead_ms": None if base_ms is None else round(mean - base_ms, 3),
    }


def _variant_calls(api: openai.AsyncOpenAI) -> list[Call]:
    """Chat, chat streamed, Responses, Responses streamed (streams read to the end) against ``api``."""

    async def drain(stream: openai.AsyncStream) -> None:
        async with stream:
            async for _ in stream:
                pass

    def chat(stream: bool) -> Call:
        async def call(i: int) -> None:
            out = await api.chat.completions.create(model="agentflow", messages=_messages(i), tools=TOOLS,
                                                    stream=stream)
            if stream:
                await drain(out)
        return call

    def responses(stream: bool) -> Call:
        async def call(i: int) -> None:
            out = await api.responses.create(model="agentflow", instructions=INSTRUCTIONS, input=f"What is {i}+2?",
                                             tools=RESPONSES_TOOLS, stream=stream)
            if stream:
                await drain(out)
        return call

    return [chat(False), chat(True), responses(False), responses(True)]


async def _compare(prefix: str, calls: list[Call], n: int, rounds: int, base_ms: float | None) -> list[dict]:
    """Run the four variants in alternating rounds (n requests each in all); rows with ratios to chat."""
    for call in calls:
        await _timed(20, 1, call)  # warm-up
    walls, lats = [0.0] * len(calls), [[] for _ in calls]
    for _ in range(rounds):
        for k, call in enumerate(calls):
            wall, lat = await _timed(n // rounds, 1, call)
            walls[k] += wall
            lats[k] += lat
    rows = [_row(prefix + suffix, len(lat), 1, wall, lat, base_ms, api=api, stream=stream)
            for (suffix, api, stream), wall, lat in zip(VARIANTS, walls, lats, strict=True)]
    for row in rows:
        row["ratio_vs_chat"] = round(row["mean_ms"] / rows[0]["mean_ms"], 3)
        row["p50_ratio_vs_chat"] = round(row["p50_ms"] / rows[0]["p50_ms"], 3)
        if base_ms is None:
            row["overhead_ms"] = round(row["mean_ms"] - rows[0]["mean_ms"], 3)
    return rows


def _other_api_calls(sdk: openai.AsyncOpenAI, http: httpx.AsyncClient, tok: object,
                     anthropic_sdk: object) -> list[tuple[str, str, bool, Call]]:
    """(mode suffix, api, stream, call): chat (openai SDK), Messages (anthropic SDK, plain and streamed),
    chat over plain httpx, the tokens-only route over plain httpx."""
    system, tools = INSTRUCTIONS, [{"name": "add", "input_schema": {"type": "object"}}]
    prompts = [tok.apply_chat_template(_messages(i), tools=TOOLS, tokenize=False, add_generation_prompt=True)
               for i in range(10)]
    token_ids = [tok.encode(p, add_special_tokens=False) for p in prompts]

    async def chat(i: int) -> None:
        await sdk.chat.completions.create(model="agentflow", messages=_messages(i), tools=TOOLS)

    def messages(stream: bool) -> Call:
        async def call(i: int) -> None:
            kw = {"model": "agentflow", "max_tokens": 64, "system": system, "tools": tools,
                  "messages": [{"role": "user", "content": f"What is {i}+2?"}]}
            if not stream:
                await anthropic_sdk.messages.create(**kw)
                return
            async with anthropic_sdk.messages.stream(**kw) as events:
                async for _ in events:
                    pass
        return call

    async def chat_httpx(i: int) -> None:
        body = {"model": "agentflow", "messages": _messages(i), "tools": TOOLS}
        (await http.post("/v1/chat/completions", json=body)).raise_for_status()

    async def tokens(i: int) -> None:
        body = {"model": "agentflow", "token_ids": token_ids[i % 10], "sampling_params": {"max_tokens": 64}}
        (await http.post("/inference/v1/generate", json=body)).raise_for_status()

    return [("_chat", "chat", False, chat), ("_messages", "messages", False, messages(False)),
            ("_messages_stream", "messages", True, messages(True)), ("_httpx_chat", "chat", False, chat_httpx),
            ("_httpx_tokens", "tokens", False, tokens)]


async def _compare_routes(named: list[tuple[str, str, bool, Call]], n: int, rounds: int, base_ms: float) -> list[dict]:
    """The routes in alternating rounds; ratios over the openai-SDK chat mean (the tokens route: over httpx chat)."""
    for *_, call in named:
        await _timed(20, 1, call)  # warm-up
    walls, lats = [0.0] * len(named), [[] for _ in named]
    for _ in range(rounds):
        for k, (*_, call) in enumerate(named):
            wall, lat = await _timed(n // rounds, 1, call)
            walls[k] += wall
            lats[k] += lat
    rows = [_row("proxy" + suffix, len(lat), 1, wall, lat, base_ms, api=api, stream=stream)
            for (suffix, api, stream, _), wall, lat in zip(named, walls, lats, strict=True)]
    for row in rows:
        base = rows[3] if row["mode"] == "proxy_httpx_tokens" else rows[0]
        row["ratio_vs_chat"] = round(row["mean_ms"] / base["mean_ms"], 3)
        row["p50_ratio_vs_chat"] = round(row["p50_ms"] / base["p50_ms"], 3)
    return rows


async def main(n: int, concurrency: int, out_tokens: int, rounds: int) -> None:
    tok = byte_tokenizer()
    reply = [*tok.encode("x" * (out_tokens - 1), add_special_tokens=False), tok.eos_token_id]
    engine = FakeEngine(reply=lambda req: list(reply))
    gconfig = GenerationConfig(max_new_tokens=out_tokens)

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)

    async with engine, ProxyServer(engine, tok, gconfig=gconfig) as proxy:
        # Baselines: the engine alone, then the in-process client (its chat mean is the overhead base).
        req = ModelRequest(input_ids=tok.encode("hello", add_special_tokens=False), gconfig=gconfig)
        wall, lat = await _timed(n, 1, lambda i: engine.agenerate(req))
        emit(_row("engine_only", n, 1, wall, lat, None))
        local = OpenAIClient(engine, tok, gconfig=gconfig)
        rows = await _compare("in_process", _variant_calls(local), n, rounds, None)
        base_ms = rows[0]["mean_ms"]
        for row in rows:
            emit(row)

        session = proxy.new_session()
        async with openai.AsyncOpenAI(base_url=session.base_url, api_key=session.api_key, max_retries=0) as sdk:
            for row in await _compare("proxy_openai_sdk", _variant_calls(sdk), n, rounds, base_ms):
                emit(row)
            calls = _variant_calls(sdk)
            wall, lat = await _timed(n, concurrency, calls[0])
            emit(_row("proxy_openai_sdk", n, concurrency, wall, lat, base_ms, api="chat", stream=False))

        headers = {"Authorization": f"Bearer {session.api_key}"}
        if anthropic is not None:
            key = session.api_key
            async with openai.AsyncOpenAI(base_url=session.base_url, api_key=key, max_retries=0) as sdk, \
                    anthropic.AsyncAnthropic(base_url=session.root_url, api_key=key, max_retries=0) as ant, \
                    httpx.AsyncClient(base_url=session.root_url, headers=headers) as http:
                for row in await _compare_routes(_other_api_calls(sdk, http, tok, ant), n, rounds, base_ms):
                    emit(row)

        async with httpx.AsyncClient(base_url=session.base_url, headers=headers) as http:
            async def via_httpx(i: int) -> None:
                body = {"model": "agentflow", "messages": _messages(i), "tools": TOOLS}
                (await http.post("/chat/completions", json=body)).raise_for_status()

            for c in (1, concurrency):
                wall, lat = await _timed(n, c, via_httpx)
                emit(_row("proxy_httpx", n, c, wall, lat, base_ms, api="chat", stream=False))


# ---------------------------------------------------------------------------------------- hostile clients
def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def _probe(stop: asyncio.Event, longest: list[float]) -> None:
    loop = asyncio.get_running_loop()
    last = loop.time()
    while not stop.is_set():
        await asyncio.sleep(0.002)
        now = loop.time()
        longest[0] = max(longest[0], now - last - 0.002)
        last = now


async def _measured(case: str, work: Callable[[], Awaitable[dict]]) -> None:
    stop, longest, rss0, t0 = asyncio.Event(), [0.0], _rss_mib(), time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_probe(stop, longest))
        try:
            extra = await work()
        finally:
            stop.set()
    print(json.dumps({"bench": "proxy_hostile", "case": case, **extra, "wall_s": round(time.perf_counter() - t0, 2),
                      "loop_block_ms": round(longest[0] * 1e3, 1),
                      "rss_growth_mib": round(_rss_mib() - rss0, 1)}), flush=True)


async def _chain(http: httpx.AsyncClient, text: str, turns: int) -> dict:
    """Turns of a previous_response_id chain until one is refused; the statuses seen."""
    previous, statuses = None, {}
    for _ in range(turns):
        body = json.dumps({"model": "m", "input": text, "previous_response_id": previous}).encode()
        r = await http.post("/v1/responses", content=body)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code != 200:
            return {"statuses": statuses, "refused_with": r.json()["error"]["message"][:160]}
        previous = r.json()["id"]
    return {"statuses": statuses}


async def _half_sent(proxy: ProxyServer, n: int) -> dict:
    host, port = proxy.base_url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(n)]
    for _, writer in conns:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # the head is never finished
    await asyncio.sleep(proxy.limits.header_timeout_s + 1)
    still_open = sum(not reader.at_eof() for reader, _ in conns)
    for _, writer in conns:
        writer.close()
    return {"statuses": {}, "half_sent": n, "still_open_after_s": proxy.limits.header_timeout_s + 1,
            "still_open": still_open}


HOSTILE_CASES = ("baseline_idle", "chain_0.9MB_x17", "input_items_30000", "chain_tiny_x1000", "half_sent_heads_300")


async def hostile(cases: list[str]) -> None:
    """The hostile-client cases named (``baseline_idle``: the probe alone for 2 s, the machine's own noise)."""
    tok = byte_tokenizer()
    engine = FakeEngine(reply=lambda req: [*tok.encode("ok", add_special_tokens=False), tok.eos_token_id])
    async with engine, ProxyServer(engine, tok) as proxy:
        def client() -> httpx.AsyncClient:
            s = proxy.new_session()
            return httpx.AsyncClient(base_url=s.root_url, timeout=120, headers={
                "Authorization": f"Bearer {s.api_key}", "content-type": "application/json"})

        async def idle() -> dict:
            await asyncio.sleep(2)
            return {"statuses": {}}

        async def items(http: httpx.AsyncClient) -> dict:
            body = json.dumps({"model": "m", "input": [{"role": "user", "content": "x"}] * 30_000}).encode()
            return {"statuses": {(await http.post("/v1/responses", content=body)).status_code: 1}}

        work = {
            "baseline_idle": lambda http: idle(),
            "chain_0.9MB_x17": lambda http: _chain(http, "x" * 900_000, 17),
            "input_items_30000": items,
            "chain_tiny_x1000": lambda http: _chain(http, "hello there", 1000),
            "half_sent_heads_300": lambda http: _half_sent(proxy, 300),
        }
        for case in cases:
            async with client() as http:
                await _measured(case, lambda: work[case](http))  # noqa: B023  # awaited before the next case


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4, help="alternations of the four variants (API x stream)")
    ap.add_argument("--hostile", nargs="*", choices=HOSTILE_CASES, metavar="CASE",
                    help=f"measure hostile clients instead (see the docstring): any of {', '.join(HOSTILE_CASES)}; "
                         "none named = all, in one process (RSS growth is clearest with one case per process)")
    args = ap.parse_args()
    if args.hostile is not None:
        asyncio.run(hostile(args.hostile or list(HOSTILE_CASES)))
    else:
        asyncio.run(main(args.requests, args.concurrency, args.output_tokens, args.rounds))
