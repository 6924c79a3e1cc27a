"""The queue between the API and the workers.

The broker carries task ids only; leases, attempts and state live on the task
row in the store, so a lost or duplicated queue entry can never run a task
twice concurrently nor lose it (the store's ``runnable()`` re-drives it).
"""

from __future__ import annotations

from typing import Protocol


class Broker(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def enqueue(self, task_id: str) -> None: ...

    async def next(self) -> str:
        """Wait for the next task id to try to claim."""
        ...

    def done(self, task_id: str) -> None:
        """The worker finished with this entry (claimed, ran, or lost the race)."""
        ...
