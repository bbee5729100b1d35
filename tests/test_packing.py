"""Sequence packing: micro-batch plans, packed tensors, and packed-vs-padded attention equality."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch

from agentflow import ConfigError, TrajectoryError
from agentflow.engines.fsdp._attention import register_packed_attention
from agentflow.engines.fsdp._packing import (
    balanced_partition,
    common_prefixes,
    dummy_micro_batch,
    normalize_batch,
    pack,
    packing_efficiency,
    plan_micro_batches,
    share_prefixes,
    split_sequences,
    unit_rows,
    unpack,
)


def test_plan_respects_budget_and_min_count():
    lengths = [50, 40, 30, 20, 10, 10]
    plan = plan_micro_batches(lengths, max_tokens=60, n_mbs=1)
    assert sorted(i for b in plan for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 60 for b in plan)
    assert len(plan) == 3  # 160 tokens need at least 3 bins of 60; FFD finds 3
    assert len(plan_micro_batches(lengths, max_tokens=None, n_mbs=4)) == 4
    assert len(plan_micro_batches([5, 5], max_tokens=None, n_mbs=8)) == 2  # cannot split a sequence


def test_plan_balances_bins():
    lengths = [8, 7, 6, 5, 4, 3, 2, 1]
    plan = plan_micro_batches(lengths, max_tokens=None, n_mbs=2)
    loads = sorted(sum(lengths[i] for i in b) for b in plan)
    assert loads == [18, 18]


def test_plan_rejects_sequence_longer_than_budget():
    with pytest.raises(ConfigError, match="max_tokens_per_mb"):
        plan_micro_batches([10, 100], max_tokens=64)


def test_long_tailed_mix_fills_budget():
    rng = random.Random(0)
    lengths = [min(2048, int(rng.paretovariate(1.2) * 64)) for _ in range(256)]
    cap = 4096
    plan = plan_micro_batches(lengths, max_tokens=cap)
    eff = packing_efficiency(lengths, plan, cap)
    assert eff["fill"] >= 0.95, eff
    assert eff["vs_lower_bound"] >= 0.95, eff


def test_balanced_partition_by_tokens():
    lengths = [5, 4, 3, 3, 2, 1]
    groups = balanced_partition(lengths, 2)
    assert sorted(sum(lengths[i] for i in g) for g in groups) == [9, 9]
    assert balanced_partition([3], 2)[1] == []


def test_pack_builds_positions_and_cu_seqlens_and_unpack_inverts():
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7], [8, 9, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]),
        "loss_mask": torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0]]),
        "rewards": torch.tensor([1.0, 2.0, 3.0]),
    }
    seqs = split_sequences(normalize_batch(batch))
    mb = pack(seqs, [0, 2])
    assert mb.data["input_ids"].tolist() == [1, 2, 3, 8, 9]
    assert mb.position_ids.tolist() == [0, 1, 2, 0, 1]
    assert mb.cu_seqlens.tolist() == [0, 3, 5]
    assert mb.max_len == 3
    assert mb.data["rewards"].tolist() == [1.0, 3.0]
    assert [t.tolist() for t in unpack(mb.data["loss_mask"], mb)] == [[0, 1, 1], [0, 1]]
    dummy = dummy_micro_batch(mb)
    assert dummy.n_tokens == 1 and dummy.seq_index == (-1,) and set(dummy.data) == set(mb.data)


def test_shared_prompt_units_lay_the_prompt_out_once():
    batch = {
        "input_ids": torch.tensor([[7, 8, 1, 2, 0], [7, 8, 3, 0, 0], [9, 8, 4, 0, 0], [7, 8, 5, 6, 6]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
        "loss_mask": torch.tensor([[0, 0, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 1]]),
        "rewards": torch.tensor([1.0, 2.0, 3.0, 4.0]),
    }
    seqs = split_sequences(normalize_batch(batch))
    units = share_prefixes(seqs)
    assert units == [(0, 1, 3), (2,)]
    assert [unit_rows(seqs, u) for u in units] == [4 + 1 + 3, 3]
    assert share_prefixes(seqs, max_tokens=6) == [(0, 1), (3,), (2,)]  # 4 + 1 rows, then 5 alone
    mb = pack(seqs, units)
    assert mb.data["input_ids"].tolist() == [7, 8, 1, 2, 3, 5, 6, 6, 9, 8, 4]
    assert mb.position_ids.tolist() == [0, 1, 2, 3, 2, 2, 3, 4, 0, 1, 2]
    assert mb.prev_index.tolist() == [-1, 0, 1, 2, 1, 1, 5, 6, -1, 8, 9]  # continuations follow row 1
    assert mb.seq_index == (0, 1, 3, 2) and mb.data["rewards"].tolist() == [1.0, 2.0, 4.0, 3.0]
    assert mb.seqlens == [4, 3, 5, 3] and mb.n_tokens == 11
    whole = [[7, 8, 1, 2], [7, 8, 3], [7, 8, 5, 6, 6], [9, 8, 4]]
    assert [t.tolist() for t in unpack(mb.data["input_ids"], mb)] == whole
    assert mb.data["input_ids"][mb.shared.gather].tolist() == [7, 8, 1, 2, 7, 8, 3, 7, 8, 5, 6, 6, 9, 8, 4]
    assert mb.shared.scatter.tolist() == [0, 1, 2, 3, 6, 9, 10, 11, 12, 13, 14]
    assert pack(seqs, [0, 1]).shared is None  # plain indices: nothing shared


def test_tensor_batch_shapes_are_validated():
    with pytest.raises(TrajectoryError, match="input_ids"):
        normalize_batch({"input_ids": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(TrajectoryError, match="shape"):
        normalize_batch({"input_ids": torch.zeros(2, 3, dtype=torch.long), "x": torch.zeros(2, 4)})


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[:-1].float(), -1).gather(1, ids[1:, None])[:, 0]


@pytest.mark.parametrize("impl", ["packed", "sdpa"])
def test_packed_row_equals_sequences_alone_with_gradients(tiny, impl):
    model = copy.deepcopy(tiny[0]).train()
    ref = copy.deepcopy(tiny[0]).train()
    if impl == "packed":
        model.set_attn_implementation(register_packed_attention())
    torch.manual_seed(0)
    lens = [7, 13, 5, 19, 11]
    seqs = [torch.randint(0, 256, (n,)) for n in lens]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 19, "max_length_k": 19} if impl == "packed" else {}
    out = model(ids, position_ids=pos, use_cache=False, **kw).logits[0]
    packed = torch.cat([_token_logprobs(p, s) for p, s in zip(torch.split(out, lens), seqs, strict=True)])
    alone = torch.cat([_token_logprobs(ref(s[None], use_cache=False).logits[0], s) for s in seqs])
    torch.testing.assert_close(packed, alone, atol=2e-6, rtol=0)
    packed.sum().backward()
    alone.sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_length_bucketed_attention_equals_one_call_per_sequence():
    import torch.nn.functional as F

    from agentflow.engines.fsdp._attention import _per_segment

    torch.manual_seed(0)
    lens = [1, 16, 17, 3, 40, 2]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, 4, sum(lens), 8, requires_grad=True)
    k, v = (torch.randn(1, 2, sum(lens), 8, requires_grad=True) for _ in range(2))
    got = _per_segment(q, k, v, cu, None, 0.0)
    b = cu.tolist()
    ref = torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                                    enable_gqa=True) for s, e in itertools.pairwise(b)], 2)
    torch.testing.assert_close(got, ref.transpose(1, 2), atol=1e-6, rtol=0)
    (g1,) = torch.autograd.grad(got.square().sum(), q)
    (g2,) = torch.autograd.grad(ref.square().sum(), q)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_heads", [6, 2])
@pytest.mark.parametrize("common", [False, True])
def test_shared_prompt_attention_equals_each_sequence_in_full(kv_heads, common):
    """Prompts held once (continuations attend to the prompt's rows under a mask, in chunks) give
    the attention, and its gradients, of every sequence laid out in full; so do prompts that
    also hold a beginning common to several of them once (``common``)."""
    import torch.nn.functional as F

    from agentflow.engines.fsdp._attention import _per_segment

    torch.manual_seed(0)
    # (prompt length, continuation lengths): short and long continuations, a 12-sample group cut
    # into chunks, a one-token prompt, a sequence sharing nothing
    specs = [(10, [3, 5, 1, 7]), (5, [40, 2]), (1, [12]), (30, [4] * 12), (3, [1]), (2, [3, 3]), (70, [9] * 9)]
    head = torch.randint(1, 50, (6,))  # with ``common``: every prompt of 6 or more tokens starts with it,
    nested = torch.randint(1, 50, (20,))  # and those of 30 or more continue with 20 more tokens in common
    ids, lm = [], []
    for p, conts in specs:
        prompt = torch.randint(1, 50, (p,))
        if common and p >= 6:
            prompt[:6] = head
        if common and p >= 30:
            prompt[6:26] = nested
        for c in conts:
            ids.append(torch.cat([prompt, torch.randint(1, 50, (c,))]))
            lm.append(torch.cat([torch.zeros(p, dtype=torch.long), torch.ones(c, dtype=torch.long)]))
    width = max(len(x) for x in ids)
    batch = {"input_ids": torch.stack([F.pad(x, (0, width - len(x))) for x in ids]),
             "attention_mask": torch.stack([F.pad(torch.ones(len(x), dtype=torch.long), (0, width - len(x)))
                                            for x in ids]),
             "loss_mask": torch.stack([F.pad(x, (0, width - len(x))) for x in lm])}
    seqs = split_sequences(normalize_batch(batch))
    units = share_prefixes(seqs)
    mb = pack(seqs, units, common_prefix_min=4 if common else 0)
    within = sum(unit_rows(seqs, u) for u in units)
    assert mb.shared is not None and mb.n_tokens == (within - 6 - 26 if common else within)
    rows = mb.n_tokens
    q = torch.randn(1, 6, rows, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, rows, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    got = _per_segment(q, k, v, mb.cu_seqlens, None, 0.0, mb.shared)
    qv, kv, vv = (x.index_select(2, mb.shared.gather) for x in (q, k, v))
    ref = torch.cat([F.scaled_dot_product_attention(qv[:, :, s:e], kv[:, :, s:e], vv[:, :, s:e], is_causal=True,
                                                    enable_gqa=kv_heads != 6)
                     for s, e in itertools.pairwise(mb.cu_seqlens.tolist())], 2)
    ref = ref.transpose(1, 2).index_select(1, mb.shared.scatter)  # each row's first copy
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    w = torch.randn_like(got)
    for g1, g2 in zip(torch.autograd.grad((got * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v)),
                      strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-12, rtol=0)
    plan = mb.shared.plan  # made once per micro-batch; every layer reuses it (and its masks)
    assert plan is not None
    assert torch.equal(_per_segment(q, k, v, mb.cu_seqlens, None, 0.0, mb.shared), got)
    assert mb.shared.plan is plan
    whole = [s["input_ids"].tolist() for s in seqs]
    assert [t.tolist() for t in unpack(mb.data["input_ids"], mb)] == [whole[i] for i in mb.seq_index]


def test_common_prefixes_finds_the_longest_earlier_beginning():
    t = torch.tensor
    prompts = [t([1, 2, 3, 4, 5]), t([1, 2, 3, 9]), t([7, 7]), t([1, 2, 3, 4, 6, 6]), t([], dtype=torch.long),
               t([1, 2, 3, 9, 9]), t([1, 2, 3, 4, 5])]
    assert common_prefixes(prompts, 1) == [(-1, 0), (0, 3), (-1, 0), (0, 4), (-1, 0), (1, 4), (0, 5)]
    assert common_prefixes(prompts, 4) == [(-1, 0), (-1, 0), (-1, 0), (0, 4), (-1, 0), (1, 4), (0, 5)]


def test_pack_lays_a_common_beginning_out_once():
    """Two groups under one 3-token system prompt: the second group's prompt holds only its own
    token, after the first group's system rows; positions, predecessors and gathers follow."""
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 1, 2, 0], [5, 6, 7, 1, 3, 3], [5, 6, 7, 8, 4, 0], [5, 6, 7, 8, 9, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6, [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]),
        "loss_mask": torch.tensor([[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 0]]),
    }
    seqs = split_sequences(normalize_batch(batch))
    units = share_prefixes(seqs)
    assert units == [(0, 1), (2, 3)]
    assert pack(seqs, units).n_tokens == 5 + 2 + 5 + 1  # within each group only
    mb = pack(seqs, units, common_prefix_min=3)
    assert mb.data["input_ids"].tolist() == [5, 6, 7, 1, 2, 3, 3, 8, 4, 9]
    assert mb.position_ids.tolist() == [0, 1, 2, 3, 4, 4, 5, 3, 4, 4]
    assert mb.prev_index.tolist() == [-1, 0, 1, 2, 3, 3, 5, 2, 7, 7]  # row 7 (token 8) follows the system rows
    assert mb.shared.gather.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 5, 6, 0, 1, 2, 7, 8, 0, 1, 2, 7, 9]
    assert [t.tolist() for t in unpack(mb.data["input_ids"], mb)] == [[5, 6, 7, 1, 2], [5, 6, 7, 1, 3, 3],
                                                                       [5, 6, 7, 8, 4], [5, 6, 7, 8, 9]]
    assert pack(seqs, units, common_prefix_min=4).n_tokens == 13  # 3 tokens in common: below the minimum
