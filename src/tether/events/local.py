"""In-process fan-out: one bounded buffer per subscriber."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import defaultdict

from tether.core.types import TaskEvent
from tether.events.base import Listener
from tether.events.buffer import BufferedSubscription

log = logging.getLogger("tether.events")

DEFAULT_SUBSCRIBER_LIMIT = 1000


class LocalEventBus:
    def __init__(self, subscriber_limit: int = DEFAULT_SUBSCRIBER_LIMIT) -> None:
        if subscriber_limit < 1:
            raise ValueError("subscriber_limit must be at least 1")
        self._subs: dict[str, set[BufferedSubscription]] = defaultdict(set)
        self._final_listeners: list[Listener] = []
        self._limit = subscriber_limit

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._subs.clear()

    async def publish(self, event: TaskEvent) -> None:
        subs = self._subs.get(event.task_id)
        kept = False
        if subs:
            for sub in list(subs):
                kept = sub._offer(event) or kept
        if event.final:
            for listener in self._final_listeners:
                result = listener(event)
                if inspect.isawaitable(result):
                    await result
        if kept:
            # Let the subscribers run before the next event: a publisher that never
            # waits otherwise (a tight loop on the memory store) would fill every
            # buffer in one go and cut off readers that are not slow at all.
            await asyncio.sleep(0)

    def subscribe(self, task_id: str, *, finals_only: bool = False) -> BufferedSubscription:
        sub = BufferedSubscription(task_id, self._limit, self._drop, finals_only=finals_only)
        self._subs[task_id].add(sub)
        return sub

    def subscribers(self, task_id: str) -> int:
        """How many subscriptions of ``task_id`` are open (streams, blocking sends)."""
        return len(self._subs.get(task_id, ()))

    def on_final(self, listener: Listener) -> None:
        self._final_listeners.append(listener)

    def _drop(self, sub: BufferedSubscription) -> None:
        subs = self._subs.get(sub.task_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.task_id]
