"""HTTP plumbing of the proxy: error bodies, the error mapping of every route, replies, client departure.

- :func:`endpoint` turns agentflow's errors into JSON errors an SDK understands: OpenAI's shape
  ``{"error": {"message", "type", "param", "code"}}``, or Anthropic's
  ``{"type": "error", "error": {"type", "message"}}`` on the Messages route.
- :func:`unless_client_leaves` runs a generation while watching the connection: when the client
  goes away first (a timeout followed by the openai SDK's retry, a closed stream), the generation is
  cancelled (the engine aborts it) and nothing is recorded; :class:`ClientGone` tells the route.
  Training data the agent never saw is never exported.

Not here: authentication, sessions and routes (:mod:`agentflow.proxy`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from agentflow import _streaming
from agentflow._proxy_guard import RequestError
from agentflow._proxy_limits import LimitExceeded
from agentflow.errors import ConfigError, EngineError, EngineTimeout, PromptTooLong, ServerError, TrajectoryError

__all__ = ["ClientGone", "HTTPError", "endpoint", "error_response", "reply", "unless_client_leaves"]

log = logging.getLogger("agentflow.proxy")
_T = TypeVar("_T")

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class ClientGone(Exception):
    """The client disconnected before its reply was ready; nothing was recorded."""


def error_response(status: int, message: str, kind: str, code: str | None = None, anthropic: bool = False) -> Response:
    """An error body the ``openai`` (or, with ``anthropic``, the ``anthropic``) SDK raises as its status error."""
    if anthropic:
        body: dict[str, Any] = {
            "type": "error",
            "error": {"type": _ANTHROPIC_KINDS.get(status, "api_error"), "message": message},
        }
    else:
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


Handler = Callable[[Request], Awaitable[Response]]


def endpoint(handler: Handler, anthropic: bool = False) -> Handler:
    """Turn agentflow errors raised by ``handler`` into error responses."""
    fail = functools.partial(error_response, anthropic=anthropic)

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        except HTTPError as e:
            return fail(e.status, e.message, e.kind)
        except RequestError as e:
            return fail(e.status, e.message, "invalid_request_error")
        except LimitExceeded as e:
            return fail(413, str(e), "request_too_large", "limit_exceeded")
        except (ConfigError, TrajectoryError) as e:
            return fail(400, str(e), "invalid_request_error")
        except EngineTimeout as e:
            return fail(504, str(e), "timeout_error")
        except PromptTooLong as e:  # the agent's input: 400, as OpenAI answers an over-long context
            return fail(400, str(e), "invalid_request_error", "context_length_exceeded")
        except EngineError as e:
            if isinstance(e, ServerError) and e.status_code == 400:  # the server refused it (e.g. context length)
                return fail(400, f"the inference server refused the request: {e}", "invalid_request_error")
            log.exception("engine error while serving a completion")
            return fail(502, f"inference engine failed: {e}", "engine_error")
        except (TypeError, ValueError, KeyError, AttributeError) as e:  # a body the checks did not foresee
            return fail(400, f"malformed request: {type(e).__name__}: {e}", "invalid_request_error")

    return wrapped


def reply(out: Any) -> Response:
    """A JSON body for a reply object; the SSE bytes of a stream (which the client built in full)."""
    if isinstance(out, _streaming.ReplayStream):
        return Response(_streaming.sse_body(out), media_type="text/event-stream")
    return JSONResponse(out.model_dump(mode="json", exclude_none=True))


async def _disconnected(request: Request) -> None:
    """Return when the client has gone (the request body has been read: only the disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[_T], forget: Callable[[_T], None]) -> _T:
    """``await work``, cancelled if the client disconnects first (then :class:`ClientGone`).

    A client that leaves after ``work`` finished but before its reply is sent gets ``forget(result)``
    (the route drops what it recorded) and :class:`ClientGone` too.
    """

    async def job() -> _T:
        return await work

    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(job())
            watch = tg.create_task(_disconnected(request))
            task.add_done_callback(lambda _: watch.cancel())
            watch.add_done_callback(lambda w: w.cancelled() or task.cancel())
    except BaseExceptionGroup as group:  # the generation's own error, as the route would have raised it
        raise group.exceptions[0] from None
    if task.cancelled():
        raise ClientGone
    result = task.result()
    if await request.is_disconnected():
        forget(result)
        raise ClientGone
    return result
