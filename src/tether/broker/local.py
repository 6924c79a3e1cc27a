"""In-process queue: an asyncio queue of task ids, de-duplicated while waiting.

Everything here dies with the process, so there is nothing to reclaim or
dead-letter: on restart the store's ``runnable()`` re-drives what was queued.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

from tether.broker.base import Delivery


class LocalBroker:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        # Waiting, not yet handed out: a second enqueue of these adds nothing. One being
        # worked on may be queued again (its follow-up message may arrive before the ack).
        self._waiting: set[str] = set()
        self._ids = itertools.count(1)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _put(self, task_id: str, deliveries: int = 1) -> None:
        if task_id not in self._waiting:
            self._waiting.add(task_id)
            self._queue.put_nowait(Delivery(task_id, str(next(self._ids)), deliveries))

    async def enqueue(self, task_id: str) -> None:
        self._put(task_id)

    async def enqueue_many(self, task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            self._put(task_id)

    async def next(self) -> Delivery:
        delivery = await self._queue.get()
        self._waiting.discard(delivery.task_id)
        return delivery

    async def ack(self, delivery: Delivery) -> None:
        return None

    async def release(self, delivery: Delivery) -> None:
        self._put(delivery.task_id)

    async def touch(self, deliveries: Sequence[Delivery]) -> None:
        return None

    def __len__(self) -> int:
        return self._queue.qsize()
