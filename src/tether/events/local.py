"""In-process fan-out: one bounded queue per subscriber."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import defaultdict

from tether.core.types import TaskEvent
from tether.events.base import Listener

log = logging.getLogger("tether.events")


class LocalSubscription:
    def __init__(self, bus: LocalEventBus, task_id: str, limit: int) -> None:
        self._bus = bus
        self.task_id = task_id
        self._queue: asyncio.Queue[TaskEvent] = asyncio.Queue(limit)
        self._overflowed = False

    def _offer(self, event: TaskEvent) -> None:
        if self._overflowed:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            # A reader this slow would grow the buffer without bound: cut it off,
            # it can resume from the store with Last-Event-ID.
            self._overflowed = True
            self.close()

    @property
    def overflowed(self) -> bool:
        return self._overflowed

    async def get(self, wait: float) -> TaskEvent | None:
        if self._overflowed and self._queue.empty():
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), wait)
        except TimeoutError:
            return None

    def close(self) -> None:
        self._bus._drop(self)


class LocalEventBus:
    def __init__(self, subscriber_limit: int = 1000) -> None:
        self._subs: dict[str, set[LocalSubscription]] = defaultdict(set)
        self._final_listeners: list[Listener] = []
        self._limit = subscriber_limit

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._subs.clear()

    async def publish(self, event: TaskEvent) -> None:
        for sub in list(self._subs.get(event.task_id, ())):
            sub._offer(event)
        if event.final:
            for listener in self._final_listeners:
                result = listener(event)
                if inspect.isawaitable(result):
                    await result

    def subscribe(self, task_id: str) -> LocalSubscription:
        sub = LocalSubscription(self, task_id, self._limit)
        self._subs[task_id].add(sub)
        return sub

    def on_final(self, listener: Listener) -> None:
        self._final_listeners.append(listener)

    def _drop(self, sub: LocalSubscription) -> None:
        subs = self._subs.get(sub.task_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.task_id]
