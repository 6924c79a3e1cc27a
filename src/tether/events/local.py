"""In-process fan-out: one bounded buffer per subscriber."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import defaultdict, deque

from tether.core.types import TaskEvent
from tether.events.base import Listener

log = logging.getLogger("tether.events")

DEFAULT_SUBSCRIBER_LIMIT = 1000


class LocalSubscription:
    def __init__(self, bus: LocalEventBus, task_id: str, limit: int) -> None:
        self._bus = bus
        self.task_id = task_id
        self._limit = limit
        self._events: deque[TaskEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._overflowed = False

    def _offer(self, event: TaskEvent) -> None:
        if self._overflowed:
            return
        if len(self._events) >= self._limit:
            # A reader this slow would grow the buffer without bound: cut it off and
            # free what it holds now; it resumes from the store with Last-Event-ID.
            self._overflowed = True
            self._events.clear()
            self.close()
        else:
            self._events.append(event)
        # Wake the reader either way: it must see the overflow at once, not at its timeout.
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def overflowed(self) -> bool:
        return self._overflowed

    async def get(self, wait: float) -> TaskEvent | None:
        if not self._events and not self._overflowed and wait > 0:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(wait):
                    await self._waiter
            except TimeoutError:
                pass
            finally:
                self._waiter = None
        if self._overflowed or not self._events:
            return None
        return self._events.popleft()

    def close(self) -> None:
        self._bus._drop(self)


class LocalEventBus:
    def __init__(self, subscriber_limit: int = DEFAULT_SUBSCRIBER_LIMIT) -> None:
        if subscriber_limit < 1:
            raise ValueError("subscriber_limit must be at least 1")
        self._subs: dict[str, set[LocalSubscription]] = defaultdict(set)
        self._final_listeners: list[Listener] = []
        self._limit = subscriber_limit

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._subs.clear()

    async def publish(self, event: TaskEvent) -> None:
        subs = self._subs.get(event.task_id)
        if subs:
            for sub in list(subs):
                sub._offer(event)
        if event.final:
            for listener in self._final_listeners:
                result = listener(event)
                if inspect.isawaitable(result):
                    await result
        if subs:
            # Let the subscribers run before the next event: a publisher that never
            # waits otherwise (a tight loop on the memory store) would fill every
            # buffer in one go and cut off readers that are not slow at all.
            await asyncio.sleep(0)

    def subscribe(self, task_id: str) -> LocalSubscription:
        sub = LocalSubscription(self, task_id, self._limit)
        self._subs[task_id].add(sub)
        return sub

    def subscribers(self, task_id: str) -> int:
        """How many subscriptions of ``task_id`` are open (streams, blocking sends)."""
        return len(self._subs.get(task_id, ()))

    def on_final(self, listener: Listener) -> None:
        self._final_listeners.append(listener)

    def _drop(self, sub: LocalSubscription) -> None:
        subs = self._subs.get(sub.task_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.task_id]
