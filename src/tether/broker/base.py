"""The queue between the API and the workers.

The broker carries task ids only; leases, attempts and state live on the task
row in the store, so a lost or duplicated queue entry can never run a task
twice concurrently nor lose it (the store's ``runnable()`` re-drives it).

A worker takes a ``Delivery`` with ``next()`` and acknowledges it with
``ack()`` only once the task's outcome is stored. An entry a worker took and
never acknowledged (the process died) is handed to another worker after the
lease time; ``touch()`` is the heartbeat that keeps a live worker's entries
from being taken over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Delivery:
    """One hand-out of a queue entry to this worker."""

    task_id: str
    entry_id: str
    deliveries: int = 1  # times this entry was handed out, this one included


class Broker(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None:
        """Stop fetching; entries fetched but never handed to ``next()`` go back to the queue."""
        ...

    async def enqueue(self, task_id: str) -> None:
        """Queue a task, unless an entry for it is already waiting (idempotent).

        Raises ``BrokerUnavailable`` when the queue cannot be reached; the task
        row is the outbox, so a worker's re-drive queues it later.
        """
        ...

    async def enqueue_many(self, task_ids: Sequence[str]) -> None: ...

    async def next(self) -> Delivery:
        """Wait for the next entry: a new one, or one whose worker went silent past the lease.

        Cancelling the wait loses nothing.
        """
        ...

    async def ack(self, delivery: Delivery) -> None:
        """Done with this entry: the task's state is stored, or there was nothing to do."""
        ...

    async def release(self, delivery: Delivery) -> None:
        """Hand the entry back for any worker to take at once (graceful shutdown)."""
        ...

    async def touch(self, deliveries: Sequence[Delivery]) -> None:
        """Still working on these: they must not be handed to another worker."""
        ...
