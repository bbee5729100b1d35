"""Backends of ``agentflow serve``: the in-process ``LocalEngine``, or a real SGLang server.

``local_engine`` loads the model (embedded name or HF directory) for :func:`serve_main`.
``run_sglang`` starts ``python -m sglang.launch_server`` as a child process, waits for its
``/health`` with a deadline, then waits for the child (Ctrl-C stops it). Not here: the HTTP app.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from typing import Any

from agentflow import InferenceEngine
from agentflow.errors import ConfigError, EngineError

__all__ = ["local_engine", "run_sglang", "sglang_command", "wait_healthy"]


def local_engine(
    model: str, max_running_requests: int | None = None, context_length: int | None = None, seed: int = 0,
    dtype: str = "auto",
) -> tuple[InferenceEngine, Any, str, int | None]:
    """(engine, tokenizer, model_path, context_length) for ``--backend local``; the two limits map
    to the engine's ``max_batch_size`` and ``max_seq_len`` (None = the engine's default), ``seed``
    to its sampling seed, ``dtype`` (``auto`` = ``float32``) to the dtype it runs in."""
    from agentflow.engines.local import LocalEngine, LocalEngineConfig
    from agentflow.engines.model_loading import load_model, resolve_model_dir

    path = str(resolve_model_dir(model))
    net, tokenizer = load_model(path)
    limits = {"max_batch_size": max_running_requests, "max_seq_len": context_length}
    # SGLang's pauses: requests paused "in_place" keep their KV through an update; the server
    # recomputes it itself after a "retract" pause.
    engine = LocalEngine(net, tokenizer, config=LocalEngineConfig(
        seed=seed, recompute_kv_on_update=False, dtype="float32" if dtype == "auto" else dtype,  # type: ignore[arg-type]
        **{k: v for k, v in limits.items() if v is not None}))
    return engine, tokenizer, path, engine.config.max_seq_len


def sglang_command(
    model_path: str, host: str, port: int, weight_version: str,
    max_running_requests: int | None = None, context_length: int | None = None, random_seed: int | None = None,
    dtype: str = "auto",
) -> list[str]:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--host", host,
           "--port", str(port), "--weight-version", weight_version]
    if dtype != "auto":
        cmd += ["--dtype", dtype]
    if random_seed is not None:
        cmd += ["--random-seed", str(random_seed)]
    if max_running_requests is not None:
        cmd += ["--max-running-requests", str(max_running_requests)]
    if context_length is not None:
        cmd += ["--context-length", str(context_length)]
    return cmd


def run_sglang(args: argparse.Namespace) -> int:
    """Launch SGLang, wait until healthy (``--startup-timeout``), then until it exits."""
    if importlib.util.find_spec("sglang") is None:
        raise ConfigError(
            "--backend sglang needs SGLang in this environment, and `import sglang` failed; install it with "
            "`pip install 'agentflow-rl[sglang]'` (or `pip install 'sglang[all]>=0.5.5'`, on a CUDA machine), "
            "or use `--backend local`"
        )
    from agentflow.engines.model_loading import resolve_model_dir
    from agentflow.engines.serve._lora import sglang_lora_flags

    cmd = sglang_command(str(resolve_model_dir(args.model)), args.host, args.port, args.weight_version,
                         args.max_running_requests, args.context_length, args.random_seed,
                         args.dtype) + sglang_lora_flags(args)
    proc = subprocess.Popen(cmd)
    try:
        wait_healthy(proc, f"http://{args.host}:{args.port}/health", args.startup_timeout)
        print(f"SGLang is serving on http://{args.host}:{args.port}", flush=True)  # noqa: T201  (CLI output)
        return proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def wait_healthy(proc: subprocess.Popen[Any], url: str, deadline_s: float, what: str = "sglang.launch_server") -> None:
    """Block (a CLI or script thread, no event loop) until ``url`` answers 200, ``proc`` dies, or
    ``deadline_s`` passes; ``what`` names the server in errors."""
    import httpx

    end = time.monotonic() + deadline_s
    delay = 0.2
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise EngineError(f"{what} exited with code {proc.returncode} before it became healthy; see its log")
        try:
            if httpx.get(url, timeout=min(30.0, max(1.0, end - time.monotonic()))).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(delay)  # waiting on another process: nothing to notify us
        delay = min(2 * delay, 5.0)
    raise EngineError(f"{what} did not answer 200 on {url} within {deadline_s} s; give it longer (large models "
                      "load slowly; for `agentflow serve --backend sglang`: --startup-timeout) or read its log")
