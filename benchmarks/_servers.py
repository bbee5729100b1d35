"""Servers pinned to a core, for the benchmarks that put generation and training on separate cores.

``agentflow serve`` or a real vLLM, started through :mod:`agentflow.engines.launch` (process group,
health wait, log file, stop on the way out) with ``taskset`` and one thread, so the trainer can own
the other core. Not part of the product: the benchmarks' shared plumbing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator, Sequence

from agentflow import EngineError
from agentflow.engines.launch import ServerCommand, free_port, launched, serve_command, vllm_command


def pinned(cpus: set[int]) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child to ``cpus``; None where this process may not use them all."""
    if not hasattr(os, "sched_setaffinity") or not cpus <= os.sched_getaffinity(0):
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def default_vllm_python() -> str:
    from agentflow.engines.model_loading import cache_dir

    return str(cache_dir() / "vllm-venv" / "bin" / "python")


def _on_core(cmd: ServerCommand, core: int, env: dict[str, str]) -> ServerCommand:
    taskset = ["taskset", "-c", str(core)] if pinned({core}) is not None and shutil.which("taskset") else []
    return dataclasses.replace(cmd, argv=[*taskset, *cmd.argv], env={**cmd.env, "OMP_NUM_THREADS": "1", **env})


@contextlib.contextmanager
def server_on_core(kind: str, model: str, log_dir: pathlib.Path, *, core: int = 0, context: int = 256,
                   rows: int = 64, python: str | None = None, seed: int = 0, extra: Sequence[str] = (),
                   startup_timeout_s: float = 300.0, dtype: str = "float32") -> Iterator[str]:
    """``kind`` = ``"serve"`` (agentflow serve) or ``"vllm"`` on ``core`` with one thread, generating
    in ``dtype``; yields its ``host:port``. ``rows``: the most requests decoded together; ``context``: the longest
    sequence. A server that dies or stays unhealthy ends the benchmark with its log's tail."""
    port = free_port()
    if kind == "vllm":
        python = python or default_vllm_python()
        if not pathlib.Path(python).exists():
            raise SystemExit(f"no vLLM interpreter at {python}; build one with `bash scripts/vllm_env.sh` "
                             "or pass --vllm-python")
        cmd = _on_core(vllm_command(python, model, port=port, dtype=dtype, max_model_len=context, seed=seed,
                                    extra=["--max-num-seqs", str(rows), *extra]),
                       core, {"VLLM_CPU_OMP_THREADS_BIND": str(core)})
    elif kind == "serve":
        import sys

        cmd = _on_core(serve_command(python or sys.executable, model, port=port, seed=seed,
                                     extra=["--max-running-requests", str(rows), "--context-length", str(context),
                                            "--log-level", "warning", "--dtype", dtype, *extra]), core, {})
    else:
        raise SystemExit(f"expected server 'serve' or 'vllm', got {kind!r}")
    try:
        with launched([cmd], log_dir, startup_timeout_s=startup_timeout_s) as [server]:
            yield server.command.address
    except EngineError as e:
        raise SystemExit(str(e)) from e
