"""The SQL ``TaskStore``: SQLite (embedded default) and PostgreSQL, one code path.

Each state change is one ``UPDATE tasks ... WHERE id = :id AND state IN (...)
[AND lease_owner = :me] RETURNING last_seq``; the bumped ``last_seq`` is the
event's sequence number, so the row lock that serialises writers also makes
the per-task sequence gap-free. The event row (and any message) is written in
the same transaction.

Database errors are translated here, once: transient ones (a dropped
connection, 40001, 40P01, 57P0x, SQLite's "database is locked") are retried with
bounded, jittered backoff and then surface as ``StoreUnavailable``; a value the
database refuses becomes ``InvalidInput``. A connection lost while COMMIT was in
flight leaves the outcome unknown: the store then reads back whether the write
landed (the event it wrote, at its sequence number, or the lease it took) and
answers or retries accordingly, so a lost acknowledgement never duplicates an
event; a write it cannot check raises ``StoreUnavailable``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

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
from tether.core.states import ACTIVE, TERMINAL, TaskState, allowed_from
from tether.core.types import JSON, Feedback, TaskEvent, TaskPage, TaskRecord, new_id, now
from tether.store.base import (
    WAIT_FOREVER,
    WAIT_PREFIX,
    Claim,
    Completion,
    ListQuery,
    Operation,
    OperationState,
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
from tether.store.schema import (
    artifacts,
    events,
    feedback,
    messages,
    operations,
    tasks,
)
from tether.store.sql_engine import SqlEngine
from tether.store.sql_exec import dumps, first, loads, rows, run

log = logging.getLogger("tether.store")
T = TypeVar("T")
Op = Callable[[AsyncConnection], Awaitable[T]]
Verify = Callable[[AsyncConnection, T], Awaitable[bool]]

_ACTIVE = [s.value for s in ACTIVE]
_TERMINAL = [s.value for s in TERMINAL]


class SqlStore(SqlEngine):
    @staticmethod
    async def _logged(conn: AsyncConnection, written: Sequence[TaskEvent]) -> bool:
        """True when each event is stored as written: its commit landed.

        A sequence number is taken under the task's row lock, so if the lost commit did
        not land no other writer can have stored this very payload at that number.
        """
        for event in written:
            row = (
                await conn.execute(
                    sa.select(events.c.kind, events.c.payload).where(
                        events.c.task_id == event.task_id, events.c.seq == event.seq
                    )
                )
            ).first()
            if row is None or (row.kind, row.payload) != (event.kind, event.payload):
                return False
        return True

    async def _event_landed(self, conn: AsyncConnection, event: TaskEvent) -> bool:
        return await self._logged(conn, [event])

    # -- building blocks ----------------------------------------------------

    async def _bump(
        self,
        conn: AsyncConnection,
        task_id: str,
        wanted: TaskState,
        states: Sequence[str],
        sets: tuple[str, ...],
        params: dict[str, Any],
        *,
        owner: str | None = None,
        lease_owner: str | None = None,
    ) -> tuple[int, str, str]:
        """The compare-and-set: bump ``last_seq`` where the guard holds, or say why not.

        ``sets`` are ``column = expression`` fragments; ``params`` their values.
        """
        sql = _bump_sql(sets, tuple(states), owner is not None, lease_owner is not None)
        row = await first(
            conn, sql, {**params, "id": task_id, "owner": owner, "lease_owner": lease_owner}
        )
        if row is not None:
            return int(row[0]), str(row[1]), str(row[2])
        found = await first(
            conn,
            _FIND_STATE_OF_OWNER if owner is not None else _FIND_STATE,
            {"id": task_id, "owner": owner},
        )
        if found is None:
            raise TaskNotFound(task_id)
        current = TaskState(found[0])
        if current.value in states and lease_owner is not None:
            raise LeaseLost(f"Task {task_id}: lease held by another worker")
        raise InvalidTransition(task_id, current, wanted)

    async def _event(
        self, conn: AsyncConnection, task_id: str, seq: int, kind: str, payload: JSON, final: bool
    ) -> TaskEvent:
        await run(
            conn,
            _INSERT_EVENT,
            {
                "task_id": task_id,
                "seq": seq,
                "kind": kind,
                "final": final,
                "payload": dumps(payload),
                "created_at": now(),
            },
        )
        return TaskEvent(task_id, seq, kind, payload, final)

    async def _message(self, conn: AsyncConnection, owner: str, message: JSON) -> None:
        await run(
            conn,
            _INSERT_MESSAGE,
            {
                "owner": owner,
                "message_id": message["messageId"],
                "task_id": message["taskId"],
                "context_id": message["contextId"],
                "role": message.get("role", "ROLE_USER"),
                "body": dumps(message),
                "created_at": now(),
            },
        )

    async def _set_state(
        self,
        conn: AsyncConnection,
        task_id: str,
        to: TaskState,
        message: JSON | None,
        *,
        owner: str | None = None,
        lease_owner: str | None = None,
        new_turn: bool = False,
    ) -> TaskEvent:
        """``message`` must already name its task and context (``common.stamp``).

        ``new_turn``: the attempt budget starts again (a follow-up message).
        """
        ts = now()
        sets: tuple[str, ...] = _STATE_SETS
        if to.terminal or to.interrupted:
            sets += _LEASE_CLEARED
        if new_turn:
            sets += ("attempts = 0",)
        allowed = _ALLOWED_FROM[to]
        seq, context_id, task_owner = await self._bump(
            conn,
            task_id,
            to,
            allowed,
            sets,
            {"state": to.value, "ts": ts, "status_message": dumps(message)},
            owner=owner,
            lease_owner=lease_owner,
        )
        if message is not None:
            await self._message(conn, task_owner, message)
        payload = status_payload(task_id, context_id, to, message, ts)
        return await self._event(
            conn, task_id, seq, "status", payload, to.terminal or to.interrupted
        )

    async def _load(
        self,
        conn: AsyncConnection,
        task_id: str,
        owner: str | None,
        history_length: int | None = None,
    ) -> TaskRecord:
        row = await first(
            conn,
            _LOAD_TASK_OF_OWNER if owner is not None else _LOAD_TASK,
            {"id": task_id, "owner": owner},
        )
        if row is None:
            raise TaskNotFound(task_id)
        return await self._fill(conn, _task(row), history_length)

    async def _fill(
        self, conn: AsyncConnection, task: TaskRecord, history_length: int | None
    ) -> TaskRecord:
        """Reads ``task``'s artifacts and its last ``history_length`` messages into it."""
        task_id = task.id
        task.artifacts = [loads(r[0]) for r in await rows(conn, _LOAD_ARTIFACTS, {"id": task_id})]
        if history_length is None:
            history = await rows(conn, _LOAD_HISTORY, {"id": task_id})
        elif history_length > 0:
            history = await rows(conn, _LOAD_HISTORY_LAST, {"id": task_id, "n": history_length})
        else:
            history = []
        task.history = [loads(r[0]) for r in reversed(history)]
        return task

    async def _seen(self, conn: AsyncConnection, owner: str, message_id: str) -> str | None:
        row = await first(conn, _SEEN, {"owner": owner, "message_id": message_id})
        return None if row is None else str(row[0])

    # -- TaskStore ----------------------------------------------------------

    async def submit(
        self, *, owner: str, message: JSON, context_id: str | None, metadata: JSON | None = None
    ) -> Submitted:
        check_submit(owner, message, context_id)
        # Chosen once, outside the retried transaction: a retry that finds this id already
        # stored knows its own lost-acknowledgement commit created it.
        task_id = new_id()

        async def op(conn: AsyncConnection) -> Submitted:
            # No look-up of the messageId first: a repeat fails the messages table's
            # unique constraint, and ``raced`` answers it (the common case pays nothing).
            ts = now()
            ctx = context_id or new_id()
            if context_id is None:
                await run(conn, _INSERT_CONTEXT, {"id": ctx, "owner": owner, "ts": ts})
            # ON CONFLICT: two first messages of one new context may race to create it.
            elif await first(conn, _ADD_CONTEXT, {"id": ctx, "owner": owner, "ts": ts}) is None:
                ctx_owner = await first(conn, _CONTEXT_OWNER, {"id": ctx})
                if ctx_owner is None or ctx_owner[0] != owner:
                    raise ContextMismatch(f"contextId {ctx} belongs to another principal")
            task = TaskRecord(
                id=task_id,
                context_id=ctx,
                owner=owner,
                state=TaskState.SUBMITTED,
                status_ts=ts,
                created_at=ts,
                metadata=metadata,
                last_seq=1,
            )
            await run(
                conn,
                _INSERT_TASK,
                {
                    "id": task_id,
                    "context_id": ctx,
                    "owner": owner,
                    "state": task.state.value,
                    "ts": ts,
                    "metadata": dumps(metadata),
                },
            )
            stored = stamp(message, task.id, ctx)
            await self._message(conn, owner, stored)
            task.history = [stored]
            payload = status_payload(task.id, ctx, task.state, None, ts)
            event = await self._event(conn, task.id, 1, "status", payload, False)
            return Submitted(task, True, event)

        async def raced() -> Submitted:
            """The messageId was used before, or a commit of ours of unknown outcome landed."""

            async def existing(conn: AsyncConnection) -> Submitted:
                seen = await self._seen(conn, owner, message["messageId"])
                if seen is None:
                    raise InvalidInput(f"messageId {message['messageId']} conflicts")
                return await self._existing(conn, owner, seen, mine=seen == task_id)

            return await self._read(existing)

        return await self._write(op, idempotent=True, on_conflict=raced)

    async def _existing(
        self, conn: AsyncConnection, owner: str, task_id: str, *, mine: bool
    ) -> Submitted:
        task = await self._load(conn, task_id, owner)
        if not mine:
            return Submitted(task, False, None)
        first = await self._events(conn, task_id, 0, limit=1)
        return Submitted(task, True, first[0] if first else None)

    def _insert(self, table: sa.Table) -> pg.Insert | sqlite.Insert:
        """An INSERT that knows ON CONFLICT, in this engine's dialect."""
        return pg.insert(table) if self.dialect == "postgresql" else sqlite.insert(table)

    async def resume(self, *, owner: str, task_id: str, message: JSON) -> Submitted:
        check_message(message)

        async def op(conn: AsyncConnection) -> Submitted:
            seen = await self._seen(conn, owner, message["messageId"])
            if seen is not None:
                return Submitted(await self._load(conn, seen, owner), False, None)
            q = sa.select(tasks.c.state, tasks.c.context_id).where(
                tasks.c.id == task_id, tasks.c.owner == owner
            )
            row = (await conn.execute(q)).first()
            if row is None:
                raise TaskNotFound(task_id)
            try:
                # A new turn: the attempt budget is per turn, not per conversation.
                event = await self._set_state(
                    conn, task_id, TaskState.SUBMITTED, None, owner=owner, new_turn=True
                )
            except InvalidTransition as exc:
                # Also reached when a concurrent message moved the task after our SELECT.
                if exc.current.terminal:
                    raise TaskTerminal(task_id, exc.current) from None
                raise UnsupportedOperation(
                    f"Task {task_id} is {exc.current.value}; "
                    "send the next message once it asks for input"
                ) from None
            await self._message(conn, owner, stamp(message, task_id, row.context_id))
            return Submitted(await self._load(conn, task_id, owner), True, event)

        async def landed(conn: AsyncConnection, sub: Submitted) -> bool:
            return sub.event is not None and await self._logged(conn, [sub.event])

        async def raced() -> Submitted:
            async def existing(conn: AsyncConnection) -> Submitted:
                seen = await self._seen(conn, owner, message["messageId"])
                if seen is None:
                    raise InvalidInput(f"messageId {message['messageId']} conflicts")
                return Submitted(await self._load(conn, seen, owner), False, None)

            return await self._read(existing)

        return await self._write(op, verify=landed, on_conflict=raced)

    async def get_task(
        self, owner: str | None, task_id: str, history_length: int | None = None
    ) -> TaskRecord:
        return await self._read(lambda conn: self._load(conn, task_id, owner, history_length))

    async def list_tasks(self, query: ListQuery) -> TaskPage:
        size = page_size(query.page_size)
        cursor = decode_cursor(query.page_token)
        cond = [tasks.c.owner == query.owner]
        if query.context_id is not None:
            cond.append(tasks.c.context_id == query.context_id)
        if query.state is not None:
            cond.append(tasks.c.state == query.state.value)
        if query.status_after is not None:
            cond.append(tasks.c.status_ts > query.status_after)

        async def op(conn: AsyncConnection) -> TaskPage:
            total = (
                await conn.execute(sa.select(sa.func.count()).select_from(tasks).where(*cond))
            ).scalar_one()
            q = sa.select(tasks).where(*cond)
            if cursor is not None:
                q = q.where(sa.tuple_(tasks.c.status_ts, tasks.c.id) < sa.tuple_(*cursor))
            q = q.order_by(tasks.c.status_ts.desc(), tasks.c.id.desc()).limit(size + 1)
            rows = (await conn.execute(q)).all()
            page = [_record(r) for r in rows[:size]]
            ids = [t.id for t in page]
            by_id = {t.id: t for t in page}
            if ids and query.include_artifacts:
                aq = (
                    sa.select(artifacts.c.task_id, artifacts.c.body)
                    .where(artifacts.c.task_id.in_(ids))
                    .order_by(artifacts.c.task_id, artifacts.c.position)
                )
                for task_id, body in await conn.execute(aq):
                    by_id[task_id].artifacts.append(body)
            if ids and (query.history_length is None or query.history_length > 0):
                mq = (
                    sa.select(messages.c.task_id, messages.c.body)
                    .where(messages.c.task_id.in_(ids))
                    .order_by(messages.c.seq)
                )
                for task_id, body in await conn.execute(mq):
                    by_id[task_id].history.append(body)
                for t in page:
                    t.history = trim_history(t.history, query.history_length)
            token = encode_cursor(page[-1].status_ts, page[-1].id) if len(rows) > size else ""
            return TaskPage(page, token, int(total))

        return await self._read(op)

    async def context_history(self, owner: str, context_id: str) -> list[JSON]:
        async def op(conn: AsyncConnection) -> list[JSON]:
            q = (
                sa.select(messages.c.body)
                .join(tasks, tasks.c.id == messages.c.task_id)
                .where(messages.c.context_id == context_id, tasks.c.owner == owner)
                .order_by(messages.c.seq)
            )
            return [r[0] for r in await conn.execute(q)]

        return await self._read(op)

    async def transition(
        self,
        task_id: str,
        to: TaskState,
        *,
        message: JSON | None = None,
        lease_owner: str | None = None,
    ) -> TaskEvent:
        if message is not None:
            check_message(message)
        return await self._write(
            lambda conn: self._set_state(conn, task_id, to, message, lease_owner=lease_owner),
            verify=self._event_landed,
        )

    async def cancel(self, owner: str, task_id: str) -> TaskEvent:
        async def op(conn: AsyncConnection) -> TaskEvent:
            try:
                return await self._set_state(conn, task_id, TaskState.CANCELED, None, owner=owner)
            except InvalidTransition as exc:
                raise TaskNotCancelable(task_id, exc.current, TaskState.CANCELED) from None

        return await self._write(op, verify=self._event_landed)

    async def update_status(self, task_id: str, message: JSON, *, lease_owner: str) -> TaskEvent:
        async def op(conn: AsyncConnection) -> TaskEvent:
            ts = now()
            seq, context_id, _ = await self._bump(
                conn,
                task_id,
                TaskState.WORKING,
                _WORKING,
                ("status_ts = :ts", "status_message = :status_message"),
                {"ts": ts, "status_message": dumps(message)},
                lease_owner=lease_owner,
            )
            payload = status_payload(task_id, context_id, TaskState.WORKING, message, ts)
            return await self._event(conn, task_id, seq, "status", payload, False)

        return await self._write(op, verify=self._event_landed)

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

        async def op(conn: AsyncConnection) -> TaskEvent:
            seq, context_id, _ = await self._bump(
                conn, task_id, TaskState.WORKING, _WORKING, (), {}, lease_owner=lease_owner
            )
            key = (
                artifacts.c.task_id == task_id,
                artifacts.c.artifact_id == artifact["artifactId"],
            )
            existing = (await conn.execute(sa.select(artifacts.c.body).where(*key))).first()
            if existing is None:
                position = (
                    await conn.execute(
                        sa.select(sa.func.count())
                        .select_from(artifacts)
                        .where(artifacts.c.task_id == task_id)
                    )
                ).scalar_one()
                await conn.execute(
                    sa.insert(artifacts).values(
                        task_id=task_id,
                        artifact_id=artifact["artifactId"],
                        position=position,
                        body=artifact,
                    )
                )
            else:
                merged = merge_artifact(existing[0], artifact, append)
                await conn.execute(sa.update(artifacts).where(*key).values(body=merged))
            payload = artifact_payload(task_id, context_id, artifact, append, last_chunk)
            return await self._event(conn, task_id, seq, "artifact", payload, False)

        return await self._write(op, verify=self._event_landed)

    async def events_after(self, task_id: str, after_seq: int) -> list[TaskEvent]:
        return await self._read(lambda conn: self._events(conn, task_id, after_seq))

    async def prune_events(self, finished_before: float, limit: int = 200) -> int:
        async def op(conn: AsyncConnection) -> int:
            q = (
                sa.select(tasks.c.id)
                .where(
                    tasks.c.state.in_(_TERMINAL),
                    tasks.c.status_ts < finished_before,
                    sa.exists().where(events.c.task_id == tasks.c.id),
                )
                .limit(limit)
            )
            ids = [r[0] for r in await conn.execute(q)]
            if ids:
                await conn.execute(sa.delete(events).where(events.c.task_id.in_(ids)))
            return len(ids)

        # Deleting what is already deleted changes nothing: safe to repeat.
        return await self._write(op, idempotent=True)

    async def _events(
        self, conn: AsyncConnection, task_id: str, after_seq: int, limit: int | None = None
    ) -> list[TaskEvent]:
        found = await rows(
            conn,
            _EVENTS_AFTER if limit is None else _EVENTS_AFTER_FIRST,
            {"id": task_id, "after": after_seq, "n": limit},
        )
        return [TaskEvent(task_id, r[0], r[1], loads(r[2]), bool(r[3])) for r in found]

    async def claim(
        self, task_id: str, worker: str, *, lease_seconds: float, max_attempts: int
    ) -> Claim | None:
        async def op(conn: AsyncConnection) -> Claim | None:
            t = now()
            params = {"id": task_id, "worker": worker, "now": t, "expires": t + lease_seconds}
            # The common case, a task never started: leased and started in one statement.
            fresh = await first(conn, _CLAIM_FRESH, {**params, "max_attempts": max_attempts})
            if fresh is not None:
                task = _task(fresh)
                payload = status_payload(task_id, task.context_id, task.state, None, t)
                started = await self._event(conn, task_id, task.last_seq, "status", payload, False)
                return Claim(await self._fill(conn, task, None), [started])
            row = await first(conn, _CLAIM, params)
            if row is None:
                return None
            state, attempts, context_id = row
            if attempts > max_attempts:
                gave_up = stamp(gave_up_message(max_attempts), task_id, context_id)
                failed = await self._set_state(
                    conn, task_id, TaskState.FAILED, gave_up, lease_owner=worker
                )
                return Claim(None, [failed])
            written = []
            if state == TaskState.SUBMITTED.value:
                written.append(
                    await self._set_state(
                        conn, task_id, TaskState.WORKING, None, lease_owner=worker
                    )
                )
            return Claim(await self._load(conn, task_id, None), written)

        async def landed(conn: AsyncConnection, claim: Claim | None) -> bool:
            if claim is None:
                return True  # nothing was written
            if claim.task is not None:
                # The expiry is this attempt's own clock reading: no other claim wrote it.
                lease = (
                    await conn.execute(
                        sa.select(tasks.c.lease_owner, tasks.c.lease_expires).where(
                            tasks.c.id == task_id
                        )
                    )
                ).first()
                if lease is None or tuple(lease) != (worker, claim.task.lease_expires):
                    return False
            return await self._logged(conn, claim.events)

        return await self._write(op, verify=landed)

    async def renew(self, worker: str, task_ids: list[str], *, lease_seconds: float) -> set[str]:
        if not task_ids:
            return set()

        async def op(conn: AsyncConnection) -> set[str]:
            stmt = (
                sa.update(tasks)
                .where(tasks.c.id.in_(task_ids), tasks.c.lease_owner == worker)
                .values(lease_expires=now() + lease_seconds)
                .returning(tasks.c.id)
            )
            return {r[0] for r in await conn.execute(stmt)}

        return await self._write(op, idempotent=True)

    async def release_leases(self, worker: str | None = None) -> int:
        async def op(conn: AsyncConnection) -> int:
            # A parked task's "lease" is its wait (owner ``wait:<op>``): no process holds it.
            cond: list[sa.ColumnElement[bool]] = [
                tasks.c.lease_owner.is_not(None),
                tasks.c.lease_owner.not_like(f"{WAIT_PREFIX}%"),
            ]
            if worker is not None:
                cond.append(tasks.c.lease_owner == worker)
            stmt = sa.update(tasks).where(*cond).values(lease_owner=None, lease_expires=None)
            return (await conn.execute(stmt)).rowcount

        return await self._write(op, idempotent=True)

    async def runnable(self, limit: int = 1000) -> list[str]:
        async def op(conn: AsyncConnection) -> list[str]:
            q = (
                sa.select(tasks.c.id)
                .where(
                    tasks.c.state.in_(_ACTIVE),
                    sa.or_(tasks.c.lease_owner.is_(None), tasks.c.lease_expires <= now()),
                )
                .order_by(tasks.c.created_at)
                .limit(limit)
            )
            return [r[0] for r in await conn.execute(q)]

        return await self._read(op)

    async def add_feedback(self, fb: Feedback) -> None:
        check_rating(fb.rating)

        ts = now()

        async def op(conn: AsyncConnection) -> None:
            q = sa.select(tasks.c.id).where(tasks.c.id == fb.task_id, tasks.c.owner == fb.owner)
            if (await conn.execute(q)).first() is None:
                raise TaskNotFound(fb.task_id)
            await conn.execute(
                sa.insert(feedback).values(
                    task_id=fb.task_id,
                    owner=fb.owner,
                    rating=fb.rating,
                    text=fb.text,
                    metadata=fb.metadata,
                    created_at=ts,
                )
            )

        async def landed(conn: AsyncConnection, _: None) -> bool:
            q = sa.select(feedback.c.id).where(
                feedback.c.task_id == fb.task_id,
                feedback.c.owner == fb.owner,
                feedback.c.created_at == ts,
            )
            return (await conn.execute(q)).first() is not None

        await self._write(op, verify=landed)

    # -- durable waits ---------------------------------------------------------

    async def wait_operation(
        self, task_id: str, operation_id: str, *, lease_owner: str, deadline: float | None
    ) -> Operation:
        check_operation_id(operation_id)

        async def op(conn: AsyncConnection) -> Operation:
            t = now()
            await conn.execute(
                self._insert(operations)
                .values(
                    id=operation_id,
                    task_id=task_id,
                    state=OperationState.PENDING.value,
                    deadline=deadline,
                    created_at=t,
                )
                .on_conflict_do_nothing()
            )
            # The row lock orders this wait against a concurrent completion: either the
            # completion sees the task parked and releases it, or this sees it completed.
            row = (
                await conn.execute(
                    sa.select(operations).where(operations.c.id == operation_id).with_for_update()
                )
            ).one()
            current = _operation(row)
            if current.task_id not in (None, task_id):
                raise InvalidInput(f"operation {operation_id} is awaited by another task")
            values: dict[str, Any] = {}
            if current.task_id is None:
                values["task_id"] = task_id
            if current.deadline is None and deadline is not None:
                values["deadline"] = deadline
            waiting_until = current.deadline if current.deadline is not None else deadline
            timed_out = (
                current.state is OperationState.PENDING
                and waiting_until is not None
                and waiting_until <= t
            )
            if timed_out:
                values.update(state=OperationState.TIMED_OUT.value, completed_at=t)
            if values:
                await conn.execute(
                    sa.update(operations).where(operations.c.id == operation_id).values(**values)
                )
                row = (
                    await conn.execute(sa.select(operations).where(operations.c.id == operation_id))
                ).one()
                current = _operation(row)
            if current.state is not OperationState.PENDING:
                return current
            parked = (
                await conn.execute(
                    sa.update(tasks)
                    .where(
                        tasks.c.id == task_id,
                        tasks.c.state == TaskState.WORKING.value,
                        tasks.c.lease_owner == lease_owner,
                    )
                    .values(
                        lease_owner=WAIT_PREFIX + operation_id,
                        lease_expires=waiting_until if waiting_until is not None else WAIT_FOREVER,
                        attempts=0,
                    )
                    .returning(tasks.c.id)
                )
            ).first()
            if parked is None:
                found = (
                    await conn.execute(sa.select(tasks.c.state).where(tasks.c.id == task_id))
                ).first()
                if found is None:
                    raise TaskNotFound(task_id)
                if found.state != TaskState.WORKING.value:
                    raise InvalidTransition(task_id, TaskState(found.state), TaskState.WORKING)
                raise LeaseLost(f"Task {task_id}: lease held by another worker")
            return current

        return await self._write(op)

    async def complete_operation(
        self, operation_id: str, *, result: Any = None, error: str | None = None
    ) -> Completion:
        check_operation_id(operation_id)
        state = OperationState.FAILED if error is not None else OperationState.COMPLETED

        async def op(conn: AsyncConnection) -> Completion:
            t = now()
            inserted = (
                await conn.execute(
                    self._insert(operations)
                    .values(
                        id=operation_id,
                        state=state.value,
                        result=result,
                        error=error,
                        created_at=t,
                        completed_at=t,
                    )
                    .on_conflict_do_nothing()
                    .returning(operations.c.id)
                )
            ).first()
            if inserted is not None:
                return Completion(Operation(operation_id, None, state, result, error), True, None)
            row = (
                await conn.execute(
                    sa.update(operations)
                    .where(
                        operations.c.id == operation_id,
                        operations.c.state == OperationState.PENDING.value,
                    )
                    .values(state=state.value, result=result, error=error, completed_at=t)
                    .returning(*operations.c)
                )
            ).first()
            if row is None:
                current = (
                    await conn.execute(sa.select(operations).where(operations.c.id == operation_id))
                ).one()
                return Completion(_operation(current), False, None)
            done = _operation(row)
            if done.task_id is None:
                return Completion(done, True, None)
            released = (
                await conn.execute(
                    sa.update(tasks)
                    .where(
                        tasks.c.id == done.task_id,
                        tasks.c.state.in_(_ACTIVE),
                        tasks.c.lease_owner == WAIT_PREFIX + operation_id,
                    )
                    .values(lease_owner=None, lease_expires=None)
                    .returning(tasks.c.id)
                )
            ).first()
            return Completion(done, True, None if released is None else str(released[0]))

        # Repeating it after a lost commit finds the operation ended: a no-op.
        return await self._write(op, idempotent=True)

    async def get_operation(self, operation_id: str) -> Operation | None:
        async def op(conn: AsyncConnection) -> Operation | None:
            q = sa.select(operations).where(operations.c.id == operation_id)
            row = (await conn.execute(q)).first()
            return None if row is None else _operation(row)

        return await self._read(op)


