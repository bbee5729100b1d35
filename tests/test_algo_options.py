"""agentflow.algo options against hand-computed values on small tensors: loss aggregation (global
across micro-batches), overlong mask and penalty, dynamic-sampling predicate, TIS / MIS at token,
sequence and geometric-mean level, GSPO's ratio, mismatch metrics, config validation."""

from __future__ import annotations

import math

import pytest
import torch

from agentflow import ConfigError, Group, Trajectory
from agentflow.algo import (
    AlgoConfig,
    PPOConfig,
    PPOLoss,
    accumulate_sums,
    aggregation_weights,
    batch_stats,
    behaviour_weight,
    compute_advantages,
    group_filter,
    has_signal,
    loss_weight,
    mismatch_stats,
    mismatch_sums,
    overlong_penalty,
    ppo_loss,
    token_count,
)

# Two sequences, right-padded: sequence 0 has 2 loss tokens, sequence 1 has 3.
MASK = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]])
PLAIN = PPOConfig(decoupled=False)


def _traj(n_out: int, reward: float, group: str = "g", finish: str = "stop", lp: float = -1.0) -> Trajectory:
    return Trajectory(input_ids=list(range(1, n_out + 2)), loss_mask=[0] + [1] * n_out,
                      logprobs=[0.0] + [lp] * n_out, versions=[-1] + [0] * n_out, reward=reward,
                      group_id=group, info={"finish_reason": finish})


# ------------------------------------------------------------------------------ loss aggregation
def test_aggregation_weights_by_hand():
    assert aggregation_weights(MASK, "token_mean") is None  # the default adds no fields
    coef, denom = aggregation_weights(MASK, "seq_mean_token_mean")
    torch.testing.assert_close(coef, torch.tensor([[0, .5, .5, 0], [0, 1 / 3, 1 / 3, 1 / 3]]))
    torch.testing.assert_close(denom, coef)
    coef, denom = aggregation_weights(MASK, "seq_sum_norm", norm=4.0)
    torch.testing.assert_close(coef, torch.tensor([[0, .25, .25, 0], [0, .25, .25, .25]]))
    torch.testing.assert_close(denom, torch.tensor([[0, .5, .5, 0], [0, 1 / 3, 1 / 3, 1 / 3]]))
    with pytest.raises(ConfigError, match="loss_agg_norm"):
        aggregation_weights(MASK, "seq_sum_norm")


def _pg_per_token(adv: torch.Tensor) -> torch.Tensor:
    """With logp == behaviour (ratio 1) and no clipping, the PPO per-token loss is -A."""
    return -adv


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_sum_norm"])
def test_aggregation_is_global_across_micro_batches(mode):
    """The engine computes sum_mb w_mb * L_mb / sum_mb w_mb with w = loss_weight(mb): cutting the
    batch into micro-batches must give the whole-batch objective, which we write out by hand."""
    adv = torch.tensor([[0.0, 1.0, 3.0, 0.0], [0.0, -2.0, 4.0, 7.0]])
    logp = torch.zeros(2, 4)
    per_token = _pg_per_token(adv)  # [[-, -1, -3, -], [-, 2, -4, -7]]
    expected = {
        "token_mean": (-1 - 3 + 2 - 4 - 7) / 5,
        "seq_mean_token_mean": ((-1 - 3) / 2 + (2 - 4 - 7) / 3) / 2,
        "seq_sum_norm": ((-1 - 3) / 4 + (2 - 4 - 7) / 4) / 2,  # Dr.GRPO, constant 4
    }[mode]
    agg = aggregation_weights(MASK, mode, norm=4.0)
    mbs = []
    for row in (0, 1):  # one micro-batch per sequence, packed to 1-D like the engine does
        mb = {"loss_mask": MASK[row], "logprobs": logp[row], "advantages": adv[row]}
        if agg is not None:
            mb["loss_coef"], mb["loss_denom"] = agg[0][row], agg[1][row]
        mbs.append(mb)
    loss_fn = PPOLoss(PLAIN)
    weights = [loss_weight(mb) for mb in mbs]
    losses = [loss_fn(mb["logprobs"].clone(), mb)[0].item() for mb in mbs]
    combined = sum(w * lo for w, lo in zip(weights, losses, strict=True)) / sum(weights)
    assert combined == pytest.approx(expected, abs=1e-6)
    whole, _ = ppo_loss(logp, logp, adv, MASK, PLAIN,
                        loss_coef=None if agg is None else agg[0], loss_denom=None if agg is None else agg[1])
    assert whole.item() == pytest.approx(expected, abs=1e-6)
    assert per_token[MASK.bool()].numel() == 5


def test_loss_weight_defaults_to_token_count():
    mb = {"loss_mask": MASK[1]}
    assert loss_weight(mb) == token_count(mb) == 3.0


