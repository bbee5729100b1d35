"""Policy losses on per-token log-probs: decoupled PPO (AReaL), PPO/GRPO, KL to a reference, SFT.

The loss-function contract of ``FSDPEngine.train_batch`` / ``eval_batch``::

    loss_fn(logprobs: Tensor[T], mb: Mapping[str, Tensor]) -> Tensor | tuple[Tensor, dict[str, float]]

``logprobs[t]`` is ``log pi(token t | tokens before t)`` of the micro-batch's packed tokens under
the current parameters (with gradient), valid where ``mb["loss_mask"]`` is 1 and 0 elsewhere.
``mb`` holds the packed, token-aligned fields of the batch (``loss_mask``, ``logprobs`` = behaviour
log-probs, and whatever the caller added: ``advantages``, ``prox_logp``, ``ref_logp`` ...), plus
``entropy`` (on loss tokens; differentiable when the loss function has a true ``entropy_grad``
attribute, else detached). The loss is the *mean over this micro-batch's loss tokens*;
the engine weights micro-batches by ``loss_weight_fn(mb)`` (use :func:`token_count`) so the
optimised quantity is the mean over every loss token of the global batch, across ranks. Returned
stats are micro-batch means; the engine averages them with the same weights.

Not here: advantages (:mod:`agentflow.algo._advantages`), value functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from agentflow.algo._config import KLEstimator, PPOConfig
from agentflow.errors import ConfigError

__all__ = ["PPOLoss", "kl_estimate", "ppo_loss", "sft_loss", "token_count"]


def token_count(mb: Mapping[str, torch.Tensor]) -> float:
    """Loss weight of a micro-batch: its number of loss tokens (global token mean)."""
    return float(mb["loss_mask"].sum())


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman 2020, "Approximating KL
    divergence", http://joschu.net/blog/kl-approx.html). With ``log_rho = ref_logp - logp``:
    k1 = ``-log_rho`` (unbiased, high variance), k2 = ``log_rho**2 / 2`` (biased, low variance),
    k3 = ``exp(log_rho) - 1 - log_rho`` (unbiased, low variance, >= 0; used by GRPO)."""
    log_rho = ref_logp - logp
    if estimator == "k1":
        return -log_rho
    if estimator == "k2":
        return 0.5 * log_rho.square()
    return torch.expm1(log_rho) - log_rho


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def ppo_loss(
    logp: torch.Tensor,
    behav_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: PPOConfig,
    prox_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Decoupled PPO (Fu et al. 2025, AReaL, arXiv:2505.24298, eq. 5) or PPO (Schulman et al. 2017,
    arXiv:1707.06347, eq. 7), averaged over loss tokens.

    Decoupled (``cfg.decoupled``): ``r = exp(logp - prox_logp)``, behaviour weight
    ``w = exp(prox_logp - behav_logp)`` (``cap``: ``min(w, cap)``; ``mask``: token dropped when
    ``w > cap``); per token ``-w * min(r * A, clip(r, 1 - eps, 1 + eps_high) * A)``.
    Plain PPO/GRPO: ``prox_logp := behav_logp`` and ``w = 1``. With ``cfg.kl_coef > 0`` adds
    ``kl_coef * KL_est(logp, ref_logp)`` per token (GRPO, arXiv:2402.03300 eq. 3, with k3). With
    ``cfg.entropy_coef > 0`` subtracts ``entropy_coef * H`` per token (``entropy``: the policy's
    entropy at each position, differentiable), an exploration bonus against entropy collapse.
    Deviation: a masked token (``w > cap`` in ``mask`` mode) still counts in the denominator, so the
    loss stays a mean over the batch's loss tokens as the engine's weights assume.

    Returns:
        The scalar loss and detached statistics (means over loss tokens).
    """
    mask = loss_mask.to(logp.dtype)
    on = loss_mask.bool()
    old = prox_logp if cfg.decoupled else behav_logp
    if old is None:
        raise ConfigError(
            "decoupled PPO needs prox_logp (log-probs of the policy before this update, from "
            "engine.forward); got none. Add batch['prox_logp'] or set PPOConfig(decoupled=False)"
        )
    log_ratio = torch.where(on, logp - old.detach(), torch.zeros_like(logp))
    ratio = log_ratio.exp()
    adv = advantages.to(logp.dtype)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - cfg.eps_clip, 1 + cfg.clip_high)
    pg = torch.maximum(pg1, pg2)
    stats: dict[str, float] = {}
    if cfg.decoupled:
        weight, dropped = _behaviour_weight(old.detach(), behav_logp, on, cfg)
        pg = pg * weight
        stats["behav_imp_weight"] = float(_masked_mean(weight, mask))
        stats["behav_dropped_frac"] = float(_masked_mean(dropped.to(mask.dtype), mask))
    per_token = pg
    if cfg.kl_coef > 0:
        if ref_logp is None:
            raise ConfigError(f"ppo.kl_coef={cfg.kl_coef} needs ref_logp in the batch; got none (or set kl_coef=0)")
        kl = kl_estimate(logp, ref_logp.detach(), cfg.kl_estimator)
        per_token = per_token + cfg.kl_coef * kl
        stats["kl_ref"] = float(_masked_mean(kl.detach(), mask))
    if cfg.entropy_coef > 0:
        if entropy is None or (logp.requires_grad and not entropy.requires_grad):
            raise ConfigError(
                f"ppo.entropy_coef={cfg.entropy_coef} needs the differentiable per-token entropy; pass "
                "entropy= with gradient (FSDPEngine does so for a loss_fn with entropy_grad=True), or set it to 0"
            )
        per_token = per_token - cfg.entropy_coef * entropy
    loss = _masked_mean(per_token, mask)
    with torch.no_grad():
        stats["pg_loss"] = float(_masked_mean(pg, mask))
        stats["clip_frac"] = float(_masked_mean((pg1 < pg2).to(mask.dtype), mask))
        stats["ratio"] = float(_masked_mean(ratio, mask))
        stats["approx_kl"] = float(_masked_mean(torch.expm1(-log_ratio) + log_ratio, mask))
        stats["advantage"] = float(_masked_mean(adv, mask))
    return loss, stats


def _behaviour_weight(
    prox: torch.Tensor, behav: torch.Tensor, on: torch.Tensor, cfg: PPOConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w = exp(prox - behav)`` on loss tokens, capped or masked above the threshold."""
    weight = torch.where(on, prox - behav, torch.zeros_like(prox)).exp()
    cap = cfg.behav_imp_weight_cap
    if cap is None:
        return weight, torch.zeros_like(on)
    above = on & (weight > cap)
    if cfg.behav_imp_weight_mode == "cap":
        return weight.clamp(max=cap), above
    return torch.where(above, torch.zeros_like(weight), weight), above


@dataclass(frozen=True, slots=True)
class PPOLoss:
    """The ``loss_fn`` for ``train_batch``: reads ``advantages``, ``logprobs`` (behaviour),
    ``prox_logp`` (decoupled), ``ref_logp`` (KL) and ``loss_mask`` from the micro-batch."""

    cfg: PPOConfig = field(default_factory=PPOConfig)

    @property
    def entropy_grad(self) -> bool:
        """Whether the engine must keep ``mb["entropy"]`` differentiable (an entropy bonus is on)."""
        return self.cfg.entropy_coef > 0

    def __call__(self, logprobs: torch.Tensor, mb: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if "advantages" not in mb:
            raise ConfigError(
                f"PPOLoss needs batch['advantages'] (see agentflow.algo.compute_advantages); got keys {sorted(mb)}"
            )
        loss, stats = ppo_loss(
            logprobs, mb["logprobs"], mb["advantages"], mb["loss_mask"], self.cfg,
            prox_logp=mb.get("prox_logp"), ref_logp=mb.get("ref_logp"), entropy=mb.get("entropy"),
        )
        if "entropy" in mb:
            stats["entropy"] = float(_masked_mean(mb["entropy"].detach(), mb["loss_mask"].to(logprobs.dtype)))
        return loss, stats


def sft_loss(logprobs: torch.Tensor, mb: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Negative log-likelihood, mean over loss tokens (supervised fine-tuning; tests, warm starts)."""
    return -_masked_mean(logprobs, mb["loss_mask"].to(logprobs.dtype))
