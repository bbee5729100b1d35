"""Inference throughput: LocalEngine vs plain ``model.generate`` on SmolLM2-135M (CPU by default).

Prints one JSON object per line (``{"bench": ..., ...}``). Workloads, all greedy, eos ignored so
every request produces exactly its ``max_new_tokens``; "useful tokens" = the tokens requests asked
for (padding and tokens past a request's own limit do not count):

- ``equal``: ``batch`` chat prompts, each ``max_new`` tokens. ``generate`` runs them as one
  left-padded batch; LocalEngine gets all requests at once.
- ``mixed``: ``2 · batch`` requests whose ``max_new_tokens`` spread evenly from ``max_new/8`` to
  ``max_new`` (shuffled, seeded). ``generate`` runs them in arrival order, ``batch`` at a time, each
  batch padded to its longest request; LocalEngine (``max_batch_size=batch``) refills a row the
  step a request finishes.
- ``lora``: LocalEngine with LoRA adapters (rank ``--lora-rank`` on every attention and MLP
  projection, random weights): ``batch`` requests all on one adapter vs the same requests spread
  round-robin over 2 and 4 adapters (one batch mixing them: PEFT runs each adapter on its own
  rows), and the base model alone in the same engine; tokens/s and the ratio to one adapter.
- ``vllm``: the ``equal`` workload on a real vLLM server as well (``--vllm-python``: the
  interpreter of a vLLM 0.32 install, default the venv of ``scripts/vllm_env.sh``), started on a
  free loopback port with ``--dtype`` and one OpenMP thread (vLLM's CPU binding), the requests
  sent concurrently to ``/inference/v1/generate`` (``ignore_eos``); generate, LocalEngine and vLLM
  alternate in one run.
- ``sampling``: the ``equal`` workload at temperature 1 in LocalEngine, drawing each token with
  the engine's per-request random streams (inverse CDF) against one ``torch.multinomial`` over the
  batch from one generator (the engine's sampler before per-request streams), swapped in the
  same engine; tokens/s and the ratio.
- ``dtype``: the ``equal`` workload in LocalEngine running in float32 and in bfloat16 (two engines,
  each with its own copy of the model, alternating; what ``agentflow serve --dtype`` picks);
  tokens/s and the ratio bfloat16 / float32. ``--dtype`` does not apply.
- ``common``: the addition run's generation step (8 addition prompts from the task code: a system
  message and two worked examples before each question, 79 of 96 tokens in common; 8 samples each,
  temperature 1, 4 tokens) in LocalEngine with the common beginning prefilled once (the default)
  and with each distinct prompt prefilled in full (``_COMMON_PREFILL_MIN`` raised past the prompt
  length), alternating; seconds per step and the ratio.
- ``rss``: a fresh subprocess loads the model, serves ``batch`` concurrent requests with
  LocalEngine, and reports its peak RSS (``ru_maxrss``) before and after serving.

Both sides of a comparison run in the same process, alternating, median of ``--reps``; the
machine may be shared, so read the ratio, not the absolute numbers. The remote engine's figures
(SGLang-protocol server + client over loopback) belong in the section marked "remote" below.

Usage::

    python benchmarks/bench_inference.py --quick          # < 2 minutes
    python benchmarks/bench_inference.py                  # full: batch 16, 128 new tokens
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

QUESTIONS = [
    "What is 2+3?",
    "Name three primary colors.",
    "Write a haiku about autumn leaves falling in the quiet forest.",
    "Explain in one sentence why the sky is blue.",
    "List the planets of the solar system in order from the sun, with one fact about each.",
    "Translate 'good morning' into French.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Give me a short motivational quote.",
    "Describe how a bicycle works to a five-year-old child who has never seen one before.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What is photosynthesis?",
    "Suggest a name for a pet turtle.",
    "How many minutes are in a day? Show the calculation step by step.",
    "Write a Python function that reverses a string.",
    "What are the benefits of drinking water?",
    "Tell me a fun fact about octopuses.",
]


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def load(dtype: str) -> tuple[Any, Any]:
    from agentflow.engines.model_loading import load_model

    return load_model("smollm2-135m", dtype=dtype)  # type: ignore[arg-type]


def prompts(tok: Any, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


# ---------------------------------------------------------------------------------------- generate
def run_generate(model: Any, tok: Any, batches: list[list[tuple[list[int], int]]]) -> None:
    """Each batch: one left-padded ``generate`` call to the batch's longest ``max_new``."""
    import torch

    for batch in batches:
        longest = max(len(p) for p, _ in batch)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p, _ in batch])
        n = max(m for _, m in batch)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=pad)


