"""Policy losses on per-token log-probs: decoupled PPO (AReaL), PPO/GRPO, GSPO's sequence ratio,
rollout-training mismatch corrections (TIS, MIS, sequence and geometric-mean weights), KL to a
reference, entropy bonus, SFT; and how per-token losses are aggregated.

The loss-function contract of ``FSDPEngine.train_batch`` / ``eval_batch``::

    loss_fn(logprobs: Tensor[T], mb: Mapping[str, Tensor]) -> Tensor | tuple[Tensor, dict[str, float]]

``logprobs[t]`` is ``log pi(token t | tokens before t)`` of the micro-batch's packed tokens under
the current parameters (with gradient), valid where ``mb["loss_mask"]`` is 1 and 0 elsewhere.
``mb`` holds the packed, token-aligned fields of the batch (``loss_mask``, ``logprobs`` = behaviour
log-probs, and whatever the caller added: ``advantages``, ``prox_logp``, ``ref_logp``, ``seq_ids``,
``loss_coef``, ``loss_denom`` ...), plus ``entropy`` (on loss tokens; differentiable when the loss
function has a true ``entropy_grad`` attribute, else detached). The engine weights micro-batches by
``loss_weight_fn(mb)`` and divides by the global sum of the weights, so the loss function returns
its micro-batch's *numerator over its share of the denominator*:

- token mean (no ``loss_coef``/``loss_denom`` fields; the default): the mean over the micro-batch's
  loss tokens, weighted by :func:`token_count`; the optimised quantity is the mean over every loss
  token of the global batch, across ranks and micro-batches;
- any other aggregation (:func:`aggregation_weights`): per-token coefficients ``c_t`` and
  denominators ``d_t`` travel with the batch, the loss is ``sum c_t l_t / sum d_t`` over the
  micro-batch and :func:`loss_weight` (``sum d_t``) weights it, so the engine optimises
  ``sum_all c_t l_t / sum_all d_t`` exactly, however the sequences are packed or sharded.

Returned stats are means over the micro-batch's loss tokens (those with ``d_t > 0``); the engine
averages them with the micro-batch weights (exact global token means under the token mean).

Not here: advantages (:mod:`agentflow.algo._advantages`), the mismatch metrics
(:mod:`agentflow.algo._mismatch`), value functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from agentflow.algo._config import KLEstimator, LossAgg, PPOConfig
from agentflow.errors import ConfigError

__all__ = [
    "PPOLoss", "aggregation_weights", "behaviour_weight", "kl_estimate", "loss_weight", "per_sequence",
    "ppo_loss", "sft_loss", "token_count",
]


def token_count(mb: Mapping[str, torch.Tensor]) -> float:
    """Loss weight of a micro-batch: its number of loss tokens (global token mean)."""
    return float(mb["loss_mask"].sum())


def loss_weight(mb: Mapping[str, torch.Tensor]) -> float:
    """Loss weight of a micro-batch under any aggregation: ``sum d_t`` over its loss tokens when the
    batch carries ``loss_denom`` (see :func:`aggregation_weights`), else :func:`token_count`."""
    denom = mb.get("loss_denom")
    if denom is None:
        return token_count(mb)
    return float((denom.double() * mb["loss_mask"].double()).sum())


def aggregation_weights(
    loss_mask: torch.Tensor, mode: LossAgg, norm: float | None = None, drop: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-token ``(loss_coef, loss_denom)`` of a padded ``[B, T]`` batch, or ``None`` for the plain
    token mean with nothing dropped (the batch then needs no extra fields).

    With ``n_s`` the loss tokens of sequence ``s`` and ``N`` the sequences:

    - ``token_mean``: ``c = d = 1``, objective ``sum_t l_t / sum_s n_s``;
    - ``seq_mean_token_mean``: ``c = d = 1 / n_s``, objective ``(1/N) sum_s (1/n_s) sum_t l_t``;
    - ``seq_sum_norm`` (Dr.GRPO, arXiv:2503.20783): ``c = 1 / norm``, ``d = 1 / n_s``, objective
      ``(1/N) sum_s (1/norm) sum_t l_t``.

    ``drop`` (``[B]`` bool) leaves sequences out of numerator and denominator (overlong masking);
    if it would leave out every sequence that has loss tokens, they keep their denominators with
    ``c = 0`` instead, so the step trains on nothing rather than failing on a zero total weight.

    Raises:
        ConfigError: ``seq_sum_norm`` without ``norm``.
    """
    if mode == "token_mean" and (drop is None or not bool(drop.any())):
        return None
    mask = loss_mask.float()
    n_s = mask.sum(1, keepdim=True)
    per_seq = (1.0 / n_s.clamp(min=1.0)).expand_as(mask)
    if mode == "token_mean":
        coef, denom = torch.ones_like(mask), torch.ones_like(mask)
    elif mode == "seq_mean_token_mean":
        coef, denom = per_seq.clone(), per_seq.clone()
    else:
        if norm is None:
            raise ConfigError("ppo.loss_agg='seq_sum_norm' needs ppo.loss_agg_norm (a constant, e.g. the "
                              "generation budget max_new_tokens; agentflow train fills it in)")
        coef, denom = torch.full_like(mask, 1.0 / norm), per_seq.clone()
    if drop is not None and bool(drop.any()):
        rows = drop.bool()
        coef[rows] = 0.0
        if bool(((n_s[:, 0] > 0) & ~rows).any()):
            denom[rows] = 0.0
    return coef * mask, denom * mask


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


