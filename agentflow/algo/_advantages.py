"""Advantages for outcome-reward RL: reward shaping, group baselines, token broadcast, batch norm.

Formulas (``r`` = shaped rewards of one group of ``n`` samples of the same prompt):

- GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, eq. in sec. 4.1.2):
  ``A_i = (r_i - mean(r)) / (std(r) + eps)`` with the sample standard deviation (``n - 1``).
- Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783):
  ``A_i = r_i - mean(r)`` (no division by the std, which biases towards easy/hard prompts).
- RLOO (Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740):
  ``A_i = r_i - (sum_j r_j - r_i) / (n - 1)`` = ``n / (n - 1) * (r_i - mean(r))``.

A group of one sample has no baseline: its advantage is 0 under every group mode. The sequence
advantage is broadcast to every policy token (``loss_mask == 1``), then optionally normalised over
all loss tokens of the batch. No value function, no GAE: outcome rewards only (deliberate).

Not here: the policy loss (:mod:`agentflow.algo._loss`), value functions (no critic: outcome rewards only).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from agentflow._types import Trajectory
from agentflow.algo._batch import pad_trajectories
from agentflow.algo._config import AlgoConfig, BatchNorm, GroupNorm
from agentflow.errors import TrajectoryError

__all__ = [
    "batch_normalize",
    "broadcast_to_tokens",
    "compute_advantages",
    "group_advantages",
    "shape_rewards",
]


def shape_rewards(rewards: torch.Tensor, cfg: AlgoConfig) -> torch.Tensor:
    """``clip((r + bias) * scale, -clip, clip)`` (no clip when ``cfg.reward_clip`` is None)."""
    out = (rewards.float() + cfg.reward_bias) * cfg.reward_scale
    if cfg.reward_clip is not None:
        out = out.clamp(-cfg.reward_clip, cfg.reward_clip)
    return out


def group_advantages(
    rewards: torch.Tensor, group_ids: Sequence[str], mode: GroupNorm, eps: float = 1e-6
) -> torch.Tensor:
    """Per-sequence advantages with a per-group baseline (formulas in the module docstring).

    Raises:
        TrajectoryError: if ``group_ids`` does not match ``rewards`` in length, or a group id is
            empty while ``mode`` needs groups.
    """
    if len(group_ids) != rewards.numel():
        raise TrajectoryError(f"got {rewards.numel()} rewards but {len(group_ids)} group ids; expected equal")
    rewards = rewards.float()
    if mode == "none":
        return rewards.clone()
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(group_ids):
        if g == "":
            raise TrajectoryError(
                f"sequence {i} has no group_id but group_norm={mode!r} needs groups; set Trajectory.group_id "
                "(samples of one prompt share it) or use group_norm='none'"
            )
        members[g].append(i)
    out = torch.zeros_like(rewards)
    for idx in members.values():
        if len(idx) < 2:
            continue  # no baseline from a single sample: advantage 0
        r = rewards[idx]
        centred = r - r.mean()
        if mode == "grpo":
            out[idx] = centred / (r.std(correction=1) + eps)
        elif mode == "dr_grpo":
            out[idx] = centred
        else:  # rloo
            out[idx] = centred * len(idx) / (len(idx) - 1)
    return out


def broadcast_to_tokens(seq_adv: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``A[b, t] = seq_adv[b] * loss_mask[b, t]`` (shape of ``loss_mask``)."""
    return seq_adv.float()[:, None] * loss_mask.float()


def batch_normalize(adv: torch.Tensor, loss_mask: torch.Tensor, mode: BatchNorm, eps: float = 1e-6) -> torch.Tensor:
    """Centre (``mean``) or standardise (``mean_std``) advantages over all loss tokens; 0 off-mask."""
    if mode == "none":
        return adv
    mask = loss_mask.bool()
    n = int(mask.sum())
    if n == 0:
        return adv
    vals = adv[mask]
    out = adv - vals.mean()
    if mode == "mean_std" and n > 1:
        out = out / (vals.std(correction=1) + eps)
    return out * mask


def compute_advantages(trajs: Sequence[Trajectory], cfg: AlgoConfig) -> torch.Tensor:
    """Per-token advantages ``[B, T]`` for ``trajs``, aligned with :func:`pad_trajectories`.

    Shape rewards, subtract the group baseline, broadcast over ``loss_mask``, batch-normalise.
    """
    batch = pad_trajectories(trajs)
    rewards = shape_rewards(batch["rewards"], cfg)
    seq_adv = group_advantages(rewards, [t.group_id for t in trajs], cfg.group_norm, cfg.eps)
    adv = broadcast_to_tokens(seq_adv, batch["loss_mask"])
    return batch_normalize(adv, batch["loss_mask"], cfg.batch_norm, cfg.eps)