def _operation(row: sa.Row[Any]) -> Operation:
    m = row._mapping
    return Operation(
        id=m["id"],
        task_id=m["task_id"],
        state=OperationState(m["state"]),
        result=m["result"],
        error=m["error"],
        deadline=m["deadline"],
    )


def _task(row: Sequence[Any]) -> TaskRecord:
    """A ``tasks`` row read with ``_TASK_COLUMNS``."""
    return TaskRecord(
        id=row[0],
        context_id=row[1],
        owner=row[2],
        state=TaskState(row[3]),
        version=row[4],
        status_message=loads(row[5]),
        status_ts=row[6],
        created_at=row[7],
        metadata=loads(row[8]),
        last_seq=row[9],
        attempts=row[10],
        lease_owner=row[11],
        lease_expires=row[12],
    )


def _record(row: sa.Row[Any]) -> TaskRecord:
    """A ``tasks`` row read with SQLAlchemy (JSON already decoded)."""
    return _task(tuple(row._mapping[c] for c in _TASK_COLUMN_NAMES))


# -- the hot path's SQL (see sql_exec) -------------------------------------------

_TASK_COLUMN_NAMES = (
    "id",
    "context_id",
    "owner",
    "state",
    "version",
    "status_message",
    "status_ts",
    "created_at",
    "metadata",
    "last_seq",
    "attempts",
    "lease_owner",
    "lease_expires",
)
_TASK_COLUMNS = ", ".join(_TASK_COLUMN_NAMES)


