"""Sequences without signal left out of the update: one PPO update with ``algo.skip_zero_advantage``
on and off.

A group whose samples all got the same reward has advantage 0 at every token under a group
baseline, so its PPO loss and gradient are 0; early in an RL run most groups are all wrong, late
most are all right. The batch is G prompts x n samples (the addition run's shape by default) in
which a share ``--flat`` of the groups has equal rewards and the others alternate 0 / 1. Both
engines start from the same weights and run :func:`agentflow.algo.ppo_update` (the proximal
log-probs and the update, what ``agentflow train`` runs per step), alternating so machine noise
hits both alike. Prints one JSON line per share with the median step time off / on, the speed-up,
the rows trained and the largest weight difference after the steps (exactness; fp32).

    python benchmarks/bench_zero_advantage.py                                   # tiny model
    python benchmarks/bench_zero_advantage.py --model smollm2-135m --flat 0.25,0.5,0.75
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

from bench_shared_prefix import batch_from_args

from agentflow import Trajectory
from agentflow.algo import AlgoConfig, ppo_update, token_advantages
from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flat", default="0.25,0.5,0.75",
                   help="comma-separated shares of groups whose rewards are all equal (0 <= share <= 1)")


def with_flat_groups(trajs: list[Trajectory], n_samples: int, share: float) -> list[Trajectory]:
    """The first ``share`` of the groups all-wrong (reward 0), the rest half right."""
    groups = len(trajs) // n_samples
    flat = round(share * groups)
    return [t.with_(reward=0.0 if i // n_samples < flat else float(i % 2)) for i, t in enumerate(trajs)]


def main() -> None:
    args, model, tok, trajs = batch_from_args(__doc__, _options)
    shares = [float(s) for s in args.flat.split(",")]
    if not shares or any(not 0 <= s <= 1 for s in shares):
        raise SystemExit(f"--flat takes shares between 0 and 1, got {args.flat!r}")
    for share in shares:
        batch = with_flat_groups(trajs, args.n_samples, share)
        engines = {}
        for skip in (False, True):
            eng = FSDPEngine(FSDPEngineConfig(lr=1e-6, device="cpu"), model=copy.deepcopy(model), tokenizer=tok)
            eng.initialize()
            engines[skip] = eng
        times: dict[bool, list[float]] = {False: [], True: []}
        rows: dict[bool, float] = {}
        for i in range(args.steps + 1):  # step 0 warms up
            for skip, eng in engines.items():
                algo = AlgoConfig(skip_zero_advantage=skip)
                t0 = time.perf_counter()
                stats = ppo_update(eng, algo, token_advantages(batch, algo), max_tokens_per_mb=8192, version=0)
                if i:
                    times[skip].append(time.perf_counter() - t0)
                rows[skip] = stats["n_seqs"]
        diff = max((a - b).abs().max().item() for a, b in
                   zip(engines[False].model.parameters(), engines[True].model.parameters(), strict=True))
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(json.dumps({"bench": "zero_advantage", "model": args.model, "groups": args.groups,
                          "n_samples": args.n_samples, "prompt": args.prompt, "answer": args.answer,
                          "flat_share": share, "seqs_trained_off": rows[False], "seqs_trained_on": rows[True],
                          "median_step_s_off": round(off, 3), "median_step_s_on": round(on, 3),
                          "speedup": round(off / on, 3), "max_weight_diff": diff}), flush=True)
        for eng in reversed(engines.values()):
            eng.destroy()


if __name__ == "__main__":
    main()