# ------------------------------------------------------------------------------ overlong handling
def test_overlong_mask_leaves_truncated_sequences_out_of_numerator_and_denominator():
    drop = torch.tensor([False, True])
    coef, denom = aggregation_weights(MASK, "token_mean", drop=drop)
    torch.testing.assert_close(coef, torch.tensor([[0., 1, 1, 0], [0, 0, 0, 0]]))
    torch.testing.assert_close(denom, coef)
    adv = torch.tensor([[0.0, 1.0, 3.0, 0.0], [0.0, 9.0, 9.0, 9.0]])
    loss, _ = ppo_loss(torch.zeros(2, 4), torch.zeros(2, 4), adv, MASK, PLAIN, loss_coef=coef, loss_denom=denom)
    assert loss.item() == pytest.approx(-(1 + 3) / 2)
    # Everything truncated: a zero loss with a non-zero weight, not an engine error.
    coef, denom = aggregation_weights(MASK, "token_mean", drop=torch.tensor([True, True]))
    assert float(coef.sum()) == 0.0 and float(denom.sum()) == 5.0
    loss, _ = ppo_loss(torch.zeros(2, 4), torch.zeros(2, 4), adv, MASK, PLAIN, loss_coef=coef, loss_denom=denom)
    assert loss.item() == 0.0


