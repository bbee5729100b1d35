"""agentflow.algo options through the real engines (tiny model, CPU): loss aggregation and
sequence-level ratios stay exact when FSDPEngine packs the batch into micro-batches with shared
prompts; the rollout-training mismatch is ~0 for an fp32 LocalEngine and not for a bf16 one."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from _fsdp_worker import make_trajs

from agentflow import GenerationConfig, MicroBatchSpec, ModelRequest, Trajectory
from agentflow.algo import (
    AlgoConfig,
    PPOConfig,
    PPOLoss,
    aggregation_weights,
    loss_weight,
    pad_trajectories,
    ppo_loss,
    ppo_step,
)
from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig
from agentflow.engines.local import LocalEngine, LocalEngineConfig

SPEC = MicroBatchSpec(n_mbs=3, max_tokens_per_mb=48)  # several micro-batches, groups cut across them


@pytest.fixture
def make_engine(tiny):
    engines = []

    def make(**overrides):
        cfg = FSDPEngineConfig(**{"lr": 1e-3, "device": "cpu", **overrides})
        eng = FSDPEngine(cfg, model=copy.deepcopy(tiny[0]), tokenizer=tiny[1])
        eng.initialize()
        engines.append(eng)
        return eng

    yield make
    for eng in reversed(engines):
        eng.destroy()


@pytest.mark.parametrize(("mode", "cfg"), [
    ("seq_mean_token_mean", PPOConfig(decoupled=False)),
    ("seq_sum_norm", PPOConfig(decoupled=False)),
    ("seq_mean_token_mean", PPOConfig(ratio_level="geo_mean", eps_clip=0.05, behav_imp_weight_level="geo_mean",
                                      behav_imp_weight_mode="mask", behav_imp_weight_floor=0.97,
                                      behav_imp_weight_cap=1.03)),
])
def test_packed_engine_loss_equals_whole_batch_objective(make_engine, mode, cfg):
    """eval_batch's global weighted mean over packed micro-batches == ppo_loss on the padded batch."""
    eng = make_engine()
    trajs = make_trajs(3, [9, 14, 21, 12, 30, 7], group_size=2, shared_prompt=True)
    batch = pad_trajectories(trajs)
    logp = eng.forward(batch, SPEC)
    g = torch.Generator().manual_seed(0)
    mask = batch["loss_mask"]
    batch["logprobs"] = (logp + 0.03 * torch.randn(logp.shape, generator=g)) * mask  # behaviour != current
    batch["prox_logp"] = (logp + 0.02 * torch.randn(logp.shape, generator=g)) * mask
    batch["advantages"] = torch.randn(mask.shape, generator=g) * mask
    batch["loss_coef"], batch["loss_denom"] = aggregation_weights(mask, mode, norm=16.0)
    rows, width = mask.shape
    batch["seq_ids"] = torch.arange(rows)[:, None].expand(rows, width).contiguous()
    expected, _ = ppo_loss(logp, batch["logprobs"], batch["advantages"], mask, cfg, prox_logp=batch["prox_logp"],
                           loss_coef=batch["loss_coef"], loss_denom=batch["loss_denom"])
    got = eng.eval_batch(batch, SPEC, PPOLoss(cfg), loss_weight)
    assert got == pytest.approx(expected.item(), abs=1e-5)


def test_ppo_step_with_every_option_on(make_engine):
    eng = make_engine()
    trajs = make_trajs(4, [9, 14, 21, 12, 30, 7], group_size=2, shared_prompt=True)
    trajs[1] = trajs[1].with_(info={"finish_reason": "length"})
    algo = AlgoConfig(
        dynamic_sampling=True, overlong_mask=True, overlong_penalty_window=4, overlong_penalty_max_tokens=20,
        ppo=PPOConfig(ratio_level="geo_mean", eps_clip=3e-3, behav_imp_weight_level="geo_mean",
                      behav_imp_weight_mode="mask", behav_imp_weight_floor=0.5, behav_imp_weight_cap=2.0,
                      loss_agg="seq_sum_norm", loss_agg_norm=20.0),
    )
    stats = ppo_step(eng, algo, trajs, max_tokens_per_mb=48, minibatches=2, version=0)
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert stats["truncated_frac"] == pytest.approx(1 / 6)
    # every sequence has signal; the truncated one has no loss weight, so the update leaves it out
    assert stats["trained_seqs"] == 5 / 2
    assert stats["mismatch/tokens"] == sum(t.n_policy_tokens for t in trajs) - trajs[1].n_policy_tokens
    assert stats["mismatch/current_version_only"] == 1.0
    assert stats["mismatch/kl"] > 0  # make_trajs' behaviour log-probs are made up


def _generate(model, tok, dtype: str, n: int = 6) -> list[Trajectory]:
    g = GenerationConfig(max_new_tokens=24, temperature=1.0)
    prompts = [list(tok.encode(p, add_special_tokens=False)) for p in ("1+2=", "3+4=", "5+1=")]
    cfg = LocalEngineConfig(dtype=dtype, ignore_eos=True, seed=3)

    async def run() -> list[Trajectory]:
        async with LocalEngine(copy.deepcopy(model), tok, config=cfg) as engine:
            reqs = [ModelRequest(prompts[i % len(prompts)], g) for i in range(n)]
            outs = await asyncio.gather(*[engine.agenerate(r) for r in reqs])
        return [Trajectory.from_response(o, reward=float(i % 2), group_id=f"p{i % len(prompts)}")
                for i, o in enumerate(outs)]

    return asyncio.run(run())


