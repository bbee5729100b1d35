"""RemoteSGLangEngine through ``agentflow serve`` vs the same LocalEngine in-process.

Starts ``agentflow serve`` (LocalEngine) as a child process on a free loopback port, and a
LocalEngine with the same model and settings in this process, then measures, side by side:

1. overhead per request: sequential requests (one at a time); mean latency remote − local;
2. throughput: ``--requests`` requests at ``--concurrency``; generated tokens/s remote / local.

Phases alternate (local, remote, local, remote ...) and the best of ``--repeats`` is kept, since
the machine is shared. Both sides run with ``--threads`` torch threads. Model: the tiny random
Llama (saved to a temp dir) by default, ``--model smollm2-135m`` / an HF path, or ``--model fake``
(``FakeEngine``, no compute: the protocol's own cost).

    python benchmarks/bench_remote.py                       # tiny model
    python benchmarks/bench_remote.py --model fake --max-new-tokens 32 --chunk-tokens 8
    python benchmarks/bench_remote.py --model smollm2-135m --requests 16 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

SERVER = (
    "import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
    "from agentflow.engines.serve.server import serve_main; sys.exit(serve_main(sys.argv[2:]))"
)
FAKE_SERVER = (  # FakeEngine (no compute) behind the same app: isolates the protocol's own cost
    "import sys, uvicorn; from agentflow.testing import FakeEngine, byte_tokenizer; "
    "from agentflow.engines.serve.server import ServerConfig, build_app; "
    "app = build_app(FakeEngine(), model_path='fake', tokenizer=byte_tokenizer(), "
    "config=ServerConfig(chunk_tokens=int(sys.argv[3]))); "
    "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_dir(name: str, tmp: str) -> str:
    if name == "fake":
        return name
    if name != "tiny":
        from agentflow.engines.model_loading import resolve_model_dir

        return str(resolve_model_dir(name))
    from agentflow.testing import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer(seed=0)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return tmp


async def run_phase(engine: Any, prompts: list[list[int]], max_new: int, concurrency: int) -> tuple[float, int]:
    """(seconds, generated tokens) for all prompts at the given concurrency (greedy)."""
    from agentflow import GenerationConfig, ModelRequest

    sem = asyncio.Semaphore(concurrency)
    gconfig = GenerationConfig(max_new_tokens=max_new, temperature=0.0)

    async def one(p: list[int]) -> int:
        async with sem:
            return (await engine.agenerate(ModelRequest(p, gconfig))).output_len

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(one(p)) for p in prompts]
    return time.perf_counter() - t0, sum(t.result() for t in tasks)


def local_engine(path: str) -> tuple[Any, Any]:
    if path == "fake":
        from agentflow.testing import FakeEngine, byte_tokenizer

        return FakeEngine(), byte_tokenizer()
    from agentflow.engines.local import LocalEngine, LocalEngineConfig
    from agentflow.engines.model_loading import load_model

    model, tok = load_model(path)
    return LocalEngine(model, tok, config=LocalEngineConfig()), tok


def _prompt(tok: Any, text: str) -> list[int]:
    msgs = [{"role": "user", "content": text}]
    if getattr(tok, "chat_template", None):
        return list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    return list(tok.encode(text))


async def measure(args: argparse.Namespace, path: str, address: str) -> dict[str, float]:
    """Per-request overhead: median of paired differences (local, then remote, same prompt), so
    load changes on the shared machine hit both sides. Throughput: alternating phases, best of N."""
    import statistics

    from agentflow.engines.remote import RemoteEngineConfig, RemoteSGLangEngine

    engine, tok = local_engine(path)
    prompts = [_prompt(tok, f"Write a short story about the number {i}.") for i in range(args.requests)]
    best: dict[str, float] = {}
    diffs: list[float] = []
    client = RemoteSGLangEngine([address], config=RemoteEngineConfig(startup_timeout_s=300))
    async with engine as local, client as remote:
        for eng in (local, remote):  # warm up both
            await run_phase(eng, prompts[:2], args.max_new_tokens, 2)
        for i in range(args.sequential * args.repeats):
            p = prompts[i % len(prompts) : i % len(prompts) + 1]
            t_local, _ = await run_phase(local, p, args.max_new_tokens, 1)
            t_remote, _ = await run_phase(remote, p, args.max_new_tokens, 1)
            diffs.append(t_remote - t_local)
            best["local_latency_s"] = min(best.get("local_latency_s", 1e9), t_local)
        for _ in range(args.repeats):
            for name, eng in (("local", local), ("remote", remote)):
                s, n = await run_phase(eng, prompts, args.max_new_tokens, args.concurrency)
                best[f"{name}_tok_s"] = max(best.get(f"{name}_tok_s", 0.0), n / s)
                best[f"{name}_tokens_per_request"] = n / len(prompts)
    best["overhead_s"] = statistics.median(diffs)
    return best


def start_server(path: str, port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    if path == "fake":
        return subprocess.Popen([sys.executable, "-c", FAKE_SERVER, "-", str(port), str(args.chunk_tokens)])
    argv = ["--model", path, "--port", str(port), "--chunk-tokens", str(args.chunk_tokens), "--log-level", "warning"]
    return subprocess.Popen([sys.executable, "-c", SERVER, str(args.threads), *argv])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--sequential", type=int, default=8, help="requests in the one-at-a-time phase")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chunk-tokens", type=int, default=32, help="server chunk size (abort/stream granularity)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(args.model, tmp)
        port = free_port()
        server = start_server(path, port, args)
        try:
            r = asyncio.run(measure(args, path, f"127.0.0.1:{port}"))
        finally:
            server.terminate()
            server.wait(30)
    print(f"model={args.model} max_new_tokens={args.max_new_tokens} chunk_tokens={args.chunk_tokens} "
          f"threads={args.threads}")
    print(f"one request at a time: local best {1000 * r['local_latency_s']:.1f} ms, remote overhead "
          f"{1000 * r['overhead_s']:+.1f} ms/request (median of paired differences)")
    print(f"generated tokens/request: local {r['local_tokens_per_request']:.1f}, "
          f"remote {r['remote_tokens_per_request']:.1f}")
    print(f"throughput at concurrency {args.concurrency}: local {r['local_tok_s']:.0f} tok/s, "
          f"remote {r['remote_tok_s']:.0f} tok/s, remote/local = {r['remote_tok_s'] / r['local_tok_s']:.2f}")


if __name__ == "__main__":
    main()