def test_overlong_penalty_by_hand():
    cfg = AlgoConfig(overlong_penalty_window=4, overlong_penalty_max_tokens=10, overlong_penalty_factor=1.0)
    lengths = torch.tensor([5.0, 6.0, 8.0, 10.0, 12.0])  # soft zone is (6, 10]
    torch.testing.assert_close(overlong_penalty(lengths, cfg), torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    half = AlgoConfig(overlong_penalty_window=4, overlong_penalty_max_tokens=10, overlong_penalty_factor=0.5)
    assert overlong_penalty(torch.tensor([9.0]), half).item() == pytest.approx(-0.375)
    assert overlong_penalty(lengths, AlgoConfig()).abs().sum().item() == 0.0
    with pytest.raises(ConfigError, match="overlong_penalty_max_tokens"):
        overlong_penalty(lengths, AlgoConfig(overlong_penalty_window=4))


def test_overlong_penalty_enters_the_group_baseline():
    trajs = [_traj(5, 1.0), _traj(8, 1.0)]  # equal rewards; the second is 2 tokens into the window
    cfg = AlgoConfig(group_norm="dr_grpo", overlong_penalty_window=4, overlong_penalty_max_tokens=10)
    adv = compute_advantages(trajs, cfg)
    # final rewards 1.0 and 0.5 -> Dr.GRPO advantages +0.25 / -0.25
    assert adv[0, 1].item() == pytest.approx(0.25) and adv[1, 1].item() == pytest.approx(-0.25)
    assert not has_signal(trajs, AlgoConfig()) and has_signal(trajs, cfg)


def test_truncation_flag_and_batch_stats():
    trajs = [_traj(3, 1.0, "a", "length"), _traj(3, 0.0, "a"), _traj(3, 1.0, "b"), _traj(3, 1.0, "b")]
    assert trajs[0].truncated and not trajs[1].truncated
    assert Trajectory([1], [0], [0.0], [-1], info={"truncated": True}).truncated
    stats = batch_stats(trajs, AlgoConfig())
    assert stats["truncated_frac"] == 0.25
    assert stats["zero_signal_frac"] == 0.5  # group b: both rewards 1


# ------------------------------------------------------------------------------ dynamic sampling
def test_dynamic_sampling_predicate():
    assert group_filter(AlgoConfig()) is None
    keep = group_filter(AlgoConfig(dynamic_sampling=True))
    assert keep is not None
    assert keep(Group("a", [_traj(2, 1.0), _traj(2, 0.0)]))
    assert not keep(Group("b", [_traj(2, 1.0), _traj(2, 1.0)]))
    assert not keep(Group("c", [_traj(2, 1.0)]))  # one sample: no baseline, advantage 0
    clipped = AlgoConfig(dynamic_sampling=True, reward_clip=1.0)  # 2 and 3 both clip to 1: no signal
    assert not has_signal([_traj(2, 2.0), _traj(2, 3.0)], clipped)


# ------------------------------------------------------------------------------ mismatch corrections
W = torch.tensor([2.0, 8.0, 0.25, 1.0])  # w = pi_prox / pi_behav per token, one sequence
ON = torch.ones(4, dtype=torch.bool)


def _w(cfg: PPOConfig, w: torch.Tensor = W, on: torch.Tensor = ON, seq_ids=None) -> tuple[list, list]:
    weight, flagged = behaviour_weight(w.log(), torch.zeros_like(w), on, cfg, seq_ids)
    return weight.tolist(), flagged.tolist()


def test_tis_token_level_caps_the_behaviour_ratio():
    weight, flagged = _w(PPOConfig(behav_imp_weight_cap=4.0))
    assert weight == pytest.approx([2.0, 4.0, 0.25, 1.0])
    assert flagged == [False, True, False, False]


def test_mis_token_level_masks_outside_the_band():
    cfg = PPOConfig(behav_imp_weight_cap=4.0, behav_imp_weight_mode="mask", behav_imp_weight_floor=0.5)
    weight, flagged = _w(cfg)
    assert weight == pytest.approx([2.0, 0.0, 0.0, 1.0])
    assert flagged == [False, True, True, False]


def test_sequence_and_geometric_levels():
    ids = torch.tensor([0, 0, 1, 1])  # two sequences: w = (2, 8) and (0.25, 1)
    seq = PPOConfig(behav_imp_weight_cap=10.0, behav_imp_weight_level="sequence")
    weight, _ = _w(seq, seq_ids=ids)
    assert weight == pytest.approx([10.0, 10.0, 0.25, 0.25])  # products 16 (capped) and 0.25
    geo = PPOConfig(behav_imp_weight_cap=3.0, behav_imp_weight_mode="mask", behav_imp_weight_floor=0.6,
                    behav_imp_weight_level="geo_mean")
    weight, flagged = _w(geo, seq_ids=ids)
    # geometric means: sqrt(2 * 8) = 4 -> above 3, masked; sqrt(0.25 * 1) = 0.5 -> below 0.6, masked
    assert weight == pytest.approx([0.0, 0.0, 0.0, 0.0]) and all(flagged)
    geo_tis = PPOConfig(behav_imp_weight_cap=5.0, behav_imp_weight_level="geo_mean")
    weight, _ = _w(geo_tis, seq_ids=ids)
    assert weight == pytest.approx([4.0, 4.0, 0.5, 0.5])
    # padded [B, T] inputs use their rows as sequences; prompt tokens (off the mask) get weight 1
    w2 = torch.tensor([[1.0, 2.0, 8.0], [1.0, 0.25, 1.0]])
    on2 = torch.tensor([[False, True, True], [False, True, True]])
    weight, _ = behaviour_weight(w2.log(), torch.zeros_like(w2), on2, geo_tis)
    torch.testing.assert_close(weight, torch.tensor([[1.0, 4.0, 4.0], [1.0, 0.5, 0.5]]))
    with pytest.raises(ConfigError, match="seq_ids"):
        behaviour_weight(W.log(), torch.zeros(4), ON, geo_tis)  # packed input without seq_ids


def test_correction_multiplies_the_prox_centred_ppo_term():
    """Decoupled PPO with TIS: -min(w, cap) * min(r A, clip(r) A), r = pi_theta / pi_prox."""
    cfg = PPOConfig(eps_clip=0.2, behav_imp_weight_cap=2.0, behav_imp_weight_level="geo_mean")
    prox = torch.log(torch.tensor([[0.5, 0.5]]))
    behav = torch.log(torch.tensor([[0.125, 0.5]]))  # w = (4, 1): geometric mean 2, at the cap
    logp = torch.log(torch.tensor([[0.6, 0.5]]))  # r = (1.2, 1.0)
    adv = torch.tensor([[1.0, 1.0]])
    loss, stats = ppo_loss(logp, behav, adv, torch.ones(1, 2), cfg, prox_logp=prox)
    assert loss.item() == pytest.approx(-2.0 * (1.2 + 1.0) / 2, abs=1e-6)
    assert stats["behav_imp_weight"] == pytest.approx(2.0)


def test_gspo_geometric_ratio_value_and_gradient():
    cfg = PPOConfig(decoupled=False, ratio_level="geo_mean", eps_clip=0.5)
    behav = torch.tensor([[0.0, -1.0, -1.0]])
    logp = torch.tensor([[0.0, -0.8, -1.1]], requires_grad=True)  # token log-ratios 0.2, -0.1
    adv = torch.tensor([[0.0, 2.0, 2.0]])
    mask = torch.tensor([[0, 1, 1]])
    loss, stats = ppo_loss(logp, behav, adv, mask, cfg)
    s = math.exp((0.2 - 0.1) / 2)  # sequence ratio, inside [0.5, 1.5]
    assert loss.item() == pytest.approx(-2.0 * s, rel=1e-6)  # token mean of the same value
    loss.backward()
    # d(-A s)/d logp_t = -A * s / n for each of the n = 2 tokens
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -2.0 * s / 2, -2.0 * s / 2], rel=1e-5)
    assert stats["ratio"] == pytest.approx(s, rel=1e-6)


