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

Before the baseline, the optional soft overlong penalty (DAPO, Yu et al. 2025, arXiv:2503.14476,
sec. 3.4, "overlong reward shaping") is added to the shaped reward: with ``L`` generated tokens,
window ``W`` and budget ``M``, ``p(L) = 0`` for ``L <= M - W``, ``-f * (L - (M - W)) / W`` for
``M - W < L <= M``, ``-f`` beyond.

Dynamic sampling (DAPO, sec. 3.2) lives here too: :func:`has_signal` says whether a group's
advantages can be non-zero (at least 2 samples whose final rewards differ), and
:func:`group_filter` turns it into the predicate the trainer passes to
``Rollout.get_groups(..., group_filter=)``.

Not here: the policy loss (:mod:`agentflow.algo._loss`), where groups are dropped and how their
staleness slots come back (``agentflow._buffer`` and ``agentflow._executor``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from agentflow._types import Trajectory
from agentflow.algo._batch import pad_trajectories
from agentflow.algo._config import AlgoConfig, BatchNorm, GroupNorm
from agentflow.errors import ConfigError, TrajectoryError

__all__ = [
    "batch_normalize",
    "broadcast_to_tokens",
    "compute_advantages",
    "final_rewards",
    "group_advantages",
    "group_filter",
    "has_signal",
    "overlong_penalty",
    "shape_rewards",
]


def shape_rewards(rewards: torch.Tensor, cfg: AlgoConfig) -> torch.Tensor:
    """``clip((r + bias) * scale, -clip, clip)`` (no clip when ``cfg.reward_clip`` is None)."""
    out = (rewards.float() + cfg.reward_bias) * cfg.reward_scale
    if cfg.reward_clip is not None:
        out = out.clamp(-cfg.reward_clip, cfg.reward_clip)
    return out


def overlong_penalty(lengths: torch.Tensor, cfg: AlgoConfig) -> torch.Tensor:
    """DAPO's soft overlong penalty per sequence (formula in the module docstring); 0 when off.

    Raises:
        ConfigError: if the penalty is on but ``cfg.overlong_penalty_max_tokens`` is unset.
    """
    window = cfg.overlong_penalty_window
    if window == 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    budget = cfg.overlong_penalty_max_tokens
    if budget is None:
        raise ConfigError("algo.overlong_penalty_window > 0 needs algo.overlong_penalty_max_tokens (the "
                          "generation budget L_max); set it (agentflow train uses generation.max_new_tokens)")
    over = (lengths.float() - (budget - window)).clamp(min=0.0)
    return -cfg.overlong_penalty_factor * (over / window).clamp(max=1.0)


def final_rewards(trajs: Sequence[Trajectory], cfg: AlgoConfig) -> torch.Tensor:
    """The per-sequence rewards the group baseline sees: shaped rewards plus the overlong penalty."""
    rewards = shape_rewards(torch.tensor([t.reward for t in trajs], dtype=torch.float32), cfg)
    if cfg.overlong_penalty_window:
        lengths = torch.tensor([t.n_policy_tokens for t in trajs], dtype=torch.float32)
        rewards = rewards + overlong_penalty(lengths, cfg)
    return rewards


def has_signal(trajs: Sequence[Trajectory], cfg: AlgoConfig) -> bool:
    """Whether a group of samples of one prompt can have a non-zero advantage: at least 2 samples
    whose final rewards (:func:`final_rewards`) differ by more than ``cfg.eps``."""
    if len(trajs) < 2:
        return False
    r = final_rewards(trajs, cfg)
    return float(r.max() - r.min()) > cfg.eps


def group_filter(cfg: AlgoConfig) -> Callable[[Any], bool] | None:
    """DAPO dynamic sampling as a consume-time predicate, or ``None`` when ``cfg.dynamic_sampling``
    is off.

    The predicate takes a buffer :class:`~agentflow.Group` and returns whether to train on it
    (:func:`has_signal` of its trajectories). Pass it to ``Rollout.get_groups(n,
    group_filter=...)`` (the :class:`~agentflow.Trainer` does, given ``group_filter=``): a group it
    rejects leaves the buffer like a stale-dropped one. Its staleness slot is given back
    (``StalenessManager.on_give_back``), so the admission budget ``(eta + v + 1) * B`` keeps
    counting only groups that are trained on, one more prompt starts in the dropped group's
    place at the current version, and ``get_groups`` keeps waiting until ``n`` groups with signal
    are there (or its timeout). Dropping never makes a trained group staler than ``eta``: the
    consume-time staleness check runs first.
    """
    if not cfg.dynamic_sampling:
        return None

    def keep(group: Any) -> bool:
        return has_signal(group.trajectories, cfg)

    return keep


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

    Shape rewards (plus the overlong penalty), subtract the group baseline, broadcast over
    ``loss_mask``, batch-normalise.
    """
    batch = pad_trajectories(trajs)
    rewards = final_rewards(trajs, cfg)
    seq_adv = group_advantages(rewards, [t.group_id for t in trajs], cfg.group_norm, cfg.eps)
    adv = broadcast_to_tokens(seq_adv, batch["loss_mask"])
    return batch_normalize(adv, batch["loss_mask"], cfg.batch_norm, cfg.eps)
