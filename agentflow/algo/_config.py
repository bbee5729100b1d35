"""Frozen, validated knobs of the RL algorithm: advantages (:class:`AlgoConfig`) and the
(decoupled) PPO loss (:class:`PPOConfig`).

Only values live here; the formulas are in :mod:`agentflow.algo._advantages` and
:mod:`agentflow.algo._loss`. Every problem is reported at once in one :class:`ConfigError`.

Not here: using the knobs (:mod:`agentflow.algo._advantages`, :mod:`agentflow.algo._loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from agentflow.errors import ConfigError

__all__ = ["AlgoConfig", "BatchNorm", "GroupNorm", "ImpWeightMode", "KLEstimator", "PPOConfig"]

GroupNorm = Literal["grpo", "dr_grpo", "rloo", "none"]
BatchNorm = Literal["none", "mean", "mean_std"]
KLEstimator = Literal["k1", "k2", "k3"]
ImpWeightMode = Literal["cap", "mask"]


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True, slots=True)
class PPOConfig:
    """The PPO / decoupled-PPO loss.

    Attributes:
        eps_clip: lower clip, the ratio is clipped to ``[1 - eps_clip, 1 + eps_clip_high]``.
        eps_clip_high: upper clip (DAPO's "clip-higher"); ``None`` = ``eps_clip``.
        decoupled: use the proximal policy (``prox_logp``, recomputed by the trainer before the
            update) as the trust-region centre and weight each token by the behaviour importance
            weight ``exp(prox_logp - behav_logp)`` (AReaL). ``False`` = standard PPO/GRPO with the
            behaviour log-probs as the old log-probs.
        behav_imp_weight_cap: threshold on the behaviour importance weight; ``None`` = no cap.
        behav_imp_weight_mode: ``"cap"`` clamps weights above the threshold to it, ``"mask"`` drops
            those tokens from the loss (they still count in the token mean's denominator).
        kl_coef: weight of the KL-to-reference term (0 = off; then ``ref_logp`` is not needed).
        kl_estimator: ``k1``/``k2``/``k3`` (Schulman, "Approximating KL divergence", 2020).
        entropy_coef: weight of the entropy bonus (0 = off): the loss subtracts
            ``entropy_coef * H(pi(. | context))`` per loss token, which resists the policy turning
            deterministic before it has found the answers.
    """

    eps_clip: float = 0.2
    eps_clip_high: float | None = None
    decoupled: bool = True
    behav_imp_weight_cap: float | None = 5.0
    behav_imp_weight_mode: ImpWeightMode = "cap"
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        ConfigError.check(self.problems())

    @property
    def clip_high(self) -> float:
        return self.eps_clip if self.eps_clip_high is None else self.eps_clip_high

    def problems(self) -> list[str]:
        out = []
        if not (_finite(self.eps_clip) and 0 < self.eps_clip < 1):
            out.append(f"ppo.eps_clip must be in (0, 1), got {self.eps_clip!r}")
        if self.eps_clip_high is not None and not (_finite(self.eps_clip_high) and self.eps_clip_high > 0):
            out.append(f"ppo.eps_clip_high must be > 0 or null, got {self.eps_clip_high!r}")
        cap = self.behav_imp_weight_cap
        if cap is not None and not (_finite(cap) and cap > 1):
            out.append(f"ppo.behav_imp_weight_cap must be > 1 or null (no cap), got {cap!r}")
        if self.behav_imp_weight_mode not in ("cap", "mask"):
            out.append(f"ppo.behav_imp_weight_mode must be 'cap' or 'mask', got {self.behav_imp_weight_mode!r}")
        if not (_finite(self.kl_coef) and self.kl_coef >= 0):
            out.append(f"ppo.kl_coef must be a finite number >= 0, got {self.kl_coef!r}")
        if not (_finite(self.entropy_coef) and self.entropy_coef >= 0):
            out.append(f"ppo.entropy_coef must be a finite number >= 0, got {self.entropy_coef!r}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            out.append(f"ppo.kl_estimator must be 'k1', 'k2' or 'k3', got {self.kl_estimator!r}")
        return out


@dataclass(frozen=True, slots=True)
class AlgoConfig:
    """Advantages and the loss of one RL algorithm.

    Reward shaping happens first, ``r' = clip((r + reward_bias) * reward_scale, -reward_clip,
    reward_clip)``, then group normalisation, then the token-level broadcast over ``loss_mask``,
    then batch normalisation over all loss tokens.

    Attributes:
        reward_scale, reward_bias, reward_clip: reward shaping (``reward_clip=None`` = no clip).
        group_norm: ``grpo`` (mean/std), ``dr_grpo`` (mean only), ``rloo`` (leave-one-out mean),
            ``none`` (raw shaped reward).
        batch_norm: normalise token advantages over the whole batch: ``none``, ``mean`` (centre)
            or ``mean_std`` (centre and scale).
        eps: added to standard deviations before dividing.
        ppo: the loss.
    """

    reward_scale: float = 1.0
    reward_bias: float = 0.0
    reward_clip: float | None = None
    group_norm: GroupNorm = "grpo"
    batch_norm: BatchNorm = "none"
    eps: float = 1e-6
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def __post_init__(self) -> None:
        ConfigError.check(self.problems())

    def problems(self) -> list[str]:
        out = []
        for name in ("reward_scale", "reward_bias"):
            if not _finite(getattr(self, name)):
                out.append(f"algo.{name} must be a finite number, got {getattr(self, name)!r}")
        if self.reward_clip is not None and not (_finite(self.reward_clip) and self.reward_clip > 0):
            out.append(f"algo.reward_clip must be > 0 or null, got {self.reward_clip!r}")
        if self.group_norm not in ("grpo", "dr_grpo", "rloo", "none"):
            out.append(f"algo.group_norm must be 'grpo', 'dr_grpo', 'rloo' or 'none', got {self.group_norm!r}")
        if self.batch_norm not in ("none", "mean", "mean_std"):
            out.append(f"algo.batch_norm must be 'none', 'mean' or 'mean_std', got {self.batch_norm!r}")
        if not (_finite(self.eps) and self.eps > 0):
            out.append(f"algo.eps must be > 0, got {self.eps!r}")
        return out
