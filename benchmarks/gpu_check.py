"""One command that runs every CUDA path of agentflow, printing figures next to their anchors.

    python benchmarks/gpu_check.py                 # one H100/H200: under 8 minutes (budget 420 s)
    python benchmarks/gpu_check.py --cpu-smoke     # the same steps on CPU with a tiny model: no figures,
                                                   # only that every step runs (what CI can check)

Steps, each one JSON line (``"ok": true/false``; a failing step does not stop the others, the exit
status is 1 if any failed):

1. ``env``: torch, transformers, the CUDA devices, bf16 support.
2. ``generate``: HF ``model.generate`` on a 0.5B Qwen2-shaped model (random weights from its
   config: nothing is downloaded), bf16, batch 256, 128 prompt + 256 new tokens, greedy, eos
   ignored. Anchor: 4,412 tok/s on an H200.
3. ``local_engine``: ``LocalEngine`` on CUDA (bf16, continuous batching) with the same 256
   requests; tok/s and the ratio to ``generate``.
4. ``fsdp_world1``: ``FSDPEngine`` with FSDP2 on NCCL (world 1), bf16 mixed precision (fp32
   master weights), the packed varlen attention (FlashAttention varlen through
   ``torch.nn.attention.varlen``) with shared prompts: 16 prompts x 8 samples, 512-token prompts,
   256-token answers. MFU = 6 x parameters x tokens / s / peak bf16 FLOP/s, on the rows the model
   computed (``mfu_rows``) and on the logical tokens (``mfu_tokens``, which prompt sharing lifts).
   Anchor: 20.5% on an H200. Also: the SFT loss on a fixed batch goes down.
5. ``packed_vs_reference``: the engine's per-token log-probs (packed, shared prompts, varlen
   kernel) against a plain HF forward of the same weights (sdpa, padded batch, bf16): max and mean
   absolute difference.
6. ``weight_handoff``: ``upload_weights(type="mem")`` (FSDP2 full state dict to CPU) then
   ``LocalEngine.aupdate_weights`` (copy into the live CUDA model between decode steps). Anchor:
   0.065 s for the state-dict hand-off on an H200. Checks a parameter arrived and the next tokens
   carry the new version.
7. ``fsdp_world2`` (when 2+ GPUs are visible, or ``--world 2``): two processes, FSDP2 over NCCL,
   the same batch split by prompt groups; tok/s, MFU, and the first-step loss against world 1.

Without CUDA (and without ``--cpu-smoke``) it prints why, checks nothing and exits 0.

Not here: SGLang servers (``bench_remote.py``), long training runs (``agentflow train``).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ANCHORS = {"generate_tok_s": 4412.0, "mfu": 0.205, "handoff_s": 0.065}  # H200, 0.5B Qwen2-shaped
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "L4": 121e12}  # dense bf16 tensor-core peak, SXM parts


@dataclass(frozen=True, slots=True)
class Shape:
    """Model and workload sizes: the real check, or a tiny CPU smoke run of the same steps."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    gen_batch: int
    gen_prompt: int
    gen_new: int
    groups: int
    samples: int
    prompt: int
    answer: int
    steps: int
    mb_tokens: int


QWEN2_05B = Shape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
                  gen_batch=256, gen_prompt=128, gen_new=256, groups=16, samples=8, prompt=512, answer=256,
                  steps=4, mb_tokens=16384)
TINY = Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512,
             gen_batch=4, gen_prompt=8, gen_new=8, groups=2, samples=2, prompt=16, answer=8, steps=2, mb_tokens=256)


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


