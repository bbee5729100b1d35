"""agentflow.algo: the RL algorithm: advantages (GRPO, Dr.GRPO, RLOO, batch norm), policy losses
(decoupled PPO, PPO/GRPO, KL to a reference, SFT) with their frozen configs, and one PPO train
step over a batch (:func:`ppo_step`: advantages once, proximal log-probs, minibatch updates).

Imports torch; ``import agentflow`` does not import this package. It knows nothing about engines:
the train engine calls the loss function through the contract documented in
:mod:`agentflow.algo._loss`.
"""

from __future__ import annotations

from agentflow.algo._advantages import (
    batch_normalize,
    broadcast_to_tokens,
    compute_advantages,
    group_advantages,
    shape_rewards,
)
from agentflow.algo._batch import pad_trajectories
from agentflow.algo._config import AlgoConfig, BatchNorm, GroupNorm, ImpWeightMode, KLEstimator, PPOConfig
from agentflow.algo._loss import PPOLoss, kl_estimate, ppo_loss, sft_loss, token_count
from agentflow.algo._step import Shard, ppo_step, ppo_update, split_by_tokens, token_advantages

__all__ = [
    "AlgoConfig",
    "BatchNorm",
    "GroupNorm",
    "ImpWeightMode",
    "KLEstimator",
    "PPOConfig",
    "PPOLoss",
    "Shard",
    "batch_normalize",
    "broadcast_to_tokens",
    "compute_advantages",
    "group_advantages",
    "kl_estimate",
    "pad_trajectories",
    "ppo_loss",
    "ppo_step",
    "ppo_update",
    "sft_loss",
    "shape_rewards",
    "split_by_tokens",
    "token_advantages",
    "token_count",
]
