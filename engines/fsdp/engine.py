"""The FSDP2 train engine: packed micro-batches, a global token-mean loss, HF checkpoints and
weight hand-off (memory, disk, broadcast) to inference engines.

One process per device (``torchrun``), or one process alone (world size 1, created here). The
model is an HF causal LM; every decoder layer and the root are wrapped with ``fully_shard``. Each
``train_batch`` packs its sequences into micro-batches (one row each, per-sequence position ids and
``cu_seq_lens``; with ``share_prefix`` the samples of one prompt share its rows and prompts share
the beginning they have in common, see :mod:`agentflow.engines.fsdp._packing`), runs
forward/backward per micro-batch with loss weights normalised over the whole batch on every rank,
clips the gradient norm and steps AdamW (skipping, and reporting, a step whose norm is not finite).

The loss-function contract is documented in :mod:`agentflow.algo._loss`: ``loss_fn(logprobs, mb)``
returns the mean loss over the micro-batch's loss tokens (optionally with a stats dict);
``loss_weight_fn(mb)`` returns its weight (the loss-token count for a token mean). Every rank must
call ``train_batch``/``forward``/``save``/``upload_weights`` together (they are collective); each
rank passes its own share of the batch.

:meth:`FSDPEngine.prepare` packs a batch once for several passes (a PPO step's proximal forward
and update run on one packing).

With ``config.lora`` set the model is wrapped with a PEFT LoRA adapter before sharding: the base
weights are frozen, only the adapter is in AdamW and its state, uploads and checkpoints carry the
adapter only (PEFT's format), and :meth:`FSDPEngine.reference` is the base model with the adapter
off (the KL reference, no second copy). See :mod:`agentflow.engines.fsdp._lora`.

Not here: the RL loop (prox log-probs, advantages and minibatching are the trainer's), rollout,
tensor/sequence parallelism, loading a model too big for one process's memory before sharding.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from agentflow import (
    CheckpointError,
    ConfigError,
    EngineError,
    FinetuneSpec,
    MicroBatchSpec,
    SaveLoadMeta,
    Scheduling,
    TrainEngine,
    Trajectory,
    TrajectoryError,
    WeightUpdateMeta,
)
from agentflow.engines._handoff import (
    WeightSpec,
    broadcast_tensors,
    bucketed,
    dtype_name,
    init_weight_update_group,
    read_hf_state_dict,
    write_hf_checkpoint,
)
from agentflow.engines._lora import add_lora
from agentflow.engines.fsdp import _dist
from agentflow.engines.fsdp._attention import register_packed_attention
from agentflow.engines.fsdp._config import FSDPEngineConfig, lr_factor
from agentflow.engines.fsdp._logprobs import install_passthrough_head, token_logprobs
from agentflow.engines.fsdp._lora import (
    ReferencePolicy,
    adapter_path_ok,
    adapter_state_dict,
    base_model_path,
    load_adapter,
    load_adapter_tensors,
    save_adapter,
    share_frozen_weights,
    tensor_bytes,
)
from agentflow.engines.fsdp._packing import (
    MicroBatch,
    PackedBatch,
    dummy_micro_batch,
    normalize_batch,
    pack,
    plan_micro_batches,
    share_prefixes,
    split_sequences,
    unit_rows,
    unpack,
)

__all__ = ["FSDPEngine", "FSDPEngineConfig"]

log = logging.getLogger(__name__)
Batch = Sequence[Trajectory] | Mapping[str, torch.Tensor] | PackedBatch
LossFn = Callable[..., Any]
WeightFn = Callable[[Mapping[str, Any]], float]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TRAIN_STATE = "agentflow_train_state.pt"
_COMMON_PREFIX_MIN = 8  # prompts that begin with this many equal tokens share their rows across groups


class FSDPEngine(TrainEngine):
    """FSDP2 :class:`TrainEngine`.

    Args:
        config: what to build and how to optimise it.
        model: an already-built HF causal LM (the engine shards it in place and owns it from then on;
            pass a copy if you need the original). Overrides ``config.path``/``model_factory``.
        tokenizer: saved next to HF checkpoints when given.
    """

    def __init__(self, config: FSDPEngineConfig, model: torch.nn.Module | None = None, tokenizer: Any = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self._given_model = model
        self.model: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.device = torch.device("cpu")
        self.version = 0
        self._own_pg = False
        self._packed = False
        self._head: torch.nn.Module | None = None
        self._tied: dict[str, str] = {}  # output-embedding name -> input-embedding name
        self._update_group: dist.ProcessGroup | None = None
        self._peft: Any = None  # the PeftModel wrapper when config.lora is set (self.model is its base model)

    # ------------------------------------------------------------------ lifetime
    def initialize(self, addr: str | None = None, ft_spec: FinetuneSpec | None = None) -> None:
        """Create the process group if needed, build, prepare and shard the model, make AdamW and
        the LR schedule. ``addr`` (``host:port``) is the rendezvous of a world of size 1."""
        if self.model is not None:
            raise EngineError("FSDPEngine.initialize called twice; expected one call per engine")
        cfg = self.config
        self.device = _dist.resolve_device(cfg.device)
        if cfg.mixed_precision and self.device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            log.warning("train.mixed_precision=true on a CPU without bf16 instructions (AVX512-BF16 or AMX): bf16 "
                        "compute is emulated there and slower than fp32; set train.mixed_precision=false")
        self._own_pg = _dist.ensure_process_group(self.device, addr)
        torch.manual_seed(cfg.seed)
        model = self._build_model()
        self._prepare(model)
        self._shard(model)
        self.model = model
        # fused: one kernel over all parameters (5x faster than the per-tensor loop on a 2-core CPU).
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],  # with LoRA: the adapter only
            lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True,
        )
        total = cfg.total_steps or (ft_spec.total_train_steps if ft_spec is not None else None)
        lr_factor(cfg.warmup_steps, cfg.lr_schedule, cfg.warmup_steps, total, cfg.min_lr_ratio)  # validate now
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.lr_schedule, cfg.warmup_steps, total, cfg.min_lr_ratio)
        )

    def destroy(self) -> None:
        """Release the model, the optimizer and the process groups this engine created."""
        if self._update_group is not None:
            dist.destroy_process_group(self._update_group)
            self._update_group = None
        self.model = self.optimizer = self.lr_scheduler = None
        if self._own_pg and dist.is_initialized():
            dist.destroy_process_group()
        self._own_pg = False

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    def get_scheduling_config(self) -> Scheduling:
        params = list(self._model().parameters()) if self.model is not None else []
        n_all = sum(p.numel() for p in params)
        n_trained = sum(p.numel() for p in params if p.requires_grad)
        mem = 4 * n_all + 12 * n_trained  # fp32 weights; grad + two AdamW moments of what trains
        return Scheduling(cpu=1, gpu=int(self.device.type == "cuda"), mem=mem >> 20)

    def train(self, mode: bool = True) -> FSDPEngine:
        self._model().train(mode)
        return self

    def set_version(self, version: int) -> None:
        self.version = version

    def get_version(self) -> int:
        return self.version

    def vocab_size(self) -> int | None:
        """Rows of the policy's input embedding (token ids outside it are rejected before training)."""
        if self.model is None:
            return None
        return int(self.model.get_input_embeddings().weight.shape[0])

    # ------------------------------------------------------------------ model set-up
    def _model(self) -> Any:
        if self.model is None:
            raise EngineError("FSDPEngine is not initialized; call engine.initialize() first")
        return self.model

    def _build_model(self) -> torch.nn.Module:
        cfg = self.config
        dtype = _DTYPES[cfg.dtype]
        if self._given_model is not None:
            model, self._given_model = self._given_model, None
        elif cfg.model_factory is not None:
            model = cfg.model_factory()
        elif cfg.path is not None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        else:
            raise ConfigError("FSDPEngine needs a model: set train.path or train.model_factory, or pass model=...")
        return model.to(device=self.device, dtype=dtype)

    def _prepare(self, model: torch.nn.Module) -> None:
        """Training switches that must happen before sharding: no KV cache, attention, head, tying."""
        model.config.use_cache = False
        if self.config.attn_impl == "packed":
            try:
                model.set_attn_implementation(register_packed_attention())
                self._packed = True
            except (ValueError, ImportError, AttributeError) as e:
                log.warning("packed attention unavailable for %s (%s); using sdpa + position_ids", type(model), e)
        if not self._packed:
            model.set_attn_implementation("sdpa")
        if self.config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._tied = _tied_names(model)
        if install_passthrough_head(model):
            self._head = model.get_output_embeddings()
        if self.config.lora is not None:
            self._peft = add_lora(model, self.config.lora)  # in place: `model` keeps its names and forward

    def _shard(self, model: torch.nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if self.config.mixed_precision else MixedPrecisionPolicy())
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)

    # ------------------------------------------------------------------ micro-batches and log-probs
    def prepare(self, input_: Batch, mb_spec: MicroBatchSpec) -> PackedBatch:
        """Pack ``input_`` once for several :meth:`forward` / :meth:`train_batch` calls (collective).

        Add per-token fields computed in between (proximal log-probs) with
        :meth:`PackedBatch.set_token_field`. ``mb_spec`` must be the one later calls pass.
        """
        mbs, batch = self._micro_batches(input_, mb_spec)
        return PackedBatch(mbs, batch)

    def _micro_batches(
        self, input_: Batch | PackedBatch, mb_spec: MicroBatchSpec
    ) -> tuple[list[MicroBatch], dict[str, torch.Tensor]]:
        if isinstance(input_, PackedBatch):
            if input_.shares_prefixes and not self._packed:
                raise EngineError("this batch was packed with shared prompts, which this engine's attention "
                                  "cannot run; prepare it with this engine (or set train.share_prefix=false)")
            return input_.micro_batches, input_.batch
        batch = normalize_batch(input_)
        seqs = split_sequences(batch)
        share = self._packed and self.config.share_prefix
        units = share_prefixes(seqs, mb_spec.max_tokens_per_mb) if share else [(i,) for i in range(len(seqs))]
        plan = plan_micro_batches([unit_rows(seqs, u) for u in units], mb_spec.max_tokens_per_mb, mb_spec.n_mbs)
        common = _COMMON_PREFIX_MIN if share else 0
        mbs = [pack(seqs, [units[u] for u in idx], common_prefix_min=common) for idx in plan]
        # every rank must run the same number of forward/backward passes (FSDP collectives)
        n = _dist.all_reduce_max_int(len(mbs))
        mbs += [dummy_micro_batch(mbs[0]) for _ in range(n - len(mbs))]
        return mbs, batch

    def _hidden(self, mb: MicroBatch, keep: torch.Tensor) -> torch.Tensor:
        """One packed row through the model; returns ``[len(keep), H]`` hidden states (pass-through
        head) or logits at the positions ``keep`` (via ``logits_to_keep``: only those rows are kept)."""
        kwargs: dict[str, Any] = {"position_ids": mb.position_ids[None], "use_cache": False, "logits_to_keep": keep}
        if self._packed:
            cu = mb.cu_seqlens
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=mb.max_len, max_length_k=mb.max_len)
            if mb.shared is not None:
                kwargs["agentflow_shared"] = mb.shared
        out = self._model()(input_ids=mb.data["input_ids"][None], **kwargs).logits[0]
        if mb.shared is not None and not mb.shared.used:
            raise EngineError(
                f"{type(self._model()).__name__} does not pass attention keywords through to the attention "
                "function, so prompts cannot be shared across samples; set train.share_prefix=false"
            )
        return out

    def _logprobs(
        self, mb: MicroBatch, select: torch.Tensor, temperature: float, entropy_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies ``[T]`` of the tokens where ``select`` (first tokens excluded)."""
        positions = torch.nonzero(select & (mb.prev_index >= 0)).flatten()
        out = self._hidden(mb, mb.prev_index[positions])
        return token_logprobs(out, mb.data["input_ids"][positions], positions, mb.n_tokens, self._head,
                              temperature, self.config.logprob_chunk_size, entropy_grad)

    def _zero_loss(self, mb: MicroBatch) -> torch.Tensor:
        """A zero loss touching every parameter, so a weight-0 micro-batch still syncs gradients."""
        out = self._hidden(mb, torch.zeros(1, dtype=torch.long, device=self.device))
        touched = out if self._head is None else torch.nn.functional.linear(out, self._head.weight)
        return touched.float().sum() * 0.0

    # ------------------------------------------------------------------ training
    def train_batch(
        self, input_: Batch, mb_spec: MicroBatchSpec, loss_fn: LossFn, loss_weight_fn: WeightFn
    ) -> dict[str, float]:
        """One optimiser step over ``input_`` (this rank's share of the global batch).

        Returns:
            ``loss`` (global weighted mean), ``grad_norm``, ``lr``, ``skipped`` (1 if the norm was
            not finite and no step was taken), ``n_seqs``/``n_tokens``/``loss_weight`` (global),
            ``n_rows`` (global tokens through the model: fewer than ``n_tokens`` when prompts are
            shared),
            ``n_mbs``, and the loss function's statistics (global weighted means).
        """
        model, opt = self._model(), self.optimizer
        assert opt is not None
        model.train()
        mbs, batch = self._micro_batches(input_, mb_spec)
        opt.zero_grad(set_to_none=True)
        stats = self._run(mbs, loss_fn, loss_weight_fn, backward=True)
        grad_norm = self._clip_grad_norm()
        skipped = not math.isfinite(grad_norm)
        if skipped:
            log.warning("skipping optimizer step: gradient norm is %s", grad_norm)
            opt.zero_grad(set_to_none=True)
        else:
            opt.step()
        stats.update(grad_norm=grad_norm, skipped=float(skipped), lr=opt.param_groups[0]["lr"], n_mbs=float(len(mbs)),
                     n_seqs=_dist.all_reduce_float(float(batch["input_ids"].shape[0])),
                     n_tokens=_dist.all_reduce_float(float(batch["attention_mask"].sum())),
                     n_rows=_dist.all_reduce_float(float(sum(mb.n_tokens for mb in mbs if mb.seq_index[0] >= 0))))
        return stats

    def eval_batch(
        self, input_: Batch, mb_spec: MicroBatchSpec, loss_fn: LossFn, loss_weight_fn: WeightFn
    ) -> float:
        """The global weighted mean of ``loss_fn`` over ``input_``, without gradients."""
        self._model().eval()
        mbs, _ = self._micro_batches(input_, mb_spec)
        with torch.no_grad():
            return self._run(mbs, loss_fn, loss_weight_fn, backward=False)["loss"]

    def _run(self, mbs: list[MicroBatch], loss_fn: LossFn, weight_fn: WeightFn, backward: bool) -> dict[str, float]:
        if "loss_mask" not in mbs[0].data:
            raise TrajectoryError(
                f"training needs batch['loss_mask'] (1 on trained tokens); got keys {sorted(mbs[0].data)}"
            )
        weights = [0.0 if mb.seq_index[0] < 0 else float(weight_fn(mb.data)) for mb in mbs]
        total = _dist.all_reduce_float(sum(weights))
        if not total > 0:
            raise EngineError(
                f"the global batch has total loss weight {total}; expected > 0 (no loss tokens?). Check that "
                "trajectories have loss_mask 1 on generated tokens and that loss_weight_fn counts them"
            )
        sums: dict[str, float] = defaultdict(float)
        scale = self.world_size / total  # FSDP averages gradients over ranks
        for mb, w in zip(mbs, weights, strict=True):
            dev = mb.to(self.device)
            if w == 0:
                loss = self._zero_loss(dev)
            else:
                lp, ent = self._logprobs(dev, dev.data["loss_mask"] > 0, self.config.temperature,
                                         backward and bool(getattr(loss_fn, "entropy_grad", False)))
                loss = self._call_loss(loss_fn, lp, {**dev.data, "entropy": ent}, w, sums)
            if backward:
                (loss * (w * scale)).backward()
        return _global_means(sums, total)

    @staticmethod
    def _call_loss(loss_fn: LossFn, lp: torch.Tensor, data: dict[str, torch.Tensor], w: float,
                   sums: dict[str, float]) -> torch.Tensor:
        result = loss_fn(lp, data)
        loss, extra = result if isinstance(result, tuple) else (result, {})
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise EngineError(f"loss_fn must return a scalar tensor (or (scalar, stats)), got {type(loss).__name__}")
        sums["loss"] += w * float(loss.detach())
        for k, v in extra.items():
            sums[k] += w * float(v)
        return loss

    def _clip_grad_norm(self) -> float:
        params = [p for p in self._model().parameters() if p.grad is not None]
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full = getattr(norm, "full_tensor", None)
        return float(full() if full is not None else norm)

    def step_lr_scheduler(self) -> None:
        if self.lr_scheduler is None:
            raise EngineError("FSDPEngine is not initialized; call engine.initialize() first")
        self.lr_scheduler.step()

    # ------------------------------------------------------------------ inference
    def forward(
        self,
        input_: Batch,
        mb_spec: MicroBatchSpec | None = None,
        output_seqlens: Sequence[int] | None = None,
        post_hook: Callable[..., Any] | None = None,
        aggregate_fn: Callable[[list[Any]], Any] | None = None,
        *,
        temperature: float | None = None,
    ) -> Any:
        """Per-token log-probs of ``input_``'s tokens under the current parameters (no gradient).

        Returns a ``[B, T]`` float32 CPU tensor aligned with the padded batch (entry ``[b, t]`` =
        ``log p(token t | tokens < t)``; 0 at each sequence's first token and at padding).
        With ``post_hook(logprobs [T_mb], mb_fields)`` the hook's result per micro-batch is
        collected instead and ``aggregate_fn`` (default ``list``) combines them; with only
        ``aggregate_fn`` it receives the per-micro-batch packed log-prob tensors. ``temperature``
        defaults to ``config.temperature``. ``output_seqlens``, if given, must equal the sequence
        lengths (checked).
        """
        mbs, batch = self._micro_batches(input_, mb_spec or MicroBatchSpec())
        lens = batch["attention_mask"].sum(1).tolist()
        if output_seqlens is not None and list(output_seqlens) != lens:
            raise EngineError(f"output_seqlens {list(output_seqlens)} do not match the sequence lengths {lens}")
        temp = self.config.temperature if temperature is None else temperature
        padded = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        results = []
        self._model().eval()
        with torch.no_grad():
            for mb in mbs:
                dev = mb.to(self.device)
                lp, _ = self._logprobs(dev, torch.ones_like(dev.position_ids, dtype=torch.bool), temp)
                if mb.seq_index[0] < 0:
                    continue
                if post_hook is not None:
                    results.append(post_hook(lp, dev.data))
                    continue
                results.append(lp.cpu())
                for i, piece in zip(mb.seq_index, unpack(results[-1], mb), strict=True):
                    padded[i, : piece.numel()] = piece
        if post_hook is not None or aggregate_fn is not None:
            return (aggregate_fn or list)(results)
        return padded

    # ------------------------------------------------------------------ state dicts
    def _options(self, **kw: bool) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(**kw)

    def full_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The unsharded model state dict with HF names, on CPU, on rank 0 (empty elsewhere).
        Collective."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(self._model(), options=self._options(full_state_dict=True, cpu_offload=True))
        if dtype is not None:
            sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
        return sd

    def _save_weights(self, path: str, tokenizer: Any, dtype: torch.dtype | None) -> None:
        self._weights_writer(path, tokenizer, dtype, own_copy=False)()

    def _weights_writer(self, path: str, tokenizer: Any, dtype: torch.dtype | None, *,
                        own_copy: bool) -> Callable[[], None]:
        """Gather the full state dict now (collective) and return what writes it to ``path`` as an
        HF checkpoint (rank 0; a no-op elsewhere). ``own_copy``: copy any tensor that is still a
        parameter's own storage (one rank, no cast), so the write may run after later steps."""
        sd = self.full_state_dict(dtype)
        if self.rank != 0:
            return lambda: None
        model = self._model()
        live = {t.untyped_storage().data_ptr() for t in _local_tensors(model)} if own_copy else set()
        sd = {k: v.clone() if v.untyped_storage().data_ptr() in live else v
              for k, v in sd.items() if k not in self._tied}
        config, generation_config = model.config, getattr(model, "generation_config", None)
        return lambda: write_hf_checkpoint(path, sd, config, generation_config=generation_config, tokenizer=tokenizer)

    def save(self, meta: SaveLoadMeta) -> None:
        """HF weights (+ config, tokenizer) to ``meta.path``; with ``meta.with_optim`` also the full
        optimizer and scheduler state (rank 0) and every rank's RNG state, for an exact resume.
        With LoRA the weights are the adapter only, in PEFT's format (``adapter_config.json`` names
        ``meta.base_model_path``, else the directory the model was loaded from)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if self.config.lora is not None:
            base = base_model_path(self._model(), meta.base_model_path or self.config.lora.base_model)
            save_adapter(self._model(), self.config.lora, meta.path, base)
            tokenizer = meta.tokenizer or self.tokenizer
            if self.rank == 0 and tokenizer is not None:
                tokenizer.save_pretrained(meta.path)
        else:
            self._save_weights(meta.path, meta.tokenizer or self.tokenizer, None)
        if meta.with_optim:
            assert self.optimizer is not None and self.lr_scheduler is not None
            osd = get_optimizer_state_dict(self._model(), self.optimizer,
                                           options=self._options(full_state_dict=True, cpu_offload=True))
            if self.rank == 0:
                torch.save({"optimizer": osd, "scheduler": self.lr_scheduler.state_dict(), "version": self.version,
                            "world_size": self.world_size}, os.path.join(meta.path, _TRAIN_STATE))
            dist.barrier()
            torch.save(_rng_state(), os.path.join(meta.path, f"rng_rank{self.rank}.pt"))
        dist.barrier()

    def load(self, meta: SaveLoadMeta) -> None:
        """Load what :meth:`save` wrote (weights; with ``meta.with_optim`` optimizer, scheduler, RNG)."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if self.config.lora is not None:
            load_adapter(self._model(), self.config.lora, meta.path)
        else:
            self._load_weights(meta.path)
        if not meta.with_optim:
            return
        state_path = os.path.join(meta.path, _TRAIN_STATE)
        if not os.path.exists(state_path):
            raise CheckpointError(f"{state_path} is missing; expected a checkpoint saved with with_optim=True")
        state = _load_plain(state_path)
        assert self.optimizer is not None and self.lr_scheduler is not None
        set_optimizer_state_dict(self._model(), self.optimizer, state["optimizer"],
                                 options=self._options(full_state_dict=True))
        self.lr_scheduler.load_state_dict(state["scheduler"])
        self.version = int(state["version"])
        rng = os.path.join(meta.path, f"rng_rank{self.rank}.pt")
        if state["world_size"] == self.world_size and os.path.exists(rng):
            _set_rng_state(_load_plain(rng))

    def _load_weights(self, path: str) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        sd: dict[str, torch.Tensor] = {}
        if self.rank == 0:
            sd = read_hf_state_dict(path)
            for out_name, in_name in self._tied.items():
                sd.setdefault(out_name, sd[in_name])
        set_model_state_dict(self._model(), sd, options=self._options(full_state_dict=True, broadcast_from_rank0=True))

    # ------------------------------------------------------------------ LoRA
    def adapter_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The LoRA adapter's full tensors under PEFT's names, on CPU, on rank 0 (empty elsewhere).
        Collective. Raises :class:`ConfigError` without ``config.lora``."""
        return adapter_state_dict(self._model(), self._lora(), dtype)

    def load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Set the adapter from full tensors under PEFT's names (read on rank 0). Collective."""
        load_adapter_tensors(self._model(), self._lora(), tensors)

    def share_base_with(self, model: torch.nn.Module) -> int:
        """Let ``model`` (an inference engine's copy of the base model, HF names) use this LoRA
        engine's frozen base weights instead of its own, so they are held once; returns the bytes
        freed (0 unless world size 1 and the same dtype and device). Only adapter-only updates may
        reach ``model`` afterwards (a full update would write into the train engine's base)."""
        self._lora()
        return share_frozen_weights(self._model(), model)

    def reference(self) -> ReferencePolicy:
        """The KL reference policy of a LoRA engine: this model with the adapter disabled (the base
        weights), as an object with this engine's ``forward``; shares the weights, so it costs no memory."""
        self._lora()
        return ReferencePolicy(self.forward, self._peft)

    def _lora(self) -> Any:
        if self.config.lora is None:
            raise ConfigError("this FSDPEngine trains full weights (train.lora is null); set train.lora to use "
                              "an adapter")
        self._model()
        return self.config.lora

    def _upload_adapter(self, meta: WeightUpdateMeta, dtype: torch.dtype | None) -> WeightUpdateMeta:
        """``mem``: the adapter tensors in ``meta.state_dict`` (rank 0); ``disk``: a PEFT adapter
        directory at ``meta.path``. Either way ``meta.adapter``/``lora_config``/``nbytes`` are set."""
        from agentflow.engines._lora import adapter_config_dict

        lora = self._lora()
        base = base_model_path(self._model(), lora.base_model)
        fields: dict[str, Any] = {"adapter": lora.name, "lora_config": adapter_config_dict(lora, base)}
        if meta.type == "mem":
            sd = self.adapter_state_dict(dtype)
            nbytes = int(_dist.all_reduce_float(float(tensor_bytes(sd)), dist.ReduceOp.MAX))
            return dataclasses.replace(meta, state_dict=sd if self.rank == 0 else None, nbytes=nbytes, **fields)
        if meta.type == "disk":
            n = save_adapter(self._model(), lora, adapter_path_ok(meta.path), base, dtype)
            nbytes = int(_dist.all_reduce_float(float(n), dist.ReduceOp.MAX))
            return dataclasses.replace(meta, nbytes=nbytes, **fields)
        raise ConfigError(
            f"a LoRA adapter is uploaded with WeightUpdateMeta.type 'mem' or 'disk', got {meta.type!r}; SGLang loads "
            "adapters from files (/load_lora_adapter): set trainer.weight_update=disk"
        )

    # ------------------------------------------------------------------ weight hand-off
    def upload_weights(self, meta: WeightUpdateMeta) -> WeightUpdateMeta:
        """Publish the current weights (collective on every train rank); ``nbytes`` of the returned
        meta is the size of the tensors moved. With LoRA only the adapter travels (``mem``, ``disk``).

        - ``mem``: returns ``meta`` with ``state_dict`` = the full CPU state dict (HF names) on
          rank 0 (None elsewhere), for an in-process engine's ``aupdate_weights``.
        - ``disk``: writes an HF checkpoint to ``meta.path`` (for ``/update_weights_from_disk``).
        - ``nccl``: broadcasts every tensor of :meth:`weight_specs`, in order, over the group joined
          with :meth:`join_weight_update_group`; the inference side must already be inside
          ``/update_weights_from_distributed`` with those specs. Raises :class:`EngineError` when
          a broadcast does not finish within ``meta.timeout_s``.
        """
        dtype = _DTYPES[self.config.weight_update_dtype] if self.config.weight_update_dtype else None
        if self.config.lora is not None:
            return self._upload_adapter(meta, dtype)
        if meta.type == "mem":
            sd = self.full_state_dict(dtype)
            nbytes = int(_dist.all_reduce_float(float(tensor_bytes(sd)), dist.ReduceOp.MAX))
            return dataclasses.replace(meta, state_dict=sd if self.rank == 0 else None, nbytes=nbytes)
        if meta.type == "disk":
            assert meta.path is not None
            self._save_weights(meta.path, self.tokenizer, dtype)
            dist.barrier()
            return dataclasses.replace(meta, nbytes=sum(s.nbytes for s in self.weight_specs()))
        if meta.type == "nccl":
            self._broadcast_weights(meta)
            return dataclasses.replace(meta, nbytes=sum(s.nbytes for s in self.weight_specs()))
        raise ConfigError(f"WeightUpdateMeta.type must be 'mem', 'disk' or 'nccl', got {meta.type!r}")

    def snapshot_weights(self, meta: WeightUpdateMeta) -> tuple[WeightUpdateMeta, Callable[[], None]]:
        """A ``disk`` upload split in two: the full state dict is gathered and copied now (collective),
        and the returned ``write`` (rank 0; a no-op elsewhere) writes that copy as an HF checkpoint
        while training goes on. An adapter (LoRA) is small and is written at once."""
        if meta.type != "disk" or self.config.lora is not None:
            return super().snapshot_weights(meta)
        assert meta.path is not None
        dtype = _DTYPES[self.config.weight_update_dtype] if self.config.weight_update_dtype else None
        write = self._weights_writer(meta.path, self.tokenizer, dtype, own_copy=True)
        return dataclasses.replace(meta, nbytes=sum(s.nbytes for s in self.weight_specs())), write

    def weight_specs(self) -> list[WeightSpec]:
        """Names, dtypes and full shapes of the tensors an ``nccl`` upload broadcasts, in order
        (the ``names``/``dtypes``/``shapes`` of ``/update_weights_from_distributed``)."""
        if self.config.lora is not None:
            raise ConfigError("a LoRA engine has no nccl weight specs: adapters travel as 'mem' or 'disk' uploads")
        dtype = self.config.weight_update_dtype
        return [WeightSpec(k, dtype or dtype_name(v.dtype), tuple(v.shape))
                for k, v in self._model().state_dict().items() if k not in self._tied]

    def join_weight_update_group(self, meta: WeightUpdateMeta, world_size: int, backend: str | None = None) -> None:
        """Join the broadcast group as its rank 0 (train rank 0 only; other ranks return at once).

        Call while the inference servers are inside ``/init_weights_update_group`` with
        ``world_size`` = 1 + their total ranks; blocks until the group forms or ``meta.timeout_s``.
        """
        if self.rank != 0:
            return
        if self._update_group is not None:
            raise EngineError("already joined a weight-update group; destroy the engine to leave it")
        backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        self._update_group = init_weight_update_group(
            meta.master_address, meta.master_port, 0, world_size, meta.group_name, backend, meta.timeout_s
        )

    def _broadcast_weights(self, meta: WeightUpdateMeta) -> None:
        if self.rank == 0 and self._update_group is None:
            raise EngineError("nccl weight upload needs a group: call join_weight_update_group(meta, world_size) first")
        specs = self.weight_specs()
        for bucket in bucketed(specs, self.config.weight_bucket_mb << 20):
            tensors = list(self._gather(bucket))  # collective on every train rank
            ok = True
            if self.rank == 0:
                assert self._update_group is not None
                try:
                    broadcast_tensors(self._update_group, tensors, meta.timeout_s)
                except EngineError:
                    ok = False
                    _dist.all_reduce_float(0.0, dist.ReduceOp.MIN)
                    raise
            if _dist.all_reduce_float(1.0 if ok else 0.0, dist.ReduceOp.MIN) < 1:
                raise EngineError("weight broadcast failed on train rank 0; see its error")

    def _gather(self, bucket: list[WeightSpec]) -> Iterator[tuple[str, torch.Tensor]]:
        sd = self._model().state_dict()
        dev = self.device if self._update_group is None or self.device.type == "cuda" else torch.device("cpu")
        for s in bucket:
            v = sd[s.name]
            full = v.full_tensor() if hasattr(v, "full_tensor") else v
            yield s.name, full.detach().to(device=dev, dtype=getattr(torch, s.dtype))


# ---------------------------------------------------------------------- helpers
def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        inner = getattr(getattr(model, "model", None), "layers", None)
        layers = list(inner) if inner is not None else []
    if not layers:
        raise EngineError(
            f"cannot find the decoder layers of {type(model).__name__} to shard; expected `_no_split_modules` "
            "or a `model.layers` ModuleList"
        )
    return layers


def _local_tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """This rank's storage of every parameter and buffer (a DTensor's local shard)."""
    for t in (*model.parameters(), *model.buffers()):
        yield t.to_local() if hasattr(t, "to_local") else t


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is None or in_emb is None or out_emb.weight is not in_emb.weight:
        return {}
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    return {f"{names[id(out_emb)]}.weight": f"{names[id(in_emb)]}.weight"}


def _global_means(sums: Mapping[str, float], total: float) -> dict[str, float]:
    keys = sorted(sums)
    if dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, dict(sums))
        merged: dict[str, float] = defaultdict(float)
        for part in gathered:
            for k, v in part.items():
                merged[k] += v
        sums, keys = merged, sorted(merged)
    out = {k: sums[k] / total for k in keys}
    out["loss_weight"] = total
    return out


def _load_plain(path: str) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only``: it cannot run code)."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # truncated archive, or an object weights_only refuses
        raise CheckpointError(f"cannot load {path} as tensors and plain data ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); the file is damaged or holds "
                              "objects agentflow will not unpickle") from e


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