def test_default_loss_is_unchanged_by_the_new_fields():
    """Token level, cap 5, token mean: the formula of the original decoupled PPO loss."""
    logp = torch.log(torch.tensor([1.1, 0.7, 1.0]))
    prox = torch.zeros(3)
    behav = torch.log(torch.tensor([0.1, 1.0, 2.0]))  # w = 10 (capped to 5), 1, 0.5
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, _ = ppo_loss(logp, behav, adv, torch.ones(3), PPOConfig(), prox_logp=prox)
    # token 0: min(1.1, 1.1)=1.1 -> -5*1.1; token 1: A<0, r=0.7 -> max(0.7, 0.8)=0.8 -> +0.8; token 2: -0.5*2
    assert loss.item() == pytest.approx((-5 * 1.1 + 0.8 - 0.5 * 2.0) / 3, abs=1e-6)


# ------------------------------------------------------------------------------ mismatch metrics
def test_mismatch_metrics_by_hand_and_version_filter():
    behav = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
    prox = torch.tensor([[0.0, -1.0, -1.8, -0.55]])  # deltas on loss tokens: 0, 0.2, -0.05
    mask = torch.tensor([[0, 1, 1, 1]])
    versions = torch.tensor([[-1, 3, 3, 2]])
    stats = mismatch_stats(mismatch_sums(behav, prox, mask, 0.1), current_version_only=False)
    k3 = [math.expm1(d) - d for d in (0.0, 0.2, -0.05)]
    assert stats["mismatch/tokens"] == 3
    assert stats["mismatch/kl"] == pytest.approx(sum(k3) / 3, rel=1e-5)
    assert stats["mismatch/max_abs_diff"] == pytest.approx(0.2, rel=1e-5)
    assert stats["mismatch/mean_abs_diff"] == pytest.approx(0.25 / 3, rel=1e-5)
    assert stats["mismatch/frac_over"] == pytest.approx(1 / 3)
    only_v3 = mismatch_stats(mismatch_sums(behav, prox, mask, 0.1, versions, 3), current_version_only=True)
    assert only_v3["mismatch/tokens"] == 2 and only_v3["mismatch/current_version_only"] == 1.0
    assert only_v3["mismatch/kl"] == pytest.approx((k3[0] + k3[1]) / 2, rel=1e-5)
    none = mismatch_stats(mismatch_sums(behav, prox, mask, 0.1, versions, 7), current_version_only=True)
    assert none == {"mismatch/tokens": 0.0, "mismatch/current_version_only": 1.0}
    every = mismatch_stats(mismatch_sums(behav, prox, mask, 0.1), prefix="mismatch/all_")
    assert every["mismatch/all_tokens"] == 3 and every["mismatch/all_max_abs_diff"] == pytest.approx(0.2, rel=1e-5)


def test_mismatch_sums_of_shards_combine_to_the_whole():
    """Two shards (minibatches, micro-batches) accumulated give the whole batch's metrics: the
    totals add up and the max is the larger one, not the sum of both."""
    behav = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, -0.3, -0.9, -1.1]])
    prox = torch.tensor([[0.0, -1.0, -1.8, -0.55], [0.0, -0.6, -0.8, -1.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    total = torch.zeros(5, dtype=torch.float64)
    for row in range(2):
        accumulate_sums(total, mismatch_sums(behav[row:row + 1], prox[row:row + 1], mask[row:row + 1], 0.1))
    assert mismatch_stats(total) == pytest.approx(mismatch_stats(mismatch_sums(behav, prox, mask, 0.1)))
    assert mismatch_stats(total)["mismatch/max_abs_diff"] == pytest.approx(0.3, rel=1e-5)


# ------------------------------------------------------------------------------ validation
def test_new_fields_are_validated_together():
    with pytest.raises(ConfigError) as e:
        PPOConfig(behav_imp_weight_floor=0.5, behav_imp_weight_level="bogus", ratio_level="seq",  # type: ignore[arg-type]
                  loss_agg="sum", loss_agg_norm=0.0)  # type: ignore[arg-type]
    assert len(e.value.problems) == 5
    with pytest.raises(ConfigError, match="decoupled"):
        PPOConfig(decoupled=False, behav_imp_weight_level="geo_mean")
    with pytest.raises(ConfigError, match="overflows"):
        PPOConfig(behav_imp_weight_level="sequence", behav_imp_weight_cap=None)
    with pytest.raises(ConfigError) as e:
        AlgoConfig(dynamic_sampling=True, group_norm="none", overlong_penalty_window=8,
                   overlong_penalty_max_tokens=4, mismatch_threshold=0.0)
    assert len(e.value.problems) == 3
