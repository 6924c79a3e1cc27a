"""The A2A 1.0 HTTP+JSON (REST) binding, at the root paths of spec section 11.3.

Bodies and results are the same ProtoJSON as the JSON-RPC binding's ``params``
and ``result``; errors are ``google.rpc.Status`` objects with the HTTP status of
spec section 5.4 and an ``ErrorInfo`` detail naming the A2A error (11.6).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tether.core.types import JSON
from tether.protocol.errors import (
    CONTENT_TYPE_NOT_SUPPORTED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    PUSH_NOT_SUPPORTED,
    TASK_NOT_CANCELABLE,
    TASK_NOT_FOUND,
    UNAVAILABLE,
    UNSUPPORTED_OPERATION,
    VERSION_NOT_SUPPORTED,
    A2AError,
    from_exception,
)
from tether.protocol.models import TaskIdParams, parse
from tether.protocol.wire import task_json
from tether.server.auth import Unauthenticated, principal
from tether.server.jsonrpc import V03, V10, list_query, negotiate, send_request
from tether.server.service import TaskService
from tether.server.sse import event_stream, resume_point

log = logging.getLogger("tether.server")

MEDIA_TYPE = "application/a2a+json"

# A2A error code -> google.rpc.Code name, as spec section 5.4 pairs them.
_STATUS: dict[int, str] = {
    PARSE_ERROR: "INVALID_ARGUMENT",
    INVALID_REQUEST: "INVALID_ARGUMENT",
    INVALID_PARAMS: "INVALID_ARGUMENT",
    METHOD_NOT_FOUND: "NOT_FOUND",
    INTERNAL_ERROR: "INTERNAL",
    TASK_NOT_FOUND: "NOT_FOUND",
    TASK_NOT_CANCELABLE: "FAILED_PRECONDITION",
    PUSH_NOT_SUPPORTED: "FAILED_PRECONDITION",
    UNSUPPORTED_OPERATION: "FAILED_PRECONDITION",
    CONTENT_TYPE_NOT_SUPPORTED: "INVALID_ARGUMENT",
    VERSION_NOT_SUPPORTED: "FAILED_PRECONDITION",
    UNAVAILABLE: "UNAVAILABLE",
}

Handler = Callable[[Request, str], Awaitable[Response]]


def status_body(error: A2AError) -> JSON:
    """``google.rpc.Status`` in its JSON form, under ``error`` (spec 11.6)."""
    return {
        "error": {
            "code": error.http_status,
            "status": _STATUS.get(error.code, "UNKNOWN"),
            "message": error.message,
            "details": error.details(),
        }
    }


def error_response(error: A2AError, headers: dict[str, str] | None = None) -> Response:
    headers = dict(headers or {})
    if error.code == UNAVAILABLE:
        headers.setdefault("Retry-After", "1")
    return Response(
        orjson.dumps(status_body(error)),
        status_code=error.http_status,
        media_type=MEDIA_TYPE,
        headers=headers,
    )


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type=MEDIA_TYPE)


def _check_version(request: Request) -> None:
    """This binding speaks A2A 1.0 (0.3's REST paths differ); 0.3 clients use JSON-RPC."""
    if negotiate(request, "") == V03:
        raise A2AError(
            VERSION_NOT_SUPPORTED,
            "A2A 0.3 is served by the JSON-RPC binding (POST /); this binding speaks 1.0",
            {"supportedVersions": V10},
        )


async def _body(request: Request) -> JSON:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise A2AError(PARSE_ERROR, "Invalid JSON payload") from None
    if not isinstance(body, dict):
        raise A2AError(INVALID_REQUEST, "The request body must be a JSON object")
    return body


class RestBinding:
    """``routes()`` are mounted at the root, beside JSON-RPC's ``POST /``."""

    def __init__(self, service: TaskService, api_keys: dict[str, str]) -> None:
        self.service = service
        self.api_keys = api_keys

    def routes(self) -> list[Route]:
        push = self._push_not_supported
        # ``/tasks/{id}`` would also match ``/tasks/x:cancel``: the verbs come first.
        table: list[tuple[str, dict[str, Handler]]] = [
            ("/message:send", {"POST": self._send}),
            ("/message:stream", {"POST": self._stream}),
            ("/tasks/{id}:cancel", {"POST": self._cancel}),
            # The proto binds GET; the spec's table and the official SDK use POST.
            ("/tasks/{id}:subscribe", {"GET": self._subscribe, "POST": self._subscribe}),
            ("/tasks/{id}/pushNotificationConfigs", {"GET": push, "POST": push}),
            ("/tasks/{id}/pushNotificationConfigs/{config_id}", {"GET": push, "DELETE": push}),
            ("/tasks/{id}", {"GET": self._get}),
            ("/tasks", {"GET": self._list}),
            ("/extendedAgentCard", {"GET": self._extended_card}),
        ]
        return [
            Route(path, self._endpoint(handlers), methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
            for path, handlers in table
        ]

    def _endpoint(self, handlers: dict[str, Handler]) -> Callable[[Request], Awaitable[Response]]:
        allow = ", ".join(handlers)

        async def endpoint(request: Request) -> Response:
            handler = handlers.get(request.method)
            if handler is None:
                error = A2AError(METHOD_NOT_FOUND, f"{request.method} is not allowed here")
                body = status_body(error)
                body["error"].update(code=405, status="UNIMPLEMENTED")
                return Response(
                    orjson.dumps(body),
                    status_code=405,
                    media_type=MEDIA_TYPE,
                    headers={"Allow": allow},
                )
            try:
                _check_version(request)
                owner = principal(request, self.api_keys)
                return await handler(request, owner)
            except Unauthenticated as exc:
                body = {"error": {"code": 401, "status": "UNAUTHENTICATED", "message": str(exc)}}
                return Response(
                    orjson.dumps(body),
                    status_code=401,
                    media_type=MEDIA_TYPE,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            except Exception as exc:
                error = from_exception(exc)
                if error.code == INTERNAL_ERROR:
                    log.exception("internal error")
                return error_response(error)

        return endpoint

    # -- operations ------------------------------------------------------------

    async def _send(self, request: Request, owner: str) -> Response:
        task = await self.service.send(send_request(owner, await _body(request), V10))
        return _json({"task": task_json(task)})

    async def _stream(self, request: Request, owner: str) -> Response:
        stream = await self.service.stream(send_request(owner, await _body(request), V10))
        return event_stream(stream, _bare, status_body)

    async def _get(self, request: Request, owner: str) -> Response:
        params: JSON = {**request.query_params, "id": request.path_params["id"]}
        p = parse(TaskIdParams, params)
        return _json(task_json(await self.service.get(owner, p.id, p.history_length)))

    async def _list(self, request: Request, owner: str) -> Response:
        query = list_query(owner, dict(request.query_params), V10)
        page = await self.service.list(query)
        return _json(
            {
                "tasks": [task_json(t) for t in page.tasks],
                "nextPageToken": page.next_page_token,
                "pageSize": query.page_size,
                "totalSize": page.total_size,
            }
        )

    async def _cancel(self, request: Request, owner: str) -> Response:
        await _body(request)  # CancelTaskRequest's id is the path's; its metadata is unused
        task_id = request.path_params["id"]
        return _json(task_json(await self.service.cancel(owner, task_id)))

    async def _subscribe(self, request: Request, owner: str) -> Response:
        if request.method == "POST":
            await _body(request)
        stream = await self.service.subscribe(
            owner, request.path_params["id"], resume_point(request)
        )
        return event_stream(stream, _bare, status_body)

    async def _push_not_supported(self, request: Request, owner: str) -> Response:
        raise A2AError(PUSH_NOT_SUPPORTED, "Push notifications are not supported by this agent")

    async def _extended_card(self, request: Request, owner: str) -> Response:
        raise A2AError(UNSUPPORTED_OPERATION, "This agent has no extended agent card")


def _bare(result: JSON) -> JSON:
    """REST streams send each ``StreamResponse`` as it is, with no envelope."""
    return result