# ---------------------------------------------------------------------------- model and data
def build_model(shape: Shape, seed: int = 0) -> Any:
    """A Qwen2-shaped causal LM with random weights (fp32, CPU), built from a config."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=shape.vocab - 1, pad_token_id=0)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def prompts(shape: Shape, n: int, length: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, shape.vocab - 1, (n, length), generator=g).tolist()


def train_batch(shape: Shape, seed: int = 1) -> list[Any]:
    """``groups`` prompts x ``samples`` answers: samples of one prompt share it (packed once)."""
    from agentflow import Trajectory

    out = []
    for gi, p in enumerate(prompts(shape, shape.groups, shape.prompt, seed)):
        for si, a in enumerate(prompts(shape, shape.samples, shape.answer, seed * 1000 + gi)):
            out.append(Trajectory(p + a, [0] * len(p) + [1] * len(a), [0.0] * (len(p) + len(a)),
                                  [-1] * len(p) + [0] * len(a), reward=float(si % 2), group_id=f"g{gi}"))
    return out


# ---------------------------------------------------------------------------- steps
def step_env(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "devices": names, "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
            "peak_bf16_tflops": (ctx["peak"] or 0) / 1e12 or None}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_generate(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch

    shape, dev = ctx["shape"], ctx["device"]
    model = ctx["infer_model"]
    ids = torch.tensor(prompts(shape, shape.gen_batch, shape.gen_prompt, seed=2), device=dev)
    kw = {"max_new_tokens": shape.gen_new, "min_new_tokens": shape.gen_new, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        model.generate(input_ids=ids[:2], attention_mask=torch.ones_like(ids[:2]), **{**kw, "max_new_tokens": 4,
                                                                                       "min_new_tokens": 4})
        _sync()
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        _sync()
    dt = time.perf_counter() - t0
    tokens = (out.shape[1] - ids.shape[1]) * out.shape[0]
    ctx["generate_tok_s"] = tokens / dt
    return {"batch": shape.gen_batch, "new_tokens": shape.gen_new, "timed_s": round(dt, 3),
            "tok_s": round(tokens / dt, 1), "anchor_tok_s": ANCHORS["generate_tok_s"]}


async def _local_run(ctx: dict[str, Any]) -> dict[str, Any]:
    from agentflow import GenerationConfig, ModelRequest
    from agentflow.engines.local import LocalEngine, LocalEngineConfig

    shape = ctx["shape"]
    cfg = LocalEngineConfig(device=str(ctx["device"]), dtype=ctx["infer_dtype"], max_batch_size=shape.gen_batch,
                            max_seq_len=shape.gen_prompt + shape.gen_new + 16, ignore_eos=True)
    engine = LocalEngine(ctx["infer_model"], config=cfg)
    ctx["local_engine"] = engine
    await engine.__aenter__()
    g = GenerationConfig(max_new_tokens=shape.gen_new, greedy=True)
    ps = prompts(shape, shape.gen_batch, shape.gen_prompt, seed=2)
    await engine.agenerate(ModelRequest(ps[0], g.new(max_new_tokens=4)))  # warm-up
    t0 = time.perf_counter()
    resps = await asyncio.gather(*(engine.agenerate(ModelRequest(p, g)) for p in ps))
    dt = time.perf_counter() - t0
    tokens = sum(r.output_len for r in resps)
    assert all(r.output_len == shape.gen_new for r in resps), "every request must produce max_new_tokens"
    ref = ctx.get("generate_tok_s")
    return {"requests": len(ps), "timed_s": round(dt, 3), "tok_s": round(tokens / dt, 1),
            "ratio_vs_generate": round(tokens / dt / ref, 3) if ref else None,
            "anchor_generate_tok_s": ANCHORS["generate_tok_s"]}


def step_local_engine(ctx: dict[str, Any]) -> dict[str, Any]:
    return ctx["loop"].run_until_complete(_local_run(ctx))


def _fsdp_config(ctx: dict[str, Any]) -> Any:
    from agentflow.engines.fsdp import FSDPEngineConfig

    return FSDPEngineConfig(lr=1e-5, device=ctx["device"].type, mixed_precision=ctx["mixed_precision"],
                            attn_impl="packed", share_prefix=True, grad_clip=1.0)


def _mfu(ctx: dict[str, Any], params: int, tokens: float, seconds: float, world: int = 1) -> float | None:
    peak = ctx["peak"]
    return round(6 * params * tokens / seconds / (peak * world), 4) if peak else None


def train_steps(engine: Any, trajs: list[Any], shape: Shape, steps: int) -> tuple[list[dict[str, float]], float]:
    """One warm-up step, then ``steps`` timed steps on the same batch; (stats per step, median seconds)."""
    import statistics

    from agentflow import MicroBatchSpec
    from agentflow.algo import sft_loss, token_count

    spec = MicroBatchSpec(max_tokens_per_mb=shape.mb_tokens)
    stats, times = [engine.train_batch(trajs, spec, sft_loss, token_count)], []
    for _ in range(steps):
        _sync()
        t0 = time.perf_counter()
        stats.append(engine.train_batch(trajs, spec, sft_loss, token_count))
        _sync()
        times.append(time.perf_counter() - t0)
    return stats, statistics.median(times)


def step_fsdp_world1(ctx: dict[str, Any]) -> dict[str, Any]:
    from agentflow.engines.fsdp import FSDPEngine

    shape = ctx["shape"]
    engine = FSDPEngine(_fsdp_config(ctx), model=copy.deepcopy(ctx["cpu_model"]))
    engine.initialize()
    ctx["fsdp"] = engine
    trajs = ctx["trajs"]
    stats, sec = train_steps(engine, trajs, shape, shape.steps)
    rows, tokens = stats[-1]["n_rows"], stats[-1]["n_tokens"]
    losses = [round(s["loss"], 4) for s in stats]
    ctx["world1_first_loss"] = losses[0]
    assert losses[-1] < losses[0], f"the SFT loss on a fixed batch must go down, got {losses}"
    p = ctx["params"]
    return {"world": 1, "seqs": len(trajs), "tokens": int(tokens), "rows": int(rows), "step_s": round(sec, 3),
            "tok_s": round(tokens / sec, 1), "mfu_rows": _mfu(ctx, p, rows, sec),
            "mfu_tokens": _mfu(ctx, p, tokens, sec), "anchor_mfu": ANCHORS["mfu"], "losses": losses,
            "mixed_precision": ctx["mixed_precision"]}


def step_packed_vs_reference(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch

    from agentflow.algo import pad_trajectories

    engine, shape = ctx["fsdp"], ctx["shape"]
    trajs = ctx["trajs"][: 2 * shape.samples]  # two prompt groups
    packed = engine.forward(trajs)  # [B, T] float32, token aligned
    ref_model = copy.deepcopy(ctx["cpu_model"])
    ref_model.load_state_dict(engine.full_state_dict(), strict=False)
    ref_model.to(device=ctx["device"], dtype=torch.bfloat16 if ctx["mixed_precision"] else torch.float32)
    batch = pad_trajectories(trajs)
    ids, mask = batch["input_ids"].to(ctx["device"]), batch["attention_mask"].to(ctx["device"])
    with torch.no_grad():
        logits = ref_model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0].cpu()
    sel = batch["loss_mask"][:, 1:].bool()
    diff = (packed[:, 1:] - lp)[sel].abs()
    tol = 0.1 if ctx["mixed_precision"] else 1e-3
    assert float(diff.max()) < tol, f"packed log-probs differ from the reference by up to {float(diff.max()):.4f}"
    del ref_model
    return {"compared_tokens": int(sel.sum()), "max_abs_diff": round(float(diff.max()), 5),
            "mean_abs_diff": round(float(diff.mean()), 6), "tolerance": tol}


async def _handoff(ctx: dict[str, Any], meta: Any) -> float:
    from agentflow import GenerationConfig, ModelRequest

    engine = ctx["local_engine"]
    _sync()
    t0 = time.perf_counter()
    await engine.aupdate_weights(meta)
    _sync()
    dt = time.perf_counter() - t0
    resp = await engine.agenerate(ModelRequest(prompts(ctx["shape"], 1, 8, seed=3)[0],
                                               GenerationConfig(max_new_tokens=4, greedy=True)))
    assert set(resp.output_versions) == {1}, f"tokens after the update must carry version 1, got {resp.output_versions}"
    return dt


def step_weight_handoff(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch

    from agentflow import WeightUpdateMeta

    fsdp = ctx["fsdp"]
    _sync()
    t0 = time.perf_counter()
    meta = fsdp.upload_weights(WeightUpdateMeta(type="mem", version=1))
    upload = time.perf_counter() - t0
    load = ctx["loop"].run_until_complete(_handoff(ctx, meta))
    name = "model.layers.0.mlp.down_proj.weight"
    live = dict(ctx["infer_model"].named_parameters())[name].detach().float().cpu()
    sent = meta.state_dict[name].float()
    assert torch.allclose(live, sent.to(live.dtype), atol=1e-2), "the LocalEngine parameter is not the uploaded one"
    return {"upload_s": round(upload, 4), "load_s": round(load, 4), "handoff_s": round(upload + load, 4),
            "anchor_handoff_s": ANCHORS["handoff_s"], "tensors": len(meta.state_dict)}


# ---------------------------------------------------------------------------- world 2
def _world2_worker(rank: int, world: int, port: int, smoke: bool, out: str) -> None:
    """One rank of a two-process FSDP2 run (spawned): train on this rank's prompt groups."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    from agentflow.engines.fsdp import FSDPEngine

    shape = TINY if smoke else QWEN2_05B
    cuda = torch.cuda.is_available() and not smoke
    ctx = {"device": torch.device("cuda", rank) if cuda else torch.device("cpu"), "mixed_precision": cuda}
    engine = FSDPEngine(_fsdp_config(ctx), model=build_model(shape))
    engine.initialize()
    trajs = train_batch(shape)
    mine = [t for t in trajs if int(t.group_id[1:]) % world == rank]
    stats, sec = train_steps(engine, mine, shape, shape.steps)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"stats": stats, "step_s": sec}, f)
    # both ranks are done with every collective before either tears the group down (once, in CI,
    # both ranks aborted at the end with "terminate called without an active exception")
    torch.distributed.barrier()
    engine.destroy()
    # Leave without the interpreter's teardown: twice in CI a rank of the CPU smoke test died of
    # SIGABRT at the end (once with "terminate called without an active exception", C++ threads
    # destroyed at exit), the barrier above notwithstanding. Everything this rank owes (its result
    # file, the collectives) is complete here.
    del engine, trajs, mine
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def step_fsdp_world2(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from agentflow.engines.fsdp._dist import free_port

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rank0.json")
        mp.start_processes(_world2_worker, args=(2, free_port(), ctx["smoke"], out), nprocs=2, join=True,
                           start_method="spawn")
        with open(out) as f:
            res = json.load(f)
    last, sec = res["stats"][-1], res["step_s"]
    first = res["stats"][0]["loss"]
    ref = ctx.get("world1_first_loss")
    return {"world": 2, "tokens": int(last["n_tokens"]), "rows": int(last["n_rows"]), "step_s": round(sec, 3),
            "tok_s": round(last["n_tokens"] / sec, 1), "mfu_rows": _mfu(ctx, ctx["params"], last["n_rows"], sec, 2),
            "first_loss": round(first, 4), "world1_first_loss": ref,
            "loss_diff_vs_world1": round(abs(first - ref), 5) if ref is not None else None}


# ---------------------------------------------------------------------------- driver
STEPS: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], tuple[str, ...]]] = [
    ("env", step_env, ()),
    ("generate", step_generate, ()),
    ("local_engine", step_local_engine, ()),
    ("fsdp_world1", step_fsdp_world1, ()),
    ("packed_vs_reference", step_packed_vs_reference, ("fsdp_world1",)),
    ("weight_handoff", step_weight_handoff, ("fsdp_world1", "local_engine")),
    ("fsdp_world2", step_fsdp_world2, ()),
]


