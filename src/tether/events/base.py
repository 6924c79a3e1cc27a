"""Live fan-out of task events to subscribers (the durable log is the store's)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from tether.core.types import TaskEvent

Listener = Callable[[TaskEvent], Awaitable[None] | None]


class Subscription(Protocol):
    """Events of one task as they are published, in order; bounded in memory."""

    async def get(self, wait: float) -> TaskEvent | None:
        """The next event, or None after ``wait`` seconds of silence."""
        ...

    @property
    def overflowed(self) -> bool:
        """True once the reader fell too far behind and events were dropped."""
        ...

    def close(self) -> None: ...


class EventBus(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, event: TaskEvent) -> None: ...

    def subscribe(self, task_id: str) -> Subscription: ...

    def on_final(self, listener: Listener) -> None:
        """Call ``listener`` for every terminal or interrupted event (used for cancel)."""
        ...
