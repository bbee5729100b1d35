"""Shared-prompt packing in the train engine: the same RL step with ``share_prefix`` on and off.

An RL batch is G prompts x n samples; the samples of a prompt start with the same P prompt tokens
and differ in their R-token answers. With ``train.share_prefix`` (the default) a micro-batch holds
each prompt once and every answer after it, so the linear layers see ``G (P + n R)`` rows instead
of ``G n (P + R)``. Both engines start from the same weights; each step runs the decoupled-PPO
work of one train step (``forward`` for the proximal log-probs, then ``train_batch``), alternating
between the two engines so machine noise hits both alike. Prints one JSON line per setting and a
summary with the speed-up (median step time, off / on) and the largest log-prob difference between
the two engines' first forward (exactness; fp32).

    python benchmarks/bench_shared_prefix.py                          # tiny model, seconds
    python benchmarks/bench_shared_prefix.py --model smollm2-135m     # the addition run's shape
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch

from agentflow import MicroBatchSpec, Trajectory
from agentflow.algo import AlgoConfig, PPOConfig, PPOLoss, compute_advantages, pad_trajectories, token_count
from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig


def make_batch(groups: int, n: int, prompt: int, answer: int, vocab: int, seed: int) -> list[Trajectory]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(groups):
        p = torch.randint(0, vocab, (prompt,), generator=g).tolist()
        for i in range(n):
            a = torch.randint(0, vocab, (answer,), generator=g).tolist()
            out.append(Trajectory(
                input_ids=p + a, loss_mask=[0] * prompt + [1] * answer,
                logprobs=[0.0] * prompt + (-3.0 + 0.1 * torch.randn(answer, generator=g)).tolist(),
                versions=[-1] * prompt + [0] * answer, reward=float(i % 2), group_id=f"g{k}",
            ))
    return out


def load(name: str) -> tuple[torch.nn.Module, object]:
    if name == "tiny":
        from agentflow.testing import tiny_model_and_tokenizer

        return tiny_model_and_tokenizer(seed=0, hidden_size=256, num_layers=4)
    from agentflow.engines.model_loading import load_model, resolve_model_dir

    return load_model(resolve_model_dir(name))


def step(engine: FSDPEngine, trajs: list[Trajectory], spec: MicroBatchSpec) -> tuple[float, dict, torch.Tensor]:
    t0 = time.perf_counter()
    batch = pad_trajectories(trajs)
    batch["prox_logp"] = prox = engine.forward(batch, spec)
    batch["advantages"] = compute_advantages(trajs, AlgoConfig())
    stats = engine.train_batch(batch, spec, PPOLoss(PPOConfig()), token_count)
    return time.perf_counter() - t0, stats, prox


def batch_from_args(doc: str, extra: Callable[[argparse.ArgumentParser], None] | None = None,
                    ) -> tuple[argparse.Namespace, torch.nn.Module, object, list[Trajectory]]:
    """The command line shared with ``bench_prox_forward.py`` and ``bench_overlap.py`` (which add
    their own options through ``extra``): the model and a step's batch."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    if extra is not None:
        extra(p)
    p.add_argument("--model", default="tiny", help="tiny (random 4-layer, byte vocabulary) or smollm2-135m")
    p.add_argument("--groups", type=int, default=8, help="prompts per step")
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--prompt", type=int, default=96, help="prompt tokens")
    p.add_argument("--answer", type=int, default=4, help="answer tokens")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    vocab = model.get_input_embeddings().num_embeddings
    return args, model, tok, make_batch(args.groups, args.n_samples, args.prompt, args.answer, vocab, seed=0)


def main() -> None:
    args, model, tok, trajs = batch_from_args(__doc__)
    spec = MicroBatchSpec(max_tokens_per_mb=8192)
    engines = {}
    for share in (False, True):
        eng = FSDPEngine(FSDPEngineConfig(lr=1e-6, device="cpu", share_prefix=share), model=copy.deepcopy(model),
                         tokenizer=tok)
        eng.initialize()
        engines[share] = eng
    times: dict[bool, list[float]] = {False: [], True: []}
    rows: dict[bool, float] = {}
    first: dict[bool, torch.Tensor] = {}
    for i in range(args.steps + 1):  # step 0 warms up
        for share, eng in engines.items():
            dt, stats, prox = step(eng, trajs, spec)
            first.setdefault(share, prox)
            rows[share] = stats["n_rows"]
            if i:
                times[share].append(dt)
    tokens = sum(len(t) for t in trajs)
    for share in (False, True):
        med = statistics.median(times[share])
        print(json.dumps({"bench": "shared_prefix", "model": args.model, "share_prefix": share, "tokens": tokens,
                          "rows": rows[share], "median_step_s": round(med, 3),
                          "rows_per_s": round(rows[share] / med, 1), "tokens_per_s": round(tokens / med, 1)}))
    diff = (first[True] - first[False]).abs().max().item()
    print(json.dumps({"bench": "shared_prefix_speedup", "model": args.model, "groups": args.groups,
                      "n_samples": args.n_samples, "prompt": args.prompt, "answer": args.answer,
                      "speedup": round(statistics.median(times[False]) / statistics.median(times[True]), 3),
                      "row_reduction": round(rows[False] / rows[True], 3), "max_logprob_diff": diff}))
    for eng in reversed(engines.values()):
        eng.destroy()


if __name__ == "__main__":
    main()
