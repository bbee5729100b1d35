"""Process-group plumbing for the train engine: create the default group when none exists, and
small collectives on Python values.

Inside ``torchrun`` (``RANK``/``WORLD_SIZE`` set) the group is made from the environment; outside
it a world of size 1 on a free local port. CPU uses gloo; CUDA uses ``cpu:gloo,cuda:nccl`` so
object collectives and CPU tensors keep working next to NCCL. It does not pick GPUs for other
processes or handle multiple nodes beyond what ``torchrun``'s environment says.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["all_reduce_float", "all_reduce_max_int", "ensure_process_group", "free_port", "resolve_device"]


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_device(choice: str) -> torch.device:
    """``auto`` = this rank's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def ensure_process_group(device: torch.device, addr: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Create the default process group unless one exists; return True if this call created it.

    Args:
        device: the training device (selects the backend).
        addr: ``host:port`` of the rendezvous for a world of size 1 (default: a free local port);
            ignored under torchrun, which sets ``MASTER_ADDR``/``MASTER_PORT``.
        timeout_s: collective timeout.
    """
    if dist.is_initialized():
        return False
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        url = f"tcp://{addr}" if addr else f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group(backend, init_method=url, rank=0, world_size=1, timeout=timeout)
    return True


def all_reduce_float(value: float, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_max_int(value: int) -> int:
    return int(all_reduce_float(float(value), dist.ReduceOp.MAX))
