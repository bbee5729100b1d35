"""bf16 mixed precision in the train engine: the same RL update with ``train.mixed_precision`` off and on.

``mixed_precision`` computes the forward and backward in bf16 over fp32 master weights, gradients
and AdamW state (FSDP2 ``MixedPrecisionPolicy``). On a GPU that is the usual setting; on a CPU with
bf16 instructions (AVX512-BF16, AMX) the matrix products run about twice as fast too. Both engines
start from the same weights and run :func:`agentflow.algo.ppo_update` on the same batch (the
addition run's shape by default: 8 prompts x 8 samples, 96 prompt and 3 answer tokens, a share
``--flat`` of the groups without signal), alternating so machine noise hits both alike.

Prints one JSON line: the median step time off / on and their ratio, the largest and mean
difference between the two engines' log-probs of the answer tokens before the first update (what
bf16 compute costs in precision), and the largest weight difference after the steps.

    python benchmarks/bench_mixed_precision.py                                  # tiny model
    python benchmarks/bench_mixed_precision.py --model smollm2-135m --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

from bench_shared_prefix import batch_from_args
from bench_zero_advantage import with_flat_groups

from agentflow import MicroBatchSpec
from agentflow.algo import AlgoConfig, pad_trajectories, ppo_update, token_advantages
from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flat", type=float, default=0.375, help="share of groups whose rewards are all equal")


def main() -> None:
    args, model, tok, trajs = batch_from_args(__doc__, _options)
    if not 0 <= args.flat <= 1:
        raise SystemExit(f"--flat takes a share between 0 and 1, got {args.flat}")
    batch = with_flat_groups(trajs, args.n_samples, args.flat)
    spec = MicroBatchSpec(max_tokens_per_mb=8192)
    engines = {}
    for mixed in (False, True):
        eng = FSDPEngine(FSDPEngineConfig(lr=1e-6, device="cpu", mixed_precision=mixed),
                         model=copy.deepcopy(model), tokenizer=tok)
        eng.initialize()
        engines[mixed] = eng
    answers = pad_trajectories(batch)["loss_mask"] > 0
    lp = {mixed: eng.forward(batch, spec)[answers] for mixed, eng in engines.items()}
    diff = (lp[True] - lp[False]).abs()
    algo = AlgoConfig(skip_zero_advantage=True)
    adv = token_advantages(batch, algo)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.steps + 1):  # step 0 warms up
        for mixed, eng in engines.items():
            t0 = time.perf_counter()
            stats = ppo_update(eng, algo, adv, max_tokens_per_mb=8192, version=0)
            if i:
                times[mixed].append(time.perf_counter() - t0)
    weights = max((a - b).abs().max().item() for a, b in
                  zip(engines[False].model.parameters(), engines[True].model.parameters(), strict=True))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(json.dumps({
        "bench": "mixed_precision", "model": args.model, "threads": args.threads, "groups": args.groups,
        "n_samples": args.n_samples, "prompt": args.prompt, "answer": args.answer, "flat_share": args.flat,
        "rows_trained": stats["n_rows"], "median_step_s_fp32": round(off, 3), "median_step_s_bf16": round(on, 3),
        "speedup": round(off / on, 3), "logprob_max_abs_diff": round(diff.max().item(), 5),
        "logprob_mean_abs_diff": round(diff.mean().item(), 5), "max_weight_diff": weights,
    }), flush=True)
    for eng in reversed(engines.values()):
        eng.destroy()


if __name__ == "__main__":
    main()
