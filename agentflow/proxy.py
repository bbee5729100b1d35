"""An OpenAI-compatible HTTP proxy on the training event loop, one API key per episode.

Agents in other processes (or written against a base URL) talk to :class:`ProxyServer` with the
official ``openai`` (or ``anthropic``) client. Each episode gets a :class:`Session`
(``proxy.new_session()``) with its own API key; behind it sits an :class:`agentflow.OpenAIClient`
that records every completion, so the lead exports the episode's trajectories with
``session.export_trajectories(...)``.

Endpoints (a key as ``Authorization: Bearer <key>`` or ``x-api-key: <key>``):

- ``POST /v1/chat/completions``: a session key; same parameters and errors as ``OpenAIClient``;
  ``"stream": true`` answers with server-sent events (``data: {chunk}`` ... ``data: [DONE]``).
- ``POST /v1/responses``: a session key; the Responses API as ``OpenAIClient.responses`` (see
  :mod:`agentflow._responses`); ``"stream": true`` answers with ``event: <type>`` / ``data: {...}``
  events. ``previous_response_id`` resolves within the session only.
- ``GET`` / ``DELETE /v1/responses/{id}``: a session key; a response the session stored (404 for
  another session's or an unknown id).
- ``POST /v1/messages``: a session key; Anthropic's Messages API (:mod:`agentflow._messages`),
  errors in Anthropic's shape; ``POST /v1/messages/count_tokens``: the prompt's token count.
- ``POST /inference/v1/generate``: a session key; vLLM's tokens-only route
  (:mod:`agentflow._tokens_route`).
- ``GET /v1/models``: any valid key.
- ``POST /v1/sessions/{id}/reward`` with ``{"reward": r, "completion_id": optional}``: that
  session's key (or the admin key); without ``completion_id`` the last completion is rewarded.
- ``GET /v1/sessions/{id}``: the session's stats and completion ids.
- ``POST /v1/sessions``: admin key only; creates a session and returns its key.

Instead of a session key, a generation route takes the proxy's :attr:`ProxyServer.run_key` with an
``X-Session-ID: <rollout id>`` header: the session opened for that id (by
``new_session(header_id=...)``, or on its first request). Unknown keys get 401, a key used on
another session's resources 403. The server binds 127.0.0.1 by default and refuses any
non-loopback address unless an ``admin_key`` is given. It runs as an ASGI app under
``uvicorn.Server`` inside the caller's event loop (no thread, no second loop):
``async with ProxyServer(...) as proxy:``, or ``proxy.bind()`` then ``tg.create_task(proxy.serve())``
in the caller's TaskGroup and ``proxy.stop()`` to end it. Signals stay with the application
(uvicorn's handlers are not installed).

Bounds (:class:`ProxyLimits`): body size and read time, request heads not sent in time (the
connection is closed), open connections, the text of one conversation, the tokens a session and
all sessions hold, the responses a session stores. Large requests are checked, rendered and
tokenized in a thread. A generation whose client disconnects before its reply is sent (a timeout
and retry, a closed stream) is cancelled, which aborts it in the engine, and is not recorded: the
agent never saw it, so it is never exported.

Streams are sent once the generation has ended (the engine returns whole generations; see
:mod:`agentflow._streaming`), as one response body; errors come before any event, as JSON.

Not covered: token-by-token streaming, the legacy Completions, embeddings and other endpoints
(404), TLS (put a reverse proxy in front).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
    from uvicorn.config import HTTP_PROTOCOLS
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"agentflow.proxy needs uvicorn and starlette ({e}); install them with: pip install 'agentflow-rl[serve]'"
    ) from e

from agentflow import _messages, _recording, _responses, _streaming, _tokens_route
from agentflow._proxy_guard import check_chat_body, check_reward_body, read_body
from agentflow._proxy_http import HTTPError, endpoint, reply, unless_client_leaves
from agentflow._proxy_limits import LimitExceeded, ProxyLimits, TokenBudget, deadline_protocol
from agentflow._types import GenerationConfig, Trajectory
from agentflow.client import CompletionRecord, ExportStyle, OpenAIClient, ResponseNotFound
from agentflow.errors import ConfigError

if TYPE_CHECKING:
    from agentflow._engine_api import InferenceEngine
    from agentflow._toolcalls import ToolParser

__all__ = ["ProxyLimits", "ProxyServer", "Session"]

log = logging.getLogger(__name__)

_MIN_ADMIN_KEY_LEN = 16


@dataclass(frozen=True, slots=True)
class Session:
    """One episode's view of the proxy: give ``base_url`` and ``api_key`` to the agent."""

    id: str
    api_key: str
    base_url: str
    client: OpenAIClient
    header_id: str | None = None

    @property
    def root_url(self) -> str:
        """``http://host:port``: the base URL of SDKs that add ``/v1`` themselves (``anthropic``) and of
        the tokens-only route (``{root_url}/inference/v1/generate``)."""
        return self.base_url.removesuffix("/v1")

    def export_trajectories(self, discount: float = 1.0, style: ExportStyle = "individual") -> list[Trajectory]:
        return self.client.export_trajectories(discount=discount, style=style)

    def set_reward(self, completion_id: str, reward: float) -> None:
        self.client.set_reward(completion_id, reward)

    def set_last_reward(self, reward: float) -> None:
        self.client.set_last_reward(reward)

    @property
    def stats(self) -> dict[str, int]:
        return self.client.stats