def per_sequence(x: torch.Tensor, on: torch.Tensor, seq_ids: torch.Tensor, mean: bool) -> torch.Tensor:
    """Sum (or mean) of ``x`` over each sequence's ``on`` tokens, broadcast back to those tokens
    (0 elsewhere). Differentiable in ``x``; works on packed ``[T]`` and padded ``[B, T]`` layouts."""
    ids = seq_ids.long()
    n = int(ids.max()) + 1 if ids.numel() else 0
    sums = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, ids[on], x[on])
    if mean:
        counts = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, ids[on], torch.ones_like(x[on]))
        sums = sums / counts.clamp(min=1.0)
    return torch.where(on, sums[ids], torch.zeros_like(x))


def _seq_ids(seq_ids: torch.Tensor | None, like: torch.Tensor, what: str) -> torch.Tensor:
    if seq_ids is not None:
        return seq_ids
    if like.dim() == 2:  # a padded batch: one sequence per row
        return torch.arange(like.shape[0], device=like.device)[:, None].expand_as(like)
    raise ConfigError(f"{what} groups tokens by sequence and needs mb['seq_ids'] (a per-token sequence index; "
                      "ppo_step adds it) for a packed micro-batch; got none")


def behaviour_weight(
    prox_logp: torch.Tensor, behav_logp: torch.Tensor, on: torch.Tensor, cfg: PPOConfig,
    seq_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The correction weight on ``w = pi_prox / pi_behav`` (detached) and where it was thresholded.

    ``w`` is the ratio of the trainer's recomputed policy before the update (``pi_prox``) to the
    policy the inference engine sampled with (``pi_behav``, possibly older weights and other
    numerics). It never involves ``pi_theta``: the PPO ratio ``pi_theta / pi_prox`` is clipped
    separately, so a correction and the trust region compose without double counting.

    Level (``cfg.behav_imp_weight_level``): ``token`` uses ``w_t``; ``sequence`` uses
    ``prod_t w_t`` and ``geo_mean`` ``exp(mean_t log w_t)`` of the sequence, for all its tokens
    (GSPO's length-normalised sequence ratio, Zheng et al. 2025, arXiv:2507.18071, applied here to
    the behaviour ratio).

    Mode (``cfg.behav_imp_weight_mode``):

    - ``cap``: truncated importance sampling (TIS), ``min(w, cap)``, as in Yao et al. 2025, "Your
      Efficient RL Framework Secretly Brings You Off-Policy RL Training" (token level, trainer
      log-probs over inference-engine log-probs) and AReaL's capped behaviour weight (arXiv:2505.24298);
    - ``mask``: masked importance sampling (MIS): ``w`` outside ``[floor, cap]`` becomes 0 (the token,
      or the whole sequence at sequence levels, contributes nothing), inside it ``w`` is kept; the
      rejection-style correction described in verl's rollout-correction documentation and slime's
      MIS option (token, sequence and geometric-mean levels).
    """
    log_w = torch.where(on, prox_logp - behav_logp, torch.zeros_like(prox_logp))
    level = cfg.behav_imp_weight_level
    if level != "token":
        ids = _seq_ids(seq_ids, log_w, f"ppo.behav_imp_weight_level={level!r}")
        log_w = per_sequence(log_w, on, ids, mean=level == "geo_mean")
    weight = log_w.exp()
    cap, floor = cfg.behav_imp_weight_cap, cfg.behav_imp_weight_floor
    above = on & (weight > cap) if cap is not None else torch.zeros_like(on)
    below = on & (weight < floor) if floor is not None else torch.zeros_like(on)
    if cfg.behav_imp_weight_mode == "cap":
        return (weight.clamp(max=cap) if cap is not None else weight), above
    out = above | below
    return torch.where(out, torch.zeros_like(weight), weight), out


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, coef: torch.Tensor | None,
               denom: torch.Tensor | None) -> torch.Tensor:
    if coef is None and denom is None:
        return _masked_mean(per_token, mask)
    if coef is None or denom is None:
        raise ConfigError("a batch with loss_coef needs loss_denom too (and vice versa); see "
                          "agentflow.algo.aggregation_weights")
    den = (denom.to(mask.dtype) * mask).sum()
    num = (per_token * coef.to(mask.dtype) * mask).sum()
    return num / den if float(den) > 0 else num * 0.0


def _policy_log_ratio(logp: torch.Tensor, old: torch.Tensor, on: torch.Tensor, cfg: PPOConfig,
                      seq_ids: torch.Tensor | None) -> torch.Tensor:
    """``log(pi_theta / pi_old)`` per token, or GSPO's per-sequence mean of it (``ratio_level``)."""
    log_ratio = torch.where(on, logp - old.detach(), torch.zeros_like(logp))
    if cfg.ratio_level == "geo_mean":
        ids = _seq_ids(seq_ids, log_ratio, "ppo.ratio_level='geo_mean'")
        log_ratio = per_sequence(log_ratio, on, ids, mean=True)
    return log_ratio