# ---------------------------------------------------------------------------------------- LocalEngine
class EngineHost:
    """A LocalEngine kept open on a private event loop between timed runs."""

    def __init__(self, model: Any, tok: Any, batch: int, dtype: str) -> None:
        from agentflow.engines.local import LocalEngine, LocalEngineConfig

        self.loop = asyncio.new_event_loop()
        cfg = LocalEngineConfig(max_batch_size=batch, dtype=dtype, ignore_eos=True, max_seq_len=1024)  # type: ignore[arg-type]
        self.engine = LocalEngine(model, tok, config=cfg)
        self.loop.run_until_complete(self.engine.__aenter__())

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.__aexit__(None, None, None))
        self.loop.close()


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_times(runs: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Each run once to warm up, then all of them in turn ``reps`` times: the median seconds of each."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for f in runs.values():
        f()
    for _ in range(reps):
        for k, f in runs.items():
            times[k].append(timed(f))
    return {k: statistics.median(v) for k, v in times.items()}


def compare(name: str, reps: int, useful: int, runs: dict[str, Callable[[], None]],
            after: Callable[[], dict[str, Any]] = dict, **extra: Any) -> None:
    med = median_times(runs, reps)
    tps = {k: useful / v for k, v in med.items()}
    if "vllm" in tps:
        extra["ratio_vllm_vs_local"] = round(tps["vllm"] / tps["local"], 3)
    emit(bench=name, useful_tokens=useful, seconds=med, tokens_per_s={k: round(v, 1) for k, v in tps.items()},
         ratio_local_vs_generate=round(tps["local"] / tps["generate"], 3), reps=reps, **extra, **after())


def bench_equal(model: Any, tok: Any, host: EngineHost, args: argparse.Namespace) -> None:
    ps = prompts(tok, args.batch)
    reqs = [(p, args.max_new) for p in ps]
    compare("equal", args.reps, sum(m for _, m in reqs), {
        "generate": lambda: run_generate(model, tok, [reqs]),
        "local": lambda: _local(host, reqs),
    }, batch=args.batch, max_new=args.max_new, dtype=args.dtype, threads=args.threads)


def bench_mixed(model: Any, tok: Any, host: EngineHost, args: argparse.Namespace) -> None:
    n = 2 * args.batch
    lo = max(1, args.max_new // 8)
    lens = [lo + (args.max_new - lo) * i // (n - 1) for i in range(n)]
    random.Random(0).shuffle(lens)
    reqs = list(zip(prompts(tok, n), lens, strict=True))
    batches = [reqs[i : i + args.batch] for i in range(0, n, args.batch)]
    padded = sum(len(b) * max(m for _, m in b) for b in batches)
    before = dict(host.engine.stats()["batch_sizes"])
    compare("mixed", args.reps, sum(lens), {
        "generate": lambda: run_generate(model, tok, batches),
        "local": lambda: _local(host, reqs),
    }, after=lambda: {"local_decode_steps_by_batch_size": _diff(host.engine.stats()["batch_sizes"], before)},
       batch=args.batch, requests=n, max_new_range=[lo, args.max_new], generate_padded_tokens=padded,
       dtype=args.dtype, threads=args.threads)


def bench_dtype(args: argparse.Namespace) -> None:
    hosts = {d: EngineHost(*load(d), args.batch, d) for d in ("float32", "bfloat16")}
    try:
        reqs = [(p, args.max_new) for p in prompts(hosts["float32"].engine.tokenizer, args.batch)]
        useful = sum(m for _, m in reqs)
        med = median_times({d: lambda h=h: _local(h, reqs) for d, h in hosts.items()}, args.reps)
        tps = {d: useful / v for d, v in med.items()}
        emit(bench="dtype", useful_tokens=useful, tokens_per_s={d: round(v, 1) for d, v in tps.items()},
             ratio_bfloat16_vs_float32=round(tps["bfloat16"] / tps["float32"], 3), batch=args.batch,
             max_new=args.max_new, threads=args.threads, reps=args.reps)
    finally:
        for h in hosts.values():
            h.close()


def bench_common(model: Any, tok: Any, args: argparse.Namespace) -> None:
    """The addition run's step with and without its prompts' common beginning prefilled once."""
    from types import SimpleNamespace

    from agentflow.engines.local import _worker
    from agentflow.envs.tasks import Task, build_task

    spec = SimpleNamespace(task="addition", path=None, size=64, eval_size=64, seed=0, system=None, shots=2,
                           train_reward="exact", options={})
    rows = build_task(spec).train[:8]
    ps = [list(tok(tok.apply_chat_template(Task.from_data(r).messages(), add_generation_prompt=True,
                                           tokenize=False))["input_ids"]) for r in rows]
    common = next(i for i in range(min(map(len, ps))) if len({p[i] for p in ps}) > 1)
    reqs = [(p, 4) for p in ps for _ in range(8)]
    host = EngineHost(model, tok, len(reqs), args.dtype)

    def run(minimum: int) -> None:
        _sampled_with(host, reqs, _worker, "_COMMON_PREFILL_MIN", minimum)

    try:
        default = _worker._COMMON_PREFILL_MIN
        med = median_times({"common_once": lambda: run(default), "each_prompt": lambda: run(1 << 30)}, args.reps)
        saved = host.engine.stats()["prefill_common_tokens"]
    finally:
        host.close()
    emit(bench="common_prefill", prompts=len(ps), samples=8, prompt_tokens=len(ps[0]), common_tokens=common,
         new_tokens=4, seconds={k: round(v, 3) for k, v in med.items()},
         speedup=round(med["each_prompt"] / med["common_once"], 3), prefill_common_tokens=saved, reps=args.reps,
         dtype=args.dtype, threads=args.threads)


def _sampled_with(host: EngineHost, reqs: list[tuple[list[int], int]], module: Any, name: str, value: Any) -> None:
    """Serve ``reqs`` at temperature 1 with ``module.name`` set to ``value``, then restore it."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        host.loop.run_until_complete(_serve(host.engine, reqs, temperature=1.0))
    finally:
        setattr(module, name, saved)


def _local(host: EngineHost, reqs: list[tuple[list[int], int]]) -> None:
    host.loop.run_until_complete(_serve(host.engine, reqs))


async def _serve(engine: Any, reqs: list[tuple[list[int], int]], temperature: float | None = None) -> None:
    from agentflow import GenerationConfig, ModelRequest

    def gconfig(m: int) -> GenerationConfig:
        if temperature is None:
            return GenerationConfig(max_new_tokens=m, greedy=True)
        return GenerationConfig(max_new_tokens=m, temperature=temperature)

    outs = await asyncio.gather(*[engine.agenerate(ModelRequest(p, gconfig(m))) for p, m in reqs])
    for (_, m), o in zip(reqs, outs, strict=True):
        if o.output_len != m:
            raise RuntimeError(f"expected {m} tokens, got {o.output_len} ({o.stop_reason})")


def bench_sampling(model: Any, tok: Any, host: EngineHost, args: argparse.Namespace) -> None:
    """Per-request streams (the engine's sampler) against one multinomial over the batch."""
    import torch

    from agentflow.engines.local import _worker

    generator = torch.Generator().manual_seed(0)
    streams = _worker.sample

    def one_generator(logits: Any, params: Any, draws: Any) -> Any:
        scores = logits.float() / torch.tensor([p.temperature for p in params])[:, None]
        tokens = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)[:, 0]
        return tokens, scores.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(scores, -1)

    def run(sampler: Any) -> None:
        _sampled_with(host, reqs, _worker, "sample", sampler)

    reqs = [(p, args.max_new) for p in prompts(tok, args.batch)]
    times: dict[str, list[float]] = {"streams": [], "one_generator": []}
    for fn in (streams, one_generator):  # warm-up
        run(fn)
    for _ in range(args.reps):
        for name, fn in (("streams", streams), ("one_generator", one_generator)):
            times[name].append(timed(lambda fn=fn: run(fn)))
    useful = sum(m for _, m in reqs)
    tps = {k: useful / statistics.median(v) for k, v in times.items()}
    emit(bench="sampling", useful_tokens=useful, tokens_per_s={k: round(v, 1) for k, v in tps.items()},
         ratio_streams_vs_one_generator=round(tps["streams"] / tps["one_generator"], 3), reps=args.reps,
         batch=args.batch, max_new=args.max_new, dtype=args.dtype, threads=args.threads)


def random_adapter(model: Any, rank: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config, tensors under PEFT's names) of a random LoRA adapter on every projection."""
    import torch

    from agentflow.engines._lora import DEFAULT_TARGETS

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in DEFAULT_TARGETS:
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(DEFAULT_TARGETS)}
    return config, tensors


def bench_lora(model: Any, tok: Any, args: argparse.Namespace) -> None:
    import copy

    from agentflow import WeightUpdateMeta

    host = EngineHost(copy.deepcopy(model), tok, args.batch, args.dtype)  # adapters wrap the model in place
    try:
        for i in range(4):
            config, tensors = random_adapter(model, args.lora_rank, seed=i)
            meta = WeightUpdateMeta(type="mem", state_dict=tensors, lora_config=config, adapter=f"a{i}")
            host.loop.run_until_complete(host.engine.aupdate_weights(meta))
        ps = prompts(tok, args.batch)
        runs = {f"{k}_adapters": [(p, args.max_new, f"a{j % k}") for j, p in enumerate(ps)] for k in (1, 2, 4)}
        runs["base"] = [(p, args.max_new, None) for p in ps]
        med = median_times({k: lambda reqs=reqs: _local_lora(host, reqs) for k, reqs in runs.items()}, args.reps)
        useful = args.batch * args.max_new
        tps = {k: useful / v for k, v in med.items()}
        emit(bench="lora", useful_tokens=useful, tokens_per_s={k: round(v, 1) for k, v in tps.items()},
             ratio_vs_1_adapter={k: round(v / tps["1_adapters"], 3) for k, v in tps.items()},
             lora_rank=args.lora_rank, batch=args.batch, max_new=args.max_new, reps=args.reps, dtype=args.dtype,
             threads=args.threads)
    finally:
        host.close()


def _local_lora(host: EngineHost, reqs: list[tuple[list[int], int, str | None]]) -> None:
    from agentflow import GenerationConfig, ModelRequest

    async def run() -> None:
        await asyncio.gather(*[host.engine.agenerate(ModelRequest(p, GenerationConfig(max_new_tokens=m, greedy=True),
                                                                  metadata={"lora": a})) for p, m, a in reqs])

    host.loop.run_until_complete(run())


def _diff(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def bench_rss(args: argparse.Namespace) -> None:
    """Peak RSS of a fresh process serving ``batch`` requests (run in a subprocess)."""
    cmd = [sys.executable, __file__, "--rss-child", "--batch", str(args.batch), "--max-new", str(args.max_new),
           "--dtype", args.dtype, "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(out.strip().splitlines()[-1], flush=True)


def rss_child(args: argparse.Namespace) -> None:
    import psutil
    import torch

    torch.set_num_threads(args.threads)
    rss = lambda: psutil.Process().memory_info().rss / 2**20  # noqa: E731
    maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731  (MiB on Linux)
    t = time.perf_counter()
    model, tok = load(args.dtype)
    load_s = time.perf_counter() - t
    loaded, loaded_now = maxrss(), rss()
    host = EngineHost(model, tok, args.batch, args.dtype)
    reqs = [(p, args.max_new) for p in prompts(tok, args.batch)]
    t = time.perf_counter()
    _local(host, reqs)
    serve_s = time.perf_counter() - t
    served_now = rss()
    kv = host.engine.stats()["kv_cache_bytes"]
    host.close()
    emit(bench="rss", batch=args.batch, max_new=args.max_new, dtype=args.dtype, load_s=round(load_s, 2),
         peak_rss_mib_after_load=round(loaded), peak_rss_mib_serving=round(maxrss()),
         rss_mib_after_load=round(loaded_now), rss_mib_after_serving=round(served_now),
         kv_cache_mib=round(kv / 2**20, 1), serve_s=round(serve_s, 2),
         tokens_per_s=round(args.batch * args.max_new / serve_s, 1))


# ---------------------------------------------------------------------------------------- vLLM
def bench_vllm(model: Any, tok: Any, host: EngineHost, args: argparse.Namespace) -> None:
    """The equal workload on generate, LocalEngine and a vLLM server started here (see the docstring)."""
    import tempfile

    from agentflow.engines.launch import free_port, launched, vllm_command
    from agentflow.engines.model_loading import cache_dir, resolve_model_dir

    python = args.vllm_python or str(cache_dir() / "vllm-venv" / "bin" / "python")
    cmd = vllm_command(python, str(resolve_model_dir("smollm2-135m")), port=free_port(), dtype=args.dtype,
                       max_model_len=1024, extra=["--max-num-seqs", str(args.batch)])
    reqs = [(p, args.max_new) for p in prompts(tok, args.batch)]
    with tempfile.TemporaryDirectory() as logs, launched([cmd], logs) as [server]:
        url = f"http://{server.command.address}/inference/v1/generate"
        compare("vllm_equal", args.reps, sum(m for _, m in reqs), {
            "generate": lambda: run_generate(model, tok, [reqs]),
            "local": lambda: _local(host, reqs),
            "vllm": lambda: asyncio.run(_vllm(url, reqs)),
        }, batch=args.batch, max_new=args.max_new, dtype=args.dtype, threads=args.threads, vllm_threads=1)


async def _vllm(url: str, reqs: list[tuple[list[int], int]]) -> None:
    import httpx

    async def one(client: httpx.AsyncClient, p: list[int], m: int) -> None:
        r = await client.post(url, json={"token_ids": p, "sampling_params": {
            "max_tokens": m, "temperature": 0.0, "ignore_eos": True, "logprobs": 0}})
        r.raise_for_status()
        n = len(r.json()["choices"][0]["token_ids"])
        if n != m:
            raise RuntimeError(f"expected {m} tokens from vLLM, got {n}")

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(one(client, p, m) for p, m in reqs))


# ---------------------------------------------------------------------------------------- remote
def bench_remote(args: argparse.Namespace) -> None:
    """RemoteSGLangEngine through `agentflow serve` (loopback) vs LocalEngine in-process, same
    model and prompts, measured by benchmarks/bench_remote.py in a child process."""
    import json
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).with_name("bench_remote.py")
    cmd = [sys.executable, str(script), "--model", "smollm2-135m", "--requests", str(args.batch),
           "--concurrency", str(args.batch), "--sequential", "4", "--max-new-tokens", str(min(args.max_new, 64)),
           "--threads", str(args.threads), "--repeats", "1" if args.quick else "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    print(json.dumps({"bench": "remote_vs_local", "report": out.strip().splitlines()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 8, 32 new tokens, 1 rep after a warm-up (< 2 minutes)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; use 1 on a shared machine (2 OpenMP threads on busy cores collapse)")
    ap.add_argument("--only", choices=["equal", "mixed", "sampling", "rss", "remote", "lora", "vllm", "dtype",
                                       "common"],
                    action="append")
    ap.add_argument("--vllm-python", default=None, help="interpreter of a vLLM 0.32 install (workload vllm)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.batch, args.max_new, args.reps = 8, 32, 1
    if args.rss_child:
        rss_child(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    only = set(args.only or ["equal", "mixed", "sampling", "rss", "remote", "lora", "common"])
    if only & {"equal", "mixed", "sampling", "vllm"}:
        model, tok = load(args.dtype)
        host = EngineHost(model, tok, args.batch, args.dtype)
        try:
            if "equal" in only:
                bench_equal(model, tok, host, args)
            if "mixed" in only:
                bench_mixed(model, tok, host, args)
            if "sampling" in only:
                bench_sampling(model, tok, host, args)
            if "vllm" in only:
                bench_vllm(model, tok, host, args)
        finally:
            host.close()
    for name, fn in (("lora", bench_lora), ("common", bench_common)):  # each with a model of its own
        if name in only:
            fn(*load(args.dtype), args)
    for name, bench in (("dtype", bench_dtype), ("rss", bench_rss), ("remote", bench_remote)):
        if name in only:
            bench(args)


if __name__ == "__main__":
    main()