def test_mismatch_is_zero_in_fp32_and_not_in_bf16(tiny, make_engine):
    model, tok = tiny
    algo = AlgoConfig(ppo=PPOConfig(), mismatch_threshold=1e-3)
    eng = make_engine(lr=1e-9)
    fp32 = ppo_step(eng, algo, _generate(model, tok, "float32"), version=0)
    bf16 = ppo_step(eng, algo, _generate(model, tok, "bfloat16"), version=0)
    assert fp32["mismatch/tokens"] == bf16["mismatch/tokens"] == 6 * 24
    assert fp32["mismatch/max_abs_diff"] < 1e-5 and fp32["mismatch/kl"] < 1e-10
    assert fp32["mismatch/frac_over"] == 0.0
    assert bf16["mismatch/max_abs_diff"] > 1e-3 and bf16["mismatch/kl"] > 1e-8
    assert bf16["mismatch/frac_over"] > 0.0
    stale = ppo_step(eng, algo, _generate(model, tok, "float32"), version=1)  # no token of version 1
    assert stale["mismatch/tokens"] == 0 and "mismatch/kl" not in stale
    assert stale["mismatch/all_tokens"] == 6 * 24 and stale["mismatch/all_max_abs_diff"] < 1e-4  # lr ~ 0


def _flat_groups(trajs: list[Trajectory], groups: set[int]) -> list[Trajectory]:
    """Give every sample of the listed groups (pairs) the same reward: their advantages are all 0."""
    return [t.with_(reward=0.5) if i // 2 in groups else t for i, t in enumerate(trajs)]


@pytest.mark.parametrize(("ppo", "minibatches"), [
    (PPOConfig(), 1),
    (PPOConfig(loss_agg="seq_mean_token_mean"), 2),
    (PPOConfig(loss_agg="seq_sum_norm", loss_agg_norm=20.0), 1),
    (PPOConfig(ratio_level="geo_mean", behav_imp_weight_level="sequence", loss_agg="seq_mean_token_mean"), 1),
])
def test_zero_advantage_sequences_are_left_out_and_the_update_stays_the_same(make_engine, ppo, minibatches):
    """Skipping sequences whose advantage is 0 everywhere trains fewer rows, with the same loss,
    gradient norm and weights as training every row (the denominator keeps their tokens); a step
    where no sequence has signal still steps the optimiser (momentum) like the full batch does."""
    trajs = make_trajs(5, [9, 14, 21, 12, 30, 7, 11, 16], group_size=2, shared_prompt=True)
    steps = [_flat_groups(trajs, {0, 2}), _flat_groups(trajs, {1}), _flat_groups(trajs, {0, 1, 2, 3})]
    engines = {skip: make_engine(weight_decay=0.1) for skip in (False, True)}
    for n, batch in enumerate(steps):
        got = {skip: ppo_step(eng, AlgoConfig(skip_zero_advantage=skip, ppo=ppo), batch, max_tokens_per_mb=48,
                              minibatches=minibatches, version=n) for skip, eng in engines.items()}
        n, k = len(batch), minibatches
        parts = [batch[i * n // k: (i + 1) * n // k] for i in range(k)]
        trained = sum(max(1, sum(t.reward != 0.5 for t in part)) for part in parts)
        assert got[True]["zero_adv_frac"] == got[False]["zero_adv_frac"] == sum(t.reward == 0.5 for t in batch) / n
        for skip in (False, True):  # n_seqs / n_tokens count the batch (a mean over minibatches)
            assert got[skip]["n_seqs"] * k == n
            assert got[skip]["n_tokens"] * k == sum(len(t) for t in batch)
        assert got[False]["trained_seqs"] * k == n
        assert got[True]["trained_seqs"] * k == trained < n
        assert got[True]["loss"] == pytest.approx(got[False]["loss"], abs=1e-6)
        assert got[True]["grad_norm"] == pytest.approx(got[False]["grad_norm"], rel=1e-4, abs=1e-9)
        for a, b in zip(engines[False].model.parameters(), engines[True].model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=5e-5)  # 5% of lr: AdamW amplifies last bits near eps


@pytest.mark.parametrize("ppo", [PPOConfig(entropy_coef=0.01), PPOConfig(decoupled=False)])
def test_zero_advantage_sequences_are_trained_when_a_term_does_not_vanish_with_the_advantage(make_engine, ppo):
    trajs = _flat_groups(make_trajs(6, [9, 14, 21, 12], group_size=2, shared_prompt=True), {0})
    stats = ppo_step(make_engine(), AlgoConfig(ppo=ppo), trajs, version=0)
    assert stats["zero_adv_frac"] == 0.5
    assert stats["n_seqs"] == 4
    assert stats["trained_seqs"] == (4 if ppo.entropy_coef > 0 else 2)


def test_a_minibatch_whose_only_signal_is_masked_still_trains_on_its_denominator(make_engine):
    """Overlong masking gives truncated sequences no loss weight: when they are the only ones with
    signal, skipping keeps a weighted sequence, so the step runs (and equals training every row)."""
    trajs = _flat_groups(make_trajs(7, [9, 14, 21, 12], group_size=2, shared_prompt=True), {1})
    trajs[:2] = [t.with_(info={"finish_reason": "length"}) for t in trajs[:2]]
    got = {skip: ppo_step(make_engine(), AlgoConfig(overlong_mask=True, skip_zero_advantage=skip), trajs, version=0)
           for skip in (False, True)}
    assert got[True]["trained_seqs"] == 1
    assert got[True]["loss"] == pytest.approx(got[False]["loss"], abs=1e-7)
    assert got[True]["grad_norm"] == pytest.approx(got[False]["grad_norm"], abs=1e-9)