def ppo_loss(
    logp: torch.Tensor,
    behav_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: PPOConfig,
    prox_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    *,
    seq_ids: torch.Tensor | None = None,
    loss_coef: torch.Tensor | None = None,
    loss_denom: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Decoupled PPO (Fu et al. 2025, AReaL, arXiv:2505.24298, eq. 5) or PPO (Schulman et al. 2017,
    arXiv:1707.06347, eq. 7), aggregated by ``loss_coef``/``loss_denom`` (token mean without them).

    Decoupled (``cfg.decoupled``): policy ratio ``r = exp(logp - prox_logp)``, behaviour weight
    ``w`` from ``exp(prox_logp - behav_logp)`` (:func:`behaviour_weight`: TIS / MIS at token,
    sequence or geometric-mean level); per token ``-w * min(r * A, clip(r, 1 - eps, 1 + eps_high) * A)``.
    Plain PPO/GRPO: ``prox_logp := behav_logp`` and ``w = 1``. ``cfg.ratio_level='geo_mean'``
    replaces ``r`` by its per-sequence geometric mean (GSPO, Zheng et al. 2025, arXiv:2507.18071;
    the gradient reaches every token through the mean). With ``cfg.kl_coef > 0`` adds
    ``kl_coef * KL_est(logp, ref_logp)`` per token (GRPO, arXiv:2402.03300 eq. 3, with k3). With
    ``cfg.entropy_coef > 0`` subtracts ``entropy_coef * H`` per token (``entropy``: the policy's
    entropy at each position, differentiable), an exploration bonus against entropy collapse.
    Deviation: a masked token (MIS) still counts in the denominator, so the loss stays a mean over
    the batch's loss tokens as the engine's weights assume (a conservative, shrunk estimate).

    ``seq_ids`` (per-token sequence index) is needed on packed inputs by the sequence-level options;
    padded ``[B, T]`` inputs use their rows.

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
    log_ratio = _policy_log_ratio(logp, old, on, cfg, seq_ids)
    ratio = log_ratio.exp()
    adv = advantages.to(logp.dtype)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - cfg.eps_clip, 1 + cfg.clip_high)
    pg = torch.maximum(pg1, pg2)
    active = mask if loss_denom is None else mask * (loss_denom > 0).to(mask.dtype)
    stats: dict[str, float] = {}
    if cfg.decoupled:
        weight, dropped = behaviour_weight(old.detach(), behav_logp, on, cfg, seq_ids)
        pg = pg * weight
        stats["behav_imp_weight"] = float(_masked_mean(weight, active))
        stats["behav_dropped_frac"] = float(_masked_mean(dropped.to(mask.dtype), active))
    per_token = pg
    if cfg.kl_coef > 0:
        if ref_logp is None:
            raise ConfigError(f"ppo.kl_coef={cfg.kl_coef} needs ref_logp in the batch; got none (or set kl_coef=0)")
        kl = kl_estimate(logp, ref_logp.detach(), cfg.kl_estimator)
        per_token = per_token + cfg.kl_coef * kl
        stats["kl_ref"] = float(_masked_mean(kl.detach(), active))
    if cfg.entropy_coef > 0:
        if entropy is None or (logp.requires_grad and not entropy.requires_grad):
            raise ConfigError(
                f"ppo.entropy_coef={cfg.entropy_coef} needs the differentiable per-token entropy; pass "
                "entropy= with gradient (FSDPEngine does so for a loss_fn with entropy_grad=True), or set it to 0"
            )
        per_token = per_token - cfg.entropy_coef * entropy
    loss = _aggregate(per_token, mask, loss_coef, loss_denom)
    with torch.no_grad():
        stats["pg_loss"] = float(_masked_mean(pg, active))
        stats["clip_frac"] = float(_masked_mean((pg1 < pg2).to(mask.dtype), active))
        stats["ratio"] = float(_masked_mean(ratio, active))
        stats["approx_kl"] = float(_masked_mean(torch.expm1(-log_ratio) + log_ratio, active))
        stats["advantage"] = float(_masked_mean(adv, active))
    return loss, stats


@dataclass(frozen=True, slots=True)
class PPOLoss:
    """The ``loss_fn`` for ``train_batch``: reads ``advantages``, ``logprobs`` (behaviour),
    ``prox_logp`` (decoupled), ``ref_logp`` (KL), ``loss_mask`` and, when present, ``seq_ids``,
    ``loss_coef`` and ``loss_denom`` from the micro-batch. Pair it with :func:`loss_weight`."""

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
            seq_ids=mb.get("seq_ids"), loss_coef=mb.get("loss_coef"), loss_denom=mb.get("loss_denom"),
        )
        if "entropy" in mb:
            stats["entropy"] = float(_masked_mean(mb["entropy"].detach(), mb["loss_mask"].to(logprobs.dtype)))
        return loss, stats


def sft_loss(logprobs: torch.Tensor, mb: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Negative log-likelihood, mean over loss tokens (supervised fine-tuning; tests, warm starts)."""
    return -_masked_mean(logprobs, mb["loss_mask"].to(logprobs.dtype))
