"""Live fan-out of task events to subscribers (the durable log is the store's).

The bus only carries what was just written; the store's event log is the truth.
A stream reads the log, then follows the bus, and fills any hole it sees (an
event whose ``seq`` is not the next one) from the log again, so a backend may
lose a live event without a subscriber ever missing one. What a backend must
not do is buffer without bound: a subscriber that does not keep up is cut off
(``overflowed``) and resumes from the log with ``Last-Event-ID``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from tether.core.errors import TetherError
from tether.core.types import TaskEvent

Listener = Callable[[TaskEvent], Awaitable[None] | None]


class SubscriberLagged(TetherError):
    """A subscriber fell more than its buffer behind the task and was cut off.

    ``last_seq`` is the last event it was given: resuming after it loses nothing.
    """

    retryable = True

    def __init__(self, task_id: str, last_seq: int) -> None:
        super().__init__(
            f"The stream of task {task_id} fell too far behind the task (its buffer of "
            f"undelivered events filled up) and was closed; resubscribe with "
            f"Last-Event-ID: {last_seq} to continue without a gap"
        )
        self.task_id = task_id
        self.last_seq = last_seq


class Subscription(Protocol):
    """Events of one task as they are published, in order; bounded in memory."""

    async def get(self, wait: float) -> TaskEvent | None:
        """The next event, or None after ``wait`` seconds of silence (at once once overflowed)."""
        ...

    @property
    def overflowed(self) -> bool:
        """True once the reader fell too far behind: what was buffered is dropped, and
        nothing more is delivered (the subscription is closed)."""
        ...

    def close(self) -> None: ...


class EventBus(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, event: TaskEvent) -> None:
        """Hand ``event`` to every subscriber of its task; never waits for a reader."""
        ...

    def subscribe(self, task_id: str, *, finals_only: bool = False) -> Subscription:
        """``finals_only``: only the task's terminal and interrupted events (its outcome)."""
        ...

    def on_final(self, listener: Listener) -> None:
        """Call ``listener`` for every terminal or interrupted event (used for cancel)."""
        ...
