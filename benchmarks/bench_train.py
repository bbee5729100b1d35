"""Train-step throughput of FSDPEngine vs a plain PyTorch loop, and packing efficiency.

Prints JSON lines:

- ``{"bench": "packing", ...}``: the micro-batch plan of a long-tailed length mix under a token
  budget: ``fill`` = real tokens / (micro-batches x budget), ``vs_lower_bound`` = minimal
  micro-batch count / count used, and the padded loop's real / processed tokens.
- ``{"bench": "lora_step", ...}``: one FSDPEngine step with a LoRA adapter (``train.lora``, rank
  ``--lora-rank`` on every attention and MLP projection) vs full fine-tuning of the same model on
  the same batch, interleaved: median wall and CPU seconds per step, trainable parameters, and the
  optimizer state's bytes (AdamW's two moments: of the adapter only with LoRA). ``--model
  smollm2-135m`` runs it on the embedded model instead of the tiny one.
- ``{"bench": "train_step", ...}``: tokens/s of ``FSDPEngine.train_batch`` (world size 1, gloo,
  packed rows, chunked log-probs) and of a plain loop over the *same* model weights, data and
  micro-batch count (padded batches with an attention mask, full-vocabulary log-softmax, AdamW),
  interleaved step by step in one process; ``ratio`` = engine / plain throughput (median wall
  time of the steps) and ``cpu_ratio`` the same on process CPU time, which other jobs on a shared
  machine disturb much less than wall time. ``*_vs_sorted``: against the same loop with the
  sequences sorted by length before chunking (less padding, a stronger baseline).

Run: ``python benchmarks/bench_train.py [--steps 3] [--seqs 32] [--threads 2] [--only lora]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import time

import torch

from agentflow import MicroBatchSpec, Trajectory
from agentflow.algo import pad_trajectories, sft_loss, token_count
from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig
from agentflow.engines.fsdp._packing import packing_efficiency, plan_micro_batches
from agentflow.testing import tiny_model_and_tokenizer


def long_tailed_lengths(n: int, seed: int, lo: int = 32, hi: int = 1024) -> list[int]:
    """Pareto(1.2)-distributed lengths in [lo, hi]: many short sequences, a few long ones."""
    rng = random.Random(seed)
    return [min(hi, int(lo * rng.paretovariate(1.2))) for _ in range(n)]


def make_batch(lengths: list[int], seed: int) -> list[Trajectory]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        prompt = max(1, n // 4)
        out.append(Trajectory(
            input_ids=torch.randint(0, 256, (n,), generator=g).tolist(),
            loss_mask=[0] * prompt + [1] * (n - prompt), logprobs=[0.0] * n,
            versions=[-1] * prompt + [0] * (n - prompt),
        ))
    return out


def plain_step(model: torch.nn.Module, opt: torch.optim.Optimizer, chunks: list[dict[str, torch.Tensor]]) -> float:
    """The baseline: padded micro-batches, attention mask, full log-softmax, global token mean."""
    model.train()
    opt.zero_grad()
    total = sum(float(c["loss_mask"].sum()) for c in chunks)
    for c in chunks:
        logits = model(input_ids=c["input_ids"], attention_mask=c["attention_mask"], use_cache=False).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, c["input_ids"][:, 1:, None])[..., 0]
        mask = c["loss_mask"][:, 1:].float()
        loss = -(lp * mask).sum() / total
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return total


def bench_packing(args: argparse.Namespace) -> None:
    lengths = long_tailed_lengths(1024, seed=1, hi=4096)
    for cap in (4096, 8192, 16384):
        plan = plan_micro_batches(lengths, cap)
        eff = packing_efficiency(lengths, plan, cap)
        print(json.dumps({"bench": "packing", "n_seqs": len(lengths), "tokens": sum(lengths), "max_len": max(lengths),
                          "budget": cap, "n_mbs": len(plan), **{k: round(v, 4) for k, v in eff.items()}}))


def bench_train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, tok = tiny_model_and_tokenizer(seed=0, hidden_size=args.hidden, num_layers=args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    lengths = long_tailed_lengths(args.seqs, seed=0)
    trajs = make_batch(lengths, seed=0)
    plain = copy.deepcopy(model)
    plain.set_attn_implementation("sdpa")
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-5)
    eng = FSDPEngine(FSDPEngineConfig(lr=1e-5, device="cpu"), model=model)
    eng.initialize()
    spec = MicroBatchSpec(n_mbs=args.n_mbs)
    # the plain loop gets the same number of micro-batches: consecutive chunks, each padded
    per = -(-len(trajs) // args.n_mbs)
    chunks = [pad_trajectories(trajs[i : i + per], tok.pad_token_id) for i in range(0, len(trajs), per)]
    # a stronger baseline: sort by length first, so each padded chunk holds similar lengths
    by_len = sorted(trajs, key=len)
    sorted_chunks = [pad_trajectories(by_len[i : i + per], tok.pad_token_id) for i in range(0, len(trajs), per)]
    runs = {"engine": lambda: eng.train_batch(trajs, spec, sft_loss, token_count),
            "plain": lambda: plain_step(plain, opt, chunks),
            "plain_sorted": lambda: plain_step(plain, opt, sorted_chunks)}
    processed = sum(c["input_ids"].numel() for c in chunks)
    processed_sorted = sum(c["input_ids"].numel() for c in sorted_chunks)
    real = sum(lengths)
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for step in range(args.steps + 1):  # step 0 warms up all
        for name in list(runs) if step % 2 == 0 else list(runs)[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            runs[name]()
            if step > 0:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    eng.destroy()
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(json.dumps({
        "bench": "train_step", "params": n_params, "hidden": args.hidden, "layers": args.layers,
        "n_seqs": len(lengths), "real_tokens": real, "max_len": max(lengths), "n_mbs": args.n_mbs,
        "plain_padded_efficiency": round(real / processed, 4),
        "plain_sorted_padded_efficiency": round(real / processed_sorted, 4),
        "threads": args.threads, "steps": args.steps,
        "engine_s": round(med["engine"], 3), "plain_s": round(med["plain"], 3),
        "engine_tok_s": round(real / med["engine"], 1), "plain_tok_s": round(real / med["plain"], 1),
        "ratio": round(med["plain"] / med["engine"], 3),
        "engine_cpu_s": round(med_cpu["engine"], 3), "plain_cpu_s": round(med_cpu["plain"], 3),
        "cpu_ratio": round(med_cpu["plain"] / med_cpu["engine"], 3),
        "plain_sorted_s": round(med["plain_sorted"], 3), "plain_sorted_cpu_s": round(med_cpu["plain_sorted"], 3),
        "ratio_vs_sorted": round(med["plain_sorted"] / med["engine"], 3),
        "cpu_ratio_vs_sorted": round(med_cpu["plain_sorted"] / med_cpu["engine"], 3),
    }))


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def bench_lora(args: argparse.Namespace) -> None:
    from agentflow.engines._lora import LoRAConfig

    torch.set_num_threads(args.threads)
    if args.model:
        from agentflow.engines.model_loading import load_model

        model, _ = load_model(args.model)
    else:
        model, _ = tiny_model_and_tokenizer(seed=0, hidden_size=args.hidden, num_layers=args.layers)
    trajs = make_batch(long_tailed_lengths(args.seqs, seed=0), seed=0)
    spec = MicroBatchSpec(n_mbs=args.n_mbs)
    engines = {"full": FSDPEngine(FSDPEngineConfig(lr=1e-5, device="cpu"), model=copy.deepcopy(model)),
               "lora": FSDPEngine(FSDPEngineConfig(lr=1e-4, device="cpu", lora=LoRAConfig(rank=args.lora_rank)),
                                  model=copy.deepcopy(model))}
    wall: dict[str, list[float]] = {k: [] for k in engines}
    cpu: dict[str, list[float]] = {k: [] for k in engines}
    for e in engines.values():
        e.initialize()
    for step in range(args.steps + 1):  # step 0 warms up both
        for name in list(engines) if step % 2 == 0 else list(engines)[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            engines[name].train_batch(trajs, spec, sft_loss, token_count)
            if step > 0:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    row: dict[str, object] = {"bench": "lora_step", "model": args.model or "tiny", "hidden": model.config.hidden_size,
                              "layers": model.config.num_hidden_layers,
                              "lora_rank": args.lora_rank, "n_seqs": len(trajs), "real_tokens": sum(map(len, trajs)),
                              "threads": args.threads, "steps": args.steps}
    for name, e in engines.items():
        assert e.optimizer is not None
        row[f"{name}_s"] = round(statistics.median(wall[name]), 3)
        row[f"{name}_cpu_s"] = round(statistics.median(cpu[name]), 3)
        row[f"{name}_trainable_params"] = sum(p.numel() for p in e.model.parameters() if p.requires_grad)
        row[f"{name}_optimizer_mib"] = round(optimizer_bytes(e.optimizer) / 2**20, 3)
        e.destroy()
    row["step_ratio_full_over_lora"] = round(float(row["full_s"]) / float(row["lora_s"]), 3)  # type: ignore[arg-type]
    print(json.dumps(row))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--n-mbs", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--model", default=None, help="lora bench: a model to load (e.g. smollm2-135m) instead of tiny")
    p.add_argument("--only", choices=["packing", "train", "lora"], action="append")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    only = set(args.only or ["packing", "train", "lora"])
    if "packing" in only:
        bench_packing(args)
    if "train" in only:
        bench_train(args)
    if "lora" in only:
        bench_lora(args)


if __name__ == "__main__":
    main()
