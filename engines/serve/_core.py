"""The core of ``agentflow serve``: :class:`SGLangServer` runs SGLang-protocol requests on an
agentflow ``InferenceEngine`` (generation, aborts, pause gates, weight versions, the context
check) and :class:`ServerConfig` holds its settings. The routes (``_routes.py``) and the app and
CLI (``server.py``) are built on it. Not here: HTTP, JSON parsing and the request guards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agentflow import GenerationConfig, InferenceEngine, ModelRequest, ModelResponse, WeightUpdateMeta
from agentflow.engines.serve._lora import LoraServing, request_metadata
from agentflow.engines.serve._protocol import GenerateItem, abort_finish, build_meta_info

__all__ = ["SGLangServer", "ServerConfig"]

log = logging.getLogger("agentflow.serve")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Settings of ``agentflow serve``.

    Attributes:
        chunk_tokens: tokens per engine call for streaming requests and for engines without
            ``abort(rid)`` (the granularity of their aborts and stream chunks).
        health_timeout_s: how long ``/health`` waits (paused server, 1-token generation) before 503;
            SGLang's ``SGLANG_HEALTH_CHECK_TIMEOUT`` is 20 s.
        dist_timeout_s: deadline of forming a weight-update group and of one distributed update.
        weight_version: the initial weight version string (SGLang's ``--weight-version``).
        context_length: prompt + max_new_tokens limit; None = not checked.
        host, port: reported by ``/get_server_info``.
        enable_lora: answer ``/load_lora_adapter`` and ``/unload_lora_adapter`` (SGLang's ``--enable-lora``).
        lora_paths: (name, path) of adapters loaded at start.
        lora_dirs: the directories ``/load_lora_adapter`` may load adapters from (``--lora-dir``);
            a path outside them is refused, and so is every runtime load when there are none.
    """

    chunk_tokens: int = 16
    health_timeout_s: float = 20.0
    dist_timeout_s: float = 600.0
    weight_version: str = "default"
    context_length: int | None = None
    host: str = "127.0.0.1"
    port: int = 30000
    enable_lora: bool = False
    lora_paths: tuple[tuple[str, str], ...] = ()
    lora_dirs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")


