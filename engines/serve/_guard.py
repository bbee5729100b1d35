"""``agentflow serve``'s gate: API keys, request limits, and aborting what nobody waits for.

- **API keys**, with SGLang's semantics (``--api-key``, ``--admin-api-key``): ``OPTIONS`` requests
  and paths starting with ``/health``, ``/ready`` or ``/metrics`` are always allowed. A key is
  accepted as ``Authorization: Bearer <key>`` (scheme case-insensitive) or ``x-api-key: <key>``,
  compared in constant time. Ordinary routes need ``api_key`` when it is set. Control routes
  (:data:`ADMIN_PATHS`: everything that changes what is served: weights, adapters, the version,
  pause/continue, cache flush) need ``admin_api_key`` when
  it is set, else ``api_key`` when that is set. A refusal is ``401 {"error": "Unauthorized"}``.
- **Limits**, each a 4xx naming the limit and how to raise it: request body bytes (413, checked on
  ``Content-Length`` and on the bytes actually received), ``sampling_params.n`` and sequences per
  call (400), ``max_new_tokens`` (400), token ids outside the vocabulary (400). Large JSON bodies
  are parsed off the event loop.
- **Disconnects**: a non-streaming ``/generate`` whose client went away is aborted, so its
  generations stop using the engine (a streaming one is cancelled by the server framework).

:func:`check_bind` refuses a non-loopback bind without an API key. Not here: the routes' own
semantics (``engines/serve/_routes.py``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agentflow.errors import ConfigError

__all__ = ["ADMIN_PATHS", "ServeLimits", "check_bind", "check_items", "install_guards", "read_json",
           "until_disconnect"]

ADMIN_PATHS = frozenset({
    "/update_weights_from_disk", "/update_weights_from_distributed", "/init_weights_update_group",
    "/destroy_weights_update_group", "/update_weight_version", "/pause_generation", "/continue_generation",
    "/flush_cache", "/load_lora_adapter", "/unload_lora_adapter",
})
_OPEN_PREFIXES = ("/health", "/ready", "/metrics")
_OFF_LOOP_BYTES = 256 * 1024  # parse bodies larger than this in a thread


@dataclass(frozen=True, slots=True)
class ServeLimits:
    """Who may call ``agentflow serve`` and how much one request may ask for.

    Attributes:
        api_key: required on every route but health/metrics when set (SGLang's ``--api-key``).
        admin_api_key: required on the control routes when set (SGLang's ``--admin-api-key``).
        max_body_bytes: largest request body; larger is 413.
        max_n: largest ``sampling_params.n``.
        max_sequences: most sequences (prompts x n) one ``/generate`` call may start.
        max_new_tokens: largest ``max_new_tokens`` (None = only the context length bounds it).
        vocab_size: token ids must be below it (None = not checked).
    """

    api_key: str | None = None
    admin_api_key: str | None = None
    max_body_bytes: int = 4 << 20
    max_n: int = 64
    max_sequences: int = 256
    max_new_tokens: int | None = None
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        problems = [f"{name} must be >= 1, got {getattr(self, name)}"
                    for name in ("max_body_bytes", "max_n", "max_sequences", "max_new_tokens", "vocab_size")
                    if getattr(self, name) is not None and getattr(self, name) < 1]
        for name in ("api_key", "admin_api_key"):
            key = getattr(self, name)
            if key is not None and not key.strip():
                problems.append(f"{name} is empty; pass a secret (e.g. python -c 'import secrets; "
                                "print(secrets.token_urlsafe(32))') or leave it out")
        if problems:
            raise ConfigError(problems)


def check_bind(host: str, limits: ServeLimits) -> None:
    """Refuse to listen beyond loopback without an API key."""
    if limits.api_key is None and not _is_loopback(host):
        raise ConfigError(f"refusing to serve on non-loopback host {host!r} without --api-key: anyone who can "
                          "reach it could load other weights or pause generation. Bind 127.0.0.1, or pass "
                          "--api-key <secret> (and --admin-api-key for the control routes)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------------ ASGI layers
class _Gate:
    """Pure ASGI (keeps the client's disconnect events visible to the routes)."""

    def __init__(self, app: Any, limits: ServeLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self._allowed(scope["method"], scope["path"], headers):
            await _respond(send, 401, {"error": "Unauthorized"})
            return
        cap = self.limits.max_body_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            await _respond(send, 413, _too_large(int(length), cap))
            return
        await self.app(scope, _capped(receive, cap), send)

    def _allowed(self, method: str, path: str, headers: dict[str, str]) -> bool:
        lim = self.limits
        if method == "OPTIONS" or path.startswith(_OPEN_PREFIXES):
            return True
        needed = (lim.admin_api_key or lim.api_key) if path in ADMIN_PATHS else lim.api_key
        return needed is None or _presented(headers, needed)


def _presented(headers: dict[str, str], key: str) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), key.encode()):
        return True
    x_key = headers.get("x-api-key")
    return x_key is not None and secrets.compare_digest(x_key.encode(), key.encode())


def _capped(receive: Any, cap: int) -> Any:
    """``receive`` that fails the request once more than ``cap`` body bytes arrived."""
    seen = 0

    async def wrapped() -> dict[str, Any]:
        nonlocal seen
        msg = await receive()
        if msg["type"] == "http.request":
            seen += len(msg.get("body", b""))
            if seen > cap:
                raise _BodyTooLarge(seen, cap)
        return msg

    return wrapped


class _BodyTooLarge(Exception):
    def __init__(self, seen: int, cap: int) -> None:
        super().__init__(f"more than {cap} bytes")
        self.seen, self.cap = seen, cap


def _too_large(size: int, cap: int) -> dict[str, Any]:
    return {"error": {"message": f"request body of {size} bytes is larger than the server's limit of {cap} bytes; "
                                 "send less (token ids, not text, for long prompts) or restart the server with a "
                                 "larger --max-body-bytes", "code": 413}}


async def _respond(send: Any, status: int, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})


def install_guards(app: Any, limits: ServeLimits) -> None:
    """Add the key check and the body cap to a FastAPI app, and answer an over-long body with 413."""
    from fastapi.responses import JSONResponse

    app.state.limits = limits
    app.add_middleware(_Gate, limits=limits)

    @app.exception_handler(_BodyTooLarge)
    async def _too_large_handler(request: Any, exc: _BodyTooLarge) -> Any:
        return JSONResponse(_too_large(exc.seen, exc.cap), status_code=413)


# ------------------------------------------------------------------------------------ /generate checks
async def read_json(request: Any) -> Any:
    """The request body as JSON, parsed in a thread when large (keeps the loop free)."""
    raw = await request.body()
    if len(raw) > _OFF_LOOP_BYTES:
        return await asyncio.to_thread(json.loads, raw)
    return json.loads(raw)


def check_items(items: Sequence[Any], limits: ServeLimits) -> None:
    """Raise ``ValueError`` (a 400) when a parsed ``/generate`` call exceeds a limit."""
    for it in items:
        sp = it.sampling
        if sp.n > limits.max_n:
            raise ValueError(f"sampling_params.n={sp.n} is larger than this server's limit of {limits.max_n}; "
                             "send several requests or restart the server with a larger --max-n")
        if limits.max_new_tokens is not None and sp.max_new_tokens > limits.max_new_tokens:
            raise ValueError(f"max_new_tokens={sp.max_new_tokens} is larger than this server's limit of "
                             f"{limits.max_new_tokens}; ask for fewer tokens")
        _check_vocab(it.input_ids, limits.vocab_size)
    if len(items) > limits.max_sequences:
        raise ValueError(f"this call would start {len(items)} sequences (prompts x n); the server's limit is "
                         f"{limits.max_sequences}. Split the batch or restart with a larger --max-sequences")


def _check_vocab(ids: Sequence[int], vocab: int | None) -> None:
    if vocab is None or not ids:
        return
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids contains token id {bad}; expected ids in [0, {vocab}) (the model's vocabulary). "
                         "Tokenize with this model's tokenizer")


async def until_disconnect(request: Any, work: Awaitable[Any], on_disconnect: Callable[[], None]) -> Any:
    """Await ``work``; if the client disconnects first, call ``on_disconnect`` (abort) and still
    await ``work`` (it ends promptly once aborted)."""
    job = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not job.done() and watcher.done() and watcher.result():
            on_disconnect()
        return await job
    finally:
        watcher.cancel()
        job.cancel()


async def _disconnected(request: Any) -> bool:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return True
