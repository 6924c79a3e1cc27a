"""A small HTTP/1.1 keep-alive client on raw asyncio streams, JSON-RPC and SSE.

Much cheaper per request than a general-purpose client, so a Python load
generator process spends its CPU on the server's answers, not on itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson


class HttpError(Exception):
    pass


# uvicorn closes a keep-alive connection after 5 s without a request: do not reuse one
# that has been idle nearly that long (the request would race the server's close).
IDLE_REUSE_SECONDS = 4.0


class Conn:
    """One keep-alive connection; one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._idle_since = 0.0
        self._head = b"POST / HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n" % (
            host.encode(),
            port,
        )

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(
            self.host, self.port, limit=1 << 20
        )
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    def idle(self) -> None:
        """The response is fully read: the connection may carry the next request."""
        self._idle_since = time.monotonic()

    async def _send(self, body: bytes, extra: bytes = b"") -> tuple[int, dict[bytes, bytes]]:
        reused = self._writer is not None
        if reused and time.monotonic() - self._idle_since > IDLE_REUSE_SECONDS:
            self.close()
            reused = False
        if self._writer is None:
            await self.connect()
        assert self._reader is not None and self._writer is not None
        try:
            self._writer.write(
                self._head + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            head = await self._reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.close()
            if reused:
                # The server closed the kept-alive connection before reading this request:
                # send it again on a new one (the messageId makes a repeat harmless anyway).
                return await self._send(body, extra)
            raise HttpError("connection closed by the server") from exc
        lines = head.split(b"\r\n")
        try:
            status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            self.close()
            raise HttpError(f"bad status line {lines[0]!r}") from None
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return status, headers

    async def _chunks(self) -> AsyncIterator[bytes]:
        assert self._reader is not None
        reader = self._reader
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]

    async def post(self, body: bytes) -> tuple[int, bytes]:
        """Status and body of one POST /."""
        try:
            status, headers = await self._send(body)
            assert self._reader is not None
            length = headers.get(b"content-length")
            if length is not None:
                data = await self._reader.readexactly(int(length))
            elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                data = b"".join([c async for c in self._chunks()])
            else:
                data = await self._reader.read()
                self.close()
            if headers.get(b"connection", b"").lower() == b"close":
                self.close()
            self.idle()
            return status, data
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise HttpError(f"{type(exc).__name__}: {exc}") from exc

    async def sse(self, body: bytes) -> AsyncIterator[bytes]:
        """POST / and yield each Server-Sent Events frame (without the blank line).

        The first thing yielded is ``b""`` once the response headers arrive.
        """
        status, headers = await self._send(body, b"Accept: text/event-stream\r\n")
        if status != 200 or b"text/event-stream" not in headers.get(b"content-type", b""):
            detail = b""
            length = headers.get(b"content-length")
            if length is not None and self._reader is not None:
                with contextlib.suppress(OSError, ValueError, asyncio.IncompleteReadError):
                    detail = await self._reader.readexactly(int(length))
            self.close()
            text = detail[:300].decode(errors="replace")
            raise HttpError(f"not an event stream: HTTP {status} {text}".rstrip())
        yield b""
        buf = b""
        try:
            async for chunk in self._chunks():
                buf += chunk
                while True:
                    end = buf.find(b"\n\n")
                    if end < 0:
                        break
                    frame, buf = buf[:end], buf[end + 2 :]
                    if frame and not frame.startswith(b":"):
                        yield frame
            self.idle()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise HttpError(f"{type(exc).__name__}: {exc}") from exc


class Ids:
    """Unique JSON-RPC and message ids: the server de-duplicates by messageId."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"b{os.getpid()}-{os.urandom(4).hex()}"
        self._n = itertools.count(1)

    def next(self) -> tuple[int, str]:
        n = next(self._n)
        return n, f"{self.prefix}-{n}"


def send_body(
    ids: Ids,
    text: str = "hello",
    *,
    method: str = "SendMessage",
    return_immediately: bool = False,
    metadata: dict[str, Any] | None = None,
    task_id: str | None = None,
) -> bytes:
    n, mid = ids.next()
    message: dict[str, Any] = {"messageId": mid, "role": "ROLE_USER", "parts": [{"text": text}]}
    if metadata:
        message["metadata"] = metadata
    if task_id:
        message["taskId"] = task_id
    params: dict[str, Any] = {"message": message}
    if return_immediately:
        params["configuration"] = {"returnImmediately": True}
    return orjson.dumps({"jsonrpc": "2.0", "id": n, "method": method, "params": params})


def rpc_body(method: str, params: dict[str, Any], req_id: int = 1) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": req_id, "method": method, "params": params})


async def rpc(conn: Conn, method: str, params: dict[str, Any]) -> Any:
    """One JSON-RPC call; its ``result``, or HttpError with the error."""
    status, data = await conn.post(rpc_body(method, params))
    reply = orjson.loads(data)
    if status != 200 or "error" in reply:
        raise HttpError(f"{method}: HTTP {status}: {reply.get('error')}")
    return reply["result"]


async def count_tasks(conn: Conn, state: str | None = None) -> int:
    """How many tasks the default owner has (in ``state``): ListTasks' ``totalSize``."""
    params: dict[str, Any] = {"pageSize": 1, "historyLength": 0}
    if state:
        params["status"] = state
    result = await rpc(conn, "ListTasks", params)
    return int(result["totalSize"])


COMPLETED = b"TASK_STATE_COMPLETED"
FAILED_STATES = (b"TASK_STATE_FAILED", b"TASK_STATE_REJECTED", b"TASK_STATE_CANCELED")
