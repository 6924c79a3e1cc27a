"""Server-Sent Events for both bindings: ``id:`` is the task's event sequence number.

A stream is: the Task snapshot, then one frame per event, ``: keep-alive``
comments while idle, and, when it cannot go on, one ``event: error`` frame with
the binding's error body (the official SDK raises it as the A2A error it names).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import orjson
from starlette.requests import Request
from starlette.responses import StreamingResponse

from tether.core.types import JSON
from tether.events.base import SubscriberLagged
from tether.protocol.errors import (
    INTERNAL_ERROR,
    UNAVAILABLE,
    A2AError,
    from_exception,
    invalid_params,
)
from tether.protocol.wire import event_json, task_json
from tether.server.service import TaskStream

log = logging.getLogger("tether.server")

KEEPALIVE = b": keep-alive\n\n"
# Key, in a reset snapshot's metadata, of why the stream restarts from it (docs/streaming.md).
REPLAY_KEY = "tether.replay"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

Wrap = Callable[[JSON], JSON]
ErrorBody = Callable[[A2AError], JSON]


def frame(data: JSON, event_id: int | None = None, *, event: str | None = None) -> bytes:
    head = b"id: %d\n" % event_id if event_id is not None else b""
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def resume_point(request: Request) -> int | None:
    """The Last-Event-ID of a reconnecting client: the header, else ``?lastEventId=``.

    (A browser's EventSource sends the header itself when it reconnects; the
    query parameter lets a first connection resume too.)
    """
    raw = request.headers.get("last-event-id")
    if raw is None or not raw.strip():
        raw = request.query_params.get("lastEventId")
    if raw is None or not raw.strip():
        return None
    try:
        seq = int(raw.strip())
    except ValueError:
        seq = -1
    if seq < 0:
        raise invalid_params(
            f"Last-Event-ID must be an event id this server sent (an integer >= 0), not {raw!r}"
        )
    return seq


def stream_error(exc: BaseException) -> A2AError:
    if isinstance(exc, SubscriberLagged):
        return A2AError(
            UNAVAILABLE, exc.message, {"taskId": exc.task_id, "lastEventId": str(exc.last_seq)}
        )
    error = from_exception(exc)
    if error.code == INTERNAL_ERROR:
        log.error("stream failed", exc_info=exc)
    return error


async def _frames(stream: TaskStream, wrap: Wrap, error_body: ErrorBody) -> AsyncIterator[bytes]:
    task = task_json(stream.task)
    first = b""
    if stream.reset is not None:
        # Said where every client looks (the Task), and once more for people
        # reading the raw stream.
        task["metadata"] = {**task.get("metadata", {}), REPLAY_KEY: stream.reset}
        first = b": reset: " + str(stream.reset["reason"]).encode() + b"\n\n"
    yield first + frame(wrap({"task": task}), stream.snapshot_id)
    events = stream.events
    try:
        async for event in events:
            if event is None:
                yield KEEPALIVE
            else:
                yield frame(wrap(event_json(event)), event.seq)
    except Exception as exc:
        yield frame(error_body(stream_error(exc)), event="error")
    finally:
        # Closes the subscription now, not whenever the generator is collected.
        await events.aclose()


def event_stream(stream: TaskStream, wrap: Wrap, error_body: ErrorBody) -> StreamingResponse:
    """The SSE response for ``stream``; ``wrap`` puts each result in the binding's envelope."""
    return StreamingResponse(
        _frames(stream, wrap, error_body), media_type="text/event-stream", headers=HEADERS
    )
