"""SGLang's LoRA protocol in ``agentflow serve``: the ``/load_lora_adapter`` and
``/unload_lora_adapter`` routes, ``lora_path`` on ``/generate``, and the server flags.

The payloads and answers follow SGLang (``LoadLoRAAdapterReqInput``: ``lora_name``, ``lora_path``,
``pinned``; ``UnloadLoRAAdapterReqInput``: ``lora_name``; both answer ``{"success",
"error_message", "loaded_adapters": {name: path}}``, 200 or 400). The routes need
``--enable-lora`` (or ``--lora-paths``), as in SGLang. ``lora_path`` on ``/generate`` names a
loaded adapter (a string, or one entry per prompt of a batch; null = the base model); a name that
is not loaded is a 400 with SGLang's message. Unloading first stops new requests for the adapter,
then waits for its requests in flight, then removes it from the engine.

The engine must have ``load_adapter(name, path)`` and ``unload_adapter(name)``
(:class:`~agentflow.engines.local.LocalEngine` does). Flags: ``--enable-lora``,
``--max-lora-rank``, ``--lora-target-modules``, ``--max-loras-per-batch``, ``--lora-paths``
(``PATH``, ``NAME=PATH`` or SGLang's JSON ``{"lora_name", "lora_path", "pinned"}``); with
``--backend sglang`` they are passed on to SGLang unchanged.

Not here: the engine side (``local/_lora.py``), the other routes (``_routes.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from agentflow.engines._lora import LORA_KEY

if TYPE_CHECKING:
    from fastapi import FastAPI

    from agentflow.engines.serve._protocol import GenerateItem

__all__ = ["LoraServing", "add_lora_arguments", "add_lora_routes", "apply_lora_flags", "parse_lora_paths",
           "sglang_lora_flags"]

_NOT_ENABLED = "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class LoadLoRAAdapterReqInput(BaseModel):
    lora_name: str
    lora_path: str
    pinned: bool = False


class UnloadLoRAAdapterReqInput(BaseModel):
    lora_name: str


class LoraServing:
    """The server's adapter registry: name -> path, and the requests in flight per adapter."""

    def __init__(self, engine: Any, enabled: bool, dirs: Sequence[str] = ()) -> None:
        self.engine = engine
        self.enabled = enabled
        self.dirs = tuple(os.path.realpath(d) for d in dirs)
        self.paths: dict[str, str] = {}
        self._in_flight: Counter[str] = Counter()
        self._idle: dict[str, asyncio.Event] = {}

    # ------------------------------------------------------------------ requests
    def check(self, items: Sequence[GenerateItem]) -> None:
        """Raise ValueError (a 400) if an item names an adapter that is not loaded."""
        wanted = {it.lora_path for it in items if it.lora_path is not None}
        missing = wanted - set(self.paths)
        if missing:
            raise ValueError(f"The following requested LoRA adapters are not loaded: {missing}\n"
                             f"Loaded adapters: {set(self.paths)}.")

    def acquire(self, items: Sequence[GenerateItem]) -> None:
        for it in items:
            if it.lora_path is not None:
                self._in_flight[it.lora_path] += 1

    def release(self, items: Sequence[GenerateItem]) -> None:
        for it in items:
            name = it.lora_path
            if name is not None and self._in_flight[name] > 0:
                self._in_flight[name] -= 1
                if self._in_flight[name] == 0 and name in self._idle:
                    self._idle[name].set()

    # ------------------------------------------------------------------ loading
    def check_request(self, name: str, path: str) -> None:
        """A runtime ``/load_lora_adapter``: a plain name, and a directory under ``--lora-dir``."""
        if not self.enabled:
            raise ValueError(_NOT_ENABLED)
        if not _NAME.fullmatch(name):
            shown = name if len(name) <= 80 else name[:80] + "..."
            raise ValueError(f"lora_name must be 1-128 characters of letters, digits, '.', '_' or '-' starting with a "
                             f"letter or digit; got {shown!r}")
        if not self.dirs:
            raise ValueError("this server loads no adapters at run time: start agentflow serve with --lora-dir DIR "
                             "(the directories adapters may be loaded from), or name them at start with --lora-paths")
        real = os.path.realpath(path)
        if not any(os.path.commonpath([real, d]) == d for d in self.dirs):
            raise ValueError(f"lora_path {path!r} is outside the adapter directories of this server "
                             f"({', '.join(self.dirs)}); put the adapter under one of them or add its directory "
                             "with --lora-dir at start")

    async def load(self, name: str, path: str) -> None:
        if not self.enabled:
            raise ValueError(_NOT_ENABLED)
        if name in self.paths:
            raise ValueError(f"Failed to load LoRA adapter {name} because it is already loaded")
        await self.engine.load_adapter(name, path)
        self.paths[name] = path

    async def unload(self, name: str) -> None:
        if not self.enabled:
            raise ValueError(_NOT_ENABLED)
        if name not in self.paths:
            raise ValueError(f"LoRA adapter {name!r} is not loaded; loaded: {sorted(self.paths)}")
        del self.paths[name]  # new requests for it are refused from now on
        while self._in_flight[name] > 0:
            ev = self._idle.setdefault(name, asyncio.Event())
            ev.clear()
            await ev.wait()
        self._idle.pop(name, None)
        await self.engine.unload_adapter(name)

    def answer(self, error: BaseException | None) -> tuple[int, dict[str, Any]]:
        body = {"success": error is None, "error_message": None if error is None else str(error),
                "loaded_adapters": dict(self.paths)}
        return (200 if error is None else 400), body


