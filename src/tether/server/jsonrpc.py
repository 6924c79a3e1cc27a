"""The JSON-RPC binding at ``POST /``: A2A 1.0 method names, and 0.3's."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tether.core.states import TaskState
from tether.core.types import JSON, Feedback
from tether.protocol import compat03
from tether.protocol.errors import (
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    PUSH_NOT_SUPPORTED,
    UNSUPPORTED_OPERATION,
    VERSION_NOT_SUPPORTED,
    A2AError,
    from_exception,
    invalid_params,
)
from tether.protocol.models import (
    FeedbackParams,
    ListTasksParams,
    SendMessageParams,
    TaskIdParams,
    message_dict,
    parse,
)
from tether.protocol.wire import task_json
from tether.server.auth import Unauthenticated, principal
from tether.server.service import SendRequest, TaskService
from tether.server.sse import event_stream, resume_point
from tether.store.base import ListQuery

log = logging.getLogger("tether.server")

V10, V03 = "1.0", "0.3"
_PUSH_METHODS = {
    "CreateTaskPushNotificationConfig",
    "GetTaskPushNotificationConfig",
    "ListTaskPushNotificationConfigs",
    "DeleteTaskPushNotificationConfig",
}
_STREAMING = {"SendStreamingMessage", "SubscribeToTask"}
UNAUTHENTICATED = -32030


def negotiate(request: Request, method: str) -> str:
    """The A2A version of this call: header, then query parameter, then the method's style."""
    raw = request.headers.get("a2a-version") or ""
    if not raw and request.scope.get("query_string"):
        raw = request.query_params.get("A2A-Version") or ""
    raw = raw.strip()
    if not raw:
        return V03 if "/" in method else V10
    major_minor = ".".join(raw.split(".")[:2])
    if major_minor in (V10, V03):
        return major_minor
    raise A2AError(
        VERSION_NOT_SUPPORTED,
        f"A2A version {raw} is not supported; use 1.0 or 0.3",
        {"supportedVersions": "1.0,0.3"},
    )


def send_request(owner: str, params: Any, version: str) -> SendRequest:
    if version == V03:
        params = compat03.send_params_up(params)
    p = parse(SendMessageParams, params)
    config = p.configuration
    return SendRequest(
        owner=owner,
        message=message_dict(p.message),
        metadata=p.metadata,
        blocking=not (config and config.return_immediately),
        history_length=config.history_length if config else None,
    )


