"""The decode thread of :class:`~agentflow.engines.local.LocalEngine`: a continuous-batching scheduler.

One ``threading.Thread`` owns the model. Each round it (1) runs queued commands (weight updates),
(2) drops cancelled and aborted sequences, (3) if not paused, admits waiting sequences into free
rows with one batched prefill, and (4) runs one decode step for every running row. A sequence
joins between two decode steps and leaves the step it finishes, so short requests never wait for
long ones. The thread sleeps on a ``threading.Condition`` when there is nothing to do (no polling)
and talks to the event loop only through ``loop.call_soon_threadsafe``; it has no event loop.

A version is read once per round, before the forward, so ``output_versions[i]`` is exactly the
version of the weights that produced token ``i``. On a weight update with
``recompute_kv_on_update`` every running sequence goes back to the head of the queue and is
prefilled again (prompt + tokens so far) under the new weights, the re-issue semantics of
``docs/inference.md``; otherwise it continues on its old-weight KV cache (SGLang's ``in_place`` mode).

LoRA: each sequence may name an adapter (``Seq.adapter``, None = the base model); with adapters
loaded (``DecodeWorker.adapters``, see ``local/_lora.py``) every forward passes one adapter name per
row, so a batch mixes adapters, and identical contexts share a prefill only under the same adapter.

Randomness: every request draws from a random stream of its own (``Seq.rng``), seeded when it is
submitted from the engine's seed, the weight version, the adapter, the prompt tokens and how many
identical requests came before it under that version (the samples of a group are told apart by
that count). Its tokens therefore do not depend on which requests share its batch or when it
joined: a run whose requests are submitted in the same order draws the same tokens (up to the
last bits of batched arithmetic). Servers that share a group's samples need distinct seeds.

Stop strings are matched on the decoded text of the last few output tokens after every token; the
token that completes a match is kept (``output_tokens`` ends with it) and the request stops with
``"stop"``. Callers that show text cut it at the match (SGLang does the same).

Not here: the asyncio API and configuration (``engine.py``), the KV layout (``_kv.py``),
sampling (``_sampling.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import threading
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from agentflow import ModelRequest, ModelResponse, StopReason
from agentflow.engines.local._kv import SlotKVCache, causal_prefill_mask, decode_mask
from agentflow.engines.local._lora import AdapterSet
from agentflow.engines.local._sampling import RowParams, sample
from agentflow.errors import EngineError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["DecodeWorker", "Seq", "WorkerLimits"]

log = logging.getLogger("agentflow.engines.local")
_STOP_WINDOW_TOKENS = 8  # extra tokens decoded beyond the longest stop string when matching
_MAX_STREAM_KEYS = 1 << 16  # distinct contexts counted per version before the counts start over
_COMMON_PREFILL_MIN = 16  # a shorter beginning common to a prefill's contexts is not worth a forward of its own


@dataclass(frozen=True, slots=True)
class WorkerLimits:
    max_batch_size: int
    max_seq_len: int
    cache_block_tokens: int
    max_prefill_tokens: int
    recompute_kv_on_update: bool
    seed: int


@dataclass(slots=True, eq=False)
class Seq:
    """One request as the worker sees it. Fields after ``t_submit`` belong to the worker thread."""

    req: ModelRequest
    fut: asyncio.Future[ModelResponse]
    params: RowParams
    stop_ids: frozenset[int]
    max_new: int
    t_submit: float
    out_tokens: list[int] = field(default_factory=list)
    out_logprobs: list[float] = field(default_factory=list)
    out_versions: list[int] = field(default_factory=list)
    kv_len: int = 0  # positions of this row held in the KV cache
    t_first: float | None = None
    cancelled: bool = False  # set from the loop; read by the worker
    aborted: bool = False  # set from the loop; read by the worker
    n_prefills: int = 0
    adapter: str | None = None  # LoRA adapter (None = the base model)
    rng: random.Random | None = None  # this request's random stream, set by DecodeWorker.submit

    @property
    def context(self) -> list[int]:
        return self.req.input_ids + self.out_tokens


@dataclass(slots=True)
class Command:
    fn: Callable[[], Any]
    done: Callable[[Any, BaseException | None], None]


@dataclass(slots=True)
class _Shared:
    """State handed between the loop and the worker, guarded by ``DecodeWorker.cv``."""

    incoming: deque[Seq] = field(default_factory=deque)
    commands: deque[Command] = field(default_factory=deque)
    pause_acks: list[Callable[[], None]] = field(default_factory=list)
    paused: bool = False
    stopping: bool = False
    poked: bool = False  # a cancel/abort was flagged


class DecodeWorker:
    """Owns the model in one thread; see the module docstring."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        limits: WorkerLimits,
        loop: asyncio.AbstractEventLoop,
        version: Callable[[], int],
    ) -> None:
        self.model = model
        self.adapters: AdapterSet | None = None  # set by the engine; the worker only reads it
        self.tokenizer = tokenizer
        self.limits = limits
        self.loop = loop
        self._version = version
        self.device = next(model.parameters()).device
        self.cv = threading.Condition()
        self.shared = _Shared()
        self.cache = SlotKVCache(
            n_layers=model.config.num_hidden_layers, max_batch=limits.max_batch_size,
            max_seq_len=limits.max_seq_len, block_tokens=limits.cache_block_tokens,
            device=self.device, dtype=next(model.parameters()).dtype,
        )
        self._streams: Counter[bytes] = Counter()  # context key -> requests seeded with it so far
        self._streams_at = (-1, 0)  # (weight version, times the counts started over) they count under
        self._additive = None if model.config._attn_implementation == "sdpa" else next(model.parameters()).dtype
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []  # row i of the KV cache holds running[i]
        self.batch_sizes: Counter[int] = Counter()  # decode steps per batch size
        self.n_joined_running = 0  # sequences admitted while others were decoding
        self.n_prefill_calls = 0
        self.n_prefill_shared = 0  # sequences whose prefill was a copy of an identical context's
        self.n_prefill_common = 0  # prompt tokens not recomputed: a beginning common to a prefill's contexts
        self.n_tokens = 0
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="agentflow-local-engine", daemon=True)

    # ------------------------------------------------------------------ called from the loop
    def start(self) -> None:
        self.thread.start()

    def submit(self, seq: Seq) -> None:
        seq.rng = self._stream(seq)  # the loop's own state: no need to hold the worker's lock
        with self.cv:
            self._check_alive()
            self.shared.incoming.append(seq)
            self.cv.notify()

    def command(self, cmd: Command) -> None:
        with self.cv:
            self._check_alive()
            self.shared.commands.append(cmd)
            self.cv.notify()

    def flag(self) -> None:
        """Wake the worker after setting ``cancelled``/``aborted`` on a sequence."""
        with self.cv:
            self.shared.poked = True
            self.cv.notify()

    def pause(self, ack: Callable[[], None]) -> None:
        """Stop between steps; ``ack`` runs (on the loop) once no forward is running."""
        with self.cv:
            self.shared.paused = True
            self.shared.pause_acks.append(ack)
            self.cv.notify()

    def resume(self) -> None:
        with self.cv:
            self.shared.paused = False
            self.cv.notify()

    def stop(self) -> None:
        with self.cv:
            self.shared.stopping = True
            self.cv.notify()

    def _stream(self, seq: Seq) -> random.Random:
        """The request's random stream (module docstring): one per (seed, version, adapter, prompt,
        occurrence). The counts start over at a new version, and after ``_MAX_STREAM_KEYS``
        distinct contexts under one version (then a generation number keeps the streams new).
        Called on the event loop only (``submit``)."""
        version, generation = self._version(), self._streams_at[1]
        if version != self._streams_at[0] or len(self._streams) >= _MAX_STREAM_KEYS:
            generation = 0 if version != self._streams_at[0] else generation + 1
            self._streams.clear()
            self._streams_at = (version, generation)
        key = hashlib.blake2b(repr(seq.adapter).encode() + array("q", seq.req.input_ids).tobytes(),
                              digest_size=16).digest()
        nth = self._streams[key]
        self._streams[key] = nth + 1
        # str seeds go through SHA-512: the same stream in every process and Python version
        return random.Random(f"{self.limits.seed}/{version}/{generation}/{nth}/{key.hex()}")

    def _check_alive(self) -> None:
        if self.shared.stopping or self.failure is not None:
            raise EngineError(
                f"LocalEngine worker is not running (failure: {self.failure!r}); expected an engine "
                "inside `async with`; start a new engine"
            )

    # ------------------------------------------------------------------ the thread
    def _main(self) -> None:
        try:
            # Everything the worker allocates (KV cache included) is an inference tensor.
            with torch.inference_mode():
                while self._round():
                    pass
        except BaseException as e:
            self.failure = e
            log.exception("LocalEngine worker failed")
        finally:
            self._fail_everything()

    def _round(self) -> bool:
        commands, paused = self._wait_for_work()
        if commands is None:
            return False
        for cmd in commands:
            self._run_command(cmd)
        self._drop_finished_by_caller()
        if paused:
            return True
        self._admit()
        if self.running:
            self._decode_step()
        return True

    def _wait_for_work(self) -> tuple[list[Command] | None, bool]:
        """Block until there is work; return (commands, paused), commands None = stop."""
        s = self.shared
        with self.cv:
            while True:
                if s.stopping:
                    return None, True
                if s.paused and s.pause_acks:
                    for ack in s.pause_acks:
                        self.loop.call_soon_threadsafe(ack)
                    s.pause_acks.clear()
                has_seqs = bool(s.incoming or self.waiting or self.running)
                if s.commands or s.poked or (has_seqs and not s.paused):
                    break
                self.cv.wait()
            self.waiting.extend(s.incoming)
            s.incoming.clear()
            s.poked = False
            commands = list(s.commands)
            s.commands.clear()
            return commands, s.paused

    def _run_command(self, cmd: Command) -> None:
        try:
            result, err = cmd.fn(), None
        except Exception as e:
            result, err = None, e
        self.loop.call_soon_threadsafe(cmd.done, result, err)

    # ------------------------------------------------------------------ scheduling
    def _drop_finished_by_caller(self) -> None:
        for seq in [s for s in self.waiting if s.cancelled or s.aborted]:
            self.waiting.remove(seq)
            self._finish_unscheduled(seq)
        for i in reversed(range(len(self.running))):
            seq = self.running[i]
            if seq.cancelled or seq.aborted:
                self._remove_row(i)
                self._finish_unscheduled(seq)

    def _finish_unscheduled(self, seq: Seq) -> None:
        if seq.aborted and not seq.cancelled:
            self._deliver(seq, "abort")

    def _admit(self) -> None:
        """Prefill as many waiting sequences as fit into free rows and the prefill budget.

        Sequences with the same context and adapter (the samples of one prompt, submitted together)
        are prefilled once; the others get a copy of its KV rows and its last logits, so they cost
        neither prefill compute nor prefill budget. A beginning that all the distinct contexts share
        (a system prompt, worked examples; at least ``_COMMON_PREFILL_MIN`` tokens, one adapter) is
        prefilled once too and its KV rows copied; each context then prefills only its own rest.
        """
        batch: list[Seq] = []
        contexts: set[tuple[Any, ...]] = set()
        longest = 0
        free = self.limits.max_batch_size - len(self.running)
        while self.waiting and len(batch) < free:
            key, n = _prefill_key(self.waiting[0]), len(self.waiting[0].context)
            new = key not in contexts
            if new and contexts and (len(contexts) + 1) * max(longest, n) > self.limits.max_prefill_tokens:
                break
            batch.append(self.waiting.popleft())
            contexts.add(key)
            longest = max(longest, n)
        if not batch:
            return
        if self.running:
            self.n_joined_running += len(batch)
        self._prefill(batch, longest)

    def _prefill(self, batch: list[Seq], longest: int) -> None:
        start, version = len(self.running), self._version()
        firsts: dict[tuple[Any, ...], int] = {}
        uniques: list[Seq] = []
        copies: list[tuple[Seq, int]] = []  # (sequence, index of the unique sequence it copies)
        for seq in batch:
            k = firsts.setdefault(_prefill_key(seq), len(uniques))
            if k == len(uniques):
                uniques.append(seq)
            else:
                copies.append((seq, k))
        ordered = uniques + [seq for seq, _ in copies]
        self.running.extend(ordered)  # before the forward, so a failure there still fails them
        self.cache.reserve(longest)
        common = _common_beginning(uniques)
        if common:  # computed once, in the first context's row, and copied to the others'
            self.cache.set_prefill(start, 1)
            self._forward(uniques[:1], input_ids=torch.tensor([uniques[0].context[:common]], device=self.device),
                          position_ids=torch.arange(common, device=self.device)[None], cache=self.cache,
                          attention_mask=causal_prefill_mask(common, self.device, additive_dtype=self._additive),
                          use_cache=True, logits_to_keep=1)
            for i in range(1, len(uniques)):
                self.cache.move_row(start, start + i, common)
            self.n_prefill_common += common * (len(uniques) - 1)
        width = longest - common
        ids = torch.zeros(len(uniques), width, dtype=torch.long)
        for i, seq in enumerate(uniques):
            rest = seq.context[common:]
            ids[i, : len(rest)] = torch.tensor(rest)
        last = torch.tensor([[len(s.context) - 1 - common] for s in uniques], device=self.device)
        ids = ids.to(self.device)
        self.cache.set_prefill(start, len(uniques), offset=common)
        mask = causal_prefill_mask(width, self.device, additive_dtype=self._additive, past=common)
        positions = torch.arange(common, longest, device=self.device)[None].expand(len(uniques), -1)
        out = self._forward(uniques, input_ids=ids, position_ids=positions, attention_mask=mask, cache=self.cache,
                            use_cache=True, logits_to_keep=last)
        logits = out.logits[:, -1]
        if copies:
            src = [k for _, k in copies]
            for j, (seq, k) in enumerate(copies):
                self.cache.move_row(start + k, start + len(uniques) + j, len(seq.context))
            logits = torch.cat([logits, logits[src]])
            self.n_prefill_shared += len(copies)
        for seq in ordered:
            seq.kv_len = len(seq.context)
            seq.n_prefills += 1
        self.n_prefill_calls += 1
        self._take_tokens(ordered, logits, version, first_row=start)

    def _decode_step(self) -> None:
        version = self._version()
        rows = self.running
        last = torch.tensor([[s.out_tokens[-1]] for s in rows], device=self.device)
        positions = torch.tensor([s.kv_len for s in rows], device=self.device)
        kv_len = max(s.kv_len for s in rows) + 1
        self.cache.reserve(kv_len)
        self.cache.set_decode(positions, kv_len)
        mask = decode_mask(positions, kv_len, additive_dtype=self._additive)
        out = self._forward(rows, input_ids=last, position_ids=positions[:, None], attention_mask=mask,
                            cache=self.cache, use_cache=True, logits_to_keep=1)
        for seq in rows:
            seq.kv_len += 1
        self.batch_sizes[len(rows)] += 1
        self._take_tokens(list(rows), out.logits[:, -1], version, first_row=0)

    def _forward(self, rows: list[Seq], **kwargs: Any) -> Any:
        """The model on ``rows`` (one per batch row); with LoRA adapters loaded, through PEFT with
        each row's adapter."""
        names = self.adapters.forward_names(s.adapter for s in rows) if self.adapters is not None else None
        if names is None:
            return self.model(**kwargs)
        assert self.adapters is not None
        return self.adapters.peft(**kwargs, adapter_names=names)

    def _take_tokens(self, seqs: list[Seq], logits: torch.Tensor, version: int, first_row: int) -> None:
        """Sample one token per sequence, append it, retire finished rows."""
        draws = [s.rng.random() for s in seqs]  # type: ignore[union-attr]  # set by submit
        tokens, logprobs = sample(logits, [s.params for s in seqs], draws)
        now = time.perf_counter()
        done: list[tuple[int, StopReason]] = []
        for i, (seq, tok, lp) in enumerate(zip(seqs, tokens.tolist(), logprobs.tolist(), strict=True)):
            seq.out_tokens.append(tok)
            seq.out_logprobs.append(lp)
            seq.out_versions.append(version)
            if seq.t_first is None:
                seq.t_first = now
            reason = self._stop_reason(seq)
            if reason is not None:
                done.append((first_row + i, reason))
        self.n_tokens += len(seqs)
        for row, reason in sorted(done, reverse=True):
            seq = self.running[row]
            self._remove_row(row)
            self._deliver(seq, reason)

    def _stop_reason(self, seq: Seq) -> StopReason | None:
        if seq.out_tokens[-1] in seq.stop_ids or self._matches_stop_string(seq):
            return "stop"
        if len(seq.out_tokens) >= seq.max_new or seq.kv_len + 1 >= self.limits.max_seq_len:
            return "length"
        return None

    def _matches_stop_string(self, seq: Seq) -> bool:
        stops = seq.req.gconfig.stop
        if not stops or self.tokenizer is None:
            return False
        window = max(map(len, stops)) + _STOP_WINDOW_TOKENS
        text = self.tokenizer.decode(seq.out_tokens[-window:], skip_special_tokens=False)
        return any(s in text for s in stops)

    def _remove_row(self, row: int) -> None:
        """Drop running row ``row``; the last row moves into its KV slot (rows stay packed)."""
        last = len(self.running) - 1
        if row != last:
            moved = self.running[last]
            self.cache.move_row(last, row, moved.kv_len)
            self.running[row] = moved
        self.running.pop()

    # ------------------------------------------------------------------ weight updates
    def requeue_running(self, which: Callable[[Seq], bool] | None = None) -> None:
        """(Worker thread, between steps.) Send running rows (those ``which`` selects; all by
        default) back for a fresh prefill, ahead of the waiting ones, in their order."""
        if which is None:
            back, self.running = self.running, []
        else:
            back = [s for s in self.running if which(s)]
            for i in reversed(range(len(self.running))):
                if which(self.running[i]):
                    self._remove_row(i)
        for seq in back:
            seq.kv_len = 0
        self.waiting.extendleft(reversed(back))

    def count_using(self, adapter: str) -> int:
        """(Worker thread.) Sequences queued or running on ``adapter``."""
        with self.cv:
            incoming = list(self.shared.incoming)
        return sum(s.adapter == adapter for s in [*incoming, *self.waiting, *self.running])

    # ------------------------------------------------------------------ results
    def _deliver(self, seq: Seq, reason: StopReason) -> None:
        now = time.perf_counter()
        resp = ModelResponse(
            input_tokens=list(seq.req.input_ids),
            output_tokens=seq.out_tokens,
            output_logprobs=seq.out_logprobs,
            output_versions=seq.out_versions,
            stop_reason=reason,
            latency=now - seq.t_submit,
            ttft=(seq.t_first if seq.t_first is not None else now) - seq.t_submit,
        )
        self.loop.call_soon_threadsafe(_set_result, seq.fut, resp)

    def _fail_everything(self) -> None:
        with self.cv:
            self.shared.stopping = True
            seqs = [*self.shared.incoming, *self.waiting, *self.running]
            commands = list(self.shared.commands)
            acks = list(self.shared.pause_acks)
            self.shared.incoming.clear()
            self.shared.commands.clear()
            self.shared.pause_acks.clear()
        self.waiting.clear()
        self.running.clear()
        why = "its worker failed" if self.failure is not None else "it was shut down"
        for seq in seqs:
            err = EngineError(
                f"LocalEngine request {seq.req.rid!r} did not finish: {why} while it was in flight "
                f"({len(seq.out_tokens)} tokens generated); expected the engine to outlive its requests"
            )
            err.__cause__ = self.failure
            _post(self.loop, _set_exception, seq.fut, err)
        for cmd in commands:
            _post(self.loop, cmd.done, None, EngineError(f"LocalEngine command dropped: {why}"))
        for ack in acks:
            _post(self.loop, ack)


def _common_beginning(uniques: list[Seq]) -> int:
    """Leading tokens every context of a prefill has in common (a system prompt, worked examples),
    prefilled once when there are at least ``_COMMON_PREFILL_MIN`` of them; every context keeps one
    token of its own (its last logits). 0 when the contexts differ in adapter or there is only one."""
    if len(uniques) < 2 or len({s.adapter for s in uniques}) > 1:
        return 0
    first = uniques[0].context
    n = min(len(s.context) for s in uniques) - 1
    for seq in uniques[1:]:
        ctx = seq.context
        n = next((i for i in range(n) if ctx[i] != first[i]), n)
        if n < _COMMON_PREFILL_MIN:
            return 0
    return n


def _prefill_key(seq: Seq) -> tuple[Any, ...]:
    """Sequences with equal keys share one prefill: same context under the same adapter."""
    return (*seq.context, seq.adapter)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # loop already closed: nobody is waiting any more
        pass


def _set_result(fut: asyncio.Future[ModelResponse], resp: ModelResponse) -> None:
    if not fut.done():
        fut.set_result(resp)


def _set_exception(fut: asyncio.Future[ModelResponse], err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)