def request_metadata(item: GenerateItem) -> dict[str, Any]:
    """``ModelRequest.metadata`` for an item: always names its adapter (None = the base model,
    SGLang's meaning of a request without ``lora_path``)."""
    return {LORA_KEY: item.lora_path}


# ----------------------------------------------------------------------------------- routes
def add_lora_routes(app: FastAPI, lora: LoraServing) -> None:
    from fastapi.responses import JSONResponse

    @app.post("/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRAAdapterReqInput) -> JSONResponse:
        try:
            lora.check_request(req.lora_name, req.lora_path)
            await lora.load(req.lora_name, req.lora_path)
        except Exception as e:  # SGLang answers every failure with 400 + success=false
            status, body = lora.answer(e)
        else:
            status, body = lora.answer(None)
        return JSONResponse(body, status_code=status)

    @app.post("/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRAAdapterReqInput) -> JSONResponse:
        try:
            await lora.unload(req.lora_name)
        except Exception as e:  # SGLang answers every failure with 400 + success=false
            status, body = lora.answer(e)
        else:
            status, body = lora.answer(None)
        return JSONResponse(body, status_code=status)


async def load_startup_adapters(lora: LoraServing, specs: Sequence[tuple[str, str]]) -> None:
    for name, path in specs:
        await lora.load(name, path)


# ----------------------------------------------------------------------------------- flags
def add_lora_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (SGLang's flag)")
    p.add_argument("--max-lora-rank", type=int, default=None, help="largest adapter rank accepted")
    p.add_argument("--lora-target-modules", nargs="+", default=None, help="modules adapters may target")
    p.add_argument("--max-loras-per-batch", type=int, default=None,
                   help="adapters loaded at once (local backend; SGLang: adapters in one batch, default 8)")
    p.add_argument("--lora-paths", nargs="+", default=None, metavar="NAME=PATH",
                   help="adapters to load at start: PATH, NAME=PATH or JSON {lora_name, lora_path, pinned}")
    p.add_argument("--lora-dir", nargs="+", default=None, metavar="DIR",
                   help="directories /load_lora_adapter may load adapters from (none: no runtime loads)")


def parse_lora_paths(values: Sequence[str] | None) -> list[tuple[str, str]]:
    """``--lora-paths`` entries as (name, path); a bare PATH is its own name, as in SGLang."""
    out = []
    for v in values or ():
        if v.lstrip().startswith("{"):
            d = json.loads(v)
            out.append((str(d["lora_name"]), str(d["lora_path"])))
        elif "=" in v:
            name, path = v.split("=", 1)
            out.append((name, path))
        else:
            out.append((v, v))
    return out


def apply_lora_flags(engine: Any, args: argparse.Namespace) -> bool:
    """Give the (not yet started) local engine the LoRA limits of the flags; return whether LoRA
    is enabled (``--enable-lora`` or ``--lora-paths``)."""
    limits = {"max_lora_rank": args.max_lora_rank, "max_loras": args.max_loras_per_batch,
              "lora_target_modules": tuple(args.lora_target_modules) if args.lora_target_modules else None}
    limits = {k: v for k, v in limits.items() if v is not None}
    if limits:
        engine.config = dataclasses.replace(engine.config, **limits)
    return bool(args.enable_lora or args.lora_paths)


def sglang_lora_flags(args: argparse.Namespace) -> list[str]:
    """The LoRA flags of ``agentflow serve`` as ``sglang.launch_server`` arguments."""
    out = ["--enable-lora"] if args.enable_lora else []
    for flag, v in (("--max-lora-rank", args.max_lora_rank), ("--max-loras-per-batch", args.max_loras_per_batch)):
        if v is not None:
            out += [flag, str(v)]
    if args.lora_target_modules:
        out += ["--lora-target-modules", *args.lora_target_modules]
    if args.lora_paths:
        out += ["--lora-paths", *args.lora_paths]
    return out
