"""The ``TaskStore`` contract every backend keeps (memory, sqlite, postgres).

Every write that changes a task is one atomic step: a compare-and-set on the
task row guarded by the transition table (and the lease owner where a worker
writes), the next event sequence number taken in the same statement, and the
event row written in the same transaction. A write refused by the guard raises
``InvalidTransition`` (with the current state), ``LeaseLost`` or
``TaskNotFound``; nothing half happens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tether.core.states import TaskState
from tether.core.types import JSON, Feedback, TaskEvent, TaskPage, TaskRecord

MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 50


@dataclass(slots=True, frozen=True)
class Submitted:
    task: TaskRecord
    created: bool  # False: the messageId was seen before; ``task`` is the existing one
    event: TaskEvent | None


@dataclass(slots=True, frozen=True)
class Claim:
    """A won claim: ``task`` (full history) to run, or None when the claim gave up on it."""

    task: TaskRecord | None
    events: list[TaskEvent]  # what the claim itself wrote: submitted -> working, or -> failed


@dataclass(slots=True, frozen=True)
class ListQuery:
    owner: str
    context_id: str | None = None
    state: TaskState | None = None
    page_size: int = DEFAULT_PAGE_SIZE
    page_token: str = ""
    status_after: float | None = None
    history_length: int | None = 0
    include_artifacts: bool = False


class TaskStore(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def submit(
        self,
        *,
        owner: str,
        message: JSON,
        context_id: str | None,
        metadata: JSON | None = None,
    ) -> Submitted:
        """Create a task, its context (if new), its first message and first event.

        A ``messageId`` already accepted from ``owner`` returns the existing task.
        """
        ...

    async def resume(self, *, owner: str, task_id: str, message: JSON) -> Submitted:
        """Add a follow-up message to an interrupted task and queue it again."""
        ...

    async def get_task(
        self, owner: str | None, task_id: str, history_length: int | None = None
    ) -> TaskRecord:
        """``owner=None`` is the runtime's view, across owners."""
        ...

    async def list_tasks(self, query: ListQuery) -> TaskPage: ...

    async def context_history(self, owner: str, context_id: str) -> list[JSON]: ...

    async def transition(
        self,
        task_id: str,
        to: TaskState,
        *,
        message: JSON | None = None,
        lease_owner: str | None = None,
    ) -> TaskEvent:
        """Compare-and-set the state; ``message`` becomes the status message and joins history."""
        ...

    async def cancel(self, owner: str, task_id: str) -> TaskEvent: ...

    async def update_status(self, task_id: str, message: JSON, *, lease_owner: str) -> TaskEvent:
        """A status message while working (no state change)."""
        ...

    async def add_artifact(
        self,
        task_id: str,
        artifact: JSON,
        *,
        lease_owner: str,
        append: bool = False,
        last_chunk: bool = False,
    ) -> TaskEvent: ...

    async def events_after(self, task_id: str, after_seq: int) -> list[TaskEvent]: ...

    async def claim(
        self, task_id: str, worker: str, *, lease_seconds: float, max_attempts: int
    ) -> Claim | None:
        """Lease a submitted or working task whose lease is free or expired.

        Returns None when another worker holds it or it is no longer runnable:
        losing that race is normal. A task claimed more than ``max_attempts``
        times is failed instead (``Claim.task`` is None).
        """
        ...

    async def renew(self, worker: str, task_ids: list[str], *, lease_seconds: float) -> set[str]:
        """Extend leases; returns the ids still held by ``worker``."""
        ...

    async def release_leases(self, worker: str | None = None) -> int:
        """Drop leases (of one worker, or all when the caller owns the store alone)."""
        ...

    async def runnable(self, limit: int = 1000) -> list[str]:
        """Submitted or working tasks with no live lease: the queue's outbox."""
        ...

    async def add_feedback(self, feedback: Feedback) -> None: ...
