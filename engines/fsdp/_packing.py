"""Sequence packing for training: a batch of variable-length sequences becomes micro-batches of
one packed row each (no padding), with per-sequence position ids and ``cu_seq_lens``.

- :func:`normalize_batch` accepts a list of :class:`Trajectory` or a padded tensor dict and returns
  the padded dict (``input_ids``/``attention_mask`` ``[B, T]``, per-token fields ``[B, T]``,
  per-sequence fields ``[B]``); :func:`split_sequences` cuts it into one dict per sequence.
- :func:`plan_micro_batches` assigns sequences to micro-batches under a token budget with at least
  ``n_mbs`` of them (first-fit-decreasing for the bin count, then worst-fit-decreasing to balance).
- :func:`share_prefixes` groups sequences that start with the same prompt (the tokens before the
  first loss token: the ``n_samples`` of one prompt) so :func:`pack` lays the prompt out once and
  every sample's continuation after it (a *shared-prefix unit*); the attention then runs each
  sequence in full through a gather (:class:`SharedLayout`), while the linear layers, which are
  most of the compute, see every prompt token once. Exact: the prompt's hidden states are the same
  for every sample and their gradients add up.
- Across prompts, :func:`pack` (``common_prefix_min``) also lays out once the beginning that
  prompts of one micro-batch have in common (a system prompt, tool descriptions, worked
  examples: :func:`common_prefixes`); a prompt then holds only its own rest after those rows.
- :func:`pack` builds one :class:`MicroBatch`; :func:`unpack` cuts a packed per-token tensor back.
- :class:`PackedBatch` keeps one packing of a batch for several passes over it (the proximal
  forward and the update of a PPO step) and adds per-token fields to it without re-packing.
- :func:`balanced_partition` splits sequences across ranks by token count.

It does not touch devices or models; the engine moves micro-batches to its device.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from agentflow import ConfigError, Trajectory, TrajectoryError

__all__ = ["MicroBatch", "PackedBatch", "SharedLayout", "Unit", "balanced_partition", "common_prefixes",
           "dummy_micro_batch", "normalize_batch", "pack", "packing_efficiency", "plan_micro_batches",
           "prompt_length", "share_prefixes", "split_sequences", "unit_rows", "unpack"]


def normalize_batch(input_: Sequence[Trajectory] | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The padded dict form of ``input_`` (trajectories are stacked with ``pad_trajectories``)."""
    if isinstance(input_, Mapping):
        return _check_padded(input_)
    from agentflow.algo import pad_trajectories

    if not all(isinstance(t, Trajectory) for t in input_):
        raise TrajectoryError(
            f"expected a list of Trajectory or a dict of tensors, got a sequence of {type(input_[0]).__name__}"
        )
    return pad_trajectories(input_)


