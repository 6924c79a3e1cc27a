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
from enum import StrEnum
from typing import Any, Protocol

from tether.core.states import TaskState
from tether.core.types import JSON, Feedback, TaskEvent, TaskPage, TaskRecord

MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 50


@dataclass(slots=True, frozen=True)
class Claim:
    """A won claim: ``task`` (full history) to run, or None when the claim gave up on it."""

    task: TaskRecord | None
    events: list[TaskEvent]  # what the claim itself wrote: submitted -> working, or -> failed


@dataclass(slots=True, frozen=True)
class Start:
    """A new task's first claim, made by its submit: who runs it, for how long."""

    worker: str
    lease_seconds: float


@dataclass(slots=True, frozen=True)
class Submitted:
    task: TaskRecord
    created: bool  # False: the messageId was seen before; ``task`` is the existing one
    event: TaskEvent | None
    # A submit with ``start`` that created the task: the claim it made (``event`` is the
    # task's first, submitted, and the claim's own is the second, working).
    started: Claim | None = None


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


class OperationState(StrEnum):
    """Where an external operation a task waits on (``ctx.wait_for``) stands."""

    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed-out"


# While a task waits, its lease is held by the wait itself: ``lease_owner`` is
# ``wait:<operation id>`` (so operation ids are kept short enough for the column)
# and ``lease_expires`` the deadline, or ``WAIT_FOREVER``. ``runnable()`` and
# ``claim()`` then leave the task alone until a completion drops that lease or the
# deadline passes, without a change to either.
WAIT_PREFIX = "wait:"
MAX_OPERATION_ID = 120
WAIT_FOREVER = 1e15


@dataclass(slots=True, frozen=True)
class Operation:
    id: str
    task_id: str | None  # None: completed before any task waited on it
    state: OperationState
    result: Any = None
    error: str | None = None
    deadline: float | None = None


@dataclass(slots=True, frozen=True)
class Completion:
    operation: Operation
    changed: bool  # False: the operation had already ended (a redelivery); nothing was written
    resumed: str | None  # the task this completion released from its wait: queue it


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
        start: Start | None = None,
    ) -> Submitted:
        """Create a task, its context (if new), its first message and first event.

        A ``messageId`` already accepted from ``owner`` returns the existing task.
        With ``start``, a task it creates is also claimed, in the same step, as
        ``claim`` would (working, leased to ``start.worker``, first attempt).
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
        """Compare-and-set the state; ``message`` becomes the status message and joins history.

        To a terminal or interrupted state, the event carries the task as the
        transition left it (``TaskEvent.task``, full history), read in the same step.
        """
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

    async def prune_events(self, finished_before: float, limit: int = 200) -> int:
        """Drop the event logs of up to ``limit`` tasks that became terminal before
        ``finished_before`` (epoch seconds); returns how many tasks lost theirs.

        The tasks themselves (status, history, artifacts, ``last_seq``) stay: a
        stream asking for pruned events is told so and gets the Task snapshot.
        """
        ...

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
        """Drop leases (of one worker, or all when the caller owns the store alone).

        Parked tasks keep their wait: a restart must not run them before their completion.
        """
        ...

    async def runnable(self, limit: int = 1000) -> list[str]:
        """Submitted or working tasks with no live lease: the queue's outbox."""
        ...

    async def add_feedback(self, feedback: Feedback) -> None: ...

    async def wait_operation(
        self, task_id: str, operation_id: str, *, lease_owner: str, deadline: float | None
    ) -> Operation:
        """Park ``task_id`` (working, leased by ``lease_owner``) until ``operation_id`` ends.

        The lease passes to the wait (see ``WAIT_PREFIX``) and the attempt budget
        starts over. An operation that already ended parks nothing and is returned
        as it is; a pending one past its deadline is marked ``TIMED_OUT`` first. The
        first wait's deadline stays, so a re-run handler cannot extend it. Raises
        ``LeaseLost``/``InvalidTransition`` like any fenced write, and ``InvalidInput``
        for an operation that another task waits on.
        """
        ...

    async def complete_operation(
        self, operation_id: str, *, result: Any = None, error: str | None = None
    ) -> Completion:
        """Record the outcome of an operation once (``error``: it failed).

        The task parked on it, if any, is released (its lease dropped) in the same
        step. An operation no task waits on yet is stored, for the wait that comes
        later; one that already ended is left as it is (``changed`` False).
        """
        ...

    async def get_operation(self, operation_id: str) -> Operation | None: ...