def list_query(owner: str, params: Any, version: str) -> ListQuery:
    if version == V03:
        params = compat03.list_params_up(params)
    p = parse(ListTasksParams, params)
    state = None
    # ProtoJSON writers may send a field's default value: UNSPECIFIED and "" filter nothing.
    if p.status and p.status != "TASK_STATE_UNSPECIFIED":
        try:
            state = TaskState.from_wire(p.status)
        except (KeyError, ValueError):
            raise invalid_params(f"status: unknown task state {p.status!r}") from None
    after = None
    if p.status_timestamp_after:
        try:
            stamp = datetime.fromisoformat(p.status_timestamp_after)
        except ValueError:
            raise invalid_params("statusTimestampAfter: not an ISO 8601 timestamp") from None
        # Timestamps on the wire are UTC (spec 5.6.1); one without an offset is too,
        # not this server's local time.
        after = (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()
    return ListQuery(
        owner=owner,
        context_id=p.context_id or None,
        state=state,
        page_size=p.page_size,
        page_token=p.page_token,
        status_after=after,
        history_length=p.history_length if p.history_length is not None else 0,
        include_artifacts=p.include_artifacts,
    )


class JsonRpcEndpoint:
    def __init__(self, service: TaskService, api_keys: dict[str, str]) -> None:
        self.service = service
        self.api_keys = api_keys
        self._methods: dict[str, Callable[[str, Any, str], Awaitable[Any]]] = {
            "SendMessage": self._send,
            "GetTask": self._get,
            "ListTasks": self._list,
            "CancelTask": self._cancel,
            "tasks/feedback": self._feedback,
        }

    async def handle(self, request: Request) -> Response:
        req_id: Any = None
        try:
            body = await request.body()
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise A2AError(PARSE_ERROR, "Invalid JSON payload") from None
            if not isinstance(payload, dict):
                raise A2AError(INVALID_REQUEST, "Request must be a JSON-RPC 2.0 object")
            req_id = payload.get("id")
            if not isinstance(req_id, str | int) or isinstance(req_id, bool):
                req_id = None
                if "id" in payload and payload["id"] is not None:
                    raise A2AError(INVALID_REQUEST, "id must be a string or an integer")
            method = payload.get("method")
            if payload.get("jsonrpc") != "2.0" or not isinstance(method, str):
                raise A2AError(
                    INVALID_REQUEST,
                    "Request payload validation error: need jsonrpc '2.0' and a method",
                )
            params = payload.get("params", {})
            if params is not None and not isinstance(params, dict):
                raise A2AError(INVALID_REQUEST, "params must be an object")
            version = negotiate(request, method)
            name = compat03.METHODS_03.get(method, method)
            owner = principal(request, self.api_keys)
            if name in _STREAMING:
                return await self._stream(request, name, owner, params or {}, version, req_id)
            handler = self._methods.get(name)
            if handler is None:
                raise self._unknown(name)
            result = await handler(owner, params or {}, version)
            if version == V03:
                result = compat03.result_down(name, result)
            return _reply(req_id, result=result)
        except Unauthenticated as exc:
            return _reply(req_id, error={"code": UNAUTHENTICATED, "message": str(exc)}, status=401)
        except Exception as exc:
            error = from_exception(exc)
            if error.code == -32603:
                log.exception("internal error")
            return _reply(req_id, error=error.rpc())

    @staticmethod
    def _unknown(name: str) -> A2AError:
        if name in _PUSH_METHODS:
            return A2AError(
                PUSH_NOT_SUPPORTED, "Push notifications are not supported by this agent"
            )
        if name == "GetExtendedAgentCard":
            return A2AError(UNSUPPORTED_OPERATION, "This agent has no extended agent card")
        return A2AError(METHOD_NOT_FOUND, f"Method not found: {name}")

    async def _send(self, owner: str, params: Any, version: str) -> JSON:
        task = await self.service.send(send_request(owner, params, version))
        return {"task": task_json(task)}

    async def _get(self, owner: str, params: Any, version: str) -> JSON:
        p = parse(TaskIdParams, params)
        return task_json(await self.service.get(owner, p.id, p.history_length))

    async def _list(self, owner: str, params: Any, version: str) -> JSON:
        query = list_query(owner, params, version)
        page = await self.service.list(query)
        return {
            "tasks": [task_json(t) for t in page.tasks],
            "nextPageToken": page.next_page_token,
            "pageSize": query.page_size,
            "totalSize": page.total_size,
        }

    async def _cancel(self, owner: str, params: Any, version: str) -> JSON:
        p = parse(TaskIdParams, params)
        return task_json(await self.service.cancel(owner, p.id))

    async def _feedback(self, owner: str, params: Any, version: str) -> JSON:
        p = parse(FeedbackParams, params)
        await self.service.feedback(Feedback(p.task_id, owner, p.rating, p.feedback, p.metadata))
        return {"taskId": p.task_id, "stored": True}

    async def _stream(
        self, request: Request, name: str, owner: str, params: Any, version: str, req_id: Any
    ) -> Response:
        if name == "SendStreamingMessage":
            stream = await self.service.stream(send_request(owner, params, version))
        else:
            p = parse(TaskIdParams, params)
            stream = await self.service.subscribe(owner, p.id, resume_point(request))

        def wrap(result: JSON) -> JSON:
            if version == V03:
                result = compat03.stream_down(result)
            return {"jsonrpc": "2.0", "id": req_id, "result": result}

        def error_body(error: A2AError) -> JSON:
            return {"jsonrpc": "2.0", "id": req_id, "error": error.rpc()}

        return event_stream(stream, wrap, error_body)


def _reply(
    req_id: Any, *, result: Any = None, error: JSON | None = None, status: int = 200
) -> Response:
    body: JSON = {"jsonrpc": "2.0", "id": req_id}
    if error is not None:
        body["error"] = error
    else:
        body["result"] = result
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")
