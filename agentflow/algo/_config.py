"""Frozen, validated knobs of the RL algorithm: advantages, dynamic sampling and overlong shaping
(:class:`AlgoConfig`), and the (decoupled) PPO loss with its off-policy corrections and loss
aggregation (:class:`PPOConfig`).

Only values live here; the formulas are in :mod:`agentflow.algo._advantages` and
:mod:`agentflow.algo._loss`, and ``docs/algorithms.md`` says when to use each option. Every
problem is reported at once in one :class:`ConfigError`. The defaults are the behaviour agentflow
had before these options existed (a run that sets none of them trains as before).

Not here: using the knobs (:mod:`agentflow.algo._advantages`, :mod:`agentflow.algo._loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from agentflow.errors import ConfigError

__all__ = [
    "AlgoConfig", "BatchNorm", "GroupNorm", "ImpWeightLevel", "ImpWeightMode", "KLEstimator", "LossAgg",
    "PPOConfig", "RatioLevel",
]

GroupNorm = Literal["grpo", "dr_grpo", "rloo", "none"]
BatchNorm = Literal["none", "mean", "mean_std"]
KLEstimator = Literal["k1", "k2", "k3"]
ImpWeightMode = Literal["cap", "mask"]
ImpWeightLevel = Literal["token", "sequence", "geo_mean"]
RatioLevel = Literal["token", "geo_mean"]
LossAgg = Literal["token_mean", "seq_mean_token_mean", "seq_sum_norm"]


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True, slots=True)
class PPOConfig:
    """The PPO / decoupled-PPO loss, its rollout-training mismatch correction and its aggregation.

    Two ratios appear (formulas in :mod:`agentflow.algo._loss`, guidance in ``docs/algorithms.md``):
    the *policy ratio* ``r = pi_theta / pi_old`` that PPO clips (``pi_old`` = ``pi_prox`` when
    ``decoupled``, else ``pi_behav``), and the *behaviour weight* ``w = pi_prox / pi_behav`` that
    corrects for the tokens having been sampled by another policy (older weights, and the inference
    engine's numerics). The ``behav_imp_weight_*`` fields act on ``w`` only, and only when
    ``decoupled`` (without it there is no ``pi_prox``: ``r`` is taken against ``pi_behav`` directly).

    Attributes:
        eps_clip: lower clip, the ratio is clipped to ``[1 - eps_clip, 1 + eps_clip_high]``.
        eps_clip_high: upper clip (DAPO's "clip-higher"); ``None`` = ``eps_clip``.
        decoupled: use the proximal policy (``prox_logp``, the log-probs of the weights before
            this step's update) as the trust-region centre and weight each token by the behaviour
            importance weight ``w = exp(prox_logp - behav_logp)`` (AReaL). ``False`` = standard
            PPO/GRPO with the behaviour log-probs as the old log-probs and no weight.
        recompute_prox: ``False`` (the default): the first minibatch of a step takes its proximal
            log-probs from its own update forward (detached): those weights *are* the proximal
            policy, so a separate no-grad forward would compute the same numbers. With
            ``trainer.ppo_minibatches=1`` that saves one forward pass over the batch per step
            (about a quarter of the train step). Later minibatches always get a separate forward
            before the first update. ``True``: the separate forward for every minibatch (only
            differs with dropout or nondeterministic kernels).
        behav_imp_weight_cap: upper threshold on ``w``; ``None`` = no threshold.
        behav_imp_weight_mode: ``"cap"`` = truncated importance sampling (TIS): ``min(w, cap)``;
            ``"mask"`` = masked importance sampling (MIS): a token (or sequence, see
            ``behav_imp_weight_level``) whose ``w`` leaves ``[behav_imp_weight_floor, cap]`` gets
            weight 0 (it still counts in the loss's denominator), the others keep ``w``.
        behav_imp_weight_floor: lower edge of the MIS band (``mask`` mode only), in (0, 1);
            ``None`` = no lower edge (only ``w > cap`` is masked, the behaviour before this field).
        behav_imp_weight_level: where ``w`` is formed and thresholded: ``"token"`` (per token, the
            default), ``"sequence"`` (the product of the sequence's token weights, one weight for
            all its tokens) or ``"geo_mean"`` (their geometric mean, ``exp(mean log w)``: a
            length-normalised sequence weight).
        ratio_level: ``"token"`` (PPO) or ``"geo_mean"`` (GSPO: the clipped policy ratio is the
            sequence's geometric mean ``exp(mean_t log r_t)``, the same for all its tokens; use a
            much smaller ``eps_clip``, e.g. 3e-4/4e-4, and ``loss_agg="seq_mean_token_mean"``).
        loss_agg: how per-token losses become the scalar: ``"token_mean"`` (mean over every loss
            token of the global batch; the default: long answers weigh in proportion to their
            length and it is today's behaviour), ``"seq_mean_token_mean"`` (mean per sequence, then
            mean over sequences: every sequence weighs the same) or ``"seq_sum_norm"`` (Dr.GRPO:
            per-sequence sums divided by the constant ``loss_agg_norm`` and averaged over sequences,
            no length normalisation, so no length bias).
        loss_agg_norm: the constant of ``seq_sum_norm`` (Dr.GRPO uses the generation budget;
            ``agentflow train`` fills in ``generation.max_new_tokens`` when it is ``None``).
        kl_coef: weight of the KL-to-reference term (0 = off; then ``ref_logp`` is not needed).
        kl_estimator: ``k1``/``k2``/``k3`` (Schulman, "Approximating KL divergence", 2020).
        entropy_coef: weight of the entropy bonus (0 = off): the loss subtracts
            ``entropy_coef * H(pi(. | context))`` per loss token, which resists the policy turning
            deterministic before it has found the answers.
    """

    eps_clip: float = 0.2
    eps_clip_high: float | None = None
    decoupled: bool = True
    recompute_prox: bool = False
    behav_imp_weight_cap: float | None = 5.0
    behav_imp_weight_mode: ImpWeightMode = "cap"
    behav_imp_weight_floor: float | None = None
    behav_imp_weight_level: ImpWeightLevel = "token"
    ratio_level: RatioLevel = "token"
    loss_agg: LossAgg = "token_mean"
    loss_agg_norm: float | None = None
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        ConfigError.check(self.problems())

    @property
    def clip_high(self) -> float:
        return self.eps_clip if self.eps_clip_high is None else self.eps_clip_high

    @property
    def needs_seq_ids(self) -> bool:
        """Whether the loss groups tokens by sequence (it then reads ``mb["seq_ids"]``)."""
        return self.ratio_level != "token" or (self.decoupled and self.behav_imp_weight_level != "token")

    def problems(self) -> list[str]:
        out = []
        if not (_finite(self.eps_clip) and 0 < self.eps_clip < 1):
            out.append(f"ppo.eps_clip must be in (0, 1), got {self.eps_clip!r}")
        if self.eps_clip_high is not None and not (_finite(self.eps_clip_high) and self.eps_clip_high > 0):
            out.append(f"ppo.eps_clip_high must be > 0 or null, got {self.eps_clip_high!r}")
        for name in ("decoupled", "recompute_prox"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"ppo.{name} must be true or false, got {getattr(self, name)!r}")
        out += self._correction_problems()
        if self.ratio_level not in ("token", "geo_mean"):
            out.append(f"ppo.ratio_level must be 'token' or 'geo_mean', got {self.ratio_level!r}")
        if self.loss_agg not in ("token_mean", "seq_mean_token_mean", "seq_sum_norm"):
            out.append("ppo.loss_agg must be 'token_mean', 'seq_mean_token_mean' or 'seq_sum_norm', "
                       f"got {self.loss_agg!r}")
        norm = self.loss_agg_norm
        if norm is not None and not (_finite(norm) and norm > 0):
            out.append(f"ppo.loss_agg_norm must be > 0 or null, got {norm!r}")
        if not (_finite(self.kl_coef) and self.kl_coef >= 0):
            out.append(f"ppo.kl_coef must be a finite number >= 0, got {self.kl_coef!r}")
        if not (_finite(self.entropy_coef) and self.entropy_coef >= 0):
            out.append(f"ppo.entropy_coef must be a finite number >= 0, got {self.entropy_coef!r}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            out.append(f"ppo.kl_estimator must be 'k1', 'k2' or 'k3', got {self.kl_estimator!r}")
        return out

    def _correction_problems(self) -> list[str]:
        out = []
        cap, floor = self.behav_imp_weight_cap, self.behav_imp_weight_floor
        if cap is not None and not (_finite(cap) and cap > 1):
            out.append(f"ppo.behav_imp_weight_cap must be > 1 or null (no cap), got {cap!r}")
        if self.behav_imp_weight_mode not in ("cap", "mask"):
            out.append(f"ppo.behav_imp_weight_mode must be 'cap' or 'mask', got {self.behav_imp_weight_mode!r}")
        if self.behav_imp_weight_level not in ("token", "sequence", "geo_mean"):
            out.append("ppo.behav_imp_weight_level must be 'token', 'sequence' or 'geo_mean', "
                       f"got {self.behav_imp_weight_level!r}")
        if floor is not None:
            if not (_finite(floor) and 0 < floor < 1):
                out.append(f"ppo.behav_imp_weight_floor must be in (0, 1) or null, got {floor!r}")
            elif self.behav_imp_weight_mode != "mask":
                out.append("ppo.behav_imp_weight_floor is the lower edge of the masking band; it needs "
                           "behav_imp_weight_mode='mask' (got 'cap', which only truncates from above)")
        if self.behav_imp_weight_level == "sequence" and cap is None:
            out.append("ppo.behav_imp_weight_level='sequence' multiplies the token weights of a whole sequence, "
                       "which overflows without a threshold; set ppo.behav_imp_weight_cap")
        if not self.decoupled and (floor is not None or self.behav_imp_weight_level != "token"):
            out.append("ppo.behav_imp_weight_floor / behav_imp_weight_level correct the behaviour weight "
                       "pi_prox / pi_behav, which exists only with ppo.decoupled=true; set decoupled=true "
                       "(the corrections then apply) or leave them at their defaults")
        return out


@dataclass(frozen=True, slots=True)
class AlgoConfig:
    """Advantages, group filtering and the loss of one RL algorithm.

    Reward shaping happens first, ``r' = clip((r + reward_bias) * reward_scale, -reward_clip,
    reward_clip)`` plus the optional overlong penalty, then group normalisation, then the
    token-level broadcast over ``loss_mask``, then batch normalisation over all loss tokens.

    Attributes:
        reward_scale, reward_bias, reward_clip: reward shaping (``reward_clip=None`` = no clip).
        group_norm: ``grpo`` (mean/std), ``dr_grpo`` (mean only), ``rloo`` (leave-one-out mean),
            ``none`` (raw shaped reward).
        batch_norm: normalise token advantages over the whole batch: ``none``, ``mean`` (centre)
            or ``mean_std`` (centre and scale).
        eps: added to standard deviations before dividing; also the tolerance under which a
            group's shaped rewards count as equal (dynamic sampling).
        dynamic_sampling: DAPO's dynamic sampling: a group whose shaped rewards are all equal (or
            that has fewer than 2 samples) has advantage 0 everywhere and is dropped when the
            trainer takes it from the buffer; the trainer keeps taking groups until the batch has
            ``rollout.consumer_batch_size`` groups with signal. A dropped group gives its staleness
            slot back, so one more prompt starts in its place (see
            :func:`agentflow.algo.group_filter`). Off by default (today's behaviour).
        dynamic_sampling_max_drop: the most groups dynamic sampling drops per train step, counted
            from the previous step (0 = no limit). Past it, groups are taken as they come until the
            step's batch is full (a flat group adds no gradient, only tokens), so a policy that gets
            (nearly) every prompt right does not stall a step on resampling; DAPO's
            ``max_num_gen_batches`` of ``k`` corresponds to ``(k - 1) * B``. Logged as
            ``rollout/filter_capped``.
        overlong_mask: DAPO's overlong filtering: sequences cut at the token budget (finish reason
            ``length``, :attr:`Trajectory.truncated`) are left out of the loss (numerator and
            denominator); their rewards still count in their group's baseline.
        overlong_penalty_window: DAPO's soft overlong punishment, the window ``L_cache`` in tokens
            (0 = off): a sequence with ``L`` generated tokens gets ``-factor * (L - (L_max -
            L_cache)) / L_cache`` added to its shaped reward when ``L > L_max - L_cache``, and
            ``-factor`` beyond ``L_max``.
        overlong_penalty_max_tokens: ``L_max`` of the penalty; ``agentflow train`` fills in
            ``generation.max_new_tokens`` when it is ``None``.
        overlong_penalty_factor: the penalty at ``L = L_max``.
        mismatch_threshold: the rollout-training mismatch metric counts the fraction of tokens
            whose ``|log pi_prox - log pi_behav|`` exceeds this (in nats).
        skip_zero_advantage: leave sequences whose advantage is 0 at every loss token (every
            sample of a group whose rewards are all equal, under a group baseline), or that have
            no loss weight (``overlong_mask``), out of the proximal forward and the update. Their
            PPO loss and its gradient are exactly 0, so the loss keeps their tokens in its
            denominator and the update is the same up to rounding, at the cost of the sequences
            that carry signal only. Ignored (every sequence trained) when ``ppo.kl_coef`` or
            ``ppo.entropy_coef`` is > 0, whose terms do not vanish with the advantage. The loss's
            statistics (``entropy``, ``clip_frac``, ``mismatch/*``) then cover the trained
            sequences; ``zero_adv_frac`` and ``trained_seqs`` say how many were left out.
        ppo: the loss.
    """

    reward_scale: float = 1.0
    reward_bias: float = 0.0
    reward_clip: float | None = None
    group_norm: GroupNorm = "grpo"
    batch_norm: BatchNorm = "none"
    eps: float = 1e-6
    dynamic_sampling: bool = False
    dynamic_sampling_max_drop: int = 0
    overlong_mask: bool = False
    overlong_penalty_window: int = 0
    overlong_penalty_max_tokens: int | None = None
    overlong_penalty_factor: float = 1.0
    mismatch_threshold: float = 0.1
    skip_zero_advantage: bool = True
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
        if self.dynamic_sampling and self.group_norm == "none":
            out.append("algo.dynamic_sampling drops groups whose rewards are all equal because their group "
                       "baseline makes every advantage 0; with group_norm='none' there is no baseline, so "
                       "pick a group_norm or turn dynamic_sampling off")
        if not (_is_int(self.dynamic_sampling_max_drop) and self.dynamic_sampling_max_drop >= 0):
            out.append("algo.dynamic_sampling_max_drop must be an integer >= 0 (groups dropped per train step; "
                       f"0 = no limit), got {self.dynamic_sampling_max_drop!r}")
        elif self.dynamic_sampling_max_drop and not self.dynamic_sampling:
            out.append(f"algo.dynamic_sampling_max_drop={self.dynamic_sampling_max_drop} caps dynamic sampling's "
                       "drops, but algo.dynamic_sampling is off: set algo.dynamic_sampling=true or leave the cap at 0")
        if not (_finite(self.mismatch_threshold) and self.mismatch_threshold > 0):
            out.append(f"algo.mismatch_threshold must be > 0 (nats), got {self.mismatch_threshold!r}")
        return out + self._overlong_problems()

    def _overlong_problems(self) -> list[str]:
        out = []
        window, lmax = self.overlong_penalty_window, self.overlong_penalty_max_tokens
        if not (_is_int(window) and window >= 0):
            out.append(f"algo.overlong_penalty_window must be an integer >= 0 (0 = off), got {window!r}")
        if lmax is not None and not (_is_int(lmax) and lmax >= 1):
            out.append(f"algo.overlong_penalty_max_tokens must be an integer >= 1 or null, got {lmax!r}")
        elif lmax is not None and _is_int(window) and window > lmax:
            out.append(f"algo.overlong_penalty_window ({window}) must not exceed "
                       f"algo.overlong_penalty_max_tokens ({lmax})")
        if not (_finite(self.overlong_penalty_factor) and self.overlong_penalty_factor >= 0):
            out.append("algo.overlong_penalty_factor must be a finite number >= 0, "
                       f"got {self.overlong_penalty_factor!r}")
        return out
