"""In-process queue: an asyncio queue of task ids, de-duplicated."""

from __future__ import annotations

import asyncio


class LocalBroker:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._pending: set[str] = set()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def enqueue(self, task_id: str) -> None:
        if task_id not in self._pending:
            self._pending.add(task_id)
            self._queue.put_nowait(task_id)

    async def next(self) -> str:
        return await self._queue.get()

    def done(self, task_id: str) -> None:
        self._pending.discard(task_id)

    def __len__(self) -> int:
        return self._queue.qsize()
