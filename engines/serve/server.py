"""``agentflow serve``: SGLang's native HTTP protocol over any agentflow ``InferenceEngine``.

:func:`build_app` wraps an engine (the in-process transformers ``LocalEngine``, or ``FakeEngine``
in tests) in a FastAPI app that answers SGLang 0.5.23's native routes with its payloads, defaults,
status codes, error shapes and success messages (summarised in ``docs/sglang.md``), so
``RemoteSGLangEngine`` and any SGLang client run against it unchanged. :func:`serve_main` is the
CLI entry point; with ``--backend sglang`` it launches a real SGLang server instead.

How generation maps onto an engine. With an engine that can abort one request and hand back its
tokens so far (``engine.abort(rid)``, as ``LocalEngine`` does), a non-streaming request is one
``engine.agenerate`` call; ``/pause_generation`` mode ``abort`` (and ``/abort_request``) aborts
it in the engine and answers **200 with the tokens generated so far** and
``finish_reason.type == "abort"``, as SGLang does. Otherwise, and for streaming, a request is
generated in chunks of ``chunk_tokens`` tokens, each one ``engine.agenerate`` call on prompt +
tokens so far: between chunks the server sees the partial output, so an abort answers with the
tokens of the finished chunks, streaming sends one cumulative chunk per engine chunk, and stop
strings are matched across chunk boundaries; the price is that every chunk boundary re-sends the
prompt (the engine re-prefills it), so keep ``chunk_tokens`` at 16 or more outside tests. Modes
``retract``/``in_place`` pause the engine itself (its transparent resume) and hold chunked
requests between chunks. Tokens carry the weight version that generated them
(``meta_info.weight_versions``).

Not supported (400 with the reason): sampling features the engine's ``GenerationConfig`` lacks
(``min_p``, penalties, grammars, seeds, ``ignore_eos``), prompt log-probs and top-k log-probs,
``input_embeds``, ``flattened_bucket`` weight loading. LoRA (``--enable-lora``,
``/load_lora_adapter``, ``lora_path``) is in ``engines/serve/_lora.py``. Not here: the engines themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import secrets
from collections.abc import Sequence
from typing import Any

from agentflow import InferenceEngine
from agentflow.engines.serve._core import ServerConfig, SGLangServer
from agentflow.engines.serve._guard import ServeLimits, check_bind, install_guards
from agentflow.engines.serve._lora import add_lora_arguments
from agentflow.engines.serve._routes import add_routes

__all__ = ["SGLangServer", "ServerConfig", "build_app", "serve_main"]


def build_app(
    engine: InferenceEngine, *, model_path: str, tokenizer: Any, config: ServerConfig | None = None,
    manage_engine: bool = True, limits: ServeLimits | None = None,
) -> Any:
    """The FastAPI app. ``manage_engine``: enter/exit ``engine`` in the app's lifespan (set False
    when the caller already runs ``async with engine:`` on the same loop). ``limits``: API keys and
    request caps (default: no key; caps of :class:`ServeLimits`, the vocabulary from the model)."""
    app = add_routes(SGLangServer(engine, tokenizer, model_path, config or ServerConfig()),
                     manage_engine=manage_engine)
    install_guards(app, limits or ServeLimits(vocab_size=_vocab_size(engine, tokenizer)))
    return app


def _vocab_size(engine: Any, tokenizer: Any) -> int | None:
    cfg = getattr(getattr(engine, "model", None), "config", None)
    n = getattr(cfg, "vocab_size", None)
    if isinstance(n, int):
        return n
    return len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None


# ---------------------------------------------------------------------------------- CLI
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="agentflow serve", description="Serve a model over SGLang's HTTP protocol.")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded default) or a HF model path")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--backend", choices=("local", "sglang"), default="local")
    p.add_argument("--chunk-tokens", type=int, default=16)
    p.add_argument("--max-running-requests", type=int, default=None,
                   help="sequences decoding at once (local backend: KV cache rows, default 16)")
    p.add_argument("--context-length", type=int, default=None,
                   help="prompt + output tokens of one request (local backend default 2048)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights and compute (as SGLang's --dtype); local backend: auto = float32. bfloat16 "
                        "generates faster on GPUs and on CPUs with AVX512-BF16 or AMX, slower where it is emulated")
    p.add_argument("--weight-version", default="default")
    p.add_argument("--random-seed", type=int, default=None,
                   help="sampling seed (as SGLang's); default: a fresh one per server, logged, so that servers "
                        "sharing a group's samples never draw alike")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds (sglang backend)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--api-key", default=None, help="required on every route but /health* (as SGLang's --api-key)")
    p.add_argument("--admin-api-key", default=None, help="required on the weight-update and pause routes")
    p.add_argument("--max-body-bytes", type=int, default=ServeLimits().max_body_bytes)
    p.add_argument("--max-n", type=int, default=ServeLimits().max_n, help="largest sampling_params.n")
    p.add_argument("--max-sequences", type=int, default=ServeLimits().max_sequences,
                   help="most sequences (prompts x n) one /generate call may start")
    add_lora_arguments(p)
    return p.parse_args(argv)


def serve_main(argv: Sequence[str] | None = None) -> int:
    """``agentflow serve``: run until interrupted. Returns the process exit code."""
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    if args.backend == "sglang":
        from agentflow.engines.serve._launch import run_sglang

        return run_sglang(args)
    import uvicorn

    from agentflow.engines.serve._lora import apply_lora_flags, parse_lora_paths

    limits = ServeLimits(api_key=args.api_key, admin_api_key=args.admin_api_key, max_body_bytes=args.max_body_bytes,
                         max_n=args.max_n, max_sequences=args.max_sequences)
    check_bind(args.host, limits)  # before loading the model
    engine, tokenizer, model_path, ctx = _local_engine(args.model, args.max_running_requests, args.context_length,
                                                       _sampling_seed(args), args.dtype)
    config = ServerConfig(chunk_tokens=args.chunk_tokens, weight_version=args.weight_version,
                          context_length=ctx, host=args.host, port=args.port,
                          enable_lora=apply_lora_flags(engine, args),
                          lora_paths=tuple(parse_lora_paths(args.lora_paths)), lora_dirs=tuple(args.lora_dir or ()))
    limits = dataclasses.replace(limits, vocab_size=_vocab_size(engine, tokenizer), max_new_tokens=ctx)
    app = build_app(engine, model_path=model_path, tokenizer=tokenizer, config=config, limits=limits)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _sampling_seed(args: argparse.Namespace) -> int:
    """``--random-seed``, or a fresh seed: two servers given one group's samples must not draw alike."""
    seed = args.random_seed if args.random_seed is not None else secrets.randbits(31)
    logging.getLogger("agentflow.serve").info("sampling seed %d (--random-seed)", seed)
    return seed


def _local_engine(
    model: str, max_running_requests: int | None = None, context_length: int | None = None, seed: int = 0,
    dtype: str = "auto",
) -> tuple[InferenceEngine, Any, str, int | None]:
    from agentflow.engines.serve._launch import local_engine

    return local_engine(model, max_running_requests, context_length, seed, dtype)