class _Gate:
    """Admission of generations: closed while paused; a weight update (writer) waits for running
    generations (readers) to finish unless the server is paused, and blocks new ones meanwhile."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self.paused = False
        self.readers = 0
        self.writers = 0

    async def enter(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self.paused and self.writers == 0)
            self.readers += 1

    async def leave(self) -> None:
        async with self._cond:
            self.readers -= 1
            self._cond.notify_all()

    async def wait_unpaused(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self.paused)

    async def wait_idle(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.readers == 0)

    async def set_paused(self, paused: bool) -> None:
        async with self._cond:
            self.paused = paused
            self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def writer(self) -> AsyncIterator[None]:
        async with self._cond:
            self.writers += 1
            try:
                if not self.paused:  # SGLang: updates while paused skip the writer lock
                    await self._cond.wait_for(lambda: self.readers == 0 or self.paused)
            except BaseException:
                self.writers -= 1
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            async with self._cond:
                self.writers -= 1
                self._cond.notify_all()


@dataclass(slots=True)
class _Run:
    """A running generation: its output so far and its abort signal."""

    item: GenerateItem
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    finish: dict[str, Any] | None = None
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    t0: float = field(default_factory=time.perf_counter)
    stream: bool = False


async def _race(aw: Awaitable[T], stop: asyncio.Event) -> T | None:
    """Await ``aw`` unless ``stop`` is set first (then cancel it and return None)."""
    if stop.is_set():
        if asyncio.iscoroutine(aw):
            aw.close()
        return None
    async with asyncio.TaskGroup() as tg:
        work = tg.create_task(_as_coro(aw))
        stopper = tg.create_task(stop.wait())
        await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            stopper.cancel()
        else:
            work.cancel()
    return None if work.cancelled() else work.result()


async def _as_coro(aw: Awaitable[T]) -> T:
    return await aw


class SGLangServer:
    """The protocol's state machine over one engine (routes live in :func:`build_app`)."""

    def __init__(self, engine: InferenceEngine, tokenizer: Any, model_path: str, config: ServerConfig) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.config = config
        self.gate = _Gate()
        self.running: dict[str, _Run] = {}
        self.weight_version = config.weight_version
        self._names: dict[int, str] = {}
        self._engine_paused = False
        self._pause_mode = "abort"
        self.groups: dict[str, Any] = {}
        self.shutting_down = False
        self.eos_ids = _eos_ids(tokenizer)
        self._abortable = callable(getattr(engine, "abort", None))  # whole requests, aborted in the engine
        self.lora = LoraServing(engine, config.enable_lora or bool(config.lora_paths), config.lora_dirs)

    # ------------------------------------------------------------------ versions
    def version_name(self, v: int) -> str:
        return self._names.get(v, self.weight_version if v == self.engine.get_version() else str(v))

    def set_weight_version(self, name: str) -> None:
        """Name the next policy version; tokens generated from now on carry it."""
        try:
            v = int(name)
        except ValueError:
            v = self.engine.get_version() + 1
        self._names.setdefault(self.engine.get_version(), self.weight_version)
        self.engine.set_version(v)
        self._names[v] = name
        self.weight_version = name

    # ------------------------------------------------------------------ generation
    def check_context(self, item: GenerateItem) -> None:
        ctx, p = self.config.context_length, len(item.input_ids)
        if ctx is None:
            return
        if p >= ctx:
            raise ValueError(f"The input ({p} tokens) is longer than the model's context length ({ctx} tokens).")
        total = p + item.sampling.max_new_tokens
        if total > ctx:
            raise ValueError(
                f"Requested token count exceeds the model's maximum context length of {ctx} tokens. You "
                f"requested a total of {total} tokens: {p} tokens from the input messages and "
                f"{item.sampling.max_new_tokens} tokens for the completion. Please reduce the number of "
                "tokens in the input messages or the completion to fit within the limit."
            )

    def register(self, items: Sequence[GenerateItem], stream: bool = False) -> list[_Run]:
        """Synchronously (no await) check and register the rids of one call."""
        seen: set[str] = set()
        self.lora.check(items)
        for it in items:
            if it.rid in self.running or it.rid in seen:
                raise ValueError(f"Duplicate request ID detected: {it.rid}")
            seen.add(it.rid)
        runs = [_Run(it, stream=stream) for it in items]
        for r in runs:
            self.running[r.item.rid] = r
        self.lora.acquire(items)
        return runs

    def unregister(self, runs: Sequence[_Run]) -> None:
        for r in runs:
            if self.running.get(r.item.rid) is r:
                del self.running[r.item.rid]
                self.lora.release([r.item])

    async def generate(self, run: _Run) -> AsyncIterator[_Run]:
        """Generate ``run``; yield it after every unfinished chunk (chunked mode), then once finished."""
        spec = run.item.sampling
        stops = tuple(dict.fromkeys((*spec.stop_token_ids, *self.eos_ids)))
        if self._abortable and not run.stream:
            await self._generate_whole(run, stops)
            yield run
            return
        while run.finish is None:
            left = spec.max_new_tokens - len(run.out)
            if left <= 0:
                run.finish = {"type": "length", "length": spec.max_new_tokens}
                break
            if self.gate.paused:  # retract / in_place: hold between chunks until continue (or abort)
                await _race(self.gate.wait_unpaused(), run.abort)
            if run.abort.is_set():
                run.finish = abort_finish()
                break
            gconfig = GenerationConfig(
                max_new_tokens=min(self.config.chunk_tokens, left), temperature=spec.temperature,
                top_p=spec.top_p, top_k=spec.top_k, stop_token_ids=stops, stop=spec.stop,
            )
            req = ModelRequest(run.item.input_ids + run.out, gconfig, rid=f"{run.item.rid}.{len(run.out)}",
                               metadata=request_metadata(run.item))
            resp = await _race(self.engine.agenerate(req), run.abort)
            if resp is None:
                run.finish = abort_finish()
                break
            run.finish = self._append(run, resp, set(stops))
            if run.finish is None:
                yield run
        yield run

    async def _generate_whole(self, run: _Run, stops: tuple[int, ...]) -> None:
        """One engine call for the whole request; an abort signal aborts it in the engine, which
        answers with the tokens generated so far."""
        spec = run.item.sampling
        if spec.max_new_tokens <= 0:
            run.finish = {"type": "length", "length": spec.max_new_tokens}
            return
        if run.abort.is_set():
            run.finish = abort_finish()
            return
        gconfig = GenerationConfig(
            max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
            stop_token_ids=stops, stop=spec.stop,
        )
        req = ModelRequest(list(run.item.input_ids), gconfig, rid=f"{run.item.rid}.0",
                           metadata=request_metadata(run.item))
        work = asyncio.ensure_future(self.engine.agenerate(req))
        stopper = asyncio.ensure_future(run.abort.wait())
        try:
            await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                self.engine.abort(req.rid)  # type: ignore[attr-defined]  # checked in __init__
            resp = await work
        finally:
            stopper.cancel()
            work.cancel()  # no-op when done; on cancellation of this call, the engine drops the request
        run.finish = self._append(run, resp, set(stops))
        if run.finish is None:
            if resp.stop_reason == "abort" or run.abort.is_set():
                run.finish = abort_finish()
            else:  # the engine's own limit (its max_seq_len) came first
                run.finish = {"type": "length", "length": len(run.out)}

    def _append(self, run: _Run, resp: ModelResponse, stops: set[int]) -> dict[str, Any] | None:
        """Add a chunk's tokens; return the finish reason if the request is done."""
        spec, start = run.item.sampling, len(run.out)
        for k, (tok, lp, v) in enumerate(zip(resp.output_tokens, resp.output_logprobs, resp.output_versions,
                                             strict=True)):
            run.out.append(tok)
            run.logprobs.append(lp)
            run.versions.append(self.version_name(v))
            matched = self._stop_string_at(run.out, spec.stop)
            if matched is not None:
                return {"type": "stop", "matched": matched}
            if tok in stops:
                return {"type": "stop", "matched": tok}
            if len(run.out) >= spec.max_new_tokens:
                return {"type": "length", "length": spec.max_new_tokens}
            if k == len(resp.output_tokens) - 1 and resp.stop_reason == "stop" and len(run.out) > start:
                return {"type": "stop", "matched": tok}  # the engine stopped on its own criterion
        return None

    def _stop_string_at(self, out: list[int], stop: tuple[str, ...]) -> str | None:
        if not stop or self.tokenizer is None:
            return None
        window = max(len(s) for s in stop) + 8
        tail = self.tokenizer.decode(out[-window:], skip_special_tokens=False)
        before = self.tokenizer.decode(out[-window:-1], skip_special_tokens=False) if len(out) > 1 else ""
        for s in stop:  # a stop string that appeared only with the newest token
            if s in tail and s not in before:
                return s
        return None

    # ------------------------------------------------------------------ response bodies
    def body(self, run: _Run, *, final: bool) -> dict[str, Any]:
        item, spec = run.item, run.item.sampling
        finish = run.finish if final else None
        ids_for_text = run.out
        if finish and finish["type"] == "stop" and isinstance(finish["matched"], int) and not spec.no_stop_trim:
            ids_for_text = run.out[:-1]
        text = self._decode(ids_for_text, skip=spec.skip_special_tokens,
                            spaces=spec.spaces_between_special_tokens)
        if finish and finish["type"] == "stop" and isinstance(finish["matched"], str) and not spec.no_stop_trim:
            pos = text.find(finish["matched"])
            text = text[:pos] if pos >= 0 else text
        texts = None
        if item.return_logprob and item.return_text_in_logprobs and self.tokenizer is not None:
            texts = [self.tokenizer.decode([t]) for t in run.out]
        meta = build_meta_info(
            rid=item.rid, finish_reason=finish, prompt_tokens=len(item.input_ids), output_ids=list(run.out),
            logprobs=list(run.logprobs) if item.return_logprob else None, token_texts=texts,
            versions=list(run.versions), weight_version=self.weight_version,
            e2e_latency=time.perf_counter() - run.t0 if final else None, sent_ts=time.time(),
        )
        return {"text": text, "output_ids": list(run.out), "meta_info": meta}

    def _decode(self, ids: list[int], *, skip: bool, spaces: bool) -> str:
        if self.tokenizer is None:
            return ""
        try:
            return str(self.tokenizer.decode(ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces))
        except TypeError:  # tokenizers without that keyword
            return str(self.tokenizer.decode(ids, skip_special_tokens=skip))

    # ------------------------------------------------------------------ control
    def abort(self, rid: str = "", *, abort_all: bool = False) -> int:
        """SGLang's matching: an exact in-flight rid, then every rid that starts with it."""
        if not abort_all and rid not in self.running:
            return 0
        hit = [r for r in self.running.values() if abort_all or r.item.rid.startswith(rid)]
        for r in hit:
            r.abort.set()
        return len(hit)

    async def pause(self, mode: str) -> None:
        self._pause_mode = mode
        await self.gate.set_paused(True)
        if mode == "abort":
            self.abort(abort_all=True)
            await self.gate.wait_idle()
        elif not self._engine_paused:
            self._engine_paused = True
            await self.engine.pause()

    async def resume(self) -> None:
        if self._engine_paused:
            self._engine_paused = False
            await self.engine.resume()
        await self.gate.set_paused(False)

    async def healthy(self) -> bool:
        try:
            async with asyncio.timeout(self.config.health_timeout_s):
                await self.gate.enter()
                try:
                    req = ModelRequest([0], GenerationConfig(max_new_tokens=1), rid=f"HEALTH_CHECK_{uuid.uuid4().hex}")
                    await self.engine.agenerate(req)
                finally:
                    await self.gate.leave()
        except Exception as e:  # any failure of the 1-token generation = unhealthy
            log.warning("health check failed: %r", e)
            return False
        return not self.shutting_down

    async def after_weight_update(self) -> None:
        """Requests paused with ``retract`` go on from a fresh prefill under the new weights (on an
        engine with ``recompute_running``); those paused ``in_place`` keep their KV."""
        recompute = getattr(self.engine, "recompute_running", None)
        if self._engine_paused and self._pause_mode == "retract" and recompute is not None:
            await recompute()

    async def update_weights(self, meta: WeightUpdateMeta, version: str | None) -> None:
        async with self.gate.writer():
            await self.engine.aupdate_weights(meta)
            await self.after_weight_update()
            if version is not None:
                self.set_weight_version(version)


def _eos_ids(tokenizer: Any) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)
