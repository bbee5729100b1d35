"""Decoupled PPO's proximal log-probs: a separate forward pass, or the update forward's own.

With one minibatch per step (``trainer.ppo_minibatches=1``, the default) the weights the update's
forward runs are the proximal policy, so ``ppo_update`` takes the first minibatch's proximal
log-probs from that forward (``algo.ppo.recompute_prox=false``, the default) instead of running a
no-grad forward over the batch first (``recompute_prox=true``, what agentflow did before). Two
engines start from the same weights and run ``ppo_update`` on the same batch (G prompts x n
samples, shared prompts packed once: the addition run's shape by default), alternating step by step
so machine noise hits both alike. Prints one JSON line per setting (median step seconds) and a
summary: the speed-up (median recompute / median reuse) and the largest weight difference between
the two engines after the steps (the updates are the same up to float rounding).

    python benchmarks/bench_prox_forward.py                              # tiny model, seconds
    python benchmarks/bench_prox_forward.py --model smollm2-135m --threads 1 --steps 4
"""

from __future__ import annotations

import copy
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_shared_prefix import batch_from_args

from agentflow.algo import AlgoConfig, PPOConfig, ppo_update, token_advantages
from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig


def main() -> None:
    args, model, tok, trajs = batch_from_args(__doc__)
    algos = {recompute: AlgoConfig(ppo=PPOConfig(recompute_prox=recompute)) for recompute in (True, False)}
    items = token_advantages(trajs, algos[True])
    engines = {}
    for recompute in algos:
        eng = FSDPEngine(FSDPEngineConfig(lr=1e-6, device="cpu"), model=copy.deepcopy(model), tokenizer=tok)
        eng.initialize()
        engines[recompute] = eng
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.steps + 1):  # step 0 warms up
        for recompute, eng in engines.items():
            t0 = time.perf_counter()
            ppo_update(eng, algos[recompute], items, max_tokens_per_mb=8192, version=0)
            if i:
                times[recompute].append(time.perf_counter() - t0)
    for recompute in algos:
        print(json.dumps({"bench": "prox_forward", "model": args.model, "recompute_prox": recompute,
                          "median_step_s": round(statistics.median(times[recompute]), 3),
                          "steps_s": [round(t, 3) for t in times[recompute]]}))
    a, b = engines[True].full_state_dict(), engines[False].full_state_dict()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(json.dumps({"bench": "prox_forward_speedup", "model": args.model, "threads": args.threads,
                      "groups": args.groups, "n_samples": args.n_samples, "prompt": args.prompt,
                      "answer": args.answer, "steps": args.steps,
                      "speedup": round(statistics.median(times[True]) / statistics.median(times[False]), 3),
                      "max_weight_diff": diff}))
    for eng in engines.values():
        eng.destroy()


if __name__ == "__main__":
    main()
