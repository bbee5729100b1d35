"""The KV cache of :class:`~agentflow.engines.local.LocalEngine`: one row per running sequence.

Each layer holds two buffers ``[max_batch, kv_heads, capacity, head_dim]``; row ``r`` keeps the
keys/values of the sequence decoding in row ``r`` at positions ``0 .. len_r - 1`` (rows are
right-padded, each at its own length). The buffers are allocated on the first write (so head
counts and sizes come from the model itself) and grow along the sequence axis in blocks of
``block_tokens`` up to ``max_seq_len``: the cache never takes more than
``2 · layers · max_batch · max_seq_len · kv_heads · head_dim`` elements, and usually far less.

It speaks the one method transformers' attention layers call on a cache, ``update``, in two modes
set before each forward: *prefill* (new rows, prompt tokens at positions ``0 .. L-1``; attention
sees only the prompt's own keys) and *decode* (one token per row written at that row's own
position; attention sees ``[:kv_len]`` of every row, with a mask hiding each row's tail).
Running rows stay packed at ``0 .. n-1``: when a row finishes, the last row moves into its slot.

A prefill may start after positions already in its rows (``set_prefill(..., offset)``: a
beginning common to several prompts, prefilled once and copied into each row with ``move_row``).

Not here: scheduling and sampling (``_worker.py``), paging or a prefix cache across requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from agentflow.errors import EngineError

__all__ = ["SlotKVCache", "causal_prefill_mask", "decode_mask"]


@dataclass(slots=True)
class _Mode:
    prefill: bool
    start: int  # first row written
    count: int  # rows written
    offset: int = 0  # prefill: position of the first token written (keys before it are already cached)
    positions: torch.Tensor | None = None  # decode: [count] write position per row
    kv_len: int = 0  # decode: keys returned per row


class SlotKVCache:
    """Per-row KV buffers with per-row lengths; see the module docstring."""

    is_compileable = False

    def __init__(
        self, n_layers: int, max_batch: int, max_seq_len: int, block_tokens: int,
        device: torch.device, dtype: torch.dtype,
    ) -> None:
        self.n_layers = n_layers
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.block_tokens = block_tokens
        self.device = device
        self.dtype = dtype
        self.capacity = 0
        self._keys: list[torch.Tensor | None] = [None] * n_layers
        self._values: list[torch.Tensor | None] = [None] * n_layers
        self._mode: _Mode | None = None
        self._rows_cache: torch.Tensor | None = None

    # ------------------------------------------------------------------ sizing
    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` positions per row (rounded up to a block, capped at max_seq_len)."""
        if tokens <= self.capacity:
            return
        if tokens > self.max_seq_len:
            raise EngineError(f"KV cache asked for {tokens} positions per row; max_seq_len is {self.max_seq_len}")
        new_cap = min(self.max_seq_len, -(-tokens // self.block_tokens) * self.block_tokens)
        for store in (self._keys, self._values):
            for i, buf in enumerate(store):
                if buf is not None:
                    grown = buf.new_zeros(*buf.shape[:2], new_cap, buf.shape[3])
                    grown[:, :, : self.capacity] = buf
                    store[i] = grown
        self.capacity = new_cap

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (*self._keys, *self._values) if b is not None)

    # ------------------------------------------------------------------ modes
    def set_prefill(self, start: int, count: int, offset: int = 0) -> None:
        """Prefill rows ``start .. start + count - 1`` with tokens from position ``offset`` on; with
        ``offset > 0`` the rows already hold positions ``0 .. offset - 1`` (a common beginning
        copied in) and attention sees them too."""
        self._mode = _Mode(prefill=True, start=start, count=count, offset=offset)

    def set_decode(self, positions: torch.Tensor, kv_len: int) -> None:
        n = positions.shape[0]
        self._mode = _Mode(prefill=False, start=0, count=n, positions=positions, kv_len=kv_len)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` positions into row ``dst`` (every layer)."""
        for store in (self._keys, self._values):
            for buf in store:
                if buf is not None:
                    buf[dst, :, :length] = buf[src, :, :length]

    # ------------------------------------------------------------------ transformers' cache protocol
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mode = self._mode
        if mode is None:
            raise EngineError("SlotKVCache.update called outside a prefill/decode step")
        k_buf, v_buf = self._buffers(layer_idx, key_states)
        if mode.prefill:
            rows, end = slice(mode.start, mode.start + mode.count), mode.offset + key_states.shape[2]
            k_buf[rows, :, mode.offset : end] = key_states
            v_buf[rows, :, mode.offset : end] = value_states
            if mode.offset:
                return k_buf[rows, :, :end], v_buf[rows, :, :end]
            return key_states, value_states
        rows = self._rows(mode.count)
        k_buf[rows, :, mode.positions] = key_states[:, :, 0]
        v_buf[rows, :, mode.positions] = value_states[:, :, 0]
        return k_buf[: mode.count, :, : mode.kv_len], v_buf[: mode.count, :, : mode.kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Only consulted by models when position_ids is not given; the engine always gives them.
        raise EngineError("SlotKVCache has per-row lengths; pass position_ids explicitly")

    def _buffers(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_buf = self._keys[layer_idx]
        if k_buf is None:
            shape = (self.max_batch, like.shape[1], self.capacity, like.shape[3])
            k_buf = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self._keys[layer_idx] = k_buf
            self._values[layer_idx] = torch.zeros_like(k_buf)
        v_buf = self._values[layer_idx]
        assert v_buf is not None
        return k_buf, v_buf

    def _rows(self, n: int) -> torch.Tensor:
        if self._rows_cache is None or self._rows_cache.shape[0] < n:
            self._rows_cache = torch.arange(self.max_batch, device=self.device)
        return self._rows_cache[:n]


def causal_prefill_mask(length: int, device: torch.device, *, additive_dtype: torch.dtype | None,
                        past: int = 0) -> torch.Tensor:
    """``[1, 1, L, past + L]`` causal mask over ``past`` cached keys (all visible) and ``L`` new
    ones: bool (sdpa) or additive 0/-inf-like (eager, ``additive_dtype``).

    Prompts are right-padded, so a real token never sees a pad (pads come after it) and the pad
    rows' outputs are ignored: a plain causal mask is exact.
    """
    mask = torch.ones(length, past + length, dtype=torch.bool, device=device).tril(past)[None, None]
    return _as_additive(mask, additive_dtype)


def decode_mask(positions: torch.Tensor, kv_len: int, *, additive_dtype: torch.dtype | None) -> torch.Tensor:
    """``[n, 1, 1, kv_len]``: row ``i`` attends to positions ``0 .. positions[i]``."""
    keys = torch.arange(kv_len, device=positions.device)
    mask = (keys[None, :] <= positions[:, None])[:, None, None, :]
    return _as_additive(mask, additive_dtype)


def _as_additive(mask: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None:
        return mask
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, torch.finfo(dtype).min)