def _check_padded(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise TrajectoryError(
            "a tensor batch needs 'input_ids' of shape [B, T] (right-padded, with 'attention_mask'); "
            f"got {None if ids is None else tuple(getattr(ids, 'shape', ()))}"
        )
    out = dict(batch)
    out.setdefault("attention_mask", torch.ones_like(ids))
    n, t = ids.shape
    for k, v in out.items():
        if not isinstance(v, torch.Tensor) or tuple(v.shape) not in ((n, t), (n,)):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise TrajectoryError(f"batch[{k!r}] has shape {shape}; expected [B, T] = {(n, t)} (per token) or [B]")
    return out


def split_sequences(batch: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One dict per sequence: per-token fields cut to the real length, per-sequence fields as 0-d."""
    lens = batch["attention_mask"].sum(1).tolist()
    seqs = []
    for b, n in enumerate(lens):
        if n == 0:
            raise TrajectoryError(f"sequence {b} has no tokens (attention_mask all 0); expected at least one")
        seqs.append({k: (v[b, :n] if v.dim() == 2 else v[b]) for k, v in batch.items() if k != "attention_mask"})
        if "loss_mask" in seqs[-1] and seqs[-1]["loss_mask"][0]:
            raise TrajectoryError(f"sequence {b} has loss_mask[0] = 1; the first token has no prediction")
    return seqs


def plan_micro_batches(lengths: Sequence[int], max_tokens: int | None, n_mbs: int = 1) -> list[list[int]]:
    """Assign sequence indices to micro-batches.

    At least ``min(n_mbs, len(lengths))`` micro-batches, each with at most ``max_tokens`` tokens
    (None = no cap). The count is the larger of ``n_mbs`` and the first-fit-decreasing bin count;
    sequences are then placed longest first into the least-loaded bin that fits (worst-fit
    decreasing), so bins are balanced; a sequence that fits nowhere opens a new bin.

    Raises:
        ConfigError: if a sequence is longer than ``max_tokens``.
    """
    if not lengths:
        raise TrajectoryError("cannot plan micro-batches for an empty batch; expected at least one sequence")
    cap = sum(lengths) if max_tokens is None else max_tokens
    longest = max(lengths)
    if longest > cap:
        raise ConfigError(
            f"a sequence of {longest} tokens does not fit max_tokens_per_mb={max_tokens}; "
            "raise MicroBatchSpec.max_tokens_per_mb to at least the longest sequence or truncate it"
        )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    k = max(_ffd_bin_count([lengths[i] for i in order], cap), min(n_mbs, len(lengths)))
    heap = [(0, b) for b in range(k)]  # (load, bin id): least-loaded first
    bins: list[list[int]] = [[] for _ in range(k)]
    for i in order:
        skipped = []
        while heap and heap[0][0] + lengths[i] > cap:
            skipped.append(heapq.heappop(heap))
        if heap:
            load, b = heapq.heappop(heap)
        else:
            load, b = 0, len(bins)
            bins.append([])
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], b))
        for item in skipped:
            heapq.heappush(heap, item)
    return [sorted(b) for b in bins if b]


def _ffd_bin_count(sorted_lengths: Sequence[int], cap: int) -> int:
    loads: list[int] = []
    for n in sorted_lengths:
        for j, load in enumerate(loads):
            if load + n <= cap:
                loads[j] += n
                break
        else:
            loads.append(n)
    return len(loads)


def balanced_partition(lengths: Sequence[int], k: int) -> list[list[int]]:
    """Split sequence indices into ``k`` groups of near-equal token count (longest first into the
    lightest group). Groups may be empty when there are fewer than ``k`` sequences."""
    if k < 1:
        raise ConfigError(f"balanced_partition needs k >= 1, got {k}")
    heap = [(0, g) for g in range(k)]
    groups: list[list[int]] = [[] for _ in range(k)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, g = heapq.heappop(heap)
        groups[g].append(i)
        heapq.heappush(heap, (load + lengths[i], g))
    return [sorted(g) for g in groups]


class SharedLayout:
    """How the rows of a packed row with shared prefixes map to whole sequences.

    The *virtual* layout is every sequence in full, one after another (what packing without sharing
    would produce). ``gather[j]`` is the row holding virtual token ``j``; ``scatter[r]`` is the
    virtual token whose attention output row ``r`` takes (its first copy). Attention reads the
    sequences' structure from these (on CPU: each prompt attended once, each continuation against
    the prompt's rows, ``plan`` caching that per micro-batch; on CUDA: gathered into the virtual
    layout and scattered back) and sets ``used`` (so the engine can tell a model that does not pass
    attention keywords through).

    A plain class, not a dataclass: FSDP2's mixed-precision input cast rebuilds dataclasses it finds
    in a forward's keywords, and the attention must see (and mark) this very object.
    """

    __slots__ = ("gather", "plan", "scatter", "used")

    def __init__(self, gather: torch.Tensor, scatter: torch.Tensor) -> None:
        self.gather, self.scatter = gather, scatter
        self.used = False
        self.plan: Any = None  # the attention's per-micro-batch plan (engines/fsdp/_attention.py), made on first use

    def to(self, device: torch.device) -> SharedLayout:
        return SharedLayout(self.gather.to(device), self.scatter.to(device))


@dataclass(frozen=True, slots=True)
class MicroBatch:
    """One packed row.

    Attributes:
        data: per-token fields as 1-D tensors of the row length ``T`` (``input_ids``,
            ``loss_mask``, ...), per-sequence fields as ``[n_seqs]`` tensors.
        position_ids: ``[T]``, each token's position in its sequence.
        prev_index: ``[T]``, the row of the token before it in its sequence (-1 for a first token):
            the row whose output predicts it. ``t - 1`` except where sequences start or, with a
            shared prefix, where a continuation starts (it follows the prefix's last row).
        cu_seqlens: ``[n_seqs + 1]`` int32 offsets of the whole sequences in the virtual layout
            (equal to the row offsets when nothing is shared).
        max_len: the longest sequence.
        seq_index: index of each packed sequence in the caller's batch (-1: padding sequence).
        shared: the :class:`SharedLayout` when some sequences share a prefix row range, else None.
        row_seq: ``[T]``, the caller's batch index of the sequence each row belongs to (a shared
            prompt row: the first sequence of its unit); with ``position_ids`` it addresses a
            padded ``[B, T]`` tensor (:meth:`PackedBatch.set_token_field`).
    """

    data: dict[str, torch.Tensor]
    position_ids: torch.Tensor
    prev_index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    seq_index: tuple[int, ...]
    shared: SharedLayout | None = None
    row_seq: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        """Rows in the packed row (what the linear layers process)."""
        return int(self.position_ids.numel())

    @property
    def seqlens(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(
            {k: v.to(device, non_blocking=True) for k, v in self.data.items()},
            self.position_ids.to(device), self.prev_index.to(device), self.cu_seqlens.to(device), self.max_len,
            self.seq_index, None if self.shared is None else self.shared.to(device), self.row_seq,
        )


Unit = tuple[int, ...]  # sequence indices packed as one shared-prefix unit (the first is laid out in full)


def prompt_length(seq: Mapping[str, torch.Tensor]) -> int:
    """Tokens before the first loss token (0 without a ``loss_mask`` or without loss tokens)."""
    mask = seq.get("loss_mask")
    if mask is None:
        return 0
    hits = torch.nonzero(mask)
    return int(hits[0, 0]) if hits.numel() else 0


def share_prefixes(seqs: Sequence[Mapping[str, torch.Tensor]], max_tokens: int | None = None) -> list[Unit]:
    """Group sequences with the same prompt (identical tokens before the first loss token) into units.

    Members keep their batch order; a unit's row count is ``prompt + sum(continuations)`` and stays
    within ``max_tokens`` (a group that would not fit is cut into several units). Sequences without
    a prompt (no ``loss_mask``, or no loss token) are units of one.
    """
    groups: dict[bytes, list[int]] = {}
    units: list[list[int]] = []
    for i, s in enumerate(seqs):
        p = prompt_length(s)
        if p == 0:
            units.append([i])
            continue
        key = s["input_ids"][:p].numpy().tobytes()
        members = groups.get(key)
        if members is None:
            groups[key] = members = [i]
            units.append(members)
        else:
            members.append(i)
    cap = max_tokens or 0
    out: list[Unit] = []
    for members in units:
        p = prompt_length(seqs[members[0]]) if len(members) > 1 else 0
        chunk: list[int] = []
        load = 0
        for i in members:
            n = int(seqs[i]["input_ids"].numel())
            cost = n if not chunk else n - p
            if chunk and cap and load + cost > cap:
                out.append(tuple(chunk))
                chunk, load, cost = [], 0, n
            chunk.append(i)
            load += cost
        out.append(tuple(chunk))
    return out


def unit_rows(seqs: Sequence[Mapping[str, torch.Tensor]], unit: Unit) -> int:
    """Rows a unit occupies when packed: the first member in full plus the others' continuations."""
    lens = [int(seqs[i]["input_ids"].numel()) for i in unit]
    p = prompt_length(seqs[unit[0]]) if len(unit) > 1 else 0
    return lens[0] + sum(n - p for n in lens[1:])


def pack(seqs: Sequence[Mapping[str, torch.Tensor]], index: Sequence[int | Unit], *,
         common_prefix_min: int = 0) -> MicroBatch:
    """Concatenate ``seqs[i] for i in index`` into one :class:`MicroBatch`.

    An entry of ``index`` may be a :data:`Unit` (from :func:`share_prefixes`): its first sequence
    is laid out in full and the others contribute only the tokens after the shared prompt (the
    prompt's per-token fields are the first sequence's; they are the same tokens, outside the loss).

    With ``common_prefix_min > 0`` the units share across one another too: a unit whose prompt
    begins with at least that many of an earlier unit's prompt tokens (a system prompt, tool
    descriptions, worked examples) lays out only the rest, after the earlier unit's rows of those
    tokens (:func:`common_prefixes` picks the earlier unit).
    """
    units = [(u,) if isinstance(u, int) else tuple(u) for u in index]
    order = [i for u in units for i in u]
    chosen = {i: seqs[i] for i in order}
    fields = seqs[order[0]]
    prompts = [prompt_length(chosen[u[0]]) for u in units]
    borrow = (common_prefixes([chosen[u[0]]["input_ids"][:p] for u, p in zip(units, prompts, strict=True)],
                              common_prefix_min) if common_prefix_min > 0 else [(-1, 0)] * len(units))
    pieces: dict[str, list[torch.Tensor]] = {k: [] for k, v in fields.items() if v.dim() == 1}
    positions: list[torch.Tensor] = []
    prev: list[torch.Tensor] = []
    gather: list[torch.Tensor] = []
    scatter: list[torch.Tensor] = []
    owner: list[torch.Tensor] = []
    lens: list[int] = []
    firsts: list[torch.Tensor] = []  # each unit's first sequence, as rows of the packed row
    row = 0
    virtual = 0
    for unit, prompt, (src, common) in zip(units, prompts, borrow, strict=True):
        p = prompt if len(unit) > 1 else 0
        for j, i in enumerate(unit):
            s = chosen[i]
            n = int(s["input_ids"].numel())
            if j == 0:  # rows of an earlier unit's common beginning, if any
                start, borrowed = common, firsts[src][:common] if common else torch.zeros(0, dtype=torch.long)
            else:  # the unit's prompt, laid out by its first sequence
                start, borrowed = p, firsts[-1][:p]
            for k in pieces:
                pieces[k].append(s[k][start:])
            rows = torch.arange(row, row + n - start)
            positions.append(torch.arange(start, n))
            owner.append(torch.full((n - start,), i, dtype=torch.long))
            before = torch.cat([borrowed, rows])
            prev.append(torch.cat([torch.tensor([-1]), before[:-1]])[start:])
            gather.append(before)
            scatter.append(torch.arange(virtual + start, virtual + n))
            lens.append(n)
            if j == 0:
                firsts.append(before)
            row += n - start
            virtual += n
    data = {k: torch.cat(v) for k, v in pieces.items()}
    data.update({k: torch.stack([chosen[i][k] for i in order]) for k, v in fields.items() if v.dim() != 1})
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    shared = None
    if virtual != row:
        shared = SharedLayout(torch.cat(gather), torch.cat(scatter))
    return MicroBatch(data, torch.cat(positions), torch.cat(prev), cu, max(lens), tuple(order), shared,
                      torch.cat(owner))


def common_prefixes(prompts: Sequence[torch.Tensor], min_len: int) -> list[tuple[int, int]]:
    """For each prompt, ``(j, n)``: the earlier prompt ``j`` with which it shares the longest
    beginning, and that length ``n`` (``(-1, 0)`` when no earlier prompt shares ``min_len`` tokens).

    The longest common beginning with any earlier prompt is found among the prompt's neighbours in
    the sorted order of the prompts so far, so this is ``O(k log k)`` comparisons for ``k`` prompts.
    """
    seen: list[tuple[tuple[int, ...], int]] = []
    out: list[tuple[int, int]] = []
    for i, tokens in enumerate(prompts):
        key = tuple(tokens.tolist())
        best = (-1, 0)
        if key:
            at = bisect.bisect_left(seen, (key, -1))
            for other, j in seen[max(0, at - 1): at + 1]:
                n = _common_length(other, key)
                if n > best[1]:
                    best = (j, n)
            bisect.insort(seen, (key, i))
        out.append(best if best[1] >= min_len else (-1, 0))
    return out


def _common_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def dummy_micro_batch(like: MicroBatch | Mapping[str, torch.Tensor]) -> MicroBatch:
    """A one-token micro-batch with every field of ``like`` zeroed (loss weight 0). Ranks run it
    when they have fewer micro-batches than others, so FSDP collectives stay matched."""
    fields = like.data if isinstance(like, MicroBatch) else like
    data = {k: torch.zeros((1,), dtype=v.dtype) for k, v in fields.items()}
    cu = torch.tensor([0, 1], dtype=torch.int32)
    return MicroBatch(data, torch.zeros(1, dtype=torch.long), torch.tensor([-1]), cu, 1, (-1,))


@dataclass(slots=True)
class PackedBatch:
    """A batch laid out once into micro-batches, for several passes (proximal forward, update).

    Attributes:
        micro_batches: the packed rows (every rank has the same number; padding ones have
            ``seq_index == (-1,)``).
        batch: the padded dict it was packed from (sequence lengths, per-sequence fields).
    """

    micro_batches: list[MicroBatch]
    batch: dict[str, torch.Tensor]

    @property
    def shares_prefixes(self) -> bool:
        return any(mb.shared is not None for mb in self.micro_batches)

    def set_token_field(self, name: str, padded: torch.Tensor) -> None:
        """Add a per-token field given as a padded ``[B, T]`` tensor (e.g. proximal log-probs)."""
        if padded.shape != self.batch["input_ids"].shape:
            raise TrajectoryError(f"{name} must have the batch's shape {tuple(self.batch['input_ids'].shape)}, "
                                  f"got {tuple(padded.shape)}")
        self.batch[name] = padded
        for mb in self.micro_batches:
            if mb.row_seq is None:  # a padding micro-batch
                mb.data[name] = torch.zeros((mb.n_tokens,), dtype=padded.dtype)
            else:
                mb.data[name] = padded[mb.row_seq, mb.position_ids]


def unpack(values: torch.Tensor, mb: MicroBatch) -> list[torch.Tensor]:
    """Cut a packed ``[T, ...]`` tensor into one whole sequence per sequence of ``mb`` (a shared
    prompt's values are repeated for each sequence that shares it)."""
    if mb.shared is not None:
        values = values[mb.shared.gather.to(values.device)]
    return list(torch.split(values, mb.seqlens))


def packing_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], cap: int) -> dict[str, float]:
    """``fill``: real tokens / (bins x cap), the share of each micro-batch's token budget used;
    ``vs_lower_bound``: minimal possible bin count / bins used; ``padded``: real tokens / tokens of
    the same sequences padded to the longest one (what a padded batch would process)."""
    total = sum(lengths)
    lower = -(-total // cap)
    return {
        "fill": total / (len(bins) * cap),
        "vs_lower_bound": lower / len(bins),
        "padded": total / (len(lengths) * max(lengths)),
    }
