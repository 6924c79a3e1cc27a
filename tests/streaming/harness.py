"""A real uvicorn server on 127.0.0.1 in the test's event loop, and a raw SSE client.

The server listens on a socket bound before it starts, so the port is known and
free of races; the client reads the stream's bytes off that socket itself, so a
test can drop the connection anywhere, even in the middle of a frame.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import uvicorn

from tether.config import Settings
from tether.runtime.agent import Agent
from tether.server.app import Components, create_app
from tether.server.transport import HttpProtocol

JSON = dict[str, Any]

# Bounds on every wait: generous, for a busy two-core machine.
TIMEOUT = 30.0


@dataclass
class Served:
    url: str
    parts: Components

    @property
    def bus(self) -> Any:
        return self.parts.bus


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    return sock


@asynccontextmanager
async def serve(
    agent: Agent,
    *,
    db: str = "memory://",
    keepalive: float = 15.0,
    buffer: int = 1000,
    retention: float = 0.0,
    api_keys: dict[str, str] | None = None,
) -> AsyncIterator[Served]:
    sock = listening_socket()
    port = sock.getsockname()[1]
    # Every setting explicit: a developer's TETHER_* variables must not change the test.
    settings = Settings(
        database_url=db,
        port=port,
        workers=8,
        lease_seconds=30.0,
        blocking_timeout=TIMEOUT,
        shutdown_grace=1.0,
        api_keys=api_keys or {},
        sse_keepalive=keepalive,
        sse_buffer=buffer,
        event_retention=retention,
    )
    app = create_app(agent, settings)
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=2,
        access_log=False,
        http=HttpProtocol,  # as `tether serve` runs it
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    url = f"http://127.0.0.1:{port}"
    try:
        # The socket already listens: this waits in its backlog until start-up is done.
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            (await http.get(f"{url}/healthz")).raise_for_status()
        yield Served(url, app.state.tether)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, TIMEOUT)
        sock.close()


# -- requests ----------------------------------------------------------------


def new_id() -> str:
    return str(uuid.uuid4())


def user_message(text: str, **extra: Any) -> JSON:
    msg: JSON = {"messageId": new_id(), "role": "ROLE_USER", "parts": [{"text": text}]}
    msg.update(extra)
    return msg


def rpc(method: str, params: JSON, req_id: Any = 1) -> JSON:
    return {"jsonrpc": "2.0", "id": req_id, "method": method, "params": params}


# -- SSE ---------------------------------------------------------------------


@dataclass
class Frame:
    """One dispatched SSE event (or, with ``comment`` set, one comment line)."""

    id: int | None = None
    event: str = "message"
    data: Any = None
    comment: str | None = None
    raw: bytes = b""

    def result(self) -> JSON:
        """The StreamResponse inside, whichever binding framed it."""
        assert isinstance(self.data, dict), self
        if "jsonrpc" in self.data:
            assert "result" in self.data, self.data
            return dict(self.data["result"])
        return dict(self.data)

    @property
    def kind(self) -> str:
        """task | statusUpdate | artifactUpdate | message (1.0) or the 0.3 ``kind``."""
        result = self.result()
        if "kind" in result:
            return str(result["kind"])
        (key,) = result.keys()
        return key

    @property
    def body(self) -> JSON:
        result = self.result()
        return result if "kind" in result else dict(result[self.kind])

    @property
    def text(self) -> str:
        """The text an update carries: its status message's, or its artifact chunk's."""
        body = self.body
        if "artifact" in body:
            parts = body["artifact"].get("parts", [])
        else:
            parts = ((body.get("status") or {}).get("message") or {}).get("parts", [])
        return "".join(p.get("text", "") for p in parts)

    @property
    def state(self) -> str | None:
        body = self.body
        status = body.get("status")
        return None if status is None else str(status["state"])


def parse_block(block: bytes) -> Frame:
    frame = Frame(raw=block)
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b":"):
            frame.comment = line[1:].strip().decode()
            continue
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if name == b"id":
            frame.id = int(value)
        elif name == b"event":
            frame.event = value.decode()
        elif name == b"data":
            data.append(value)
    if data:
        frame.data = orjson.loads(b"\n".join(data))
    return frame


class SSEReader:
    """Frames of one streaming response, read off the socket as they are asked for.

    Iterating again goes on where the last loop stopped. With ``limit``, it stops
    reading after that many bytes of the body (a drop, mid-frame as likely as not);
    the partial frame is discarded, as an SSE client must.
    """

    def __init__(self, response: httpx.Response, limit: int | None = None) -> None:
        assert response.headers["content-type"].startswith("text/event-stream"), response.headers
        self.response = response
        self.limit = limit
        self.read = 0
        self.comments: list[str] = []
        self._buffer = b""
        self._chunks = response.aiter_raw()
        self._done = False

    def __aiter__(self) -> SSEReader:
        return self

    async def __anext__(self) -> Frame:
        while b"\n\n" not in self._buffer:
            if self._done:
                raise StopAsyncIteration
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                self._done = True
                continue
            if self.limit is not None:
                chunk = chunk[: max(self.limit - self.read, 0)]
                self._done = self.read + len(chunk) >= self.limit
            self.read += len(chunk)
            self._buffer += chunk
        block, self._buffer = self._buffer.split(b"\n\n", 1)
        frame = parse_block(block)
        if frame.data is None and frame.comment is not None:
            self.comments.append(frame.comment)
        return frame


def events_only(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if f.data is not None]


async def read_stream(
    http: httpx.AsyncClient,
    url: str,
    method: str,
    params: JSON,
    *,
    headers: dict[str, str] | None = None,
) -> list[Frame]:
    """Every frame of a JSON-RPC streaming call, up to the end of the stream."""
    async with http.stream("POST", f"{url}/", json=rpc(method, params), headers=headers) as r:
        assert r.status_code == 200
        if not r.headers["content-type"].startswith("text/event-stream"):
            await r.aread()
            raise AssertionError(f"not a stream: {r.text}")
        return [f async for f in SSEReader(r)]


async def call(http: httpx.AsyncClient, url: str, method: str, params: JSON) -> JSON:
    """A JSON-RPC call's whole response (``result`` or ``error``)."""
    response = await http.post(f"{url}/", json=rpc(method, params))
    assert response.status_code == 200, response.text
    return dict(response.json())


async def send(http: httpx.AsyncClient, url: str, text: str, **extra: Any) -> JSON:
    """A blocking SendMessage; returns the Task."""
    body = await call(http, url, "SendMessage", {"message": user_message(text, **extra)})
    assert "result" in body, body
    return dict(body["result"]["task"])
