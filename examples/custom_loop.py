"""Your own asynchronous RL loop with agentflow's public pieces, in one short script.

    python examples/custom_loop.py            # ~10 s on a laptop CPU

What `agentflow train` does, spelled out: an inference engine with a Rollout (executor, replay
buffer, staleness bound) runs episodes on the event loop while the train step runs in a thread;
after each step the new weights go to the engine (pause, load, version + 1, resume) and the episodes
in flight carry on. Here a random tiny model (byte tokenizer) learns to answer in lowercase letters, a
reward that it can learn in a few steps on a CPU. Swap in your model, workflow and reward.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import tempfile

from agentflow import Checkpointer, PromptSource, Rollout, RolloutConfig, SaveLoadMeta, WeightUpdateMeta
from agentflow.algo import AlgoConfig, ppo_step
from agentflow.engines import FSDPEngine, FSDPEngineConfig, LocalEngine, LocalEngineConfig
from agentflow.envs.tasks import Task
from agentflow.testing import tiny_model_and_tokenizer
from agentflow.workflows import RLVRConfig, RLVRWorkflow


def lowercase(completion: str, task: Task) -> float:
    """The share of the answer's characters that are lowercase letters a-z (0 for an empty answer)."""
    return sum("a" <= c <= "z" for c in completion) / len(completion) if completion else 0.0


def build(args: argparse.Namespace):
    model, tok = tiny_model_and_tokenizer(seed=0)
    train_engine = FSDPEngine(FSDPEngineConfig(lr=args.lr, device="cpu"), model=copy.deepcopy(model), tokenizer=tok)
    train_engine.initialize()
    engine = LocalEngine(model, tok, config=LocalEngineConfig(max_batch_size=32, max_seq_len=128))
    rollout = Rollout(engine, RolloutConfig(max_staleness=1, consumer_batch_size=args.batch, max_concurrent=16))
    gconfig = RLVRConfig().gconfig.new(n_samples=4, max_new_tokens=8, temperature=1.0)
    workflow = RLVRWorkflow(tok, lowercase, RLVRConfig(gconfig=gconfig))
    prompts = PromptSource([{"id": str(i), "prompt": f"Write {i} in words", "answer": ""} for i in range(64)], seed=0)
    return train_engine, engine, rollout, workflow, prompts


async def feed(rollout: Rollout, workflow, prompts: PromptSource) -> None:
    """Keep a few prompts waiting; admission under the staleness bound is the rollout's job."""
    while True:
        await rollout.wait_for_room(8)
        rollout.submit(prompts.next(), workflow)


async def train(args: argparse.Namespace) -> list[dict]:
    train_engine, _, rollout, workflow, prompts = build(args)
    algo = AlgoConfig()
    log = []
    async with rollout, asyncio.TaskGroup() as tg:
        feeder = tg.create_task(feed(rollout, workflow, prompts))
        for step in range(1, args.steps + 1):
            groups = await asyncio.to_thread(rollout.get_groups, args.batch, 120)  # blocks a thread, not the loop
            trajs = [t for g in groups for t in g.trajectories]
            stats = await asyncio.to_thread(ppo_step, train_engine, algo, trajs, max_tokens_per_mb=2048)
            meta = await asyncio.to_thread(train_engine.upload_weights, WeightUpdateMeta(type="mem"))
            await rollout.update_weights(meta, version=step)
            lag = max(step - 1 - g.min_version for g in groups if g.min_version is not None)
            log.append({"step": step, "reward": statistics.fmean(t.reward for t in trajs),
                        "loss": stats["loss"], "max_staleness": lag, "episodes": len(trajs)})
            print(json.dumps(log[-1]))
        feeder.cancel()
    with tempfile.TemporaryDirectory() as run_dir:  # a checkpoint of the final policy (a real run keeps it)
        ckpt = Checkpointer(run_dir).save(
            args.steps, trainer_state={"step": args.steps, "data": prompts.state_dict()}, rollout_state={},
            save_model=lambda path: train_engine.save(SaveLoadMeta(path=str(path), with_optim=True)))
        print(json.dumps({"checkpoint": ckpt.name}))
    train_engine.destroy()
    return log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=4, help="prompts per step (each sampled 4 times)")
    p.add_argument("--lr", type=float, default=1e-2)
    log = asyncio.run(train(p.parse_args()))
    first, last = log[0]["reward"], statistics.fmean(r["reward"] for r in log[-2:])
    print(json.dumps({"reward_first": round(first, 3), "reward_last": round(last, 3)}))


if __name__ == "__main__":
    main()
