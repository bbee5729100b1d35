"""In-process transformers inference: :class:`LocalEngine`, for laptops, CI and single-GPU runs.

``LocalEngine(model_or_path, tokenizer)`` runs a Hugging Face causal LM in one worker thread with
continuous batching: requests that arrive while others decode are prefilled and join the running
batch between two decode steps, and leave the step they finish (``_worker.py``). The event
loop never runs a forward; the worker hands results back with ``loop.call_soon_threadsafe``.

Why our own scheduler and not transformers' continuous batching (``init_continuous_batching``,
measured with transformers 5.24, ``docs/inference.md``): it has no stop strings, one global
``do_sample`` (greedy and sampled
requests cannot share a batch), per-request sampling only for parameters given a non-default value
up front, no terminal output on cancel, and versions could only be attached to tokens racily
(its thread streams results while we update weights). On CPU it was measured no faster than padded
``generate`` at 64 requests and costs ~0.5 s per stop. Our scheduler is a padded KV cache with one
row per sequence and per-row positions and masks (``_kv.py``), passed to the model as its
cache, so any HF decoder whose attention calls ``cache.update`` works unchanged; throughput figures
against ``generate`` are in docs/inference.md (benchmarks/bench_inference.py).

Semantics (the contract of :class:`~agentflow.InferenceEngine`, plus):

- log-probs: of the distribution the token was drawn from (after temperature, top-k, top-p); for
  greedy requests of the raw distribution (see ``_sampling.py``). fp32.
- ``output_versions[i]``: the engine version when token ``i`` was produced (read by the worker
  before each forward; never -1).
- stops: the tokenizer's and the model's eos ids always stop, plus ``stop_token_ids``; the stop
  token is the last output token. Stop strings (``GenerationConfig.stop``, needs a tokenizer) stop
  after the token that completes the match; that token is the last output token and callers that
  show text cut the text at the match (as SGLang does). ``stop_reason`` is ``"stop"``,
  ``"length"`` (``max_new_tokens`` or ``max_seq_len`` reached) or ``"abort"`` (:meth:`abort`).
- ``n_samples`` of the request is ignored: one call, one sample (workflows call ``agenerate`` per
  sample, as in AReaL).
- pause: ``await engine.pause()`` returns once no forward is running; in-flight ``agenerate`` calls
  wait and continue after ``resume()``. Weight updates (``"mem"``: a full HF-named state dict;
  ``"disk"``: an HF checkpoint directory of safetensors) are copied into the live parameters between
  steps; with ``recompute_kv_on_update`` (default) the running sequences are prefilled again under
  the new weights (re-issue semantics), so every token after an update comes from the new policy.

- LoRA (``local/_lora.py``): adapters are loaded beside the base weights (a weight update with
  ``meta.adapter`` set, or :meth:`LocalEngine.load_adapter`), several at once; a request picks
  one with ``ModelRequest.metadata["lora"]`` (None = the base model; no key = the default
  adapter, the first one loaded) and one batch mixes adapters. A new version of an adapter is
  copied into its tensors between steps, like a full update, and only the sequences on that
  adapter are prefilled again. The first adapter wraps the engine's model with PEFT in place.

Not here: tensor parallelism, paged attention, prefix caching, CUDA graphs, the HTTP server
(``engines/server.py``), ``"nccl"`` weight updates (the remote engine's job).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from agentflow import InferenceEngine, ModelRequest, ModelResponse, RolloutConfig, WeightUpdateMeta
from agentflow.errors import CheckpointError, ConfigError, EngineError, PromptTooLong

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from agentflow.engines.local._lora import AdapterSet
    from agentflow.engines.local._worker import DecodeWorker, Seq

__all__ = ["LocalEngine", "LocalEngineConfig"]


@dataclass(frozen=True, slots=True)
class LocalEngineConfig:
    """Settings of a :class:`LocalEngine`.

    Attributes:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: ``"float32"`` or ``"bfloat16"`` (the model is cast to it).
        max_batch_size: sequences decoding at once (rows of the KV cache).
        max_seq_len: prompt + output tokens of one request; longer prompts are refused and outputs
            stop with ``"length"`` there. The KV cache holds at most ``max_batch_size ·
            max_seq_len`` token positions (``2 · layers · kv_heads · head_dim`` values each),
            allocated as needed in blocks of ``cache_block_tokens`` positions per row.
        cache_block_tokens: growth step of the KV cache along the sequence axis.
        max_prefill_tokens: padded prompt tokens prefilled in one forward (a longer single prompt
            is still prefilled, alone).
        recompute_kv_on_update: after a weight update, prefill running sequences again under the
            new weights (True) or keep their old-weight KV cache (False, SGLang's in-place mode).
        seed: sampling seed. Each request draws from a stream of its own, derived from this seed,
            the weight version and its prompt (the samples of a group apart by their order), so
            what it draws does not depend on which requests share its batch.
        ignore_eos: do not stop on the eos ids (``stop_token_ids`` still stop); for benchmarks
            that need exact output lengths, like SGLang's ``ignore_eos``.
        attn_implementation: ``"sdpa"`` or ``"eager"`` (used when loading from a path).
        max_loras: LoRA adapters loaded at once (SGLang's ``--max-loras-per-batch``).
        max_lora_rank: the largest adapter rank accepted (None = any; SGLang's ``--max-lora-rank``).
        lora_target_modules: the modules adapters may target (None = any; ``--lora-target-modules``).
    """

    device: str = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_batch_size: int = 16
    max_seq_len: int = 2048
    cache_block_tokens: int = 256
    max_prefill_tokens: int = 4096
    recompute_kv_on_update: bool = True
    seed: int = 0
    ignore_eos: bool = False
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    max_loras: int = 8
    max_lora_rank: int | None = None
    lora_target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        ConfigError.check(self.problems())

    def problems(self) -> list[str]:
        out = []
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            out.append(f"local.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.dtype not in ("float32", "bfloat16"):
            out.append(f"local.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            out.append(f"local.attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")
        for name in ("max_batch_size", "max_seq_len", "cache_block_tokens", "max_prefill_tokens", "max_loras",
                     *(["max_lora_rank"] if self.max_lora_rank is not None else [])):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                out.append(f"local.{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.seed, int):
            out.append(f"local.seed must be an integer, got {self.seed!r}")
        return out


class LocalEngine(InferenceEngine):
    """Continuous-batching transformers inference in one worker thread (see the module docstring).

    Args:
        model_or_path: a loaded ``PreTrainedModel``, an HF model directory, or an embedded model
            name (``"smollm2-135m"``); paths and names are loaded in :meth:`initialize`.
        tokenizer: needed for stop strings and to add its eos id to the stop set; loaded with the
            model when ``model_or_path`` is a path or name.
        rollout: configuration of the owned workflow executor.
        config: engine settings.

    Use as ``async with LocalEngine(...) as engine:``; the worker thread lives inside the block.
    """

    def __init__(
        self,
        model_or_path: PreTrainedModel | str | os.PathLike[str],
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        rollout: RolloutConfig | None = None,
        config: LocalEngineConfig | None = None,
    ) -> None:
        super().__init__(rollout)
        self.config = config or LocalEngineConfig()
        self._source = model_or_path
        self.model: PreTrainedModel | None = None if isinstance(model_or_path, str | os.PathLike) else model_or_path
        self.tokenizer = tokenizer
        self._worker: DecodeWorker | None = None
        self._eos_ids: frozenset[int] = frozenset()
        self._gen_version = 0  # the version the worker stamps on tokens
        self._inflight: set[Seq] = set()  # on the loop: requests awaiting their result
        self._adapters: AdapterSet | None = None  # LoRA adapters, made in initialize

    # ------------------------------------------------------------------ lifetime
    async def initialize(self) -> None:
        from agentflow.engines.local._worker import DecodeWorker, WorkerLimits

        if self._worker is not None:
            raise EngineError("LocalEngine is already running; expected one `async with` at a time")
        if self.model is None:
            await asyncio.to_thread(self._load_source)
        assert self.model is not None
        self.model = await asyncio.to_thread(self._prepare_model, self.model)
        self._eos_ids = frozenset() if self.config.ignore_eos else _eos_ids(self.model, self.tokenizer)
        c = self.config
        limits = WorkerLimits(c.max_batch_size, c.max_seq_len, c.cache_block_tokens, c.max_prefill_tokens,
                              c.recompute_kv_on_update, c.seed)
        self._worker = DecodeWorker(self.model, self.tokenizer, limits, self.loop, lambda: self._gen_version)
        self._worker.adapters = self._adapter_set(self.model)
        self._worker.start()

    async def destroy(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        worker.stop()
        await asyncio.to_thread(worker.thread.join)
        await asyncio.sleep(0)  # let the failures the worker posted reach their futures

    def _load_source(self) -> None:
        from agentflow.engines.model_loading import load_model

        model, tok = load_model(self._source, device=self.config.device, dtype=self.config.dtype,  # type: ignore[arg-type]
                                attn_implementation=self.config.attn_implementation)
        self.model = model
        self.tokenizer = self.tokenizer or tok

    def _prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        import torch

        impl = model.config._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise ConfigError(
                f"LocalEngine needs a model with attn_implementation 'sdpa' or 'eager', got {impl!r}; "
                "call model.set_attn_implementation('sdpa') first"
            )
        return model.to(device=torch.device(self.config.device), dtype=getattr(torch, self.config.dtype)).eval()

    # ------------------------------------------------------------------ generation
    async def agenerate(self, req: ModelRequest) -> ModelResponse:
        from agentflow.engines.local._sampling import RowParams
        from agentflow.engines.local._worker import Seq

        worker = self._running_worker()
        self._check_request(req)
        adapter = self._adapter_set().resolve(req.metadata)
        fut: asyncio.Future[ModelResponse] = self.loop.create_future()
        g = req.gconfig
        seq = Seq(
            req=req, fut=fut, params=RowParams.of(g), stop_ids=self._eos_ids | frozenset(g.stop_token_ids),
            max_new=min(g.max_new_tokens, self.config.max_seq_len - len(req.input_ids)), t_submit=time.perf_counter(),
            adapter=adapter,
        )
        worker.submit(seq)
        self._inflight.add(seq)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            seq.cancelled = True
            # Nobody awaits the shielded future any more: consume its outcome so a shutdown that
            # fails it later does not log "exception was never retrieved".
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            worker.flag()
            raise
        finally:
            self._inflight.discard(seq)

    def abort(self, rid: str | None = None) -> int:
        """Finish in-flight requests (``rid`` or all) now with ``stop_reason="abort"`` and the
        tokens generated so far. Returns how many were flagged."""
        worker = self._running_worker()
        hits = [s for s in self._inflight if rid is None or s.req.rid == rid]
        for s in hits:
            s.aborted = True
        worker.flag()
        return len(hits)

    def _check_request(self, req: ModelRequest) -> None:
        n, cap = len(req.input_ids), self.config.max_seq_len
        if n >= cap:
            raise PromptTooLong(
                f"prompt of request {req.rid!r} has {n} tokens; expected fewer than max_seq_len={cap} "
                "(raise LocalEngineConfig.max_seq_len or shorten the prompt)"
            )
        if req.gconfig.stop and self.tokenizer is None:
            raise EngineError(
                f"request {req.rid!r} has stop strings {req.gconfig.stop!r} but the engine has no tokenizer; "
                "pass tokenizer= to LocalEngine"
            )
        vocab = self.model.config.vocab_size if self.model is not None else None
        if vocab is not None and (min(req.input_ids) < 0 or max(req.input_ids) >= vocab):
            raise EngineError(
                f"request {req.rid!r} has token ids outside [0, {vocab}); got min {min(req.input_ids)}, "
                f"max {max(req.input_ids)}; tokenize with the engine's tokenizer"
            )

    def _running_worker(self) -> DecodeWorker:
        if self._worker is None:
            raise EngineError("LocalEngine is not running; use `async with LocalEngine(...) as engine:`")
        return self._worker

    # ------------------------------------------------------------------ pause / resume
    async def _interrupt(self) -> None:
        worker = self._worker
        if worker is None:
            return
        acked: asyncio.Future[None] = self.loop.create_future()
        worker.pause(lambda: acked.done() or acked.set_result(None))
        await acked

    async def _continue(self) -> None:
        if self._worker is not None:
            self._worker.resume()

    def set_version(self, version: int) -> None:
        super().set_version(version)
        self._gen_version = version

    # ------------------------------------------------------------------ weights
    async def aupdate_weights(self, meta: WeightUpdateMeta) -> None:
        """Load ``meta``'s weights into the live model between decode steps.

        ``"mem"``: ``meta.state_dict`` holds full (unsharded) tensors under HF names; ``"disk"``:
        ``meta.path`` is an HF checkpoint directory (``*.safetensors``). Every parameter must be
        covered (tied weights once). If ``meta.version`` is set, the engine takes that version.
        With ``meta.adapter`` set, only that LoRA adapter is loaded or replaced (see
        :meth:`load_adapter`); the base weights stay.
        """
        worker = self._running_worker()
        if meta.adapter is not None:
            config, tensors = await asyncio.to_thread(adapter_payload, meta)
            await self._install_adapter(meta.adapter, config, tensors, meta.version)
            return
        if meta.type == "mem":
            if meta.state_dict is None:
                raise EngineError("WeightUpdateMeta(type='mem') needs state_dict=<name -> tensor>, got None")
            state = meta.state_dict
        elif meta.type == "disk":
            from agentflow.engines._handoff import read_hf_state_dict

            assert meta.path is not None
            try:
                state = await asyncio.to_thread(read_hf_state_dict, meta.path)
            except CheckpointError as e:  # a weight update that cannot be loaded is the engine's error
                raise EngineError(str(e)) from e
        else:
            raise EngineError(
                f"LocalEngine loads weights of type 'mem' or 'disk', got {meta.type!r}; "
                "use 'mem' for an in-process engine"
            )
        await self._in_worker(lambda: self._load_weights(worker, state, meta.version))
        if meta.version is not None:
            self.set_version(meta.version)

    def _load_weights(self, worker: DecodeWorker, state: Mapping[str, torch.Tensor], version: int | None) -> None:
        """(Worker thread, between steps.) Copy ``state`` into the parameters in place."""
        assert self.model is not None
        copy_state_dict(self.model, state)
        if version is not None:
            self._gen_version = version
        if self.config.recompute_kv_on_update:
            worker.requeue_running()

    # ------------------------------------------------------------------ LoRA adapters
    async def load_adapter(self, name: str, path: str | os.PathLike[str], version: int | None = None) -> None:
        """Load (or replace) LoRA adapter ``name`` from a PEFT adapter directory, between two decode
        steps, without touching the base weights. Requests on ``name`` that are running continue under
        the new adapter (prefilled again when ``recompute_kv_on_update``). Raises :class:`EngineError`
        when it breaks a limit (``max_loras``, ``max_lora_rank``, ``lora_target_modules``) or does
        not fit the base model."""
        from agentflow.engines._lora import read_adapter

        self._running_worker()
        config, tensors = await asyncio.to_thread(read_adapter, path)
        await self._install_adapter(name, config, tensors, version)

    async def unload_adapter(self, name: str) -> None:
        """Remove LoRA adapter ``name``; fails while requests on it are queued or running."""
        worker = self._running_worker()
        adapters = self._adapter_set()
        await self._in_worker(lambda: adapters.unload(name, worker.count_using(name)))

    @property
    def adapters(self) -> dict[str, dict[str, Any]]:
        """The loaded LoRA adapters: name -> rank, target modules, whether it is the default."""
        return self._adapter_set().info() if self._adapters is not None else {}

    @property
    def default_adapter(self) -> str | None:
        """The adapter of requests without ``metadata["lora"]`` (None = the base model)."""
        return self._adapters.default if self._adapters is not None else None

    @default_adapter.setter
    def default_adapter(self, name: str | None) -> None:
        adapters = self._adapter_set()
        adapters.default = None if name is None else adapters.resolve({"lora": name})

    async def recompute_running(self) -> None:
        """Prefill every running sequence again under the current weights and adapters, between
        two decode steps (what ``recompute_kv_on_update`` does after each update; SGLang's
        ``retract`` pause)."""
        worker = self._running_worker()
        await self._in_worker(worker.requeue_running)

    async def _install_adapter(self, name: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                               version: int | None) -> None:
        worker, adapters = self._running_worker(), self._adapter_set()
        adapters.check(name, config, tensors)

        def install() -> None:
            adapters.load(name, config, tensors)
            if version is not None:
                self._gen_version = version
            if self.config.recompute_kv_on_update:
                worker.requeue_running(lambda s: s.adapter == name)

        await self._in_worker(install)
        if version is not None:
            self.set_version(version)

    def _adapter_set(self, model: Any = None) -> AdapterSet:
        from agentflow.engines.local._lora import AdapterSet, LoraLimits

        if self._adapters is None:
            c = self.config
            if model is None:
                raise EngineError("LocalEngine is not running; use `async with LocalEngine(...) as engine:`")
            self._adapters = AdapterSet(model, LoraLimits(c.max_loras, c.max_lora_rank, c.lora_target_modules))
        return self._adapters

    async def _in_worker(self, fn: Any) -> Any:
        from agentflow.engines.local._worker import Command

        fut: asyncio.Future[Any] = self.loop.create_future()

        def done(result: Any, err: BaseException | None) -> None:
            if fut.done():
                return
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(result)

        self._running_worker().command(Command(fn, done))
        return await fut

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict[str, Any]:
        """Counters of the worker: decode steps per batch size, joins while running, prefill calls,
        sequences whose prefill was shared with an identical context, prompt tokens not recomputed
        because the contexts of a prefill began alike (``prefill_common_tokens``), tokens."""
        w = self._worker
        if w is None:
            return {}
        return {
            "batch_sizes": dict(sorted(dict(w.batch_sizes).items())),  # copy first: the worker writes it
            "decode_steps": sum(w.batch_sizes.values()),
            "joined_running_batch": w.n_joined_running,
            "prefill_calls": w.n_prefill_calls,
            "prefill_shared": w.n_prefill_shared,
            "prefill_common_tokens": w.n_prefill_common,
            "tokens": w.n_tokens,
            "kv_cache_bytes": w.cache.nbytes(),
            "lora_adapters": sorted(self.adapters),
        }


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def copy_state_dict(model: PreTrainedModel, state: Mapping[str, torch.Tensor]) -> None:
    """Copy every tensor of ``state`` into ``model``'s parameter of the same name, in place.

    Raises EngineError (before copying anything) on unknown names, shape mismatches, or
    parameters that ``state`` does not cover (tied parameters count once).
    """
    import torch

    from agentflow.engines._lora import is_lora_param

    targets = _base_names(model.state_dict(keep_vars=True))
    unknown = sorted(set(state) - set(targets))
    wrong = [f"{k}: expected {tuple(targets[k].shape)}, got {tuple(v.shape)}"
             for k, v in state.items() if k in targets and targets[k].shape != v.shape]
    covered = {targets[k].data_ptr() for k in state if k in targets}
    missing = [n for n, p in model.named_parameters() if p.data_ptr() not in covered and not is_lora_param(n)]
    if unknown or wrong or missing:
        raise EngineError(
            "weight update does not match the model: "
            f"unknown names {unknown[:5]}{'...' if len(unknown) > 5 else ''}, shape mismatches {wrong[:5]}, "
            f"missing parameters {missing[:5]}{'...' if len(missing) > 5 else ''}; expected a full, unsharded "
            "state dict with the model's HF parameter names"
        )
    with torch.no_grad():
        for k, v in state.items():
            targets[k].copy_(v)


def _base_names(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base weights of a model under their HF names, also after LoRA layers were injected
    (``q_proj.base_layer.weight`` -> ``q_proj.weight``; adapter tensors left out)."""
    from agentflow.engines._lora import is_lora_param

    return {k.replace(".base_layer.", "."): v for k, v in sd.items() if not is_lora_param(k)}


def adapter_payload(meta: WeightUpdateMeta) -> tuple[dict[str, Any], Mapping[str, torch.Tensor]]:
    """(adapter_config, tensors under PEFT's names) of an adapter weight update."""
    from agentflow.engines._lora import read_adapter

    if meta.type == "disk":
        assert meta.path is not None
        return read_adapter(meta.path)
    if meta.type != "mem" or meta.state_dict is None or meta.lora_config is None:
        raise EngineError(
            f"an adapter update ({meta.adapter!r}) needs type='mem' with state_dict and lora_config (what "
            f"FSDPEngine.upload_weights returns) or type='disk' with an adapter directory; got type={meta.type!r}"
        )
    return dict(meta.lora_config), meta.state_dict
