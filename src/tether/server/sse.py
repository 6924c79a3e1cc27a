"""Server-Sent Events: ``id:`` is the task's event sequence number."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import orjson
from starlette.responses import StreamingResponse

from tether.core.types import JSON, TaskEvent

KEEPALIVE_SECONDS = 15.0


def frame(data: JSON, event_id: int | None = None) -> bytes:
    head = b"id: %d\n" % event_id if event_id is not None else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def last_event_id(value: str | None) -> int | None:
    if value is None or not value.strip():
        return None
    try:
        seq = int(value)
    except ValueError:
        return None
    return seq if seq >= 0 else None


async def _frames(
    first: bytes,
    events: AsyncIterator[TaskEvent],
    render: Callable[[TaskEvent], bytes],
    keepalive: float,
) -> AsyncIterator[bytes]:
    yield first
    pending: asyncio.Future[TaskEvent] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=keepalive)
            if not done:
                # A comment line keeps proxies and clients from timing the stream out.
                yield b": keep-alive\n\n"
                continue
            pending = None
            try:
                event = done.pop().result()
            except StopAsyncIteration:
                return
            yield render(event)
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        closer = getattr(events, "aclose", None)
        if closer is not None:
            with contextlib.suppress(BaseException):
                await closer()


def sse_response(
    first: bytes,
    events: AsyncIterator[TaskEvent],
    render: Callable[[TaskEvent], bytes],
    keepalive: float = KEEPALIVE_SECONDS,
) -> StreamingResponse:
    return StreamingResponse(
        _frames(first, events, render, keepalive),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