def peak_flops(names: list[str], override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, flops in PEAK_BF16_FLOPS.items():
        if names and all(key in n for n in names[:1]):
            return flops
    return None


def make_context(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    smoke = args.cpu_smoke
    shape = TINY if smoke else QWEN2_05B
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    names = [] if smoke else [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    cpu_model = build_model(shape)
    infer_dtype = "float32" if smoke else "bfloat16"
    infer_model = copy.deepcopy(cpu_model).to(device=device, dtype=getattr(torch, infer_dtype))
    return {"smoke": smoke, "shape": shape, "device": device, "peak": peak_flops(names, args.peak_tflops),
            "cpu_model": cpu_model, "infer_model": infer_model, "infer_dtype": infer_dtype,
            "params": n_params(cpu_model), "mixed_precision": not smoke, "trajs": train_batch(shape),
            "loop": asyncio.new_event_loop(), "world2": args.world == "2" or (args.world == "auto" and len(names) >= 2)}


def run_step(name: str, fn: Callable[[dict[str, Any]], dict[str, Any]], ctx: dict[str, Any]) -> bool:
    t0 = time.perf_counter()
    try:
        figures = fn(ctx)
    except Exception as e:  # a failing step is reported and the others still run
        emit(step=name, ok=False, seconds=round(time.perf_counter() - t0, 2), error=f"{type(e).__name__}: {e}",
             where=traceback.format_exc().strip().splitlines()[-3:])
        return False
    emit(step=name, ok=True, seconds=round(time.perf_counter() - t0, 2), **figures)
    return True


def close(ctx: dict[str, Any]) -> None:
    engine = ctx.get("local_engine")
    if engine is not None:
        ctx["loop"].run_until_complete(engine.__aexit__(None, None, None))
    if ctx.get("fsdp") is not None:
        ctx["fsdp"].destroy()
    ctx["loop"].close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False), so there is nothing to "
              "check here; nothing was run. Run it on a GPU machine (one H100/H200: under 8 minutes), or pass "
              "--cpu-smoke to run the same steps on CPU with a tiny model.", file=sys.stderr)
        emit(step="gpu_check", ok=True, skipped="no CUDA device")
        return 0
    t_start = time.perf_counter()
    ctx = make_context(args)
    passed: set[str] = set()
    failed = []
    try:
        for name, fn, needs in STEPS:
            if name == "fsdp_world2" and not ctx["world2"]:
                emit(step=name, ok=True, skipped="fewer than 2 GPUs (pass --world 2 to force)")
                continue
            if time.perf_counter() - t_start > args.budget_s:
                emit(step=name, ok=False, skipped=f"over the {args.budget_s} s budget")
                failed.append(name)
                continue
            if not set(needs) <= passed:
                emit(step=name, ok=False, skipped=f"needs {', '.join(n for n in needs if n not in passed)}")
                failed.append(name)
                continue
            if run_step(name, fn, ctx):
                passed.add(name)
            else:
                failed.append(name)
    finally:
        close(ctx)
    emit(step="summary", ok=not failed, failed=failed, seconds=round(time.perf_counter() - t_start, 1),
         smoke=args.cpu_smoke)
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: checks the steps run, no figures")
    p.add_argument("--world", choices=["auto", "1", "2"], default="auto",
                   help="also run FSDP2 with two processes (auto: when 2+ GPUs are visible)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining steps past this many seconds")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU on an unlisted GPU")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
