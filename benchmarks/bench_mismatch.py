"""Rollout-training mismatch of the in-process engine: LocalEngine log-probs vs FSDPEngine's.

Generates answers to the addition run's prompts (``examples/addition.yaml``: one-digit addition, its
chat prompt, its sampling: temperature 1, 12 new tokens) with a LocalEngine in each ``--dtypes`` precision,
recomputes their log-probs with an fp32 FSDPEngine holding the same weights, and prints the
``mismatch/*`` metrics of :mod:`agentflow.algo._mismatch` per precision (one JSON line each). All
tokens are of version 0 and the weights are identical, so what remains is numerics.

    python benchmarks/bench_mismatch.py                        # tiny random model, seconds
    python benchmarks/bench_mismatch.py --model smollm2-135m   # the addition run's policy
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import pathlib
import time

import torch

from agentflow import MicroBatchSpec
from agentflow.algo import mismatch_stats, mismatch_sums, pad_trajectories
from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig
from agentflow.engines.local import LocalEngine, LocalEngineConfig
from agentflow.recipe import build
from agentflow.recipe.config import TrainRecipeConfig, load_recipe_config

ADDITION = pathlib.Path(__file__).resolve().parents[1] / "examples" / "addition.yaml"


async def _rollout(cfg: TrainRecipeConfig, model, tok, dtype: str, prompts: int) -> list:
    task = build.task_data(cfg.data)
    workflow = build.workflow(cfg.workflow, tok, task.reward, cfg.generation)
    local = LocalEngineConfig(dtype=dtype, max_batch_size=64, max_seq_len=256, seed=1)
    async with LocalEngine(copy.deepcopy(model), tok, config=local) as engine:
        return await engine.rollout(task.train[:prompts], workflow)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threshold", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_recipe_config([str(ADDITION)])
    model, tok = build.model_and_tokenizer(args.model, cfg.model)
    trainer = FSDPEngine(FSDPEngineConfig(device="cpu", temperature=cfg.generation.temperature or 1.0),
                         model=copy.deepcopy(model), tokenizer=tok)
    trainer.initialize()
    try:
        for dtype in args.dtypes.split(","):
            t0 = time.perf_counter()
            trajs = asyncio.run(_rollout(cfg, model, tok, dtype, args.prompts))
            batch = pad_trajectories(trajs)
            prox = trainer.forward(batch, MicroBatchSpec(max_tokens_per_mb=8192))
            sums = mismatch_sums(batch["logprobs"], prox, batch["loss_mask"], args.threshold, batch["versions"], 0)
            stats = {k.removeprefix("mismatch/"): round(v, 8) for k, v in mismatch_stats(sums, True).items()}
            print(json.dumps({"model": args.model, "engine_dtype": dtype, "trainer_dtype": "float32",
                              "sequences": len(trajs), "threshold": args.threshold, **stats,
                              "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    finally:
        trainer.destroy()


if __name__ == "__main__":
    main()
