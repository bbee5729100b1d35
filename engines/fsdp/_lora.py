"""The LoRA side of the FSDP2 train engine: adapter tensors out of (and into) a sharded model, the
adapter's files in checkpoints, and the reference policy (the base model with the adapter off).

All functions that touch the model are collective: every train rank calls them, in the same order.
Adapter tensors leave the engine under PEFT's file names (``base_model.model.<module>.lora_A.weight``,
see :mod:`agentflow.engines._lora`), the names SGLang and ``PeftModel.from_pretrained`` read.

Not here: building the adapter (``_lora.add_lora``), the engine's training step, full-weight
hand-off (``fsdp.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from agentflow.engines._lora import (
    TRAIN_ADAPTER,
    LoRAConfig,
    adapter_config_dict,
    check_fits,
    from_peft_key,
    is_adapter_dir,
    is_lora_param,
    read_adapter,
    to_peft_key,
    write_adapter,
)
from agentflow.errors import CheckpointError

__all__ = ["ReferencePolicy", "adapter_disabled", "adapter_state_dict", "base_model_path", "load_adapter",
           "load_adapter_tensors", "save_adapter", "share_frozen_weights"]


def _options(**kw: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def adapter_state_dict(model: torch.nn.Module, cfg: LoRAConfig, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The full (unsharded) adapter tensors on CPU under PEFT's names, on rank 0 (empty elsewhere).
    Collective; gathers only the trainable (adapter) parameters, never the frozen base."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True,
                                                      ignore_frozen_params=True))
    # (a tied output embedding comes through ignore_frozen_params under its second name: drop it)
    out = {to_peft_key(k, TRAIN_ADAPTER): (v.to(dtype) if dtype is not None else v) for k, v in sd.items()
           if is_lora_param(k)}
    return out if dist.get_rank() == 0 else {}


def base_model_path(model: torch.nn.Module, given: str | None) -> str | None:
    """What ``adapter_config.json`` names as the base model: ``given``, else the directory the
    model was loaded from (None for a model built from a config)."""
    return given or getattr(model, "name_or_path", None) or None


def save_adapter(model: torch.nn.Module, cfg: LoRAConfig, path: str, base: str | None,
                 dtype: torch.dtype | None = None) -> int:
    """Write the adapter as a PEFT directory at ``path`` (rank 0; collective). Returns its bytes."""
    sd = adapter_state_dict(model, cfg, dtype)
    n = 0
    if dist.get_rank() == 0:
        n = write_adapter(path, sd, adapter_config_dict(cfg, base))
    dist.barrier()
    return n


def load_adapter(model: torch.nn.Module, cfg: LoRAConfig, path: str) -> None:
    """Load the adapter of a PEFT directory into the sharded model (collective; rank 0 reads).

    Raises:
        CheckpointError: ``path`` holds no adapter, or one of another rank or other target modules.
    """
    tensors: dict[str, torch.Tensor] = {}
    if dist.get_rank() == 0:
        if not is_adapter_dir(path):
            raise CheckpointError(
                f"{path!r} has no adapter_config.json; expected a LoRA checkpoint (train.lora is set). A full "
                "HF checkpoint cannot be loaded into a LoRA engine: set train.lora=null to resume it"
            )
        config, tensors = read_adapter(path)
        _check_same_adapter(model, cfg, config, tensors, path)
    load_adapter_tensors(model, cfg, tensors)


def load_adapter_tensors(model: torch.nn.Module, cfg: LoRAConfig, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy full adapter tensors (PEFT's names, given on rank 0) into the sharded model. Collective."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if dist.get_rank() == 0:
        _check_same_adapter(model, cfg, {"r": cfg.rank, "target_modules": list(cfg.target_modules)}, tensors,
                            "<tensors>")
    sd = {from_peft_key(k, TRAIN_ADAPTER): v for k, v in tensors.items()}
    set_model_state_dict(model, sd, options=_options(full_state_dict=True, broadcast_from_rank0=True, strict=False))


def _check_same_adapter(model: torch.nn.Module, cfg: LoRAConfig, config: Mapping[str, Any],
                        tensors: Mapping[str, torch.Tensor], path: str) -> None:
    expected = {to_peft_key(n, TRAIN_ADAPTER) for n, p in model.named_parameters() if p.requires_grad}
    missing, unknown = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if int(config.get("r", -1)) != cfg.rank or missing or unknown:
        raise CheckpointError(
            f"the adapter at {path!r} (rank {config.get('r')}, targets {config.get('target_modules')}) is not the one "
            f"this engine trains (rank {cfg.rank}, targets {list(cfg.target_modules)}): missing {missing[:3]}, "
            f"unexpected {unknown[:3]}; set train.lora to the checkpoint's settings"
        )
    check_fits(model, tensors, config, what=f"checkpoint at {path!r}")


# ----------------------------------------------------------------------------------- reference policy
@contextmanager
def adapter_disabled(peft_model: Any) -> Iterator[None]:
    """Run the base model: PEFT's ``disable_adapter`` (the LoRA layers add nothing). FSDP2 re-reads
    each parameter's ``requires_grad`` at every all-gather, so PEFT's toggling of it is safe."""
    with peft_model.disable_adapter():
        yield


class ReferencePolicy:
    """The KL reference of a LoRA engine: the same (sharded) model with its adapter disabled, so
    no second copy of the weights. Has the one method the PPO step needs of a reference engine."""

    def __init__(self, forward: Callable[..., Any], peft_model: Any) -> None:
        self._forward, self._peft = forward, peft_model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``FSDPEngine.forward`` under the base weights (collective like it)."""
        with adapter_disabled(self._peft):
            return self._forward(*args, **kwargs)

    def destroy(self) -> None:
        """Nothing to release: the weights belong to the train engine."""


def share_frozen_weights(engine_model: torch.nn.Module, other: torch.nn.Module) -> int:
    """Point ``other``'s parameters (a plain HF model of the same architecture, e.g. the in-process
    inference engine's) at the engine's frozen base weights, so the base is held once; return the
    bytes freed. Only at world size 1 with equal dtype and device (else 0, nothing shared). The
    frozen weights never change, so the inference thread may read them while the engine trains;
    a full-weight update of ``other`` would write into them, so use adapter-only updates."""
    if dist.get_world_size() != 1:
        return 0
    frozen = {k.replace(".base_layer.", "."): p for k, p in engine_model.named_parameters() if not p.requires_grad}
    freed = 0
    with torch.no_grad():
        for name, p in other.named_parameters():
            src = frozen.get(name)
            local = src.to_local() if src is not None and hasattr(src, "to_local") else src
            if local is None or local.shape != p.shape or local.dtype != p.dtype or local.device != p.device:
                continue
            if local.data_ptr() != p.data_ptr():
                freed += p.numel() * p.element_size()
                p.data = local
    return freed


def tensor_bytes(sd: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def adapter_path_ok(path: str | None) -> str:
    if not path:
        raise CheckpointError("a LoRA disk upload needs WeightUpdateMeta.path (the adapter directory), got none")
    return os.fspath(path)
