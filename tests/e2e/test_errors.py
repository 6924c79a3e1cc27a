"""Malformed and impossible requests over raw HTTP: the spec's error codes, no stack traces."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from .helpers import (
    HTTP_TIMEOUT,
    assert_no_stack_trace,
    message,
    new_id,
    result,
    rpc,
    send,
)
from .server import TetherServer

pytestmark = pytest.mark.timeout(120)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
TASK_NOT_FOUND = -32001
TASK_NOT_CANCELABLE = -32002
PUSH_NOT_SUPPORTED = -32003
UNSUPPORTED_OPERATION = -32004
VERSION_NOT_SUPPORTED = -32009


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
        yield client


async def post_raw(
    http: httpx.AsyncClient, url: str, content: bytes, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """POST / with any body; checks what every error answer must look like."""
    response = await http.post(
        url, content=content, headers={"Content-Type": "application/json", **(headers or {})}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert_no_stack_trace(response.text)
    body: dict[str, Any] = response.json()
    assert body["jsonrpc"] == "2.0"
    if "error" in body:
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"]
        # Error details are ProtoJSON Any objects (spec 9.5), the first an ErrorInfo.
        assert isinstance(error["data"], list) and error["data"]
        assert all("@type" in d for d in error["data"])
        assert error["data"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    return body


def call(method: str, params: Any = None, req_id: Any = 7) -> bytes:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
    if params is not None:
        body["params"] = params
    return httpx.Request("POST", "http://x", json=body).read()


def code(body: dict[str, Any]) -> int:
    assert "result" not in body, body
    return int(body["error"]["code"])


V10 = {"A2A-Version": "1.0"}


async def test_parse_error(server: TetherServer, http: httpx.AsyncClient) -> None:
    for raw in (b"{not json", b"", b'{"jsonrpc": "2.0", "method": "GetTask"', b"\xff\xfe"):
        body = await post_raw(http, server.url, raw, V10)
        assert code(body) == PARSE_ERROR
        assert body["id"] is None


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b'[{"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "x"}}]',
        b'"a string"',
        b"42",
        b'{"id": 1, "method": "GetTask", "params": {"id": "x"}}',
        b'{"jsonrpc": "1.0", "id": 1, "method": "GetTask", "params": {"id": "x"}}',
        b'{"jsonrpc": "2.0", "id": 1, "params": {"id": "x"}}',
        b'{"jsonrpc": "2.0", "id": 1, "method": 12}',
        b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": ["x"]}',
        b'{"jsonrpc": "2.0", "id": {"an": "object"}, "method": "GetTask", "params": {"id": "x"}}',
    ],
)
async def test_invalid_request(server: TetherServer, http: httpx.AsyncClient, raw: bytes) -> None:
    assert code(await post_raw(http, server.url, raw, V10)) == INVALID_REQUEST


@pytest.mark.parametrize("method", ["DoSomething", "tasks/explode", "sendmessage", ""])
async def test_method_not_found(server: TetherServer, http: httpx.AsyncClient, method: str) -> None:
    body = await post_raw(http, server.url, call(method, {}), V10)
    assert code(body) == METHOD_NOT_FOUND
    assert body["id"] == 7


BAD_PARAMS: list[tuple[str, Any]] = [
    ("SendMessage", {}),
    ("SendMessage", {"message": "hello"}),
    ("SendMessage", {"message": {"role": "ROLE_USER", "parts": [{"text": "no id"}]}}),
    ("SendMessage", {"message": {**message("x"), "parts": []}}),
    ("SendMessage", {"message": {**message("x"), "role": "ROLE_ROBOT"}}),
    ("SendMessage", {"message": {**message("x"), "parts": [{"text": "a", "data": {}}]}}),
    ("SendMessage", {"message": {**message("x"), "parts": [{}]}}),
    ("SendMessage", {"message": message("x"), "configuration": {"historyLength": -1}}),
    ("SendMessage", {"message": {**message("x"), "messageId": "m" * 300}}),
    ("GetTask", {}),
    ("GetTask", {"id": ""}),
    ("GetTask", {"id": "x", "historyLength": -3}),
    ("GetTask", {"id": "x", "historyLength": "many"}),
    ("CancelTask", {}),
    ("ListTasks", {"pageSize": 0}),
    ("ListTasks", {"pageSize": 1000}),
    ("ListTasks", {"pageToken": "not-a-token-we-issued"}),
    ("ListTasks", {"status": "TASK_STATE_BOGUS"}),
    ("ListTasks", {"statusTimestampAfter": "yesterday"}),
]


@pytest.mark.parametrize(("method", "params"), BAD_PARAMS)
async def test_invalid_params(
    server: TetherServer, http: httpx.AsyncClient, method: str, params: Any
) -> None:
    body = await post_raw(http, server.url, call(method, params), V10)
    assert code(body) == INVALID_PARAMS, body
    assert body["id"] == 7


async def test_invalid_params_name_the_field(server: TetherServer, http: httpx.AsyncClient) -> None:
    bad = {"message": {**message("x"), "role": "ROLE_ROBOT"}}
    body = await post_raw(http, server.url, call("SendMessage", bad), V10)
    details = {d["@type"]: d for d in body["error"]["data"]}
    violations = details["type.googleapis.com/google.rpc.BadRequest"]["fieldViolations"]
    assert any("role" in v["field"] for v in violations), violations


async def test_task_not_found(server: TetherServer, http: httpx.AsyncClient) -> None:
    missing = new_id()
    for method, params in (
        ("GetTask", {"id": missing}),
        ("CancelTask", {"id": missing}),
        ("SendMessage", {"message": message("echo x", task_id=missing)}),
    ):
        body = await post_raw(http, server.url, call(method, params), V10)
        assert code(body) == TASK_NOT_FOUND, body


async def test_task_not_cancelable(server: TetherServer, http: httpx.AsyncClient) -> None:
    for text in ("echo done", "fail", "reject"):
        task = await send(http, server.url, text)
        body = await post_raw(http, server.url, call("CancelTask", {"id": task["id"]}), V10)
        assert code(body) == TASK_NOT_CANCELABLE, body
        # Nothing leaves a terminal state.
        again = result(await rpc(http, server.url, "GetTask", {"id": task["id"]}))
        assert again["status"] == task["status"]


async def test_unsupported_operation(server: TetherServer, http: httpx.AsyncClient) -> None:
    done = await send(http, server.url, "echo finished")
    follow_up = {"message": message("echo more", task_id=done["id"])}
    body = await post_raw(http, server.url, call("SendMessage", follow_up), V10)
    assert code(body) == UNSUPPORTED_OPERATION
    assert "completed" in body["error"]["message"]

    gate = new_id()
    running = await send(http, server.url, f"progress {gate}", return_immediately=True)
    try:
        # A working task is not waiting for input: no message may join it.
        follow_up = {"message": message("echo more", task_id=running["id"])}
        body = await post_raw(http, server.url, call("SendMessage", follow_up), V10)
        assert code(body) == UNSUPPORTED_OPERATION
    finally:
        (server.marks / f"{gate}.go").write_text("")

    body = await post_raw(http, server.url, call("GetExtendedAgentCard"), V10)
    assert code(body) == UNSUPPORTED_OPERATION


async def test_push_notifications_not_supported(
    server: TetherServer, http: httpx.AsyncClient
) -> None:
    params = {"taskId": new_id(), "url": "http://127.0.0.1:9/hook"}
    body = await post_raw(http, server.url, call("CreateTaskPushNotificationConfig", params), V10)
    assert code(body) == PUSH_NOT_SUPPORTED


@pytest.mark.parametrize("version", ["2.0", "0.2", "1.1", "latest"])
async def test_version_not_supported(
    server: TetherServer, http: httpx.AsyncClient, version: str
) -> None:
    body = await post_raw(
        http, server.url, call("GetTask", {"id": new_id()}), {"A2A-Version": version}
    )
    assert code(body) == VERSION_NOT_SUPPORTED
    assert version in body["error"]["message"]


async def test_version_as_query_parameter(server: TetherServer, http: httpx.AsyncClient) -> None:
    url = f"{server.url}/?A2A-Version=9.9"
    body = await post_raw(http, url, call("GetTask", {"id": new_id()}))
    assert code(body) == VERSION_NOT_SUPPORTED


async def test_the_server_survives_bad_input(server: TetherServer, http: httpx.AsyncClient) -> None:
    """After every kind of bad request above, tasks still run."""
    for raw in (b"{", b"[]", call("Nope"), call("SendMessage", {"message": 1})):
        await post_raw(http, server.url, raw, V10)
    task = await send(http, server.url, "echo still here")
    assert task["status"]["state"] == "TASK_STATE_COMPLETED"
