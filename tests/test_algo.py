"""agentflow.algo: advantages and losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from agentflow import ConfigError, Trajectory, TrajectoryError
from agentflow.algo import (
    AlgoConfig,
    PPOConfig,
    PPOLoss,
    batch_normalize,
    compute_advantages,
    group_advantages,
    kl_estimate,
    pad_trajectories,
    ppo_loss,
    sft_loss,
    shape_rewards,
    token_count,
)


def _traj(n_prompt: int, n_out: int, reward: float, group: str, lp: float = -1.0) -> Trajectory:
    n = n_prompt + n_out
    return Trajectory(
        input_ids=list(range(1, n + 1)),
        loss_mask=[0] * n_prompt + [1] * n_out,
        logprobs=[0.0] * n_prompt + [lp] * n_out,
        versions=[-1] * n_prompt + [0] * n_out,
        reward=reward,
        group_id=group,
    )


def test_shape_rewards_scales_biases_and_clips():
    cfg = AlgoConfig(reward_scale=2.0, reward_bias=-0.5, reward_clip=1.5)
    out = shape_rewards(torch.tensor([0.0, 1.0, 2.0]), cfg)
    # (0 - .5) * 2 = -1; (1 - .5) * 2 = 1; (2 - .5) * 2 = 3 -> clipped to 1.5
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0, 1.5]))


def test_grpo_group_advantages_match_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 3.0])
    ids = ["a", "a", "a", "a", "b", "b"]
    adv = group_advantages(r, ids, "grpo", eps=0.0)
    std_a = math.sqrt(((0.5**2) * 4) / 3)  # sample std of [1, 0, 0, 1]
    std_b = math.sqrt(2.0)  # sample std of [5, 3]
    expected = [0.5 / std_a, -0.5 / std_a, -0.5 / std_a, 0.5 / std_a, 1 / std_b, -1 / std_b]
    torch.testing.assert_close(adv, torch.tensor(expected))


def test_dr_grpo_and_rloo_baselines():
    r = torch.tensor([3.0, 0.0, 0.0])
    ids = ["g"] * 3
    torch.testing.assert_close(group_advantages(r, ids, "dr_grpo"), torch.tensor([2.0, -1.0, -1.0]))
    # leave-one-out: 3 - 0 = 3; 0 - (3 + 0) / 2 = -1.5 (twice)
    torch.testing.assert_close(group_advantages(r, ids, "rloo"), torch.tensor([3.0, -1.5, -1.5]))


def test_single_sample_group_has_zero_advantage_and_missing_group_fails_loud():
    assert group_advantages(torch.tensor([7.0]), ["solo"], "grpo").item() == 0.0
    with pytest.raises(TrajectoryError, match="group_id"):
        group_advantages(torch.tensor([1.0, 2.0]), ["", ""], "grpo")
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 2.0]), ["", ""], "none"), torch.tensor([1.0, 2.0]))


def test_compute_advantages_broadcasts_over_loss_mask_and_pads():
    trajs = [_traj(2, 3, 1.0, "g"), _traj(1, 1, 0.0, "g")]
    adv = compute_advantages(trajs, AlgoConfig(group_norm="dr_grpo"))
    assert adv.shape == (2, 5)
    torch.testing.assert_close(adv[0], torch.tensor([0, 0, 0.5, 0.5, 0.5]))
    torch.testing.assert_close(adv[1], torch.tensor([0, -0.5, 0, 0, 0]))


def test_batch_normalize_over_loss_tokens_only():
    adv = torch.tensor([[9.0, 1.0, 3.0], [9.0, 5.0, 0.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    centred = batch_normalize(adv, mask, "mean")  # mean of 1, 3, 5 = 3
    torch.testing.assert_close(centred, torch.tensor([[0.0, -2.0, 0.0], [0.0, 2.0, 0.0]]))
    std = batch_normalize(adv, mask, "mean_std", eps=0.0)  # sample std of 1, 3, 5 = 2
    torch.testing.assert_close(std, torch.tensor([[0.0, -1.0, 0.0], [0.0, 1.0, 0.0]]))


def test_pad_trajectories_rejects_loss_on_first_token():
    with pytest.raises(TrajectoryError, match=r"loss_mask\[0\]"):  # refused when built, before padding
        pad_trajectories([Trajectory(input_ids=[1, 2], loss_mask=[1, 1], logprobs=[-1.0, -1.0], versions=[0, 0])])


def test_ppo_loss_matches_hand_computed_clipping():
    cfg = PPOConfig(eps_clip=0.2, decoupled=False)
    behav = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 2.0]))  # ratios vs behaviour (exp(0) = 1)
    adv = torch.tensor([1.0, 1.0, -1.0, 2.0])
    mask = torch.tensor([1, 1, 1, 0])
    loss, stats = ppo_loss(logp.requires_grad_(), behav, adv, mask, cfg)
    # token 0: A>0, r=1.5 -> min(1.5, 1.2) = 1.2 -> -1.2 (clipped)
    # token 1: A>0, r=0.5 -> min(0.5, 0.8) = 0.5 -> -0.5
    # token 2: A<0, r=1.1 -> min(-1.1, -1.1) -> 1.1
    expected = (-1.2 - 0.5 + 1.1) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(1 / 3)
    loss.backward()  # clipped token has zero gradient, the masked one too


def test_decoupled_ppo_uses_prox_ratio_and_behaviour_weight():
    cfg = PPOConfig(eps_clip=0.2, behav_imp_weight_cap=2.0, behav_imp_weight_mode="cap")
    logp = torch.log(torch.tensor([1.0, 1.0, 1.0]))
    prox = torch.log(torch.tensor([1.0, 1.0, 1.0]))
    behav = torch.log(torch.tensor([0.5, 0.25, 2.0]))  # w = 2, 4 (capped to 2), 0.5
    adv = torch.tensor([1.0, 1.0, 1.0])
    loss, stats = ppo_loss(logp, behav, adv, torch.ones(3), cfg, prox_logp=prox)
    assert loss.item() == pytest.approx(-(2 + 2 + 0.5) / 3, abs=1e-6)
    assert stats["behav_dropped_frac"] == pytest.approx(1 / 3)
    masked = PPOConfig(behav_imp_weight_cap=2.0, behav_imp_weight_mode="mask")
    loss_m, _ = ppo_loss(logp, behav, adv, torch.ones(3), masked, prox_logp=prox)
    assert loss_m.item() == pytest.approx(-(2 + 0 + 0.5) / 3, abs=1e-6)  # denominator keeps 3 tokens


def test_decoupled_ppo_without_prox_fails_loud():
    with pytest.raises(ConfigError, match="prox_logp"):
        ppo_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2), PPOConfig())


def test_kl_estimators_match_formulas():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    d = -0.5  # log(ref/pi)
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * d * d)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(d) - 1 - d)
    cfg = PPOConfig(decoupled=False, kl_coef=0.1)
    loss, stats = ppo_loss(logp, logp, torch.zeros(1), torch.ones(1), cfg, ref_logp=ref)
    assert loss.item() == pytest.approx(0.1 * (math.exp(d) - 1 - d), rel=1e-5)
    assert stats["kl_ref"] == pytest.approx(math.exp(d) - 1 - d, rel=1e-5)


def test_ppo_loss_fn_contract_and_token_weight():
    mb = {
        "loss_mask": torch.tensor([0, 1, 1]),
        "logprobs": torch.tensor([0.0, -1.0, -2.0]),
        "advantages": torch.tensor([0.0, 1.0, 1.0]),
        "entropy": torch.tensor([0.0, 2.0, 4.0]),
    }
    loss, stats = PPOLoss(PPOConfig(decoupled=False))(mb["logprobs"].clone(), mb)
    assert loss.item() == pytest.approx(-1.0)  # ratio 1 everywhere
    assert stats["entropy"] == pytest.approx(3.0)
    assert token_count(mb) == 2.0
    assert sft_loss(mb["logprobs"], mb).item() == pytest.approx(1.5)
    with pytest.raises(ConfigError, match="advantages"):
        PPOLoss()(mb["logprobs"], {"loss_mask": mb["loss_mask"], "logprobs": mb["logprobs"]})


def test_entropy_bonus_subtracts_coef_times_mean_entropy():
    logp = torch.tensor([0.0, -1.0, -2.0], requires_grad=True)
    mask, adv = torch.tensor([0, 1, 1]), torch.tensor([0.0, 1.0, 1.0])
    ent = torch.tensor([9.0, 2.0, 4.0], requires_grad=True)
    cfg = PPOConfig(decoupled=False, entropy_coef=0.1)
    assert PPOLoss(cfg).entropy_grad and not PPOLoss(PPOConfig()).entropy_grad
    loss, _ = ppo_loss(logp, logp.detach(), adv, mask, cfg, entropy=ent)
    assert loss.item() == pytest.approx(-1.0 - 0.1 * 3.0)  # prompt token's entropy not counted
    loss.backward()
    assert ent.grad.tolist() == pytest.approx([0.0, -0.05, -0.05])
    with pytest.raises(ConfigError, match="entropy"):  # training without a differentiable entropy
        ppo_loss(logp, logp.detach(), adv, mask, cfg, entropy=ent.detach())


def test_configs_validate_every_field_at_once():
    with pytest.raises(ConfigError) as e:
        PPOConfig(eps_clip=1.5, behav_imp_weight_cap=0.5, kl_coef=-1.0, entropy_coef=-0.1)
    assert len(e.value.problems) == 4
    with pytest.raises(ConfigError):
        AlgoConfig(group_norm="bogus", reward_clip=0.0)  # type: ignore[arg-type]  # invalid on purpose
