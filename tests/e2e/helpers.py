"""Small clients for the end-to-end tests: raw JSON-RPC over httpx, and the official SDK."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
from a2a.client import Client, ClientConfig, ClientFactory
from a2a.types import a2a_pb2 as pb

T = TypeVar("T")
JSON = dict[str, Any]

# Bounds on every wait: generous, for a busy two-core machine.
HTTP_TIMEOUT = 30.0
WAIT = 30.0

TERMINAL_03 = {"completed", "failed", "canceled", "rejected"}
STACK_MARKERS = ("Traceback", 'File "', "site-packages", '.py", line')


def new_id() -> str:
    return str(uuid.uuid4())


# -- raw JSON-RPC ------------------------------------------------------------


async def rpc(
    http: httpx.AsyncClient,
    url: str,
    method: str,
    params: Any = None,
    *,
    version: str | None = "1.0",
    req_id: Any = 1,
) -> JSON:
    """One JSON-RPC call; ``version=None`` sends no A2A-Version header (0.3 by default)."""
    body: JSON = {"jsonrpc": "2.0", "id": req_id, "method": method}
    if params is not None:
        body["params"] = params
    headers = {"A2A-Version": version} if version else {}
    response = await http.post(url, json=body, headers=headers)
    assert response.status_code == 200, response.text
    data: JSON = response.json()
    return data


def result(response: JSON) -> JSON:
    assert "error" not in response, response
    out: JSON = response["result"]
    return out


def error_code(response: JSON) -> int:
    assert "result" not in response, response
    return int(response["error"]["code"])


def assert_no_stack_trace(text: str) -> None:
    for marker in STACK_MARKERS:
        assert marker not in text, f"stack trace leaked ({marker!r}): {text}"


def message(
    text: str,
    *,
    message_id: str | None = None,
    task_id: str | None = None,
    context_id: str | None = None,
) -> JSON:
    """A 1.0 ProtoJSON user message."""
    msg: JSON = {
        "messageId": message_id or new_id(),
        "role": "ROLE_USER",
        "parts": [{"text": text}],
    }
    if task_id:
        msg["taskId"] = task_id
    if context_id:
        msg["contextId"] = context_id
    return msg


def message_03(text: str, **extra: Any) -> JSON:
    """A 0.3 user message (``kind`` discriminators, lowercase role)."""
    return {
        "kind": "message",
        "messageId": new_id(),
        "role": "user",
        "parts": [{"kind": "text", "text": text}],
        **extra,
    }


async def send(
    http: httpx.AsyncClient,
    url: str,
    text: str,
    *,
    return_immediately: bool = False,
    **msg: Any,
) -> JSON:
    """SendMessage (1.0) and the Task it returns."""
    params: JSON = {"message": message(text, **msg)}
    if return_immediately:
        params["configuration"] = {"returnImmediately": True}
    task: JSON = result(await rpc(http, url, "SendMessage", params))["task"]
    return task


async def get_task(http: httpx.AsyncClient, url: str, task_id: str, **params: Any) -> JSON:
    task: JSON = result(await rpc(http, url, "GetTask", {"id": task_id, **params}))
    return task


def text_of(msg: JSON | None) -> str:
    if not msg:
        return ""
    return "\n".join(p["text"] for p in msg.get("parts", []) if "text" in p)


# -- waiting with a deadline ---------------------------------------------------


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    *,
    within: float = WAIT,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``probe`` until it returns something other than None (only where nothing
    can be awaited: the server is another process)."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


def read_if_exists(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


async def wait_file(path: Path, within: float = WAIT) -> str:
    async def probe() -> str | None:
        return await asyncio.to_thread(read_if_exists, path)

    return await eventually(probe, within=within, what=str(path))


async def wait_state(
    http: httpx.AsyncClient, url: str, task_id: str, *states: str, within: float = WAIT
) -> JSON:
    async def probe() -> JSON | None:
        task = await get_task(http, url, task_id)
        return task if task["status"]["state"] in states else None

    return await eventually(probe, within=within, what=f"task {task_id} in {states}")


# -- the official SDK ----------------------------------------------------------


@asynccontextmanager
async def sdk(url: str) -> AsyncIterator[Client]:
    """The a2a-sdk client, resolved from the agent card (JSON-RPC, A2A 1.0, no streaming)."""
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        client = await ClientFactory(
            ClientConfig(streaming=False, httpx_client=http)
        ).create_from_url(url)
        try:
            yield client
        finally:
            await client.close()


def pb_message(
    text: str,
    *,
    message_id: str | None = None,
    task_id: str | None = None,
    context_id: str | None = None,
) -> pb.Message:
    msg = pb.Message(
        message_id=message_id or new_id(), role=pb.ROLE_USER, parts=[pb.Part(text=text)]
    )
    if task_id:
        msg.task_id = task_id
    if context_id:
        msg.context_id = context_id
    return msg


async def sdk_send(
    client: Client,
    text: str,
    *,
    return_immediately: bool = False,
    history_length: int | None = None,
    **msg: Any,
) -> pb.Task:
    request = pb.SendMessageRequest(message=pb_message(text, **msg))
    if return_immediately:
        request.configuration.return_immediately = True
    if history_length is not None:
        request.configuration.history_length = history_length
    responses = [r async for r in client.send_message(request)]
    assert len(responses) == 1, responses
    assert responses[0].HasField("task"), responses[0]
    return responses[0].task


def pb_text(msg: pb.Message | pb.Artifact) -> str:
    return "\n".join(p.text for p in msg.parts if p.HasField("text"))


async def rpc03(http: httpx.AsyncClient, url: str, method: str, params: Any = None) -> JSON:
    """A call the way a 0.3 client makes it: 0.3 method name, no A2A-Version header."""
    return await rpc(http, url, method, params, version=None)
