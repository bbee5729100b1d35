"""The two Ray actors of ``agentflow launch``: one inference server, one trainer rank.

Each actor runs its work as a child process with :class:`agentflow.engines.launch.ServerProcess`
(the same code ``agentflow train`` uses to start local servers): :class:`ServerActor` runs the
configured server command and waits for its ``/health``; :class:`RankActor` runs ``python -m
agentflow train`` with torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), so a rank runs exactly the torchrun code path. The child writes
to the actor's stdout, which Ray streams to the launching terminal with the actor's name
(``server-0``, ``rank-1``) as prefix. The child is in its own process group (a Ctrl-C in the
terminal reaches the launcher only) and gets SIGTERM if the actor dies (Linux).

The actors are asyncio actors: ``watch``/``wait`` block on the child in a thread while ``stop``
can still be called. Not here: placement, restarts, the job's lifetime (:mod:`agentflow.recipe.launch`).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from typing import Any

from agentflow.engines.launch import ServerCommand, ServerProcess, free_port
from agentflow.errors import ConfigError

__all__ = ["RankActor", "ServerActor", "server_argv"]

_ENV_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.S)
_STDOUT = pathlib.Path("/dev/stdout")  # the actor's stdout: Ray forwards it to the driver with a prefix


def server_argv(template: str, **values: Any) -> tuple[list[str], dict[str, str]]:
    """The server command with its placeholders filled in, and the ``NAME=value`` words before it
    as environment (``VLLM_SERVER_DEV_MODE=1 vllm serve ...``, as a shell would). A leading
    ``agentflow`` runs this Python's ``-m agentflow`` (no dependence on PATH on the node)."""
    try:
        argv = [part.format(**values) for part in shlex.split(template)]
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"launch.server_command={template!r}: bad placeholder ({e}); use {{model}}, {{host}}, "
                          "{port}, {gpus} and {api_key}") from e
    env = {}
    while argv and _ENV_WORD.fullmatch(argv[0]):
        name, value = argv.pop(0).split("=", 1)
        env[name] = value
    if argv and argv[0] == "agentflow":
        argv = [sys.executable, "-m", "agentflow", *argv[1:]]
    return argv, env


def node_ip() -> str:
    import ray

    return str(ray.util.get_node_ip_address())


async def _port_free(host: str, port: int, deadline_s: float) -> None:
    """Wait until ``port`` can be bound on ``host`` (a killed server's port may linger briefly)."""
    end = time.monotonic() + deadline_s
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                return
            except OSError:
                if time.monotonic() > end:
                    return  # let the server fail with its own message
        await asyncio.sleep(0.5)  # another process holds the port: nothing to notify us


def _write_private(path: str, text: str) -> str:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:  # in mkdtemp's private directory
        f.write(text)
    return path


class ServerActor:
    """One inference server on its placement-group bundle (see the module docstring)."""

    def __init__(self, index: int, template: str, values: dict[str, Any]) -> None:
        self.index, self.template, self.values = index, template, values
        self.server: ServerProcess | None = None

    def __repr__(self) -> str:  # Ray's log prefix
        return f"server-{self.index}"

    async def start(self, port: int, startup_timeout_s: float) -> str:
        """Start the server on ``port`` (0 = a free one), wait for ``/health``; returns ``host:port``."""
        host = node_ip()
        port = port or free_port(host)
        await _port_free(host, port, 30.0)
        argv, env = server_argv(self.template, host=host, port=port, **self.values)
        self.server = ServerProcess(ServerCommand(argv, {"PYTHONUNBUFFERED": "1", **env}, host, port, repr(self)),
                                    _STDOUT)
        self.server.start()
        await asyncio.to_thread(self.server.wait_healthy, startup_timeout_s)
        return f"{host}:{port}"

    async def watch(self) -> int:
        """Return the server's exit code once it exits."""
        proc = self.server.proc if self.server is not None else None
        return -1 if proc is None else await asyncio.to_thread(proc.wait)

    async def stop(self, grace_s: float) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.stop, grace_s)


class RankActor:
    """One trainer rank: ``python -m agentflow train CONFIG`` with torchrun's environment."""

    def __init__(self, rank: int, local_rank: int, world: int) -> None:
        self.rank, self.local_rank, self.world = rank, local_rank, world
        self.child: ServerProcess | None = None
        self.tmp = tempfile.mkdtemp(prefix=f"agentflow-rank{rank}-")

    def __repr__(self) -> str:  # Ray's log prefix
        return f"rank-{self.rank}"

    async def endpoint(self, port: int) -> tuple[str, int, list[str]]:
        """This node's address, ``port`` (0 = a free one; rank 0's ``MASTER_ADDR``/``MASTER_PORT``)
        and the GPUs Ray gave this actor."""
        import ray

        host = node_ip()
        return host, port or free_port(host), [str(g) for g in ray.get_gpu_ids()]

    async def start(self, config_yaml: str, master: tuple[str, int], env: dict[str, str], args: list[str]) -> str:
        """Write the config on this node and start the rank; returns the node's address."""
        path = _write_private(os.path.join(self.tmp, "config.yaml"), config_yaml)
        torchrun = {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world),
                    "LOCAL_WORLD_SIZE": env.pop("LOCAL_WORLD_SIZE", "1"), "MASTER_ADDR": master[0],
                    "MASTER_PORT": str(master[1]), "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "agentflow", "train", path, *args]
        host = node_ip()
        self.child = ServerProcess(ServerCommand(argv, {**env, **torchrun}, host, 0, repr(self)), _STDOUT)
        self.child.start()
        return host

    async def wait(self) -> int:
        """The rank's exit code once it exits."""
        proc = self.child.proc if self.child is not None else None
        return -1 if proc is None else await asyncio.to_thread(proc.wait)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM (the run stops gracefully and checkpoints), SIGKILL after ``grace_s``."""
        if self.child is not None:
            await asyncio.to_thread(self.child.stop, grace_s)
        shutil.rmtree(self.tmp, ignore_errors=True)
