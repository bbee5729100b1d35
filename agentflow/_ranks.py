"""torchrun plumbing for the training loop: rank 0 leads, the other ranks follow.

Rollout runs on rank 0 only. Each step rank 0 computes advantages over the whole batch, cuts it
with :func:`agentflow.algo.split_by_tokens` and broadcasts the shards (one object collective); every
rank then runs :func:`agentflow.algo.ppo_update` on its shard. Uploads and saves are collective
too, so rank 0's train engine is wrapped in :class:`LeadEngine`, which tells the followers before
each such call, and the followers run :func:`follow` until rank 0 says stop.

Not here: process-group setup (the train engine creates it), rollout, the loss.
"""

from __future__ import annotations

from typing import Any

from agentflow._engine_api import SaveLoadMeta, TrainEngine
from agentflow._types import Trajectory
from agentflow.algo import (
    AlgoConfig,
    advantage_stats,
    batch_stats,
    ppo_step,
    ppo_update,
    split_by_tokens,
    token_advantages,
)
from agentflow.errors import EngineError

__all__ = ["LeadEngine", "Ranks", "StepPlan", "follow"]


class Ranks:
    """This process's rank and world size, and rank 0's broadcasts to the others."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def send(self, obj: Any) -> None:
        self.dist.broadcast_object_list([obj], src=0)

    def recv(self) -> Any:
        box: list[Any] = [None]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]


class StepPlan:
    """How one PPO update runs on each rank (the same on all of them)."""

    def __init__(self, algo: AlgoConfig, *, max_tokens_per_mb: int | None, minibatches: int,
                 ref_engine: TrainEngine | None = None) -> None:
        self.algo, self.ref_engine = algo, ref_engine
        self.max_tokens_per_mb, self.minibatches = max_tokens_per_mb, minibatches

    def update(self, train_engine: TrainEngine, shard: Any) -> dict[str, float]:
        return ppo_update(train_engine, self.algo, shard, max_tokens_per_mb=self.max_tokens_per_mb,
                          minibatches=self.minibatches, ref_engine=self.ref_engine)

    def step(self, train_engine: TrainEngine, trajs: list[Trajectory]) -> dict[str, float]:
        """One process's whole step: advantages over the batch, then the update."""
        return ppo_step(train_engine, self.algo, trajs, max_tokens_per_mb=self.max_tokens_per_mb,
                        minibatches=self.minibatches, ref_engine=self.ref_engine)

    def lead(self, ranks: Ranks, train_engine: TrainEngine, trajs: list[Trajectory]) -> dict[str, float]:
        """Rank 0's step: shard the batch, send the shards, train on shard 0."""
        items = token_advantages(trajs, self.algo)
        shards = split_by_tokens(items, ranks.world)
        ranks.send(("step", shards))  # one broadcast per step; rank r trains on shards[r]
        update = self.update(train_engine, shards[0])
        return {**batch_stats(trajs, self.algo), **update, **advantage_stats(items, update, self.minibatches)}


class LeadEngine:
    """Rank 0's view of the train engine: tells the followers before each collective call."""

    def __init__(self, inner: TrainEngine, ranks: Ranks) -> None:
        self._inner, self._ranks = inner, ranks

    def upload_weights(self, meta: Any) -> Any:
        self._ranks.send(("upload", meta))
        return self._inner.upload_weights(meta)

    def snapshot_weights(self, meta: Any) -> Any:
        self._ranks.send(("snapshot", meta))
        return self._inner.snapshot_weights(meta)

    def save(self, meta: Any) -> None:
        self._ranks.send(("save", meta.path))
        self._inner.save(meta)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def follow(ranks: Ranks, plan: StepPlan, train_engine: TrainEngine) -> None:
    """Ranks > 0: mirror rank 0's collective calls (train, upload or snapshot, save) until it says stop."""
    while True:
        kind, payload = ranks.recv()
        if kind == "stop":
            return
        if kind == "step":
            plan.update(train_engine, payload[ranks.rank])
        elif kind == "upload":
            train_engine.upload_weights(payload)
        elif kind == "snapshot":  # rank 0 writes the copy: the others only join the gather
            train_engine.snapshot_weights(payload)
        elif kind == "save":
            train_engine.save(SaveLoadMeta(path=payload, with_optim=True))
        else:
            raise EngineError(f"rank {ranks.rank} got the command {kind!r} from rank 0, expected 'step', 'upload', "
                              "'snapshot', 'save' or 'stop': every rank must run the same agentflow version")
        if kind in ("upload", "snapshot") and payload.version is not None:  # as rank 0's Trainer does
            train_engine.set_version(payload.version)
