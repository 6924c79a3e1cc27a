"""The ceiling: a bare Starlette JSON-RPC endpoint that parses the request and keeps nothing.

It answers a ``SendMessage`` as if the task had completed, so the load generator
counts its responses exactly as it counts Tether's. Whatever Tether does per task
costs on top of this. ``uvicorn tether.bench.ceiling:app``
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def rpc(request: Request) -> Response:
    try:
        payload: Any = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}}
        return Response(orjson.dumps(body), media_type="application/json")
    if not isinstance(payload, dict) or payload.get("jsonrpc") != "2.0":
        body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Invalid"}}
        return Response(orjson.dumps(body), media_type="application/json")
    message = (payload.get("params") or {}).get("message") or {}
    result = {
        "task": {
            "id": message.get("messageId", ""),
            "contextId": "ceiling",
            "status": {"state": "TASK_STATE_COMPLETED"},
        }
    }
    reply: dict[str, Any] = {"jsonrpc": "2.0", "id": payload.get("id"), "result": result}
    return Response(orjson.dumps(reply), media_type="application/json")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[Route("/", rpc, methods=["POST"]), Route("/healthz", health, methods=["GET"])]
)
