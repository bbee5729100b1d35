"""One PPO train step over a batch of trajectories, for any :class:`TrainEngine`.

:func:`ppo_step` is what ``agentflow train`` runs per step and what a custom loop calls:
advantages over the whole batch (:func:`token_advantages`, once), then :func:`ppo_update`:
proximal (and reference) log-probs, the PPO minibatch updates and the LR step. Under torchrun
rank 0 computes the advantages, cuts the batch with :func:`split_by_tokens` (whole prompt groups,
near-equal tokens per rank) and every rank runs :func:`ppo_update` on its shard.

The batch is laid out once per minibatch: with an engine that has ``prepare(batch, mb_spec)``
(:class:`agentflow.engines.FSDPEngine`) the padded batch is packed into micro-batches once and the
proximal forward, the reference forward and the update all run on that packing; other engines get
the padded batch. Options that need more than the default fields add them to the padded batch
before packing: ``seq_ids`` (sequence-level ratios or weights), ``loss_coef``/``loss_denom`` (a loss
aggregation other than the token mean, overlong masking; weighted by :func:`loss_weight`).

Metrics returned besides the engine's: :func:`batch_stats` (truncation rate, share of groups
without signal, overlong penalty) and, whenever the proximal log-probs are computed (decoupled
PPO), the rollout-training mismatch of :mod:`agentflow.algo._mismatch` over the tokens generated
at the train engine's current version.

Not here: the loss itself (:mod:`agentflow.algo._loss`), rollout, or the rank plumbing.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

import torch

from agentflow._engine_api import MicroBatchSpec, TrainEngine
from agentflow._memory import trim_heap
from agentflow._types import Trajectory
from agentflow.algo._advantages import compute_advantages, has_signal, overlong_penalty
from agentflow.algo._batch import pad_trajectories
from agentflow.algo._config import AlgoConfig
from agentflow.algo._loss import PPOLoss, aggregation_weights, loss_weight
from agentflow.algo._mismatch import accumulate_sums, mismatch_stats, mismatch_sums, reduce_sums
from agentflow.errors import ConfigError

__all__ = ["Shard", "advantage_stats", "batch_stats", "ppo_step", "ppo_update", "split_by_tokens", "token_advantages"]

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


def batch_stats(trajs: list[Trajectory], algo: AlgoConfig) -> dict[str, float]:
    """Whole-batch metrics: ``truncated_frac`` (sequences cut at the token budget,
    :attr:`Trajectory.truncated`), ``zero_signal_frac`` (groups whose advantages are all 0,
    :func:`has_signal`; 0 under dynamic sampling, omitted when a trajectory has no group id) and
    ``overlong_penalty`` (mean soft penalty, when it is on)."""
    out = {"truncated_frac": statistics.fmean(t.truncated for t in trajs) if trajs else 0.0}
    groups: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        groups[t.group_id].append(t)
    if groups and "" not in groups:
        out["zero_signal_frac"] = sum(not has_signal(g, algo) for g in groups.values()) / len(groups)
    if algo.overlong_penalty_window and trajs:
        lengths = torch.tensor([t.n_policy_tokens for t in trajs], dtype=torch.float32)
        out["overlong_penalty"] = float(overlong_penalty(lengths, algo).mean())
    return out


def advantage_stats(items: Shard, update: dict[str, float], minibatches: int = 1) -> dict[str, float]:
    """``zero_adv_frac``: the share of the batch's sequences whose advantage is 0 at every loss
    token (left out of the update under ``algo.skip_zero_advantage``). When the engine's ``update``
    statistics count ``n_seqs`` / ``n_tokens`` (those it trained on, a mean over ``minibatches``),
    they are kept as ``trained_seqs`` / ``trained_tokens`` and ``n_seqs`` / ``n_tokens`` count the
    whole batch, as without skipping (``n_rows`` stays the tokens through the model)."""
    if not items:
        return {}
    out = {"zero_adv_frac": sum(not any(adv) for _, adv in items) / len(items)}
    for key, whole in (("seqs", len(items)), ("tokens", sum(len(t) for t, _ in items))):
        if f"n_{key}" in update:
            out[f"trained_{key}"], out[f"n_{key}"] = update[f"n_{key}"], whole / minibatches
    return out


def _rows_to_train(items: Shard, algo: AlgoConfig, weights: torch.Tensor) -> list[int] | None:
    """The rows of a minibatch the update needs, or ``None`` for all of them: with
    ``algo.skip_zero_advantage`` (and no KL or entropy term) the rows with a non-zero advantage
    and loss weight (``weights``: each row's share of the loss denominator), else the shortest
    row with weight: its loss is 0, so the optimiser still steps as it would have on the whole
    minibatch, momentum and weight decay included."""
    ppo = algo.ppo
    if not algo.skip_zero_advantage or ppo.kl_coef > 0 or ppo.entropy_coef > 0:
        return None
    weighted = [i for i in range(len(items)) if weights[i] > 0]
    rows = [i for i in weighted if any(items[i][1])]
    if len(rows) == len(items) or not weighted:
        return None
    return rows or [min(weighted, key=lambda i: len(items[i][0]))]


def _padded_batch(items: Shard, algo: AlgoConfig) -> dict[str, torch.Tensor]:
    """The padded minibatch the update trains on: every row, or only the rows with a non-zero
    advantage (:func:`_rows_to_train`), whose loss denominators are then scaled so that the loss
    is still divided by the whole minibatch's denominator."""
    batch = _all_rows(items, algo)
    mask = batch["loss_mask"].to(torch.float32)
    coef, denom = batch.get("loss_coef", mask), batch.get("loss_denom", mask)
    weights = (denom * mask).sum(1)
    rows = _rows_to_train(items, algo, weights)
    if rows is None:
        return batch
    keep = torch.tensor(rows)
    width = int(batch["attention_mask"][keep].sum(1).max())
    batch = {k: v[keep, :width] if v.dim() == 2 else v[keep] for k, v in batch.items()}
    if "seq_ids" in batch:
        batch["seq_ids"] = torch.arange(len(rows))[:, None].expand(len(rows), width).contiguous()
    batch["loss_coef"] = coef[keep, :width]
    batch["loss_denom"] = denom[keep, :width] * float(weights.sum() / weights[keep].sum())
    return batch


def _all_rows(items: Shard, algo: AlgoConfig) -> dict[str, torch.Tensor]:
    batch = pad_trajectories([t for t, _ in items])
    adv = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
    for i, (_, a) in enumerate(items):
        adv[i, : len(a)] = torch.tensor(a)
    batch["advantages"] = adv
    ppo = algo.ppo
    if ppo.needs_seq_ids:
        rows, width = adv.shape
        batch["seq_ids"] = torch.arange(rows)[:, None].expand(rows, width).contiguous()
    drop = torch.tensor([t.truncated for t, _ in items]) if algo.overlong_mask else None
    agg = aggregation_weights(batch["loss_mask"], ppo.loss_agg, ppo.loss_agg_norm, drop)
    if agg is not None:
        batch["loss_coef"], batch["loss_denom"] = agg
    return batch


def _prepare(train_engine: TrainEngine, batch: dict[str, torch.Tensor], mb_spec: MicroBatchSpec) -> Any:
    return train_engine.prepare(batch, mb_spec)  # packed once, reused below


def _engine_version(train_engine: TrainEngine) -> int | None:
    version = train_engine.get_version()
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def _reference_logprobs(
    train_engine: TrainEngine, algo: AlgoConfig, padded: list[dict[str, torch.Tensor]], batches: list[Any],
    mb_spec: MicroBatchSpec, ref_engine: TrainEngine | None, mismatch: _Mismatch,
) -> None:
    """Proximal log-probs of every minibatch before the first update (but the first minibatch's,
    which its own update forward provides, see :class:`_ProxFromUpdate`), and the reference's;
    adds the proximal log-probs' rollout-training mismatch to ``mismatch``."""
    if algo.ppo.kl_coef > 0 and ref_engine is None:
        raise ConfigError("algo.ppo.kl_coef > 0 needs a reference model; none was built")
    for i, (pad, batch) in enumerate(zip(padded, batches, strict=True)):
        if algo.ppo.decoupled and (i > 0 or algo.ppo.recompute_prox):
            prox = train_engine.forward(batch, mb_spec)
            _attach(batch, "prox_logp", prox)
            mismatch.add(pad["logprobs"], prox, pad["loss_mask"], pad["versions"])
        if ref_engine is not None and algo.ppo.kl_coef > 0:
            _attach(batch, "ref_logp", ref_engine.forward(batch, mb_spec))
    trim_heap()  # the forwards' temporaries, before the update allocates its own


class _Mismatch:
    """Rollout-training mismatch sums of the proximal log-probs: of the tokens generated at the
    train engine's ``version`` and of every loss token (:mod:`agentflow.algo._mismatch`)."""

    def __init__(self, threshold: float, version: int | None) -> None:
        self.threshold, self.version = threshold, version
        self.current = torch.zeros(5, dtype=torch.float64)
        self.every = torch.zeros(5, dtype=torch.float64)

    def add(self, behav: torch.Tensor, prox: torch.Tensor, mask: torch.Tensor, versions: torch.Tensor | None) -> None:
        accumulate_sums(self.current, mismatch_sums(behav, prox, mask, self.threshold, versions, self.version))
        accumulate_sums(self.every, mismatch_sums(behav, prox, mask, self.threshold))

    def stats(self) -> dict[str, float]:
        out = mismatch_stats(reduce_sums(self.current), current_version_only=self.version is not None)
        if self.version is not None:
            out.update(mismatch_stats(reduce_sums(self.every), prefix="mismatch/all_"))
        return out


class _ProxFromUpdate:
    """The first minibatch's loss: the update forward runs the weights before this step's update,
    which are the proximal policy, so its log-probs (detached) are the proximal log-probs and no
    separate forward is needed (``algo.ppo.recompute_prox`` restores one). Gradients are those of
    a separate forward's: the policy ratio is 1 and its derivative is that of ``logp``."""

    def __init__(self, loss: PPOLoss, mismatch: _Mismatch) -> None:
        self.loss, self.mismatch = loss, mismatch

    @property
    def entropy_grad(self) -> bool:
        return self.loss.entropy_grad

    def __call__(self, logprobs: torch.Tensor, mb: Any) -> tuple[torch.Tensor, dict[str, float]]:
        prox = logprobs.detach()
        self.mismatch.add(mb["logprobs"], prox, mb["loss_mask"], mb.get("versions"))
        return self.loss(logprobs, {**mb, "prox_logp": prox})


def _attach(batch: Any, key: str, padded: torch.Tensor) -> None:
    """Add a per-token field: to the packed batch through its own method, else to the padded dict."""
    setter = getattr(batch, "set_token_field", None)
    if setter is not None:
        setter(key, padded)
    else:
        batch[key] = padded


def ppo_update(
    train_engine: TrainEngine, algo: AlgoConfig, items: Shard, *, max_tokens_per_mb: int | None = None,
    minibatches: int = 1, ref_engine: TrainEngine | None = None, version: int | None = None,
) -> dict[str, float]:
    """Proximal (and reference) log-probs -> PPO minibatch updates -> LR step, on this rank's shard.

    ``items`` are trajectories with their advantages (:func:`token_advantages`); the shard is cut
    into ``minibatches`` optimiser steps in batch order. Returns the minibatches' mean statistics
    and the ``mismatch/*`` metrics (all ranks combined). ``version`` is the policy version of
    ``train_engine``'s current weights (updates published so far); the mismatch is measured on the
    tokens generated at that version. ``None`` = ``train_engine.get_version()`` when it has one
    (:class:`~agentflow.Trainer` keeps it in sync; a custom loop should call
    ``train_engine.set_version(v)`` after publishing version ``v``), else every loss token is used.
    Collective under torchrun: every rank calls it once per step with the same ``minibatches``.
    """
    n, k = len(items), minibatches
    if n < k:
        raise ConfigError(f"trainer.ppo_minibatches={k} but this rank has only {n} sequences; lower it")
    mb_spec = MicroBatchSpec(max_tokens_per_mb=max_tokens_per_mb)
    padded = [_padded_batch(items[i * n // k: (i + 1) * n // k], algo) for i in range(k)]
    batches = [_prepare(train_engine, b, mb_spec) for b in padded]
    version = _engine_version(train_engine) if version is None else version
    mismatch = _Mismatch(algo.mismatch_threshold, version)
    _reference_logprobs(train_engine, algo, padded, batches, mb_spec, ref_engine, mismatch)
    del padded
    loss = PPOLoss(algo.ppo)
    stats: dict[str, float] = {}
    for i, batch in enumerate(batches):
        loss_fn = _ProxFromUpdate(loss, mismatch) if i == 0 and algo.ppo.decoupled and not algo.ppo.recompute_prox \
            else loss
        for key, value in train_engine.train_batch(batch, mb_spec, loss_fn, loss_weight).items():
            stats[key] = stats.get(key, 0.0) + value / k
    train_engine.step_lr_scheduler()
    return {**stats, **mismatch.stats()} if algo.ppo.decoupled else stats


def ppo_step(
    train_engine: TrainEngine, algo: AlgoConfig, trajs: list[Trajectory], *, max_tokens_per_mb: int | None = None,
    minibatches: int = 1, ref_engine: TrainEngine | None = None, version: int | None = None,
) -> dict[str, float]:
    """One train step on one process: :func:`token_advantages`, then :func:`ppo_update`; the
    statistics include :func:`batch_stats` and :func:`advantage_stats`."""
    items = token_advantages(trajs, algo)
    update = ppo_update(train_engine, algo, items, max_tokens_per_mb=max_tokens_per_mb, minibatches=minibatches,
                        ref_engine=ref_engine, version=version)
    return {**batch_stats(trajs, algo), **update, **advantage_stats(items, update, minibatches)}
