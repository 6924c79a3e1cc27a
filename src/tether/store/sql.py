"""The SQL ``TaskStore``: SQLite (embedded default) and PostgreSQL, one code path.

Each state change is one ``UPDATE tasks ... WHERE id = :id AND state IN (...)
[AND lease_owner = :me] RETURNING last_seq``; the bumped ``last_seq`` is the
event's sequence number, so the row lock that serialises writers also makes
the per-task sequence gap-free. The event row (and any message) is written in
the same transaction; on PostgreSQL the hot writes are one statement each
(``queries.PG_*``), run without BEGIN/COMMIT.

The SQL is in ``queries``, run by ``sql_exec``; transactions, retries and the
translation of database errors are ``sql_engine``'s. A connection lost while a
write's COMMIT (or its one statement) was in flight leaves the outcome unknown:
the store then reads back whether the write landed (the event it wrote, at its
sequence number or stamped with its own clock reading, or the lease it took) and
answers or retries accordingly, so a lost acknowledgement never duplicates an
event; a write it cannot check raises ``StoreUnavailable``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from operator import itemgetter
from typing import Any, NoReturn, TypeVar

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
from tether.core.states import TaskState
from tether.core.types import JSON, Feedback, TaskEvent, TaskPage, TaskRecord, new_id, now
from tether.store import queries as q
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
    status,
    status_payload,
    trim_history,
)
from tether.store.pg_batch import Bulk
from tether.store.sql_engine import SqlEngine
from tether.store.sql_exec import Db, Row, dumps, in_list, loads

log = logging.getLogger("tether.store")
T = TypeVar("T")


class SqlStore(SqlEngine):
    @staticmethod
    async def _logged(db: Db, written: Sequence[TaskEvent]) -> bool:
        """True when each event is stored as written: its commit landed.

        A sequence number is taken under the task's row lock, so if the lost commit did
        not land no other writer can have stored this very payload at that number.
        """
        for event in written:
            row = await db.first(q.EVENT_AT, {"id": event.task_id, "seq": event.seq})
            if row is None or (row[0], loads(row[1])) != (event.kind, event.payload):
                return False
        return True

    async def _event_landed(self, db: Db, event: TaskEvent) -> bool:
        return await self._logged(db, [event])

    # -- building blocks ----------------------------------------------------

    async def _bump(
        self,
        db: Db,
        task_id: str,
        wanted: TaskState,
        states: Sequence[str],
        sets: tuple[str, ...],
        params: dict[str, Any],
        *,
        owner: str | None = None,
        lease_owner: str | None = None,
        whole: bool = False,
    ) -> Row:
        """The compare-and-set: bump ``last_seq`` where the guard holds, or say why not.

        ``sets`` are ``column = expression`` fragments; ``params`` their values. The row
        is ``last_seq, context_id, owner``, or with ``whole`` the task as ``SQLITE_LOAD``
        reads it (SQLite).
        """
        sql = q.bump(
            sets, tuple(states), owner is not None, lease_owner is not None, whole, q.SQLITE_WHOLE
        )
        row = await db.first(
            sql, {**params, "id": task_id, "owner": owner, "lease_owner": lease_owner, "n": -1}
        )
        if row is None:
            await self._refused(db, task_id, wanted, states, owner, lease_owner)
        return row

    @staticmethod
    async def _refused(
        db: Db,
        task_id: str,
        wanted: TaskState,
        states: Sequence[str],
        owner: str | None,
        lease_owner: str | None,
    ) -> NoReturn:
        """Why a compare-and-set changed nothing."""
        found = await db.first(
            q.FIND_STATE_OF_OWNER if owner is not None else q.FIND_STATE,
            {"id": task_id, "owner": owner},
        )
        if found is None:
            raise TaskNotFound(task_id)
        current = TaskState(found[0])
        if current.value in states and lease_owner is not None:
            raise LeaseLost(f"Task {task_id}: lease held by another worker")
        raise InvalidTransition(task_id, current, wanted)

    async def _event(
        self,
        db: Db,
        task_id: str,
        seq: int,
        kind: str,
        payload: JSON,
        final: bool,
        *,
        created_at: float | None = None,
        task: TaskRecord | None = None,
    ) -> TaskEvent:
        await db.run(
            q.INSERT_EVENT,
            {
                "task_id": task_id,
                "seq": seq,
                "kind": kind,
                "final": final,
                "payload": dumps(payload),
                "created_at": now() if created_at is None else created_at,
            },
        )
        return TaskEvent(task_id, seq, kind, payload, final, task)

    @staticmethod
    async def _written_at(db: Db, task_id: str, ts: float) -> TaskEvent | None:
        """The event a write stamped with ``ts`` stored, if it did.

        ``ts`` is that write's own clock reading: no other writer stamped the same.
        """
        row = await db.first(q.EVENT_WRITTEN_AT, {"id": task_id, "ts": ts})
        if row is None:
            return None
        return TaskEvent(task_id, row[0], row[1], loads(row[2]), bool(row[3]))

    async def _message(self, db: Db, owner: str, message: JSON) -> None:
        await db.run(
            q.INSERT_MESSAGE,
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
        db: Db,
        task_id: str,
        to: TaskState,
        message: JSON | None,
        *,
        owner: str | None = None,
        lease_owner: str | None = None,
        new_turn: bool = False,
        ts: float | None = None,
        whole: bool = False,
    ) -> TaskEvent:
        """``message`` must already name its task and context (``common.stamp``).

        ``new_turn``: the attempt budget starts again (a follow-up message). ``ts``: the
        clock reading to record (the status time, and the event's ``created_at``).
        ``whole``: the event carries the task as this leaves it (``TaskEvent.task``).
        """
        ts = now() if ts is None else ts
        if db.dialect == "postgresql":
            bulk = self._pg_state(
                task_id, to, message, owner=owner, lease_owner=lease_owner, new_turn=new_turn,
                ts=ts, whole=whole,
            )  # fmt: skip
            return await bulk.alone(db)
        sets: tuple[str, ...] = q.STATE_SETS
        if to.terminal or to.interrupted:
            sets += q.LEASE_CLEARED
        if new_turn:
            sets += ("attempts = 0",)
        allowed = q.ALLOWED_FROM[to]
        final = to.terminal or to.interrupted
        values = {"state": to.value, "ts": ts, "status_message": dumps(message)}
        row = await self._bump(
            db, task_id, to, allowed, sets, values, owner=owner, lease_owner=lease_owner,
            whole=whole,
        )  # fmt: skip
        task = _with_children(row, db.dialect) if whole else None
        seq, context_id, task_owner = (
            (task.last_seq, task.context_id, task.owner) if task else (row[0], row[1], row[2])
        )
        if message is not None:
            await self._message(db, task_owner, message)
            if task is not None:
                task.history.append(message)  # read before it was written
        payload = status_payload(task_id, context_id, to, message, ts)
        return await self._event(
            db, task_id, seq, "status", payload, final, created_at=ts, task=task
        )

    def _pg_state(
        self,
        task_id: str,
        to: TaskState,
        message: JSON | None,
        *,
        owner: str | None = None,
        lease_owner: str | None = None,
        new_turn: bool = False,
        ts: float,
        whole: bool = False,
    ) -> Bulk[TaskEvent]:
        """``_set_state`` on PostgreSQL: the update, its message and its event in one
        statement, which a batch shares with the others of its kind."""
        allowed = q.ALLOWED_FROM[to]
        final = to.terminal or to.interrupted
        state = status(to, message, ts)
        row = {
            "id": task_id,
            "state": to.value,
            "ts": ts,
            "status_message": message,
            "final": final,
            "status": state,
        }
        if owner is not None:
            row["owner"] = owner
        if lease_owner is not None:
            row["lease_owner"] = lease_owner
        if message is not None:
            row.update(
                message_id=message["messageId"],
                message_context=message["contextId"],
                role=message.get("role", "ROLE_USER"),
                body=message,
            )
        sql = q.pg_set_state(
            allowed, owner is not None, lease_owner is not None, final, new_turn,
            message is not None, whole,
        )  # fmt: skip

        def event(row: Row) -> TaskEvent:
            if not whole:
                payload = {"taskId": task_id, "contextId": str(row[1]), "status": state}
                return TaskEvent(task_id, int(row[0]), "status", payload, final)
            task = _with_children(row, "postgresql")
            if message is not None:
                task.history.append(message)  # the statement's reads do not see its own writes
            payload = {"taskId": task_id, "contextId": task.context_id, "status": state}
            return TaskEvent(task_id, task.last_seq, "status", payload, final, task)

        async def refused(db: Db) -> NoReturn:
            await self._refused(db, task_id, to, allowed, owner, lease_owner)

        return Bulk(sql, row, event, refused)

    async def _load(
        self,
        db: Db,
        task_id: str,
        owner: str | None,
        history_length: int | None = None,
    ) -> TaskRecord:
        """The task with its artifacts and its last ``history_length`` messages: one
        statement, so one snapshot without a transaction of its own."""
        if db.dialect == "postgresql":
            sql = q.PG_LOAD_OF_OWNER if owner is not None else q.PG_LOAD
            limit = history_length
        else:
            sql = q.SQLITE_LOAD_OF_OWNER if owner is not None else q.SQLITE_LOAD
            limit = -1 if history_length is None else history_length
        row = await db.first(sql, {"id": task_id, "owner": owner, "n": limit})
        if row is None:
            raise TaskNotFound(task_id)
        return _with_children(row, db.dialect)

    async def _seen(self, db: Db, owner: str, message_id: str) -> str | None:
        row = await db.first(q.SEEN, {"owner": owner, "message_id": message_id})
        return None if row is None else str(row[0])

    # -- TaskStore ----------------------------------------------------------

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
        # Chosen once, outside the retried transaction: a retry that finds this id already
        # stored knows its own lost-acknowledgement commit created it.
        task_id = new_id()

        async def op(db: Db) -> Submitted:
            # No look-up of the messageId first: a repeat fails the messages table's
            # unique constraint, and ``raced`` answers it (the common case pays nothing).
            task, stored, first, working = _new_task(
                task_id, owner, message, context_id, metadata, start
            )
            ts, ctx = task.created_at, task.context_id
            if context_id is None:
                await db.run(q.INSERT_CONTEXT, {"id": ctx, "owner": owner, "ts": ts})
            # ON CONFLICT: two first messages of one new context may race to create it.
            elif await db.first(q.ADD_CONTEXT, {"id": ctx, "owner": owner, "ts": ts}) is None:
                ctx_owner = await db.first(q.CONTEXT_OWNER, {"id": ctx})
                if ctx_owner is None or ctx_owner[0] != owner:
                    raise ContextMismatch(f"contextId {ctx} belongs to another principal")
            await db.run(q.INSERT_TASK, _task_values(task))
            await self._message(db, owner, stored)
            events = {"id": task_id, "payload": dumps(first), "ts": ts}
            if working is not None:
                events["working"] = dumps(working)
            await db.run(q.submit_events(working is not None, db.dialect), events)
            return _created(task, first, working)

        async def stored(db: Db) -> Submitted | None:
            """What the messageId points at, if anything (a commit of ours of unknown
            outcome that landed counts as ours)."""
            seen = await self._seen(db, owner, message["messageId"])
            if seen is None:
                return None
            found = await self._existing(db, owner, seen, mine=seen == task_id)
            if start is None or found.task.lease_owner != start.worker or not found.created:
                return found
            # Ours, and still leased to the worker it was started for: it runs it.
            started = await self._events(db, task_id, 1, limit=1)
            return replace(found, started=Claim(found.task, started))

        async def raced() -> Submitted:
            """The messageId was used before, or a commit of ours of unknown outcome landed."""
            found = await self._read(stored)
            if found is None:
                raise InvalidInput(f"messageId {message['messageId']} conflicts")
            return found

        if context_id is None and self.dialect == "postgresql":
            # A new context's first message is one statement, shared in a batch.
            bulk = _pg_submit(task_id, owner, message, metadata, start)
            return await self._write(
                bulk.alone, idempotent=True, on_conflict=raced, recover=stored, bulk=bulk
            )
        return await self._write(op, idempotent=True, on_conflict=raced)

    async def _existing(self, db: Db, owner: str, task_id: str, *, mine: bool) -> Submitted:
        task = await self._load(db, task_id, owner)
        if not mine:
            return Submitted(task, False, None)
        first = await self._events(db, task_id, 0, limit=1)
        return Submitted(task, True, first[0] if first else None)

    async def resume(self, *, owner: str, task_id: str, message: JSON) -> Submitted:
        check_message(message)

        async def op(db: Db) -> Submitted:
            seen = await self._seen(db, owner, message["messageId"])
            if seen is not None:
                return Submitted(await self._load(db, seen, owner), False, None)
            row = await db.first(q.CONTEXT_OF_TASK, {"id": task_id, "owner": owner})
            if row is None:
                raise TaskNotFound(task_id)
            try:
                # A new turn: the attempt budget is per turn, not per conversation.
                event = await self._set_state(
                    db, task_id, TaskState.SUBMITTED, None, owner=owner, new_turn=True
                )
            except InvalidTransition as exc:
                # Also reached when a concurrent message moved the task after our SELECT.
                if exc.current.terminal:
                    raise TaskTerminal(task_id, exc.current) from None
                raise UnsupportedOperation(
                    f"Task {task_id} is {exc.current.value}; "
                    "send the next message once it asks for input"
                ) from None
            await self._message(db, owner, stamp(message, task_id, row[0]))
            return Submitted(await self._load(db, task_id, owner), True, event)

        async def landed(db: Db, sub: Submitted) -> bool:
            return sub.event is not None and await self._logged(db, [sub.event])

        async def raced() -> Submitted:
            async def existing(db: Db) -> Submitted:
                seen = await self._seen(db, owner, message["messageId"])
                if seen is None:
                    raise InvalidInput(f"messageId {message['messageId']} conflicts")
                return Submitted(await self._load(db, seen, owner), False, None)

            return await self._read(existing)

        return await self._write(op, verify=landed, on_conflict=raced)

    async def get_task(
        self, owner: str | None, task_id: str, history_length: int | None = None
    ) -> TaskRecord:
        return await self._read(
            lambda db: self._load(db, task_id, owner, history_length), one_statement=True
        )

    async def list_tasks(self, query: ListQuery) -> TaskPage:
        size = page_size(query.page_size)
        cursor = decode_cursor(query.page_token)
        where = "owner = :owner"
        params: dict[str, Any] = {"owner": query.owner}
        if query.context_id is not None:
            where += " AND context_id = :context_id"
            params["context_id"] = query.context_id
        if query.state is not None:
            where += " AND state = :state"
            params["state"] = query.state.value
        if query.status_after is not None:
            where += " AND status_ts > :after"
            params["after"] = query.status_after

        async def op(db: Db) -> TaskPage:
            count = await db.first(f"SELECT count(*) FROM tasks WHERE {where}", params)
            page_where = where
            if cursor is not None:
                page_where += " AND (status_ts, id) < (:cursor_ts, :cursor_id)"
            found = await db.rows(
                f"SELECT {q.TASK_COLUMNS} FROM tasks WHERE {page_where} "
                "ORDER BY status_ts DESC, id DESC LIMIT :limit",
                {
                    **params,
                    "cursor_ts": cursor and cursor[0],
                    "cursor_id": cursor and cursor[1],
                    "limit": size + 1,
                },
            )
            page = [_task(r) for r in found[:size]]
            by_id = {t.id: t for t in page}
            ids, id_params = in_list("id", list(by_id))
            if by_id and query.include_artifacts:
                for task_id, body in await db.rows(
                    f"SELECT task_id, body FROM artifacts WHERE task_id IN ({ids}) "
                    "ORDER BY task_id, position",
                    id_params,
                ):
                    by_id[task_id].artifacts.append(loads(body))
            if by_id and (query.history_length is None or query.history_length > 0):
                for task_id, body in await db.rows(
                    f"SELECT task_id, body FROM messages WHERE task_id IN ({ids}) ORDER BY seq",
                    id_params,
                ):
                    by_id[task_id].history.append(loads(body))
                for t in page:
                    t.history = trim_history(t.history, query.history_length)
            token = encode_cursor(page[-1].status_ts, page[-1].id) if len(found) > size else ""
            return TaskPage(page, token, int(count[0]) if count else 0)

        return await self._read(op)

    async def context_history(self, owner: str, context_id: str) -> list[JSON]:
        async def op(db: Db) -> list[JSON]:
            found = await db.rows(q.CONTEXT_HISTORY, {"context_id": context_id, "owner": owner})
            return [loads(r[0]) for r in found]

        return await self._read(op, one_statement=True)

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
        ts = now()
        whole = to.terminal or to.interrupted
        if self.dialect == "postgresql":
            bulk = self._pg_state(task_id, to, message, lease_owner=lease_owner, ts=ts, whole=whole)
            return await self._write(
                bulk.alone, recover=lambda db: self._written_at(db, task_id, ts), bulk=bulk
            )
        return await self._write(
            lambda db: self._set_state(
                db, task_id, to, message, lease_owner=lease_owner, ts=ts, whole=whole
            ),
            recover=lambda db: self._written_at(db, task_id, ts),
        )

    async def cancel(self, owner: str, task_id: str) -> TaskEvent:
        ts = now()

        async def op(db: Db) -> TaskEvent:
            try:
                return await self._set_state(
                    db, task_id, TaskState.CANCELED, None, owner=owner, ts=ts
                )
            except InvalidTransition as exc:
                raise TaskNotCancelable(task_id, exc.current, TaskState.CANCELED) from None

        return await self._write(op, recover=lambda db: self._written_at(db, task_id, ts))

    async def update_status(self, task_id: str, message: JSON, *, lease_owner: str) -> TaskEvent:
        async def op(db: Db) -> TaskEvent:
            ts = now()
            bumped = await self._bump(
                db,
                task_id,
                TaskState.WORKING,
                q.WORKING,
                ("status_ts = :ts", "status_message = :status_message"),
                {"ts": ts, "status_message": dumps(message)},
                lease_owner=lease_owner,
            )
            seq, context_id = int(bumped[0]), str(bumped[1])
            payload = status_payload(task_id, context_id, TaskState.WORKING, message, ts)
            return await self._event(db, task_id, seq, "status", payload, False)

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

        async def op(db: Db) -> TaskEvent:
            bumped = await self._bump(
                db, task_id, TaskState.WORKING, q.WORKING, (), {}, lease_owner=lease_owner
            )
            seq, context_id = int(bumped[0]), str(bumped[1])
            key = {"task_id": task_id, "artifact_id": artifact["artifactId"]}
            existing = await db.first(q.ARTIFACT, key)
            if existing is None:
                await db.run(
                    q.INSERT_ARTIFACT, {**key, "of_task": task_id, "body": dumps(artifact)}
                )
            else:
                merged = merge_artifact(loads(existing[0]), artifact, append)
                await db.run(q.UPDATE_ARTIFACT, {**key, "body": dumps(merged)})
            payload = artifact_payload(task_id, context_id, artifact, append, last_chunk)
            return await self._event(db, task_id, seq, "artifact", payload, False)

        return await self._write(op, verify=self._event_landed)

    async def events_after(self, task_id: str, after_seq: int) -> list[TaskEvent]:
        return await self._read(lambda db: self._events(db, task_id, after_seq), one_statement=True)

    async def prune_events(self, finished_before: float, limit: int = 200) -> int:
        async def op(db: Db) -> int:
            found = await db.rows(q.FINISHED_WITH_EVENTS, {"before": finished_before, "n": limit})
            if found:
                ids, params = in_list("id", [r[0] for r in found])
                await db.run(f"DELETE FROM events WHERE task_id IN ({ids})", params)
            return len(found)

        # Deleting what is already deleted changes nothing: safe to repeat.
        return await self._write(op, idempotent=True)

    async def _events(
        self, db: Db, task_id: str, after_seq: int, limit: int | None = None
    ) -> list[TaskEvent]:
        found = await db.rows(
            q.EVENTS_AFTER if limit is None else q.EVENTS_AFTER_FIRST,
            {"id": task_id, "after": after_seq, "n": limit},
        )
        return [TaskEvent(task_id, r[0], r[1], loads(r[2]), bool(r[3])) for r in found]

    async def claim(
        self, task_id: str, worker: str, *, lease_seconds: float, max_attempts: int
    ) -> Claim | None:
        t = now()  # this claim's clock reading: its lease expiry and its event's stamp
        working = status(TaskState.WORKING, None, t)

        def fresh(row: Row) -> Claim:
            """A task never started, leased and started by ``PG_CLAIM_FRESH``."""
            task = _with_children(row, "postgresql")
            payload = {"taskId": task_id, "contextId": task.context_id, "status": working}
            return Claim(task, [TaskEvent(task_id, task.last_seq, "status", payload)])

        async def not_fresh(db: Db) -> None:
            return None

        async def claimed(db: Db) -> Claim | None:
            """After a lost reply: the claim, if its event (stamped ``t``) is stored."""
            started = await self._written_at(db, task_id, t)
            return (
                None if started is None else Claim(await self._load(db, task_id, None), [started])
            )

        if self.dialect == "postgresql":
            row = {
                "id": task_id,
                "worker": worker,
                "now": t,
                "expires": t + lease_seconds,
                "max_attempts": max_attempts,
                "status": working,
            }
            bulk: Bulk[Claim | None] = Bulk(q.PG_CLAIM_FRESH, row, fresh, not_fresh)
            started = await self._write(bulk.alone, recover=claimed, bulk=bulk)
            if started is not None:
                return started

        async def op(db: Db) -> Claim | None:
            t = now()
            params = {"id": task_id, "worker": worker, "now": t, "expires": t + lease_seconds}
            # The common case, a task never started: leased and started in one statement
            # (PostgreSQL's is tried above, with its event in the same statement).
            if db.dialect == "sqlite":
                fresh = await db.first(
                    q.SQLITE_CLAIM_FRESH, {**params, "max_attempts": max_attempts, "n": -1}
                )
                if fresh is not None:
                    task = _with_children(fresh, db.dialect)
                    payload = status_payload(task_id, task.context_id, task.state, None, t)
                    started = await self._event(
                        db, task_id, task.last_seq, "status", payload, False
                    )
                    return Claim(task, [started])
            row = await db.first(q.CLAIM, params)
            if row is None:
                return None
            state, attempts, context_id = row
            if attempts > max_attempts:
                gave_up = stamp(gave_up_message(max_attempts), task_id, context_id)
                failed = await self._set_state(
                    db, task_id, TaskState.FAILED, gave_up, lease_owner=worker
                )
                return Claim(None, [failed])
            written = []
            if state == TaskState.SUBMITTED.value:
                written.append(
                    await self._set_state(db, task_id, TaskState.WORKING, None, lease_owner=worker)
                )
            return Claim(await self._load(db, task_id, None), written)

        async def landed(db: Db, claim: Claim | None) -> bool:
            if claim is None:
                return True  # nothing was written
            if claim.task is not None:
                # The expiry is this attempt's own clock reading: no other claim wrote it.
                lease = await db.first(q.LEASE, {"id": task_id})
                if lease is None or tuple(lease) != (worker, claim.task.lease_expires):
                    return False
            return await self._logged(db, claim.events)

        return await self._write(op, verify=landed)

    async def renew(self, worker: str, task_ids: list[str], *, lease_seconds: float) -> set[str]:
        if not task_ids:
            return set()
        ids, params = in_list("id", task_ids)

        async def op(db: Db) -> set[str]:
            found = await db.rows(
                f"UPDATE tasks SET lease_expires = :expires "
                f"WHERE id IN ({ids}) AND lease_owner = :worker RETURNING id",
                {**params, "worker": worker, "expires": now() + lease_seconds},
            )
            return {r[0] for r in found}

        return await self._write(op, idempotent=True)

    async def release_leases(self, worker: str | None = None) -> int:
        async def op(db: Db) -> int:
            # A parked task's "lease" is its wait (owner ``wait:<op>``): no process holds it.
            sql = q.RELEASE_LEASES if worker is None else q.RELEASE_LEASES_OF
            return await db.run(sql, {"waiting": f"{WAIT_PREFIX}%", "worker": worker})

        return await self._write(op, idempotent=True)

    async def runnable(self, limit: int = 1000) -> list[str]:
        async def op(db: Db) -> list[str]:
            return [r[0] for r in await db.rows(q.RUNNABLE, {"now": now(), "n": limit})]

        return await self._read(op, one_statement=True)

    async def add_feedback(self, fb: Feedback) -> None:
        check_rating(fb.rating)
        values = {"task_id": fb.task_id, "owner": fb.owner, "ts": now()}

        async def op(db: Db) -> None:
            if await db.first(q.TASK_OF_OWNER, {"id": fb.task_id, "owner": fb.owner}) is None:
                raise TaskNotFound(fb.task_id)
            await db.run(
                q.INSERT_FEEDBACK,
                {**values, "rating": fb.rating, "text": fb.text, "metadata": dumps(fb.metadata)},
            )

        async def landed(db: Db, _: None) -> bool:
            return await db.first(q.FEEDBACK_AT, values) is not None

        await self._write(op, verify=landed)

    # -- durable waits ---------------------------------------------------------

    async def wait_operation(
        self, task_id: str, operation_id: str, *, lease_owner: str, deadline: float | None
    ) -> Operation:
        check_operation_id(operation_id)

        async def op(db: Db) -> Operation:
            t = now()
            key = {"id": operation_id}
            await db.run(
                q.ADD_OPERATION,
                {
                    **key,
                    "task_id": task_id,
                    "deadline": deadline,
                    "state": OperationState.PENDING.value,
                    "ts": t,
                },
            )
            # The row lock orders this wait against a concurrent completion: either the
            # completion sees the task parked and releases it, or this sees it completed.
            lock = " FOR UPDATE" if db.dialect == "postgresql" else ""
            row = await db.first(q.OPERATION + lock, key)
            assert row is not None
            current = _operation(row)
            if current.task_id not in (None, task_id):
                raise InvalidInput(f"operation {operation_id} is awaited by another task")
            waiting_until = current.deadline if current.deadline is not None else deadline
            timed_out = (
                current.state is OperationState.PENDING
                and waiting_until is not None
                and waiting_until <= t
            )
            if current.task_id is None or current.deadline != waiting_until or timed_out:
                state = OperationState.TIMED_OUT if timed_out else current.state
                row = await db.first(
                    q.AWAIT_OPERATION,
                    {
                        **key,
                        "task_id": task_id,
                        "deadline": waiting_until,
                        "state": state.value,
                        "ts": t if timed_out else None,
                    },
                )
                assert row is not None
                current = _operation(row)
            if current.state is not OperationState.PENDING:
                return current
            parked = await db.first(
                q.PARK,
                {
                    "id": task_id,
                    "lease_owner": lease_owner,
                    "waiter": WAIT_PREFIX + operation_id,
                    "until": WAIT_FOREVER if waiting_until is None else waiting_until,
                },
            )
            if parked is None:
                found = await db.first(q.FIND_STATE, {"id": task_id})
                if found is None:
                    raise TaskNotFound(task_id)
                if found[0] != TaskState.WORKING.value:
                    raise InvalidTransition(task_id, TaskState(found[0]), TaskState.WORKING)
                raise LeaseLost(f"Task {task_id}: lease held by another worker")
            return current

        return await self._write(op)

    async def complete_operation(
        self, operation_id: str, *, result: Any = None, error: str | None = None
    ) -> Completion:
        check_operation_id(operation_id)
        state = OperationState.FAILED if error is not None else OperationState.COMPLETED

        async def op(db: Db) -> Completion:
            values = {
                "id": operation_id,
                "state": state.value,
                "result": dumps(result),
                "error": error,
                "ts": now(),
            }
            if await db.first(q.ADD_ENDED_OPERATION, values) is not None:
                return Completion(Operation(operation_id, None, state, result, error), True, None)
            row = await db.first(q.END_OPERATION, values)
            if row is None:
                current = await db.first(q.OPERATION, {"id": operation_id})
                assert current is not None
                return Completion(_operation(current), False, None)
            done = _operation(row)
            if done.task_id is None:
                return Completion(done, True, None)
            released = await db.first(
                q.RELEASE_WAITER, {"id": done.task_id, "waiter": WAIT_PREFIX + operation_id}
            )
            return Completion(done, True, None if released is None else str(released[0]))

        # Repeating it after a lost commit finds the operation ended: a no-op.
        return await self._write(op, idempotent=True)

    async def get_operation(self, operation_id: str) -> Operation | None:
        async def op(db: Db) -> Operation | None:
            row = await db.first(q.OPERATION, {"id": operation_id})
            return None if row is None else _operation(row)

        return await self._read(op, one_statement=True)


def _operation(row: Sequence[Any]) -> Operation:
    """An ``operations`` row read with ``q.OPERATION``."""
    return Operation(
        id=row[0],
        task_id=row[1],
        state=OperationState(row[2]),
        result=loads(row[3]),
        error=row[4],
        deadline=row[5],
    )


def _submitted(
    task_id: str,
    context_id: str,
    owner: str,
    metadata: JSON | None,
    ts: float,
    start: Start | None,
) -> TaskRecord:
    """A task as its submit stores it (history added by the caller): submitted, or
    with ``start`` working, leased, on its first attempt, its second event written."""
    task = TaskRecord(
        id=task_id,
        context_id=context_id,
        owner=owner,
        state=TaskState.SUBMITTED,
        status_ts=ts,
        created_at=ts,
        metadata=metadata,
        last_seq=1,
    )
    if start is not None:
        task.state, task.version, task.last_seq, task.attempts = TaskState.WORKING, 1, 2, 1
        task.lease_owner, task.lease_expires = start.worker, ts + start.lease_seconds
    return task


def _new_task(
    task_id: str,
    owner: str,
    message: JSON,
    context_id: str | None,
    metadata: JSON | None,
    start: Start | None,
) -> tuple[TaskRecord, JSON, JSON, JSON | None]:
    """A submit's new task (in a new context unless ``context_id``), its first message
    as stored, its submitted event's payload and with ``start`` its working one's."""
    ts = now()
    ctx = context_id or new_id()
    task = _submitted(task_id, ctx, owner, metadata, ts, start)
    stored = stamp(message, task_id, ctx)
    task.history = [stored]
    first = status_payload(task_id, ctx, TaskState.SUBMITTED, None, ts)
    working = status_payload(task_id, ctx, TaskState.WORKING, None, ts) if start else None
    return task, stored, first, working


def _task_values(task: TaskRecord) -> dict[str, Any]:
    """``q.INSERT_TASK``'s parameters."""
    return {
        "id": task.id,
        "context_id": task.context_id,
        "owner": task.owner,
        "state": task.state.value,
        "version": task.version,
        "ts": task.created_at,
        "metadata": dumps(task.metadata),
        "last_seq": task.last_seq,
        "attempts": task.attempts,
        "lease_owner": task.lease_owner,
        "lease_expires": task.lease_expires,
    }


def _pg_submit(
    task_id: str, owner: str, message: JSON, metadata: JSON | None, start: Start | None
) -> Bulk[Submitted]:
    """``submit`` of a new context's first message on PostgreSQL (``q.pg_submit``)."""
    task, stored, first, working = _new_task(task_id, owner, message, None, metadata, start)
    row = {
        **_task_values(task),
        "metadata": metadata,
        "message_id": stored["messageId"],
        "role": stored.get("role", "ROLE_USER"),
        "body": stored,
        "payload": first,
    }
    if working is not None:
        row["working"] = working
    created = _created(task, first, working)
    return Bulk(q.pg_submit(start is not None), row, lambda _: created)


def _created(task: TaskRecord, first: JSON, working: JSON | None) -> Submitted:
    """What a submit that created ``task`` returns: with ``working``, its claim too."""
    submitted = TaskEvent(task.id, 1, "status", first, False)
    if working is None:
        return Submitted(task, True, submitted)
    started = TaskEvent(task.id, 2, "status", working, False)
    return Submitted(task, True, submitted, Claim(replace(task), [started]))


def _with_children(row: Sequence[Any], dialect: str) -> TaskRecord:
    """A task read with ``PG_LOAD`` or ``SQLITE_LOAD``: its columns, then its artifacts
    and its history."""
    task = _task(row)
    if dialect == "postgresql":
        task.artifacts = loads(row[-2]) or []
        task.history = loads(row[-1]) or []
    else:
        task.artifacts = children(row[-2])
        task.history = children(row[-1])
    return task


def children(joined: str | None) -> list[JSON]:
    """Rows that ``queries._SQLITE_CHILDREN`` joined as ``[ordinal,body],…``, in order."""
    if joined is None:
        return []
    pairs = loads(f"[{joined}]")
    pairs.sort(key=itemgetter(0))
    return [body for _, body in pairs]


def _task(row: Sequence[Any]) -> TaskRecord:
    """A ``tasks`` row read with ``q.TASK_COLUMNS``."""
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
