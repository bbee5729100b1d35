"""Configuration of the FSDP2 train engine and its learning-rate schedule.

Values only; the engine (:mod:`agentflow.engines.fsdp`) does the wiring.

Not here: the engine that reads it (:mod:`agentflow.engines.fsdp`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from agentflow import ConfigError
from agentflow.engines._lora import LoRAConfig

__all__ = ["FSDPEngineConfig", "lr_factor"]

Schedule = Literal["constant", "linear", "cosine"]


@dataclass(frozen=True, slots=True)
class FSDPEngineConfig:
    """How the FSDP2 engine builds, shards and optimises the policy.

    Attributes:
        path: HF model directory or hub name (``from_pretrained``); or use ``model_factory``, or pass
            a built model to ``FSDPEngine(config, model=...)``.
        model_factory: zero-argument callable returning an ``nn.Module`` (an HF causal LM).
        dtype: parameter (master) dtype: ``float32``, ``bfloat16`` or ``float16``.
        mixed_precision: compute in bf16 with fp32 master weights and fp32 gradient reduction
            (FSDP2 ``MixedPrecisionPolicy``). On GPUs, and on CPUs with bf16 instructions
            (AVX512-BF16, AMX), where the matrix products run about twice as fast as in fp32.
        lr, weight_decay, betas, eps: AdamW.
        lr_schedule: ``constant``, ``linear`` or ``cosine`` decay to ``min_lr_ratio * lr`` after
            ``warmup_steps`` of linear warm-up; decay length is ``total_steps`` or, if None,
            ``FinetuneSpec.total_train_steps`` given to ``initialize``.
        grad_clip: max global gradient norm (None = no clipping; the norm is still reported).
        gradient_checkpointing: recompute decoder layers in backward.
        attn_impl: ``packed`` (custom varlen/per-segment attention, exact and fastest) or ``sdpa``
            (``position_ids`` + ``use_cache=False``; quadratic in the packed length; for models that
            do not dispatch through transformers' ``AttentionInterface``).
        share_prefix: pack the samples of one prompt (sequences with the same tokens before their
            first loss token) so the prompt is computed once per micro-batch (``packed`` attention
            only; exact; ~n_samples times fewer prompt tokens through the linear layers), and the
            beginning that prompts have in common (8 tokens or more: a system prompt, tool
            descriptions, worked examples) once per micro-batch too.
        logprob_chunk_size: positions per chunk of the chunked log-prob computation.
        temperature: sampling temperature of the behaviour policy; logits are divided by it.
        device: ``auto`` (GPU of ``LOCAL_RANK`` if CUDA is available), ``cpu`` or ``cuda``.
        seed: torch seed on every rank (model init via factory/path, dropout).
        weight_update_dtype: dtype of uploaded weights (None = the parameter dtype).
        weight_bucket_mb: MiB of parameters gathered at once during an ``nccl`` upload.
        trust_remote_code: passed to ``from_pretrained``.
        lora: train a LoRA adapter (PEFT) on the frozen model instead of every weight; null = full
            fine-tuning. Turn it on with any of train.lora.rank (16), .alpha (32), .dropout (0),
            .target_modules (the attention and MLP projections), .name (policy). Only the adapter
            is in the optimizer, uploaded to inference engines and saved in checkpoints (docs/lora.md).
    """

    path: str | None = None
    model_factory: Callable[[], Any] | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    mixed_precision: bool = False
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_schedule: Schedule = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    total_steps: int | None = None
    grad_clip: float | None = 1.0
    gradient_checkpointing: bool = False
    attn_impl: Literal["packed", "sdpa"] = "packed"
    share_prefix: bool = True
    logprob_chunk_size: int = 1024
    temperature: float = 1.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 1
    weight_update_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    weight_bucket_mb: int = 512
    trust_remote_code: bool = False
    lora: LoRAConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        ConfigError.check(self.problems())

    def problems(self) -> list[str]:
        out = []
        if self.path is not None and self.model_factory is not None:
            out.append("set at most one of train.path and train.model_factory, got both")
        choices = {
            "dtype": ("float32", "bfloat16", "float16"), "lr_schedule": ("constant", "linear", "cosine"),
            "attn_impl": ("packed", "sdpa"), "device": ("auto", "cpu", "cuda"),
            "weight_update_dtype": (None, "float32", "bfloat16", "float16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                out.append(f"train.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = {"lr": self.lr, "eps": self.eps, "temperature": self.temperature}
        out += [f"train.{k} must be a finite number > 0, got {v!r}" for k, v in positive.items()
                if not (isinstance(v, int | float) and math.isfinite(v) and v > 0)]
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            out.append(f"train.weight_decay must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            out.append(f"train.grad_clip must be > 0 or null, got {self.grad_clip!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            out.append(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        ints = {"warmup_steps": (self.warmup_steps, 0), "logprob_chunk_size": (self.logprob_chunk_size, 1),
                "weight_bucket_mb": (self.weight_bucket_mb, 1), "total_steps": (self.total_steps or 1, 1)}
        out += [f"train.{k} must be an integer >= {lo}, got {v!r}" for k, (v, lo) in ints.items()
                if not (isinstance(v, int) and v >= lo)]
        return out


def lr_factor(step: int, schedule: Schedule, warmup: int, total: int | None, min_ratio: float) -> float:
    """Multiplier of the base learning rate after ``step`` scheduler steps.

    Warm-up: ``(step + 1) / warmup`` for ``step < warmup`` (never 0). Then, with
    ``p = (step - warmup) / max(1, total - warmup)`` clipped to [0, 1]: constant 1; linear
    ``1 - (1 - m) p``; cosine ``m + (1 - m)(1 + cos(pi p)) / 2``.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if total is None:
        raise ConfigError(
            f"lr_schedule={schedule!r} needs the run length: set train.total_steps or pass "
            "ft_spec=FinetuneSpec(...) to initialize(); got neither"
        )
    p = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * p
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
