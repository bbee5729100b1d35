"""One PPO train step over a batch of trajectories, for any :class:`TrainEngine`.

:func:`ppo_step` is what ``agentflow train`` runs per step and what a custom loop calls:
advantages over the whole batch (:func:`token_advantages`, once), then :func:`ppo_update`:
proximal (and reference) log-probs, the PPO minibatch updates and the LR step. Under torchrun
rank 0 computes the advantages, cuts the batch with :func:`split_by_tokens` (whole prompt groups,
near-equal tokens per rank) and every rank runs :func:`ppo_update` on its shard.

The batch is laid out once per minibatch: with an engine that has ``prepare(batch, mb_spec)``
(:class:`agentflow.engines.FSDPEngine`) the padded batch is packed into micro-batches once and the
proximal forward, the reference forward and the update all run on that packing; other engines get
the padded batch.

Not here: the loss itself (:mod:`agentflow.algo._loss`), rollout, or the rank plumbing.
"""

from __future__ import annotations

from typing import Any

import torch

from agentflow._engine_api import MicroBatchSpec, TrainEngine
from agentflow._memory import trim_heap
from agentflow._types import Trajectory
from agentflow.algo._advantages import compute_advantages
from agentflow.algo._batch import pad_trajectories
from agentflow.algo._config import AlgoConfig
from agentflow.algo._loss import PPOLoss, token_count
from agentflow.errors import ConfigError

__all__ = ["Shard", "ppo_step", "ppo_update", "split_by_tokens", "token_advantages"]

Shard = list[tuple[Trajectory, list[float]]]  # trajectories with their per-token advantages


def token_advantages(trajs: list[Trajectory], algo: AlgoConfig) -> Shard:
    """Advantages over the *whole* batch (group and batch normalisation need all of it)."""
    adv = compute_advantages(trajs, algo)
    return [(t, adv[i, : len(t)].tolist()) for i, t in enumerate(trajs)]


def split_by_tokens(items: Shard, n: int) -> list[Shard]:
    """Whole prompt groups, largest first, onto the least-loaded rank: near-equal token counts per
    rank, and the samples of one prompt stay together so the train engine computes the prompt once.

    A group's load is the tokens its rank runs: the prompt once plus every continuation. With fewer
    groups than ranks, sequences are split one by one instead (every rank needs one).
    """
    if len(items) < n:
        raise ConfigError(f"a batch of {len(items)} sequences cannot be split over {n} ranks; "
                          "raise rollout.consumer_batch_size or generation.n_samples")
    groups: dict[tuple[int, ...], Shard] = {}
    for item in items:
        groups.setdefault(_prompt_key(item[0]), []).append(item)
    units = list(groups.values()) if len(groups) >= n else [[item] for item in items]
    shards: list[Shard] = [[] for _ in range(n)]
    load = [0] * n
    for unit in sorted(units, key=lambda u: -_load_of(u)):
        r = min(range(n), key=lambda i: (load[i], len(shards[i])))
        shards[r].extend(unit)
        load[r] += _load_of(unit)
    return shards


def _load_of(unit: Shard) -> int:
    p = len(_prompt_key(unit[0][0])) if len(unit) > 1 else 0
    return sum(len(t) for t, _ in unit) - p * (len(unit) - 1)


def _prompt_key(traj: Trajectory) -> tuple[int, ...]:
    """The tokens before the first loss token (what the samples of one prompt share)."""
    mask = traj.loss_mask
    first = next((i for i, m in enumerate(mask) if m), len(mask))
    return tuple(traj.input_ids[:first])


def _padded_batch(items: Shard) -> dict[str, torch.Tensor]:
    batch = pad_trajectories([t for t, _ in items])
    adv = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
    for i, (_, a) in enumerate(items):
        adv[i, : len(a)] = torch.tensor(a)
    batch["advantages"] = adv
    return batch


def _prepare(train_engine: TrainEngine, items: Shard, mb_spec: MicroBatchSpec) -> Any:
    batch = _padded_batch(items)
    prepare = getattr(train_engine, "prepare", None)
    return batch if prepare is None else prepare(batch, mb_spec)  # packed once, reused below


def _reference_logprobs(
    train_engine: TrainEngine, algo: AlgoConfig, batches: list[Any], mb_spec: MicroBatchSpec,
    ref_engine: TrainEngine | None,
) -> None:
    """Proximal log-probs of every minibatch before the first update, and the reference's."""
    if algo.ppo.kl_coef > 0 and ref_engine is None:
        raise ConfigError("algo.ppo.kl_coef > 0 needs a reference model; none was built")
    for batch in batches:
        if algo.ppo.decoupled:
            _attach(batch, "prox_logp", train_engine.forward(batch, mb_spec))
        if ref_engine is not None and algo.ppo.kl_coef > 0:
            _attach(batch, "ref_logp", ref_engine.forward(batch, mb_spec))
    trim_heap()  # the forwards' temporaries, before the update allocates its own


def _attach(batch: Any, key: str, padded: torch.Tensor) -> None:
    """Add a per-token field: to the packed batch through its own method, else to the padded dict."""
    setter = getattr(batch, "set_token_field", None)
    if setter is not None:
        setter(key, padded)
    else:
        batch[key] = padded


def ppo_update(
    train_engine: TrainEngine, algo: AlgoConfig, items: Shard, *, max_tokens_per_mb: int | None = None,
    minibatches: int = 1, ref_engine: TrainEngine | None = None,
) -> dict[str, float]:
    """Proximal (and reference) log-probs -> PPO minibatch updates -> LR step, on this rank's shard.

    ``items`` are trajectories with their advantages (:func:`token_advantages`); the shard is cut
    into ``minibatches`` optimiser steps in batch order. Returns the minibatches' mean statistics.
    Collective under torchrun: every rank calls it once per step with the same ``minibatches``.
    """
    n, k = len(items), minibatches
    if n < k:
        raise ConfigError(f"trainer.ppo_minibatches={k} but this rank has only {n} sequences; lower it")
    mb_spec = MicroBatchSpec(max_tokens_per_mb=max_tokens_per_mb)
    batches = [_prepare(train_engine, items[i * n // k: (i + 1) * n // k], mb_spec) for i in range(k)]
    _reference_logprobs(train_engine, algo, batches, mb_spec, ref_engine)
    loss = PPOLoss(algo.ppo)
    stats: dict[str, float] = {}
    for batch in batches:
        for key, value in train_engine.train_batch(batch, mb_spec, loss, token_count).items():
            stats[key] = stats.get(key, 0.0) + value / k
    train_engine.step_lr_scheduler()
    return stats


def ppo_step(
    train_engine: TrainEngine, algo: AlgoConfig, trajs: list[Trajectory], *, max_tokens_per_mb: int | None = None,
    minibatches: int = 1, ref_engine: TrainEngine | None = None,
) -> dict[str, float]:
    """One train step on one process: :func:`token_advantages`, then :func:`ppo_update`."""
    return ppo_update(train_engine, algo, token_advantages(trajs, algo), max_tokens_per_mb=max_tokens_per_mb,
                      minibatches=minibatches, ref_engine=ref_engine)
