"""``POST /operations/{id}:complete``: an external system completes an operation.

The caller proves it was handed the operation by the task (``ctx.operation()``)
with the operation's token, an HMAC of its id under TETHER_SECRET, in the
``X-Tether-Token`` header or the ``token`` query parameter. The body is
``{"result": <any JSON>}`` or ``{"error": "what went wrong"}``.

With Redis the completion goes onto the completions stream (202: the consumer
group stores it once, on a worker); embedded, it is stored here (200).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse

from tether.core.errors import InvalidInput, TetherError
from tether.runtime.process import Complete
from tether.runtime.waits import verify

log = logging.getLogger("tether.server")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


class OperationsEndpoint:
    def __init__(self, complete: Complete, secret: str | None, *, queued: bool) -> None:
        self._complete = complete
        self._secret = secret
        self._status = 202 if queued else 200

    async def handle(self, request: Request) -> JSONResponse:
        operation_id = str(request.path_params["operation_id"])
        if not self._secret:
            return _error(404, "completing operations over HTTP needs TETHER_SECRET on the API")
        token = request.headers.get("x-tether-token") or request.query_params.get("token")
        if not verify(self._secret, operation_id, token):
            return _error(403, "a valid operation token is required (X-Tether-Token)")
        body = await request.body()
        try:
            data: Any = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError:
            return _error(400, 'the body must be JSON: {"result": …} or {"error": "…"}')
        if not isinstance(data, dict):
            return _error(400, "the body must be a JSON object")
        error = data.get("error")
        if error is not None and not isinstance(error, str):
            return _error(400, "error must be a string")
        try:
            answer = await self._complete(operation_id, data.get("result"), error)
        except InvalidInput as exc:
            return _error(400, exc.message)
        except TetherError as exc:
            status = 503 if exc.retryable else 500
            log.warning("completing operation %s failed: %s", operation_id, exc)
            return _error(status, exc.message)
        return JSONResponse(answer, status_code=self._status)
