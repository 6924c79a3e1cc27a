"""One subscriber's bounded buffer of a task's events: what every bus hands out."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from tether.core.types import TaskEvent


def _fire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class BufferedSubscription:
    """Events offered by the bus, in the order offered, until the reader falls ``limit``
    behind: then it is cut off (``overflowed``) and resumes from the store.

    ``dedupe``: drop an event whose seq is not above the last one handed over, for a bus
    that may offer the same event more than once (from several paths). ``finals_only``:
    keep only terminal and interrupted events, for a reader that waits for the outcome.
    """

    def __init__(
        self,
        task_id: str,
        limit: int,
        drop: Callable[[BufferedSubscription], None],
        *,
        dedupe: bool = False,
        finals_only: bool = False,
    ) -> None:
        self.task_id = task_id
        self._finals_only = finals_only
        self._limit = limit
        self._drop = drop
        self._dedupe = dedupe
        self._events: deque[TaskEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._overflowed = False
        self._closed = False
        self._last = 0  # highest seq handed over

    def _offer(self, event: TaskEvent) -> bool:
        """Whether ``event`` was kept for the reader."""
        if (
            self._overflowed
            or self._closed
            or (self._finals_only and not event.final)
            or (self._dedupe and event.seq <= self._last)
        ):
            return False
        if len(self._events) >= self._limit:
            # A reader this slow would grow the buffer without bound: cut it off and
            # free what it holds now; it resumes from the store with Last-Event-ID.
            self._overflowed = True
            self._events.clear()
            self.close()
        else:
            self._events.append(event)
            self._last = event.seq
        # Wake the reader either way: it must see the overflow at once, not at its timeout.
        if self._waiter is not None:
            _fire(self._waiter)
        return True

    @property
    def overflowed(self) -> bool:
        return self._overflowed

    async def get(self, wait: float) -> TaskEvent | None:
        if self._overflowed:
            return None
        if self._events:
            return self._events.popleft()
        if self._closed or wait <= 0:
            return None
        loop = asyncio.get_running_loop()
        # A future and a timer: cheaper than a queue under ``asyncio.timeout``, and
        # this runs for every event of every blocking send.
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(wait, _fire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self._overflowed or not self._events:
            return None
        return self._events.popleft()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop(self)
            if self._waiter is not None:
                _fire(self._waiter)
