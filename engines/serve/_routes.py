"""The HTTP routes of ``agentflow serve`` (FastAPI), over :class:`SGLangServer`'s state machine.

Each route reproduces SGLang 0.5.23's request model, status codes, body shapes and success
messages; see ``engines/serve/server.py`` for the semantics and ``docs/sglang.md`` for the
protocol. Not here: generation and pausing logic (the server class).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel

import agentflow
from agentflow import WeightUpdateMeta
from agentflow.engines.serve._guard import check_items, read_json, until_disconnect
from agentflow.engines.serve._lora import add_lora_routes, load_startup_adapters
from agentflow.engines.serve._protocol import ContractError, parse_generate

if TYPE_CHECKING:
    from agentflow.engines.serve._core import SGLangServer, _Run

__all__ = ["add_routes"]

_FLUSH_TEXT = (
    "Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting requests, "
    "the operation will not be performed.)\n"
)


# ----------------------------------------------------------------------------------- request models
class PauseGenerationReqInput(BaseModel):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class ContinueGenerationReqInput(BaseModel):
    torch_empty_cache: bool = True


class UpdateWeightFromDiskReqInput(BaseModel):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    flush_cache: bool = True
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False


class UpdateWeightVersionReqInput(BaseModel):
    new_version: str
    abort_all_requests: bool = True


class AbortReq(BaseModel):
    rid: str = ""
    abort_all: bool = False


class InitWeightsUpdateGroupReqInput(BaseModel):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class UpdateWeightsFromDistributedReqInput(BaseModel):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None


class DestroyWeightsUpdateGroupReqInput(BaseModel):
    group_name: str = "weight_update_group"


# ----------------------------------------------------------------------------------- helpers
def _error(status: int, message: str) -> JSONResponse:
    """``_create_error_response``: ``{"error": {"message": ...}}``."""
    return JSONResponse({"error": {"message": message}}, status_code=status)


def _http_error(status: int, message: str) -> JSONResponse:
    """The ``ErrorResponse`` shape of validation errors and HTTPExceptions."""
    body = {"object": "error", "message": message, "type": HTTPStatus(status).phrase, "param": None, "code": status}
    return JSONResponse(body, status_code=status)


def _int_or_none(v: str | None) -> int | None:
    try:
        return None if v is None else int(v)
    except ValueError:
        return None


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _drain(server: SGLangServer, run: _Run) -> BaseException | None:
    try:
        async for _ in server.generate(run):
            pass
    except Exception as e:  # reported as the request's error response
        return e
    return None


async def _collect(server: SGLangServer, runs: Sequence[_Run], is_batch: bool) -> JSONResponse:
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(_drain(server, r)) for r in runs]
    for t in tasks:
        err = t.result()
        if isinstance(err, ValueError):
            return _error(400, str(err))
        if err is not None:
            return _http_error(500, f"generation failed: {type(err).__name__}: {err}")
    bodies = [server.body(r, final=True) for r in runs]
    return JSONResponse(bodies if is_batch else bodies[0])


async def _feed(server: SGLangServer, run: _Run, index: int | None, q: asyncio.Queue[str | None]) -> None:
    try:
        async for r in server.generate(run):
            chunk = server.body(r, final=r.finish is not None)
            if index is not None:
                chunk["index"] = index
            await q.put(_sse(chunk))
    except Exception as e:  # an error after the 200 started: one error event, as SGLang does
        code = 400 if isinstance(e, ValueError) else 500
        await q.put(_sse({"error": {"message": str(e), "type": "invalid_request_error", "code": code,
                                    "retryable": False}}))
    finally:
        await q.put(None)


async def _stream(server: SGLangServer, runs: Sequence[_Run], is_batch: bool) -> AsyncIterator[str]:
    q: asyncio.Queue[str | None] = asyncio.Queue()
    try:
        async with asyncio.TaskGroup() as tg:
            for i, r in enumerate(runs):
                tg.create_task(_feed(server, r, i if is_batch else None, q))
            left = len(runs)
            while left:
                chunk = await q.get()
                if chunk is None:
                    left -= 1
                else:
                    yield chunk
    finally:
        server.unregister(runs)
        await server.gate.leave()
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------------- app
def add_routes(server: SGLangServer, *, manage_engine: bool) -> FastAPI:  # noqa: C901, PLR0915  (one route table)
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if manage_engine:
                await stack.enter_async_context(server.engine)
            await load_startup_adapters(server.lora, server.config.lora_paths)
            try:
                yield
            finally:
                server.shutting_down = True
                server.abort(abort_all=True)
                await _destroy_groups(server)

    app = FastAPI(title="agentflow serve (SGLang protocol)", lifespan=lifespan)
    app.state.server = server
    add_lora_routes(app, server.lora)  # /load_lora_adapter, /unload_lora_adapter

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _http_error(400, str(exc))

    @app.get("/health")
    @app.get("/health_generate")
    async def health() -> Response:
        ok = not server.shutting_down and await server.healthy()
        return Response(status_code=200 if ok else 503)

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def model_info() -> dict[str, Any]:
        cfg = getattr(getattr(server.engine, "model", None), "config", None)
        return {
            "model_path": server.model_path, "tokenizer_path": server.model_path, "is_generation": True,
            "preferred_sampling_params": None, "weight_version": server.weight_version,
            "served_model_name": server.model_path, "has_image_understanding": False,
            "has_audio_understanding": False, "model_type": getattr(cfg, "model_type", None),
            "architectures": getattr(cfg, "architectures", None),
        }

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def server_info() -> dict[str, Any]:
        c = server.config
        return {
            "model_path": server.model_path, "tokenizer_path": server.model_path, "host": c.host, "port": c.port,
            "tp_size": 1, "dp_size": 1, "context_length": c.context_length, "chunk_tokens": c.chunk_tokens,
            "weight_version": server.weight_version, "backend": "agentflow", "engine": type(server.engine).__name__,
            "internal_states": [{"num_running_reqs": len(server.running), "paused": server.gate.paused}],
            "version": f"agentflow-{agentflow.__version__}",
        }

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Response:
        try:
            body = await read_json(request)  # large bodies are parsed off the loop
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _http_error(400, f"JSON decode error: {e}")
        try:
            items, is_batch, stream = parse_generate(body, server.tokenizer)
            check_items(items, request.app.state.limits)  # n, sequences, max_new_tokens, vocabulary
            for it in items:
                server.check_context(it)
        except ContractError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except ValueError as e:
            return _error(400, str(e))
        await server.gate.enter()
        try:
            runs = server.register(items, stream=stream)
        except ValueError as e:
            await server.gate.leave()
            return _error(400, str(e))
        if stream:
            return StreamingResponse(_stream(server, runs, is_batch), media_type="text/event-stream")
        try:  # a client that disconnects aborts its generations
            return await until_disconnect(request, _collect(server, runs, is_batch),
                                          lambda: [server.abort(r.item.rid) for r in runs])
        finally:
            server.unregister(runs)
            await server.gate.leave()

    @app.post("/pause_generation")
    async def pause_generation(req: PauseGenerationReqInput) -> dict[str, str]:
        await server.pause(req.mode)
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post("/continue_generation")
    async def continue_generation(req: ContinueGenerationReqInput) -> dict[str, str]:
        await server.resume()
        return {"message": "Generation continued successfully.", "status": "ok"}

    @app.post("/abort_request")
    async def abort_request(req: AbortReq) -> Response:
        server.abort(req.rid, abort_all=req.abort_all)
        return Response(status_code=200)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> PlainTextResponse:
        ok = not server.running
        if ok and callable(getattr(server.engine, "flush_cache", None)):
            await asyncio.to_thread(server.engine.flush_cache)  # type: ignore[attr-defined]  # optional hook
        return PlainTextResponse(_FLUSH_TEXT, status_code=200 if ok else 400)

    @app.post("/update_weight_version")
    async def update_weight_version(req: UpdateWeightVersionReqInput) -> dict[str, Any]:
        if req.abort_all_requests:
            server.abort(abort_all=True)
        server.set_weight_version(req.new_version)
        return {"success": True, "message": f"Weight version updated to {req.new_version}",
                "new_version": req.new_version}

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(req: UpdateWeightFromDiskReqInput) -> JSONResponse:
        if req.abort_all_requests:
            server.abort(abort_all=True)
        paused = len(server.running) if server.gate.paused else 0
        try:
            meta = WeightUpdateMeta(type="disk", path=req.model_path, version=_int_or_none(req.weight_version))
            await server.update_weights(meta, req.weight_version)
        except Exception as e:  # the protocol answers failures with 400 + success=false
            return JSONResponse({"success": False, "message": f"Failed to update weights: {e}.",
                                 "num_paused_requests": paused}, status_code=400)
        msg = "Succeeded to update model weights."
        if req.weight_version is not None:
            msg += f" Weight version updated to {req.weight_version}."
        return JSONResponse({"success": True, "message": msg, "num_paused_requests": paused})

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(req: InitWeightsUpdateGroupReqInput) -> JSONResponse:
        try:
            await _init_group(server, req)
        except Exception as e:  # 400 + success=false, as SGLang
            return JSONResponse({"success": False, "message": f"Failed to initialize custom process group: {e}."},
                                status_code=400)
        return JSONResponse({"success": True, "message": "Succeeded to initialize custom process group."})

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(req: UpdateWeightsFromDistributedReqInput) -> JSONResponse:
        try:
            await _update_from_distributed(server, req)
        except Exception as e:  # 400 + success=false, as SGLang
            return JSONResponse({"success": False, "message": f"Failed to update parameter online: {e}. The model "
                                 "weights may be partially updated."}, status_code=400)
        msg = "Succeeded to update parameter online."
        if req.weight_version is not None:
            msg += f" Weight version updated to {req.weight_version}."
        return JSONResponse({"success": True, "message": msg})

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(req: DestroyWeightsUpdateGroupReqInput) -> JSONResponse:
        entry = server.groups.pop(req.group_name, None)
        if entry is None:
            return JSONResponse({"success": False, "message": f"Failed to destroy custom process group: no group "
                                 f"named {req.group_name!r}; known: {sorted(server.groups)}."}, status_code=400)
        from agentflow.engines._handoff import destroy_weight_update_group

        await asyncio.to_thread(destroy_weight_update_group, entry[0])
        return JSONResponse({"success": True, "message": "Succeeded to destroy custom process group."})

    return app


# ----------------------------------------------------------------------------------- weight groups
async def _init_group(server: SGLangServer, req: InitWeightsUpdateGroupReqInput) -> None:
    from agentflow.engines._handoff import init_weight_update_group

    if req.group_name in server.groups:
        raise ValueError(f"group {req.group_name!r} already exists; destroy it first")
    t = server.config.dist_timeout_s
    async with asyncio.timeout(t + 5):
        pg = await asyncio.to_thread(
            init_weight_update_group, req.master_address, req.master_port, req.rank_offset, req.world_size,
            req.group_name, req.backend, t,
        )
    server.groups[req.group_name] = (pg, req.backend)


async def _update_from_distributed(server: SGLangServer, req: UpdateWeightsFromDistributedReqInput) -> None:
    from agentflow.engines._handoff import WeightSpec, receive_tensors

    entry = server.groups.get(req.group_name)
    if entry is None:
        raise ValueError(f"no weight-update group {req.group_name!r}; call /init_weights_update_group first")
    if req.load_format not in (None, "auto"):
        raise ValueError(f"load_format={req.load_format!r} is not supported by agentflow serve; expected null")
    if not len(req.names) == len(req.dtypes) == len(req.shapes):
        raise ValueError(f"names, dtypes, shapes differ in length: {len(req.names)}, {len(req.dtypes)}, "
                         f"{len(req.shapes)}; expected one entry per tensor")
    if req.abort_all_requests:
        server.abort(abort_all=True)
    async with server.gate.writer():
        group, backend = entry
        device = "cuda" if backend == "nccl" else "cpu"
        specs = [WeightSpec(n, d, tuple(s)) for n, d, s in zip(req.names, req.dtypes, req.shapes, strict=True)]
        # each receive has its own deadline inside the thread: a timed-out one leaves no thread behind
        received = await asyncio.to_thread(receive_tensors, group, specs, device, server.config.dist_timeout_s)
        meta = WeightUpdateMeta(type="mem", state_dict=received, version=_int_or_none(req.weight_version))
        await server.engine.aupdate_weights(meta)
        await server.after_weight_update()
        if req.weight_version is not None:
            server.set_weight_version(req.weight_version)


async def _destroy_groups(server: SGLangServer) -> None:
    if not server.groups:
        return
    from agentflow.engines._handoff import destroy_weight_update_group

    for name in list(server.groups):
        await asyncio.to_thread(destroy_weight_update_group, server.groups.pop(name)[0])