def _states(states: Sequence[str]) -> str:
    # Enum values, never user input: safe to inline, and one prepared statement each.
    return ", ".join(f"'{s}'" for s in states)


_ALLOWED_FROM = {to: tuple(sorted(s.value for s in allowed_from(to))) for to in TaskState}
_WORKING = (TaskState.WORKING.value,)
_STATE_SETS = (
    "state = :state",
    "version = version + 1",
    "status_ts = :ts",
    "status_message = :status_message",
)
_LEASE_CLEARED = ("lease_owner = NULL", "lease_expires = NULL")


@functools.cache
def _bump_sql(sets: tuple[str, ...], states: tuple[str, ...], owner: bool, lease: bool) -> str:
    where = f"id = :id AND state IN ({_states(states)})"
    if owner:
        where += " AND owner = :owner"
    if lease:
        where += " AND lease_owner = :lease_owner"
    assign = ", ".join(("last_seq = last_seq + 1", *sets))
    return f"UPDATE tasks SET {assign} WHERE {where} RETURNING last_seq, context_id, owner"


_FIND_STATE = "SELECT state, lease_owner FROM tasks WHERE id = :id"
_FIND_STATE_OF_OWNER = _FIND_STATE + " AND owner = :owner"
_LOAD_TASK = f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = :id"
_LOAD_TASK_OF_OWNER = _LOAD_TASK + " AND owner = :owner"
_LOAD_ARTIFACTS = "SELECT body FROM artifacts WHERE task_id = :id ORDER BY position"
_LOAD_HISTORY = "SELECT body FROM messages WHERE task_id = :id ORDER BY seq DESC"
_LOAD_HISTORY_LAST = _LOAD_HISTORY + " LIMIT :n"
_SEEN = "SELECT task_id FROM messages WHERE owner = :owner AND message_id = :message_id"
_EVENTS_AFTER = (
    "SELECT seq, kind, payload, final FROM events WHERE task_id = :id AND seq > :after ORDER BY seq"
)
_EVENTS_AFTER_FIRST = _EVENTS_AFTER + " LIMIT :n"
_INSERT_CONTEXT = "INSERT INTO contexts (id, owner, created_at) VALUES (:id, :owner, :ts)"
_ADD_CONTEXT = _INSERT_CONTEXT + " ON CONFLICT (id) DO NOTHING RETURNING id"
_CONTEXT_OWNER = "SELECT owner FROM contexts WHERE id = :id"
_INSERT_TASK = (
    "INSERT INTO tasks (id, context_id, owner, state, version, status_ts, created_at, "
    "metadata, last_seq, attempts) "
    "VALUES (:id, :context_id, :owner, :state, 0, :ts, :ts, :metadata, 1, 0)"
)
_INSERT_MESSAGE = (
    "INSERT INTO messages (owner, message_id, task_id, context_id, role, body, created_at) "
    "VALUES (:owner, :message_id, :task_id, :context_id, :role, :body, :created_at)"
)
_INSERT_EVENT = (
    "INSERT INTO events (task_id, seq, kind, final, payload, created_at) "
    "VALUES (:task_id, :seq, :kind, :final, :payload, :created_at)"
)
assert TaskState.SUBMITTED in allowed_from(TaskState.WORKING)
_CLAIM_FRESH = (
    "UPDATE tasks SET lease_owner = :worker, lease_expires = :expires, "
    f"attempts = attempts + 1, state = '{TaskState.WORKING.value}', version = version + 1, "
    "status_ts = :now, status_message = NULL, last_seq = last_seq + 1 "
    f"WHERE id = :id AND state = '{TaskState.SUBMITTED.value}' AND attempts < :max_attempts "
    "AND (lease_owner IS NULL OR lease_expires <= :now) "
    f"RETURNING {_TASK_COLUMNS}"
)
_CLAIM = (
    "UPDATE tasks SET lease_owner = :worker, lease_expires = :expires, "
    "attempts = attempts + 1 "
    f"WHERE id = :id AND state IN ({_states(sorted(_ACTIVE))}) "
    "AND (lease_owner IS NULL OR lease_expires <= :now) "
    "RETURNING state, attempts, context_id"
)
