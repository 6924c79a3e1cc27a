"""``HttpProtocol`` (one send per response) under a real uvicorn server, read off the socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tether.server.transport import HttpProtocol

from .harness import TIMEOUT, listening_socket

BIG = b"x" * 1_000_000  # more than a socket takes at once: the transport's buffer holds the rest


class Chunks:
    """A stream whose next chunk is released by the test."""

    def __init__(self) -> None:
        self.release: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def endpoint(self, request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            while (chunk := await self.release.get()) is not None:
                yield chunk

        return StreamingResponse(body(), media_type="text/plain")


async def small(request: Request) -> Response:
    return Response(b'{"ok":true}', media_type="application/json")


async def big(request: Request) -> Response:
    return Response(BIG, media_type="application/octet-stream")


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, Chunks]]:
    chunks = Chunks()
    app = Starlette(
        routes=[Route("/small", small), Route("/big", big), Route("/stream", chunks.endpoint)]
    )
    sock = listening_socket()
    config = uvicorn.Config(app, log_level="warning", access_log=False, http=HttpProtocol)
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    try:
        yield sock.getsockname()[1], chunks
    finally:
        await chunks.release.put(None)
        srv.should_exit = True
        await asyncio.wait_for(task, TIMEOUT)
        sock.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await asyncio.wait_for(reader.readexactly(length), TIMEOUT)


async def test_responses_on_one_connection_arrive_whole(server: tuple[int, Chunks]) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for path, expected in (("/small", b'{"ok":true}'), ("/big", BIG), ("/small", b'{"ok":true}')):
        writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        head, body = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert body == expected
    writer.close()
    await writer.wait_closed()


async def test_a_closing_response_is_sent_before_the_connection_ends(
    server: tuple[int, Chunks],
) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    head, body = await read_response(reader)
    assert b"connection: close" in head.lower()
    assert body == BIG
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # then the server's FIN
    writer.close()
    await writer.wait_closed()


async def test_a_stream_s_chunks_go_out_as_they_are_made(server: tuple[int, Chunks]) -> None:
    port, chunks = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
    await chunks.release.put(b"first")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert b"transfer-encoding: chunked" in head.lower()
    # Each chunk arrives while the next one is not made yet.
    for text in (b"first", b"second"):
        if text != b"first":
            await chunks.release.put(text)
        frame = await asyncio.wait_for(reader.readuntil(b"\r\n" + text + b"\r\n"), TIMEOUT)
        assert frame.endswith(text + b"\r\n")
    await chunks.release.put(None)
    assert await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), TIMEOUT) == b"0\r\n\r\n"
    writer.close()
    await writer.wait_closed()
