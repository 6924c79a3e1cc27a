"""An in-memory ``TaskStore`` that keeps every constraint of the SQL backends.

Each method runs without an ``await`` between its check and its write, which
makes it atomic on the event loop, just as the SQL backends' single statements
are atomic in the database.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from tether.core.errors import (
    ContextMismatch,
    InvalidInput,
    InvalidTransition,
    LeaseLost,
    TaskNotCancelable,
    TaskNotFound,
    TaskTerminal,
    UnsupportedOperation,
)
from tether.core.states import ACTIVE, CANCELABLE, TaskState, allowed_from
from tether.core.types import JSON, Feedback, TaskEvent, TaskPage, TaskRecord, new_id, now
from tether.store.base import (
    WAIT_FOREVER,
    WAIT_PREFIX,
    Claim,
    Completion,
    ListQuery,
    Operation,
    OperationState,
    Start,
    Submitted,
)
from tether.store.common import (
    artifact_payload,
    check_artifact,
    check_message,
    check_operation_id,
    check_rating,
    check_submit,
    decode_cursor,
    encode_cursor,
    gave_up_message,
    merge_artifact,
    page_size,
    stamp,
    status_payload,
    trim_history,
)


class MemoryStore:
    def __init__(self) -> None:
        self._tasks: dict[str, TaskRecord] = {}
        self._contexts: dict[str, str] = {}  # context id -> owner
        self._message_ids: dict[tuple[str, str], str] = {}  # (owner, messageId) -> task id
        self._events: dict[str, list[TaskEvent]] = {}
        # Messages of a context in the order they were stored, as SQL's messages.seq orders them.
        self._context_messages: dict[str, list[JSON]] = {}
        self.feedback: list[Feedback] = []
        self._operations: dict[str, Operation] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _task(self, task_id: str, owner: str | None = None) -> TaskRecord:
        task = self._tasks.get(task_id)
        if task is None or (owner is not None and task.owner != owner):
            raise TaskNotFound(task_id)
        return task

    def _check_new(self, owner: str, message: JSON) -> None:
        """SQL keeps one row per (owner, messageId); a second one is refused there, so here too."""
        check_message(message)
        if (owner, message["messageId"]) in self._message_ids:
            raise InvalidInput(f"messageId {message['messageId']} was already used")

    def _remember(self, task: TaskRecord, message: JSON) -> None:
        self._message_ids[(task.owner, message["messageId"])] = task.id
        task.history.append(message)
        self._context_messages.setdefault(task.context_id, []).append(message)

    def _event(self, task: TaskRecord, kind: str, payload: JSON, final: bool = False) -> TaskEvent:
        task.last_seq += 1
        event = TaskEvent(task.id, task.last_seq, kind, payload, final)
        self._events[task.id].append(event)
        return event

    def _status_event(self, task: TaskRecord) -> TaskEvent:
        payload = status_payload(
            task.id, task.context_id, task.state, task.status_message, task.status_ts
        )
        return self._event(task, "status", payload, task.state.terminal or task.state.interrupted)

    def _snapshot(self, task: TaskRecord, history_length: int | None = None) -> TaskRecord:
        # Deep copies, in and out, as a database round trip makes them: no caller can
        # change stored state by mutating what it passed in or got back.
        return replace(
            task,
            artifacts=copy.deepcopy(task.artifacts),
            history=copy.deepcopy(trim_history(task.history, history_length)),
            status_message=copy.deepcopy(task.status_message),
            metadata=copy.deepcopy(task.metadata),
        )

    async def submit(
        self,
        *,
        owner: str,
        message: JSON,
        context_id: str | None,
        metadata: JSON | None = None,
        start: Start | None = None,
    ) -> Submitted:
        check_submit(owner, message, context_id)
        message, metadata = copy.deepcopy(message), copy.deepcopy(metadata)
        seen = self._message_ids.get((owner, message["messageId"]))
        if seen is not None:
            return Submitted(self._snapshot(self._tasks[seen]), False, None)
        if context_id is not None and self._contexts.get(context_id, owner) != owner:
            raise ContextMismatch(f"contextId {context_id} belongs to another principal")
        context_id = context_id or new_id()
        self._contexts.setdefault(context_id, owner)
        task = TaskRecord(
            id=new_id(),
            context_id=context_id,
            owner=owner,
            state=TaskState.SUBMITTED,
            metadata=metadata,
        )
        task.status_ts = task.created_at
        self._remember(task, stamp(message, task.id, context_id))
        self._tasks[task.id] = task
        self._events[task.id] = []
        event = self._status_event(task)
        if start is None:
            return Submitted(self._snapshot(task), True, event)
        task.attempts = 1
        task.lease_owner, task.lease_expires = start.worker, task.created_at + start.lease_seconds
        working = self._apply(task, TaskState.WORKING, None)
        started = Claim(self._snapshot(task), [working])
        return Submitted(self._snapshot(task), True, event, started)

    async def resume(self, *, owner: str, task_id: str, message: JSON) -> Submitted:
        check_message(message)
        message = copy.deepcopy(message)
        seen = self._message_ids.get((owner, message["messageId"]))
        if seen is not None:
            return Submitted(self._snapshot(self._tasks[seen]), False, None)
        task = self._task(task_id, owner)
        if task.state.terminal:
            raise TaskTerminal(task_id, task.state)
        if task.state in ACTIVE:
            raise UnsupportedOperation(
                f"Task {task_id} is {task.state.value}; "
                "send the next message once it asks for input"
            )
        task.state = TaskState.SUBMITTED
        task.version += 1
        task.status_message = None
        task.status_ts = now()
        # A new turn: the attempt budget is per turn, not per conversation.
        task.attempts = 0
        self._remember(task, stamp(message, task.id, task.context_id))
        event = self._status_event(task)
        return Submitted(self._snapshot(task), True, event)

    async def get_task(
        self, owner: str | None, task_id: str, history_length: int | None = None
    ) -> TaskRecord:
        return self._snapshot(self._task(task_id, owner), history_length)

    async def list_tasks(self, query: ListQuery) -> TaskPage:
        size = page_size(query.page_size)
        cursor = decode_cursor(query.page_token)
        matches = [
            t
            for t in self._tasks.values()
            if t.owner == query.owner
            and (query.context_id is None or t.context_id == query.context_id)
            and (query.state is None or t.state == query.state)
            and (query.status_after is None or t.status_ts > query.status_after)
        ]
        matches.sort(key=lambda t: (t.status_ts, t.id), reverse=True)
        total = len(matches)
        if cursor is not None:
            matches = [t for t in matches if (t.status_ts, t.id) < cursor]
        page = matches[:size]
        token = encode_cursor(page[-1].status_ts, page[-1].id) if len(matches) > size else ""
        snaps = [self._snapshot(t, query.history_length) for t in page]
        if not query.include_artifacts:
            for snap in snaps:
                snap.artifacts = []
        return TaskPage(snaps, token, total)

    async def context_history(self, owner: str, context_id: str) -> list[JSON]:
        if self._contexts.get(context_id) != owner:
            return []
        return list(self._context_messages.get(context_id, []))

    def _guard(self, task: TaskRecord, to: TaskState, lease_owner: str | None) -> None:
        if task.state not in allowed_from(to):
            raise InvalidTransition(task.id, task.state, to)
        if lease_owner is not None and task.lease_owner != lease_owner:
            raise LeaseLost(f"Task {task.id}: lease held by another worker")

    async def transition(
        self,
        task_id: str,
        to: TaskState,
        *,
        message: JSON | None = None,
        lease_owner: str | None = None,
    ) -> TaskEvent:
        task = self._task(task_id)
        self._guard(task, to, lease_owner)
        if message is not None:
            self._check_new(task.owner, message)
            message = copy.deepcopy(message)
        event = self._apply(task, to, message)
        return replace(event, task=self._snapshot(task)) if event.final else event

    def _apply(self, task: TaskRecord, to: TaskState, message: JSON | None) -> TaskEvent:
        task.state = to
        task.version += 1
        task.status_ts = now()
        task.status_message = message
        if message is not None:
            self._remember(task, message)
        if to.terminal or to.interrupted:
            task.lease_owner = task.lease_expires = None
        return self._status_event(task)

    async def cancel(self, owner: str, task_id: str) -> TaskEvent:
        task = self._task(task_id, owner)
        if task.state not in CANCELABLE:
            raise TaskNotCancelable(task_id, task.state, TaskState.CANCELED)
        return self._apply(task, TaskState.CANCELED, None)

    def _working(self, task_id: str, lease_owner: str) -> TaskRecord:
        task = self._task(task_id)
        if task.state is not TaskState.WORKING:
            raise InvalidTransition(task_id, task.state, TaskState.WORKING)
        if task.lease_owner != lease_owner:
            raise LeaseLost(f"Task {task_id}: lease held by another worker")
        return task

    async def update_status(self, task_id: str, message: JSON, *, lease_owner: str) -> TaskEvent:
        task = self._working(task_id, lease_owner)
        task.status_message = copy.deepcopy(message)
        task.status_ts = now()
        return self._status_event(task)

    async def add_artifact(
        self,
        task_id: str,
        artifact: JSON,
        *,
        lease_owner: str,
        append: bool = False,
        last_chunk: bool = False,
    ) -> TaskEvent:
        check_artifact(artifact)
        artifact = copy.deepcopy(artifact)
        task = self._working(task_id, lease_owner)
        for i, existing in enumerate(task.artifacts):
            if existing["artifactId"] == artifact["artifactId"]:
                task.artifacts[i] = merge_artifact(existing, artifact, append)
                break
        else:
            task.artifacts.append(artifact)
        payload = artifact_payload(task.id, task.context_id, artifact, append, last_chunk)
        return self._event(task, "artifact", payload)

    async def events_after(self, task_id: str, after_seq: int) -> list[TaskEvent]:
        return [e for e in self._events.get(task_id, []) if e.seq > after_seq]

    async def prune_events(self, finished_before: float, limit: int = 200) -> int:
        pruned = 0
        for task in self._tasks.values():
            if pruned >= limit:
                break
            if task.state.terminal and task.status_ts < finished_before and self._events[task.id]:
                self._events[task.id] = []
                pruned += 1
        return pruned

    async def claim(
        self, task_id: str, worker: str, *, lease_seconds: float, max_attempts: int
    ) -> Claim | None:
        task = self._tasks.get(task_id)
        t = now()
        if task is None or task.state not in ACTIVE:
            return None
        if task.lease_owner is not None and (task.lease_expires or 0) > t:
            return None
        task.attempts += 1
        if task.attempts > max_attempts:
            msg = stamp(gave_up_message(max_attempts), task.id, task.context_id)
            return Claim(None, [self._apply(task, TaskState.FAILED, msg)])
        task.lease_owner, task.lease_expires = worker, t + lease_seconds
        events = []
        if task.state is TaskState.SUBMITTED:
            events.append(self._apply(task, TaskState.WORKING, None))
        return Claim(self._snapshot(task), events)

    async def renew(self, worker: str, task_ids: list[str], *, lease_seconds: float) -> set[str]:
        held = set()
        expires = now() + lease_seconds
        for task_id in task_ids:
            task = self._tasks.get(task_id)
            if task is not None and task.lease_owner == worker:
                task.lease_expires = expires
                held.add(task_id)
        return held

    async def release_leases(self, worker: str | None = None) -> int:
        count = 0
        for task in self._tasks.values():
            owner = task.lease_owner
            # A parked task's "lease" is its wait (owner ``wait:<op>``): no process holds it.
            if owner is not None and not owner.startswith(WAIT_PREFIX) and worker in (None, owner):
                task.lease_owner = task.lease_expires = None
                count += 1
        return count

    async def runnable(self, limit: int = 1000) -> list[str]:
        t = now()
        ready = [
            task
            for task in self._tasks.values()
            if task.state in ACTIVE and (task.lease_owner is None or (task.lease_expires or 0) <= t)
        ]
        ready.sort(key=lambda task: task.created_at)
        return [task.id for task in ready[:limit]]

    async def add_feedback(self, feedback: Feedback) -> None:
        check_rating(feedback.rating)
        self._task(feedback.task_id, feedback.owner)
        self.feedback.append(feedback)

    # -- durable waits ---------------------------------------------------------

    async def wait_operation(
        self, task_id: str, operation_id: str, *, lease_owner: str, deadline: float | None
    ) -> Operation:
        check_operation_id(operation_id)
        task = self._working(task_id, lease_owner)
        op = self._operations.get(operation_id)
        if op is not None and op.task_id not in (None, task_id):
            raise InvalidInput(f"operation {operation_id} is awaited by another task")
        if op is None:
            op = Operation(operation_id, task_id, OperationState.PENDING, deadline=deadline)
        else:
            op = replace(op, task_id=task_id, deadline=op.deadline or deadline)
        if op.state is OperationState.PENDING and op.deadline is not None and op.deadline <= now():
            op = replace(op, state=OperationState.TIMED_OUT)
        self._operations[operation_id] = op
        if op.state is OperationState.PENDING:
            task.lease_owner = WAIT_PREFIX + operation_id
            task.lease_expires = op.deadline if op.deadline is not None else WAIT_FOREVER
            task.attempts = 0
        return op

    async def complete_operation(
        self, operation_id: str, *, result: object = None, error: str | None = None
    ) -> Completion:
        check_operation_id(operation_id)
        state = OperationState.FAILED if error is not None else OperationState.COMPLETED
        op = self._operations.get(operation_id)
        if op is not None and op.state is not OperationState.PENDING:
            return Completion(op, False, None)
        if op is None:
            op = Operation(operation_id, None, state, result, error)
        else:
            op = replace(op, state=state, result=result, error=error)
        self._operations[operation_id] = op
        task = self._tasks.get(op.task_id) if op.task_id is not None else None
        if (
            task is not None
            and task.state in ACTIVE
            and task.lease_owner == WAIT_PREFIX + operation_id
        ):
            task.lease_owner = task.lease_expires = None
            return Completion(op, True, task.id)
        return Completion(op, True, None)

    async def get_operation(self, operation_id: str) -> Operation | None:
        return self._operations.get(operation_id)