class _SessionClient(OpenAIClient):
    """A session's recording client; its errors name the proxy, which is what the agent talks to."""

    _who = "agentflow's proxy"


def _check_bind(host: str, admin_key: str | None) -> None:
    if admin_key is not None and len(admin_key) < _MIN_ADMIN_KEY_LEN:
        raise ConfigError(
            f"admin_key has {len(admin_key)} characters; expected at least {_MIN_ADMIN_KEY_LEN} "
            "(e.g. secrets.token_urlsafe(32))"
        )
    if admin_key is None and not _is_loopback(host):
        raise ConfigError(
            f"refusing to bind the proxy to non-loopback host {host!r} without an admin_key; bind 127.0.0.1, "
            "or pass admin_key=<secret> to expose it deliberately"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ProxyServer:
    """OpenAI-compatible chat endpoint over ``engine``, with per-episode sessions.

    Args:
        engine: the inference engine all sessions share.
        tokenizer: the tokenizer (with chat template) of the served model.
        host, port: where to listen; port 0 picks a free port (see :attr:`base_url`).
        admin_key: needed to bind a non-loopback address; also lets a holder create sessions
            over HTTP and reward any session.
        model_name: the id ``/v1/models`` lists (requests may name any model).
        gconfig, chat_template_kwargs, tool_parser: defaults for each session's
            :class:`OpenAIClient`.
        limits: per-request, per-session and global bounds (:class:`ProxyLimits`).
        freeze_gc: when the first proxy of the process starts serving, move every object alive then
            (the model, the libraries) out of the cyclic garbage collector's reach (``gc.freeze()``,
            once per process). A full collection pauses every thread, the event loop included, for
            time proportional to the objects it scans: with torch and transformers loaded that was
            0.23-0.35 s on a loaded 2-core machine, and under 1 ms after the freeze. Objects alive at
            that point are still freed when unreferenced; only cycles among them are never collected.
        run_key: the key that, with an ``X-Session-ID`` header, reaches a session (default: a fresh
            random key, see :attr:`run_key`).
    """

    def __init__(
        self,
        engine: InferenceEngine,
        tokenizer: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        admin_key: str | None = None,
        model_name: str = "agentflow",
        gconfig: GenerationConfig | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tool_parser: str | ToolParser = "qwen",
        limits: ProxyLimits | None = None,
        run_key: str | None = None,
        freeze_gc: bool = True,
    ) -> None:
        _check_bind(host, admin_key)
        if run_key is not None and len(run_key) < _MIN_ADMIN_KEY_LEN:
            raise ConfigError(f"run_key has {len(run_key)} characters; expected at least {_MIN_ADMIN_KEY_LEN}")
        self.engine, self.tokenizer = engine, tokenizer
        self.host, self.port = host, port
        self.model_name = model_name
        self.limits = limits or ProxyLimits()
        self.freeze_gc = freeze_gc
        self._admin_key = admin_key
        self._run_key = run_key or f"af-run-{secrets.token_urlsafe(32)}"
        self._client_kwargs: dict[str, Any] = {
            "gconfig": gconfig, "chat_template_kwargs": chat_template_kwargs, "tool_parser": tool_parser,
        }
        self._budget = TokenBudget(self.limits.max_total_tokens, "the proxy (all sessions together)")
        self._by_key: dict[str, Session] = {}
        self._by_id: dict[str, Session] = {}
        self._by_header: dict[str, Session] = {}
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._stop_requested = False
        self.app = self._build_app()

    # ------------------------------------------------------------------ sessions
    @property
    def base_url(self) -> str:
        """``http://host:port/v1`` (the port is known once the server is started)."""
        if self._sock is None:
            raise ConfigError("proxy not listening yet: use `async with proxy:` or call proxy.bind() first")
        host, port = self._sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/v1"

    @property
    def run_key(self) -> str:
        """One key for a whole run: a request with it and ``X-Session-ID: <id>`` reaches the session
        opened for that id (:meth:`new_session` with ``header_id``, or opened on its first request)."""
        return self._run_key

    def new_session(
        self,
        *,
        gconfig: GenerationConfig | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        header_id: str | None = None,
    ) -> Session:
        """A fresh session with its own API key and recording client.

        ``header_id``: the session also answers requests made with :attr:`run_key` and the header
        ``X-Session-ID: <header_id>``.
        """
        if header_id is not None:
            _check_header_id(header_id)
            if header_id in self._by_header:
                raise ConfigError(f"X-Session-ID {header_id!r} already names session {self._by_header[header_id].id}; "
                                  "give each rollout its own id (or close the other session first)")
        kwargs = dict(self._client_kwargs)
        if gconfig is not None:
            kwargs["gconfig"] = gconfig
        if chat_template_kwargs is not None:
            kwargs["chat_template_kwargs"] = chat_template_kwargs
        sid = f"sess-{secrets.token_hex(8)}"
        client = _SessionClient(self.engine, self.tokenizer, **kwargs)
        client.bounds = _recording.Bounds(
            conversation_bytes=self.limits.max_conversation_bytes,
            stored_responses=self.limits.max_stored_responses,
            budget=TokenBudget(self.limits.max_session_tokens, f"session {sid}", parent=self._budget),
        )
        session = Session(id=sid, api_key=f"af-{secrets.token_urlsafe(32)}", base_url=self.base_url, client=client,
                          header_id=header_id)
        self._by_key[session.api_key] = session
        self._by_id[session.id] = session
        if header_id is not None:
            self._by_header[header_id] = session
        return session

    def session_for_header(self, header_id: str) -> Session:
        """The open session that ``X-Session-ID: <header_id>`` reaches."""
        try:
            return self._by_header[header_id]
        except KeyError:
            raise ConfigError(f"no open session answers X-Session-ID {header_id!r}; open one with "
                              "proxy.new_session(header_id=...) or send a request with the run key first") from None

    def close_session(self, session: Session | str) -> Session:
        """Revoke a session's key and forget it (export its trajectories first, or keep the object)."""
        sid = session if isinstance(session, str) else session.id
        found = self._by_id.pop(sid, None)
        if found is None:
            raise ConfigError(f"unknown session {sid!r}; expected one of {len(self._by_id)} open sessions")
        del self._by_key[found.api_key]
        if found.header_id is not None:
            self._by_header.pop(found.header_id, None)
        budget = found.client.bounds.budget
        if budget is not None:
            budget.add(-budget.used)  # its tokens no longer count against the proxy's total
        return found

    @property
    def sessions(self) -> list[Session]:
        return list(self._by_id.values())

    # ------------------------------------------------------------------ lifetime
    async def __aenter__(self) -> ProxyServer:
        self._listen()
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._tg.create_task(self.serve())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.stop()
        tg, self._tg = self._tg, None
        if tg is not None:
            await tg.__aexit__(*exc)

    async def serve(self) -> None:
        """Serve until :meth:`stop`; run it as a task of the caller's TaskGroup."""
        sock = self._listen()
        lim = self.limits
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off", ws="none",
            timeout_graceful_shutdown=5, limit_concurrency=lim.max_connections,
            timeout_keep_alive=min(5, int(lim.header_timeout_s) or 1),
            http=deadline_protocol(_http_protocol(), lim.header_timeout_s),
        )
        self._server = _QuietServer(config)
        self._server.should_exit = self._stop_requested  # stop() may have come before this task ran
        if self.freeze_gc:
            _freeze_gc_once()
        try:
            await self._server.serve(sockets=[sock])
        finally:
            self._server = None
            self._sock = None
            sock.close()

    def stop(self) -> None:
        """Ask :meth:`serve` to return (it finishes in-flight requests first)."""
        self._stop_requested = True
        if self._server is not None:
            self._server.should_exit = True

    def bind(self) -> str:
        """Listen on ``host:port`` now (``serve`` does it too) and return :attr:`base_url`.

        Connections queue until :meth:`serve` runs, so sessions can be handed out first.
        """
        self._listen()
        return self.base_url

    def _listen(self) -> socket.socket:
        if self._sock is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            # proto=IPPROTO_TCP so asyncio sets TCP_NODELAY on accepted connections (with proto 0 it
            # does not, and Nagle + delayed ACK add ~40 ms to every response).
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.port))
                sock.listen(1024)
            except OSError as e:
                sock.close()
                raise ConfigError(f"cannot listen on {self.host}:{self.port} ({e}); choose another port") from e
            sock.setblocking(False)
            self._sock = sock
        return self._sock

    # ------------------------------------------------------------------ HTTP
    def _build_app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", endpoint(self._chat), methods=["POST"]),
            Route("/v1/responses", endpoint(self._responses), methods=["POST"]),
            Route("/v1/responses/{response_id}", endpoint(self._stored_response), methods=["GET", "DELETE"]),
            Route("/v1/messages", endpoint(self._messages, anthropic=True), methods=["POST"]),
            Route("/v1/messages/count_tokens", endpoint(self._count_tokens, anthropic=True), methods=["POST"]),
            Route("/inference/v1/generate", endpoint(self._generate_tokens), methods=["POST"]),
            Route("/v1/models", endpoint(self._models), methods=["GET"]),
            Route("/v1/sessions", endpoint(self._create_session), methods=["POST"]),
            Route("/v1/sessions/{session_id}", endpoint(self._session_info), methods=["GET"]),
            Route("/v1/sessions/{session_id}/reward", endpoint(self._reward), methods=["POST"]),
        ]
        return Starlette(routes=routes)

    def _key(self, request: Request) -> str:
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            return key.strip()
        key = request.headers.get("x-api-key", "").strip()  # what the anthropic SDK sends
        if key:
            return key
        raise HTTPError(401, "missing 'Authorization: Bearer <session api key>' (or 'x-api-key: <key>') header",
                        "authentication_error")

    def _is_admin(self, key: str) -> bool:
        return self._admin_key is not None and secrets.compare_digest(key, self._admin_key)

    def _session_for(self, request: Request) -> Session:
        key = self._key(request)
        session = self._by_key.get(key)
        if session is not None:
            return session
        if secrets.compare_digest(key, self._run_key):
            return self._session_by_header(request)
        if self._is_admin(key):
            raise HTTPError(403, "the admin key cannot chat; use a session's api_key", "permission_error")
        raise HTTPError(401, "unknown or revoked API key; use the api_key of an open session (or the run key with "
                             "an X-Session-ID header)", "authentication_error")

    def _session_by_header(self, request: Request) -> Session:
        header_id = request.headers.get("x-session-id")
        if not header_id:
            raise HTTPError(400, "a request made with the run key needs an 'X-Session-ID: <rollout id>' header "
                                 "naming its session", "invalid_request_error")
        try:
            _check_header_id(header_id)
        except ConfigError as e:
            raise HTTPError(400, str(e), "invalid_request_error") from e
        session = self._by_header.get(header_id)
        if session is not None:
            return session
        if len(self._by_id) >= self.limits.max_sessions:
            raise LimitExceeded(
                f"X-Session-ID {header_id!r} would open a session beyond the proxy's limit of "
                f"{self.limits.max_sessions} open sessions (ProxyLimits.max_sessions); close finished sessions "
                "(proxy.close_session) or raise the limit")
        return self.new_session(header_id=header_id)

    def _authorize_session(self, request: Request, session_id: str) -> Session:
        key = self._key(request)
        own = self._by_key.get(key)
        if own is None and not self._is_admin(key):
            raise HTTPError(401, "unknown or revoked API key", "authentication_error")
        if own is not None and own.id != session_id:
            raise HTTPError(403, f"this key belongs to session {own.id}, not {session_id}", "permission_error")
        session = self._by_id.get(session_id)
        if session is None:
            raise HTTPError(404, f"unknown session {session_id!r}", "not_found_error")
        return session

    async def _read(self, request: Request) -> tuple[Session, dict[str, Any], bool | None]:
        """(session, JSON body, True to prepare it off the loop or None to let the client decide by its size
        and history) of a generation request."""
        session = self._session_for(request)
        body = await read_body(request, self.limits.max_body_bytes, self.limits.body_timeout_s)
        return session, body, int(request.headers.get("content-length") or 0) > _recording.OFF_LOOP_CHARS or None

    async def _chat(self, request: Request) -> Response:
        session, body, big = await self._read(request)
        check_chat_body(body)  # a JSON 400 naming the field, not a 500
        out = await unless_client_leaves(request, session.client._create(body, off_loop=big),
                                         lambda o: session.client._forget(_reply_id(o)))
        return reply(out)

    async def _responses(self, request: Request) -> Response:
        session, body, big = await self._read(request)
        out = await unless_client_leaves(request, session.client._respond(body, off_loop=big),
                                         lambda o: session.client._forget(_reply_id(o)))
        return reply(out)

    async def _messages(self, request: Request) -> Response:
        """Anthropic's Messages API (:mod:`agentflow._messages`)."""
        session, body, big = await self._read(request)
        client = session.client
        parse = functools.partial(_messages.parse_request, body, client._who)
        big = big or _recording.is_large(body, "messages")
        req = await asyncio.to_thread(parse) if big else parse()
        work = client._chat_record(req.chat, _responses.new_id("msg"), big)
        p, rec = await unless_client_leaves(request, work, lambda out: client._forget(out[1].id))
        raw = client.tokenizer.decode(_without_stop(rec, p.gconfig.stop_token_ids), skip_special_tokens=False)
        message = _messages.build_message(rec, req.model, _messages.matched_stop(raw, req.stop_sequences))
        if req.stream:
            return Response(_messages.message_sse(message), media_type="text/event-stream")
        return JSONResponse(message)

    async def _count_tokens(self, request: Request) -> Response:
        """Anthropic's token count: the prompt's tokens as the chat template renders it (nothing generated)."""
        session, body, big = await self._read(request)
        client = session.client

        def count() -> int:
            req = _messages.parse_request({"max_tokens": 1, **body}, client._who)
            return len(client._prepare_chat(req.chat)[1].prompt_ids)

        big = big or _recording.is_large(body, "messages")
        return JSONResponse({"input_tokens": await asyncio.to_thread(count) if big else count()})

    async def _generate_tokens(self, request: Request) -> Response:
        """vLLM's tokens-only route (:mod:`agentflow._tokens_route`)."""
        session, body, _ = await self._read(request)
        client = session.client
        req = _tokens_route.parse_request(body, client.gconfig, len(self.tokenizer), client._who)
        work = _tokens_route.generate(client, req)
        _, out = await unless_client_leaves(request, work, lambda res: client._forget(res[0].id))
        return JSONResponse(out)

    async def _stored_response(self, request: Request) -> Response:
        session = self._session_for(request)
        rid = request.path_params["response_id"]
        try:
            if request.method == "DELETE":
                await session.client.responses.delete(rid)
                return JSONResponse({"id": rid, "object": "response.deleted", "deleted": True})
            return reply(await session.client.responses.retrieve(rid))
        except ResponseNotFound as e:
            raise HTTPError(404, str(e), "not_found_error") from e

    async def _models(self, request: Request) -> JSONResponse:
        key = self._key(request)
        if key not in self._by_key and not self._is_admin(key) and not secrets.compare_digest(key, self._run_key):
            raise HTTPError(401, "unknown or revoked API key", "authentication_error")
        model = {"id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "agentflow"}
        return JSONResponse({"object": "list", "data": [model]})

    async def _create_session(self, request: Request) -> JSONResponse:
        if not self._is_admin(self._key(request)):
            raise HTTPError(403, "creating sessions over HTTP needs the admin key", "permission_error")
        s = self.new_session()
        return JSONResponse({"id": s.id, "api_key": s.api_key, "base_url": s.base_url})

    async def _session_info(self, request: Request) -> JSONResponse:
        s = self._authorize_session(request, request.path_params["session_id"])
        ids = [r.id for r in s.client.records]
        return JSONResponse({"id": s.id, "stats": s.stats, "completion_ids": ids})

    async def _reward(self, request: Request) -> JSONResponse:
        s = self._authorize_session(request, request.path_params["session_id"])
        body = await read_body(request, self.limits.max_body_bytes, self.limits.body_timeout_s)
        check_reward_body(body)  # 422 for a reward that would break training
        cid = body.get("completion_id")
        if cid is None:
            s.set_last_reward(body["reward"])
            cid = s.client.records[-1].id
        else:
            s.set_reward(cid, body["reward"])
        return JSONResponse({"session_id": s.id, "completion_id": cid, "reward": body["reward"]})


class _QuietServer(uvicorn.Server):
    """``uvicorn.Server`` without its signal handlers (the application owns SIGINT/SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


_HEADER_ID_MAX = 256
_gc_frozen = False


def _freeze_gc_once() -> None:
    """``gc.freeze()`` the first time a proxy serves in this process (see ``ProxyServer(freeze_gc=)``)."""
    global _gc_frozen
    if not _gc_frozen:
        _gc_frozen = True
        gc.freeze()


def _check_header_id(header_id: str) -> None:
    if not 0 < len(header_id) <= _HEADER_ID_MAX or not header_id.isprintable():
        raise ConfigError(f"X-Session-ID must be 1 to {_HEADER_ID_MAX} printable characters, got {header_id!r:.80}")


def _http_protocol() -> type[asyncio.Protocol]:
    """The HTTP protocol class uvicorn would pick ("auto": httptools if installed, else h11)."""
    module, _, name = HTTP_PROTOCOLS["auto"].partition(":")
    cls: type[asyncio.Protocol] = getattr(importlib.import_module(module), name)
    return cls


def _reply_id(out: Any) -> str:
    """The completion id of a chat / Responses reply (a stream's first item carries it)."""
    if isinstance(out, _streaming.ReplayStream):
        first = out._items[0]
        return str(first["response"]["id"] if "response" in first else first["id"])
    return str(out.id)


def _without_stop(rec: CompletionRecord, stop_ids: tuple[int, ...]) -> list[int]:
    ids = rec.output_ids
    return ids[:-1] if ids and ids[-1] in stop_ids else ids
