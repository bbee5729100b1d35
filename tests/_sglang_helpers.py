"""Test helpers for the SGLang-protocol server and client: a uvicorn server in a thread on a free
loopback port, and a simulated trainer (rank 0) that broadcasts weights over gloo."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

WEIGHT_SPEC = {"layer.weight": (3, 4), "layer.bias": (4,)}


class ServerThread:
    """``uvicorn`` serving ``app`` on 127.0.0.1:<port> in a daemon thread (its own loop); port 0
    picks a free one, the port of a stopped server restarts it at the same address."""

    def __init__(self, app: Any, port: int = 0) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 10.0) -> ServerThread:
        """Blocking: call from a worker thread inside async tests (``asyncio.to_thread``)."""
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > end or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on {self.address}")
            time.sleep(0.01)
        return self

    def stop(self, *, force: bool = False, timeout: float = 10.0) -> None:
        """Shut uvicorn down; ``force`` drops in-flight requests (a crash, as the client sees it)."""
        self.server.force_exit = force
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()


def trainer_broadcast(port: int, world_size: int, group_name: str) -> None:
    """Rank 0 of the weight-update group: broadcast WEIGHT_SPEC tensors (values = arange) in order."""
    import torch

    from agentflow.engines._handoff import (
        broadcast_tensors,
        destroy_weight_update_group,
        init_weight_update_group,
    )

    group = init_weight_update_group("127.0.0.1", port, 0, world_size, group_name, "gloo", timeout_s=60)
    tensors = [(n, torch.arange(float(torch.Size(s).numel())).reshape(s)) for n, s in WEIGHT_SPEC.items()]
    broadcast_tensors(group, tensors, timeout_s=60)
    destroy_weight_update_group(group)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
