"""A standalone torch.distributed process group for weight broadcasts (SGLang's wire convention).

SGLang servers join the trainer's weight-update group with ``init_custom_process_group``: a TCP
rendezvous at ``tcp://master_address:master_port`` (the trainer, rank 0, hosts the store), the store
wrapped in ``PrefixStore(group_name)``, and a process group built from it *without* a default
(world) group, so the process can still have its own. :func:`init_weight_update_group` builds the
same group with the same keys, so a trainer written for SGLang talks to ``agentflow serve``
unchanged, and the trainer side can use this function too.

Blocking: every function here blocks (the group forms only when all ranks join; a broadcast
returns when every rank took part). Call them from a worker thread (``asyncio.to_thread``) with a
deadline. Not here: which tensors are sent (the server and the trainer agree through the
``/update_weights_from_distributed`` payload).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

__all__ = ["broadcast_tensors", "destroy_weight_update_group", "init_weight_update_group"]


def init_weight_update_group(
    *, master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
    backend: str = "nccl", timeout_s: float = 600.0,
) -> dist.ProcessGroup:
    """Join (rank > 0) or host (rank 0) the group; returns once all ``world_size`` ranks joined.

    ``backend`` is ``"nccl"`` (GPUs) or ``"gloo"`` (CPU tensors; what the tests use).
    """
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _new_process_group_helper, _world

    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    timeout = timedelta(seconds=timeout_s)
    url = f"tcp://{master_address}:{master_port}"
    store, rank, world_size = next(dist.rendezvous(url, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = dist.PrefixStore(group_name, store)
    # The private helper is the only way to build a group without a default group; SGLang (and the
    # trainers written for it) do exactly this, so the store keys match theirs.
    pg, _ = _new_process_group_helper(
        world_size, rank, [], backend, store, group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def broadcast_tensors(tensors: list[torch.Tensor], group: dist.ProcessGroup, src: int = 0) -> None:
    """Broadcast each tensor from ``src`` in list order (in place on receivers)."""
    import torch.distributed as dist

    for t in tensors:
        dist.broadcast(t, src=src, group=group)


def destroy_weight_update_group(group: dist.ProcessGroup) -> None:
    import torch.distributed as dist

    dist.destroy_process_group(group)
