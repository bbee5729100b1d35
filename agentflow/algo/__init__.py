"""agentflow.algo: the RL algorithm: advantages (GRPO, Dr.GRPO, RLOO, batch norm, DAPO's overlong
penalty), dynamic sampling (a consume-time group filter), policy losses (decoupled PPO, PPO/GRPO,
GSPO's sequence ratio, TIS/MIS mismatch corrections, KL to a reference, entropy bonus, SFT) with
their loss aggregation and frozen configs, the rollout-training mismatch metrics, and one PPO train
step over a batch (:func:`ppo_step`: advantages once, proximal log-probs, minibatch updates).

Imports torch; ``import agentflow`` does not import this package. It knows nothing about engines:
the train engine calls the loss function through the contract documented in
:mod:`agentflow.algo._loss`. ``docs/algorithms.md`` says what each option computes and when to use it.
"""

from __future__ import annotations

from agentflow.algo._advantages import (
    batch_normalize,
    broadcast_to_tokens,
    compute_advantages,
    final_rewards,
    group_advantages,
    group_filter,
    has_signal,
    overlong_penalty,
    shape_rewards,
)
from agentflow.algo._batch import pad_trajectories
from agentflow.algo._config import (
    AlgoConfig,
    BatchNorm,
    GroupNorm,
    ImpWeightLevel,
    ImpWeightMode,
    KLEstimator,
    LossAgg,
    PPOConfig,
    RatioLevel,
)
from agentflow.algo._loss import (
    PPOLoss,
    aggregation_weights,
    behaviour_weight,
    kl_estimate,
    loss_weight,
    per_sequence,
    ppo_loss,
    sft_loss,
    token_count,
)
from agentflow.algo._mismatch import accumulate_sums, mismatch_stats, mismatch_sums
from agentflow.algo._step import (
    Shard,
    advantage_stats,
    batch_stats,
    ppo_step,
    ppo_update,
    split_by_tokens,
    token_advantages,
)

__all__ = [
    "AlgoConfig",
    "BatchNorm",
    "GroupNorm",
    "ImpWeightLevel",
    "ImpWeightMode",
    "KLEstimator",
    "LossAgg",
    "PPOConfig",
    "PPOLoss",
    "RatioLevel",
    "Shard",
    "accumulate_sums",
    "advantage_stats",
    "aggregation_weights",
    "batch_normalize",
    "batch_stats",
    "behaviour_weight",
    "broadcast_to_tokens",
    "compute_advantages",
    "final_rewards",
    "group_advantages",
    "group_filter",
    "has_signal",
    "kl_estimate",
    "loss_weight",
    "mismatch_stats",
    "mismatch_sums",
    "overlong_penalty",
    "pad_trajectories",
    "per_sequence",
    "ppo_loss",
    "ppo_step",
    "ppo_update",
    "sft_loss",
    "shape_rewards",
    "split_by_tokens",
    "token_advantages",
    "token_count",
]
