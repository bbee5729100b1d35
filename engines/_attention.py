"""The ``"packed"`` attention: exact causal attention over a packed row of sequences.

Registered once with transformers' ``AttentionInterface``; a model switched to it with
``model.set_attn_implementation("packed")`` reads ``cu_seq_lens_q`` / ``max_length_q`` (forwarded
by transformers to the attention function) and attends only within each sequence:

- CUDA with bf16/fp16: one ``torch.nn.attention.varlen.varlen_attn`` call (FlashAttention varlen),
  cost sum(n_i^2), no mask.
- otherwise (CPU, or fp32): a loop of causal SDPA calls, one per sequence, also exact and
  sum(n_i^2) (measured 3.4x faster than sdpa with a block-diagonal mask on CPU with
  transformers 5.24).

With shared prompts (the train engine's ``agentflow_shared`` keyword, a
:class:`~agentflow.engines._packing.SharedLayout`), q/k/v are first gathered into the layout of
whole sequences, attended as above and scattered back to the packed rows.

No mask function is registered, so transformers builds no ``L x L`` mask. Without
``cu_seq_lens_q`` each row is treated as one unpadded causal sequence. It does not handle padded
batches with a 2D mask or a KV cache: it is for the train engine's packed rows only, and callers
must pass ``use_cache=False``.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch
import torch.nn.functional as F

from agentflow import ConfigError

__all__ = ["PACKED", "packed_attention", "register_packed_attention"]

PACKED = "packed"
_registered = False


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    agentflow_shared: Any = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over ``query [1, Hq, T, D]``, ``key/value [1, Hkv, T, D]``; returns ``[1, T, Hq, D]``."""
    p = dropout if module.training else 0.0
    if cu_seq_lens_q is None:
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, dropout_p=p, enable_gqa=query.shape[1] != key.shape[1]
        )
        return out.transpose(1, 2), None
    if query.shape[0] != 1:
        raise ConfigError(f"packed attention expects one packed row (batch size 1), got batch size {query.shape[0]}")
    gather = scatter = None
    if agentflow_shared is not None:
        gather, scatter = agentflow_shared.gather, agentflow_shared.scatter
        agentflow_shared.used = True
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        if gather is not None:
            query, key, value = (x.index_select(2, gather) for x in (query, key, value))
        out = _varlen(query, key, value, cu_seq_lens_q, int(max_length_q or query.shape[2]), scaling, p)
        return (out if scatter is None else out.index_select(1, scatter)), None
    return _per_segment(query, key, value, cu_seq_lens_q, scaling, p, gather, scatter), None


def _per_segment(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scaling: float | None, p: float,
    gather: torch.Tensor | None = None, scatter: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact causal attention per sequence, with sequences of similar length batched together.

    Sequences are grouped by length bucket (powers of two) and each group runs as one right-padded
    causal SDPA call: with right padding, causal attention of every real query only sees real keys,
    so the result is exact; padded rows are dropped. Few calls instead of one per sequence (small
    ops are slow on CPU), at most ~4x the attention FLOPs of the longest member per group.

    ``cu`` delimits sequences in the virtual layout; ``gather`` maps virtual tokens to rows of
    q/k/v and ``scatter`` picks each row's output from the virtual layout (shared prompts; both
    None = the identity). All indexing is ``index_select`` (its backward is a fast ``index_add``).
    """
    bounds = cu.tolist()
    lens = [e - s for s, e in itertools.pairwise(bounds)]
    gqa = q.shape[1] != k.shape[1]
    if len(lens) == 1 and gather is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=p, enable_gqa=gqa)
        return out.transpose(1, 2)
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lens):
        groups.setdefault(max(16, 1 << (n - 1).bit_length()), []).append(i)
    outs, where = [], []
    for members in groups.values():
        width = max(lens[i] for i in members)
        ar = torch.arange(width)
        real = torch.stack([ar < lens[i] for i in members]).flatten()  # [k * width]
        idx = torch.stack([bounds[i] + torch.minimum(ar, torch.tensor(lens[i] - 1)) for i in members]).flatten()
        rows = idx.to(q.device) if gather is None else gather[idx.to(gather.device)]
        qg, kg, vg = (x[0].index_select(1, rows).unflatten(1, (len(members), width)).transpose(0, 1)
                      for x in (q, k, v))  # [k, H, width, D]
        og = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scaling, dropout_p=p, enable_gqa=gqa)
        outs.append(og.transpose(1, 2).flatten(0, 1))  # [k * width, H, D]
        where.append(torch.where(real, idx, -1))  # virtual position of each output row (-1: padding)
    where_all = torch.cat(where)
    keep = torch.nonzero(where_all >= 0).flatten()
    order = keep[torch.argsort(where_all[keep])]  # output rows in virtual order
    if scatter is not None:
        order = order[scatter.to(order.device)]
    return torch.cat(outs).index_select(0, order.to(q.device))[None]


def _varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scaling: float | None, p: float
) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    if p > 0:
        raise ConfigError(f"varlen packed attention has no dropout; got attention dropout {p}. Set it to 0")
    kwargs: dict[str, Any] = {"scale": scaling, "window_size": (-1, 0)}  # (-1, 0) = causal
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in inspect.signature(varlen_attn).parameters:
            kwargs["enable_gqa"] = True
        else:  # torch < 2.13: repeat the kv heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    cu = cu.to(q.device, torch.int32)
    q, k, v = (x[0].transpose(0, 1) for x in (q, k, v))  # [T, H, D]
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)
    return out[None]


def register_packed_attention() -> str:
    """Register the ``"packed"`` implementation with transformers (idempotent); return its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED, packed_attention)
        _registered = True
    return PACKED
