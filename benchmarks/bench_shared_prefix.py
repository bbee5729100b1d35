"""Shared-prompt packing in the train engine: the same RL step with ``share_prefix`` on and off.

An RL batch is G prompts x n samples; the samples of a prompt start with the same P prompt tokens
and differ in their R-token answers. With ``train.share_prefix`` (the default) a micro-batch holds
each prompt once and every answer after it, so the linear layers see ``G (P + n R)`` rows instead
of ``G n (P + R)``. Both engines start from the same weights; each step runs the decoupled-PPO
work of one train step (``forward`` for the proximal log-probs, then ``train_batch``), alternating
between the two engines so machine noise hits both alike. Prints one JSON line per setting and a
summary with the speed-up (median step time, off / on) and the largest log-prob difference between
the two engines' first forward (exactness; fp32).

With ``--common C`` every prompt starts with the same C tokens (a system prompt, worked examples:
the addition run's prompts have 79 of their 96 tokens in common), which ``share_prefix`` also lays
out once per micro-batch; a third engine, sharing only within each prompt's samples (``groups``),
shows what that adds. The summary then also reports ``speedup_vs_groups``.

    python benchmarks/bench_shared_prefix.py                          # tiny model, seconds
    python benchmarks/bench_shared_prefix.py --model smollm2-135m     # the addition run's shape
    python benchmarks/bench_shared_prefix.py --model smollm2-135m --common 79 --mixed-precision
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from agentflow import MicroBatchSpec, Trajectory
from agentflow.algo import AlgoConfig, PPOConfig, PPOLoss, compute_advantages, pad_trajectories, token_count
from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig
from agentflow.engines.fsdp import engine as fsdp_engine


def make_batch(groups: int, n: int, prompt: int, answer: int, vocab: int, seed: int,
               common: int = 0) -> list[Trajectory]:
    """``groups`` prompts x ``n`` samples; every prompt starts with the same ``common`` tokens."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, vocab, (common,), generator=g).tolist()
    out = []
    for k in range(groups):
        p = head + torch.randint(0, vocab, (prompt - common,), generator=g).tolist()
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
    p.add_argument("--common", type=_tokens, default=0, help="leading prompt tokens every prompt has in common")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.common > args.prompt:
        p.error(f"--common must be at most --prompt ({args.prompt}), got {args.common}")
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    vocab = model.get_input_embeddings().num_embeddings
    return args, model, tok, make_batch(args.groups, args.n_samples, args.prompt, args.answer, vocab, seed=0,
                                        common=args.common)


def _tokens(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens >= 0, got {text}")
    return n


@contextlib.contextmanager
def _within_groups_only(on: bool) -> Iterator[None]:
    """Share each prompt among its samples but not a beginning common to several prompts."""
    saved = fsdp_engine._COMMON_PREFIX_MIN
    fsdp_engine._COMMON_PREFIX_MIN = 0 if on else saved
    try:
        yield
    finally:
        fsdp_engine._COMMON_PREFIX_MIN = saved


def main() -> None:
    args, model, tok, trajs = batch_from_args(__doc__, lambda q: q.add_argument(
        "--mixed-precision", action="store_true", help="bf16 compute with fp32 master weights (train.mixed_precision)"))
    spec = MicroBatchSpec(max_tokens_per_mb=8192)
    settings = ["off", "groups", "on"] if args.common else ["off", "on"]
    engines = {}
    for name in settings:
        cfg = FSDPEngineConfig(lr=1e-6, device="cpu", share_prefix=name != "off", mixed_precision=args.mixed_precision)
        eng = FSDPEngine(cfg, model=copy.deepcopy(model), tokenizer=tok)
        eng.initialize()
        engines[name] = eng
    times: dict[str, list[float]] = {name: [] for name in settings}
    rows: dict[str, float] = {}
    first: dict[str, torch.Tensor] = {}
    for i in range(args.steps + 1):  # step 0 warms up
        for name, eng in engines.items():
            with _within_groups_only(name == "groups"):
                dt, stats, prox = step(eng, trajs, spec)
            first.setdefault(name, prox)
            rows[name] = stats["n_rows"]
            if i:
                times[name].append(dt)
    tokens = sum(len(t) for t in trajs)
    med = {name: statistics.median(times[name]) for name in settings}
    for name in settings:
        print(json.dumps({"bench": "shared_prefix", "model": args.model, "share_prefix": name != "off",
                          "setting": name, "tokens": tokens, "rows": rows[name], "median_step_s": round(med[name], 3),
                          "rows_per_s": round(rows[name] / med[name], 1),
                          "tokens_per_s": round(tokens / med[name], 1)}))
    summary = {"bench": "shared_prefix_speedup", "model": args.model, "groups": args.groups,
               "n_samples": args.n_samples, "prompt": args.prompt, "answer": args.answer, "common": args.common,
               "mixed_precision": args.mixed_precision, "speedup": round(med["off"] / med["on"], 3),
               "row_reduction": round(rows["off"] / rows["on"], 3),
               "max_logprob_diff": (first["on"] - first["off"]).abs().max().item()}
    if args.common:
        summary.update(speedup_vs_groups=round(med["groups"] / med["on"], 3),
                       row_reduction_vs_groups=round(rows["groups"] / rows["on"], 3))
    print(json.dumps(summary))
    for eng in reversed(engines.values()):
        eng.destroy()


if __name__ == "__main__":
    main()
