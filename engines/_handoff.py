"""The weight hand-off, both ends of the wire: HF checkpoints on disk, and the broadcast group that
SGLang's ``/init_weights_update_group`` + ``/update_weights_from_distributed`` expect.

Disk: :func:`write_hf_checkpoint` writes ``config.json``, ``generation_config.json``, safetensors
(sharded with an index above ``max_shard_size``) and the tokenizer, loadable by
``AutoModelForCausalLM.from_pretrained``, SGLang and vLLM; :func:`read_hf_state_dict` is the one
reader of such a directory (the local engine's disk updates, ``agentflow serve``, tests).

Broadcast (SGLang's ``/init_weights_update_group`` + ``/update_weights_from_distributed``): the
trainer joins a process group *separate from its
training group* as rank 0 and each inference rank joins as ``rank_offset + tp_rank``; both sides
call :func:`init_weight_update_group`, which does what SGLang's ``init_custom_process_group``
does (TCP rendezvous at ``master_address:master_port`` hosted by rank 0, a ``PrefixStore`` named
after the group, ``_new_process_group_helper``). The trainer then broadcasts every tensor from
rank 0 in the order of the ``names``/``dtypes``/``shapes`` lists the server received
(:func:`broadcast_tensors`); :func:`receive_tensors` is the receiving side (``agentflow serve``).
Every collective runs under its own deadline and fails with :class:`EngineError` instead of
hanging, so a thread that runs one is never left stuck in it. Not here: the HTTP calls (the remote
engine's protocol adapters make them, the server's routes answer them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from agentflow import CheckpointError, EngineError

__all__ = ["WeightSpec", "broadcast_tensors", "bucketed", "destroy_weight_update_group", "init_weight_update_group",
           "read_hf_state_dict", "receive_tensors", "write_hf_checkpoint"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class WeightSpec:
    """One tensor of a weight update, as ``/update_weights_from_distributed`` lists it."""

    name: str
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=to_dtype(self.dtype)).element_size()

    @staticmethod
    def payload(specs: Sequence[WeightSpec]) -> dict[str, list[Any]]:
        """The ``names``/``dtypes``/``shapes`` fields of the HTTP request body."""
        return {"names": [s.name for s in specs], "dtypes": [s.dtype for s in specs],
                "shapes": [list(s.shape) for s in specs]}


def to_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise EngineError(f"unknown torch dtype name {name!r}; expected e.g. 'bfloat16', 'float16', 'float32'")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bucketed(specs: Sequence[WeightSpec], bucket_bytes: int) -> Iterator[list[WeightSpec]]:
    """Consecutive groups of ``specs`` of at most ``bucket_bytes`` each (a bigger tensor is alone)."""
    bucket: list[WeightSpec] = []
    size = 0
    for s in specs:
        if bucket and size + s.nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(s)
        size += s.nbytes
    if bucket:
        yield bucket


# ----------------------------------------------------------------------------- HF checkpoints
def write_hf_checkpoint(
    path: str, state_dict: Mapping[str, torch.Tensor], config: Any, *, generation_config: Any = None,
    tokenizer: Any = None, max_shard_size: str = "5GB",
) -> None:
    """Write an HF checkpoint directory (call on one rank only)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in state_dict.items()}
    split = split_torch_state_dict_into_shards(sd, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: sd[n] for n in names}, os.path.join(path, filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    config.save_pretrained(path)
    if generation_config is not None:
        generation_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def read_hf_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory, on CPU: the files its
    ``model.safetensors.index.json`` lists, else every ``*.safetensors`` file in it.

    Raises:
        CheckpointError: the directory is missing or holds no safetensors.
    """
    from safetensors.torch import load_file

    root = os.fspath(path)
    index = os.path.join(root, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(root) if n.endswith(".safetensors")) if os.path.isdir(root) else []
    if not files:
        raise CheckpointError(
            f"no *.safetensors files (nor model.safetensors.index.json) in {root!r}; expected an HF checkpoint "
            "directory written by FSDPEngine.save, agentflow's trainer or model.save_pretrained(path)"
        )
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(os.path.join(root, name)))
    return out


# ----------------------------------------------------------------------------- broadcast group
def init_weight_update_group(
    master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
    backend: str = "nccl", timeout_s: float = 600.0,
) -> dist.ProcessGroup:
    """Join the weight-update group (trainer: rank 0; server ranks: ``rank_offset + tp_rank``).

    Blocks until all ``world_size`` ranks joined; mirrors SGLang's ``init_custom_process_group``
    so both sides meet. Works next to an existing default group (the trainer's FSDP world).

    Raises:
        EngineError: if the group did not form within ``timeout_s``.
    """
    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world, rendezvous

    if backend not in ("nccl", "gloo"):
        raise EngineError(f"weight-update group backend must be 'nccl' (GPUs) or 'gloo' (CPU), got {backend!r}")
    if not 0 <= rank < world_size:
        raise EngineError(f"weight-update group rank must be in [0, world_size={world_size}), got {rank}")
    timeout = timedelta(seconds=timeout_s)
    try:
        store, rank, world_size = next(
            rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout)
        )
        store.set_timeout(timeout)
        prefixed = PrefixStore(group_name, store)
        pg, _ = _new_process_group_helper(
            world_size, rank, [], backend, prefixed, group_name=group_name, backend_options=None, timeout=timeout
        )
    except (RuntimeError, ValueError, TimeoutError) as e:
        raise EngineError(
            f"weight-update group {group_name!r} at {master_address}:{master_port} (rank {rank} of {world_size}, "
            f"{backend}) did not form within {timeout_s:.0f} s: {e}. Expected every inference rank to join "
            "(POST /init_weights_update_group with the same address, port, world size and group name) "
            "while this call waits; check that they can reach the address and that the port is free"
        ) from e
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_weight_update_group(pg: dist.ProcessGroup) -> None:
    """Leave the group (both sides, when the trainer is done with it or before a process exits)."""
    dist.destroy_process_group(pg)


def _wait(work: Any, what: str, timeout_s: float) -> None:
    try:
        ok = work.wait(timedelta(seconds=timeout_s))
    except RuntimeError as e:
        raise EngineError(
            f"{what} did not finish within {timeout_s:.0f} s: {e}. Expected every inference rank to be inside "
            "/update_weights_from_distributed with the same names/dtypes/shapes in the same order"
        ) from e
    if ok is False:
        raise EngineError(f"{what} failed or timed out after {timeout_s:.0f} s; the weight-update group is unusable")


def broadcast_tensors(pg: dist.ProcessGroup, tensors: Iterable[tuple[str, torch.Tensor]], timeout_s: float) -> int:
    """Broadcast each tensor from rank 0 of ``pg``, in order; return the bytes sent."""
    sent = 0
    for name, t in tensors:
        work = dist.broadcast(t.contiguous(), src=0, group=pg, async_op=True)
        _wait(work, f"broadcast of {name!r}", timeout_s)
        sent += t.numel() * t.element_size()
    return sent


def receive_tensors(
    pg: dist.ProcessGroup, specs: Sequence[WeightSpec], device: torch.device | str, timeout_s: float
) -> dict[str, torch.Tensor]:
    """The receiving side of :func:`broadcast_tensors`: allocate each spec and receive it."""
    out: dict[str, torch.Tensor] = {}
    for s in specs:
        t = torch.empty(s.shape, dtype=to_dtype(s.dtype), device=device)
        _wait(dist.broadcast(t, src=0, group=pg, async_op=True), f"receive of {s.name!r}", timeout_s)
        out[s.name] = t
    return out
