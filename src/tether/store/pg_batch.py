"""Group commit for the PostgreSQL store: concurrent write transactions share one COMMIT.

A task's write statement costs PostgreSQL more for its own commit and round trips
than for its rows: measured here, a submit alone ~0.35-0.43 ms of the server's CPU,
sixteen of them in one transaction ~0.2 ms each. So while ``FLUSHERS`` writes or
batches are in flight, the writes that arrive wait, and go together: one BEGIN, each
transaction's statements in turn, one COMMIT. A write that finds a flusher free runs
alone, as it would without this (a lone statement in autocommit), so a quiet server
waits for nothing.

A transaction that raises inside a batch leaves PostgreSQL's transaction aborted,
whatever it wrote: the batch is rolled back and run again without it, and it runs
alone once the batch has committed, so that it answers what it would have answered
alone (a repeated messageId finds the first one committed). A batch whose
connection breaks before its COMMIT wrote nothing: every caller gets the error and
may retry. One whose COMMIT gets no answer may or may not have landed: every caller
gets ``CommitUnknown`` with its own result and checks it as it would alone.

A batch holds the row locks of its writes until its COMMIT, so it must not wait
long for another's: a lease renewal of many tasks and a batch of their outcomes
lock rows in different orders, and PostgreSQL breaks such a deadlock only after
``deadlock_timeout`` (1 s by default; the bench's p99 showed it). A statement in a
batch gives up a row lock after ``LOCK_WAIT``: its write is set apart as above,
the batch's locks go, and alone it waits as long as it must.

A write that is one statement over a batch's rows (``Bulk``) goes with the others of
its statement as one statement: one execution for all their rows. A row its guard
refused comes back missing, wrote nothing, and its write runs alone after the
commit, to answer as it would have alone. When such a statement fails as a whole
(a repeated messageId among its rows, say), the batch is rolled back and its writes
run one statement each.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncpg

from tether.store.sql_exec import (
    CommitUnknown,
    Db,
    DriverError,
    PgDb,
    Row,
    dumps,
    pg_error,
    terminate,
)

log = logging.getLogger("tether.store")
T = TypeVar("T")
Op = Callable[[Db], Awaitable[T]]
Alone = Callable[[Op[Any], bool], Awaitable[Any]]

# Writes in flight at once, alone or in batches. Fewer share more commits but wait in
# line longer: in the redis-mode bench (64 clients) 1, 2 and 4 gave 616-768, 743-815
# and 780-932 tasks/s for the same CPU per task; 8 no more than 4, for more CPU.
FLUSHERS = 4
# Bounds how long the first caller of a batch waits behind the others.
MAX_BATCH = 64
# How long a batch's statement waits for a row lock. A batch of 64 writes runs in
# ~20 ms: a wait longer than that is most likely on a writer that waits on us.
LOCK_WAIT = "50ms"
_BEGIN = f"BEGIN; SET LOCAL lock_timeout = '{LOCK_WAIT}'"


@dataclass(frozen=True, slots=True)
class Bulk(Generic[T]):
    """A write that is one statement over ``r``, the rows of a batch (``queries``'
    ``_pg_rows``, from the JSON array ``:rows``); ``row`` is this write's, a value per
    column."""

    sql: str
    row: Mapping[str, Any]
    finish: Callable[[Row], T]  # the write's result from its returned row, after r.i
    # Its answer when the statement's guard refused its row; None: a statement that has
    # no guard (it writes every row or fails).
    missing: Callable[[Db], Awaitable[T]] | None = None

    async def alone(self, db: Db) -> T:
        rows = await db.rows(self.sql, {"rows": dumps([self.row])})
        if rows:
            return self.finish(rows[0][1:])
        if self.missing is None:
            raise RuntimeError(f"a write without a guard returned no row: {self.sql[:80]}")
        return await self.missing(db)


class _Ungroup(Exception):
    """A statement of a batch's rows failed as a whole: its rows go one by one."""


@dataclass(slots=True, eq=False)
class _Write:
    op: Op[Any]
    single: bool  # one statement: alone, it runs in autocommit
    bulk: Bulk[Any] | None
    fut: asyncio.Future[Any]
    result: Any = None


class PgGroupCommit:
    """Runs write transactions on connections of ``connect()``'s pool; ``alone`` runs
    one by itself (``single``: in autocommit), as the store would without batches."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Pool]],
        timeout: float,
        alone: Alone,
    ) -> None:
        self._connect = connect
        self._timeout = timeout
        self._alone = alone
        self._pending: list[_Write] = []
        self._flushers: set[asyncio.Task[None]] = set()

    async def run(self, op: Op[T], *, single: bool, bulk: Bulk[T] | None = None) -> T:
        """``op``'s result once its transaction has committed, or what it raised.
        ``bulk``: ``op`` is that statement alone."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append(_Write(op, single, bulk, fut))
        if len(self._flushers) < FLUSHERS:
            flusher = asyncio.create_task(self._flush())
            self._flushers.add(flusher)
            flusher.add_done_callback(self._flushers.discard)
        return await fut

    async def close(self) -> None:
        if self._flushers:
            await asyncio.wait(self._flushers, timeout=5.0)

    async def _flush(self) -> None:
        while self._pending:
            taken = self._pending[:MAX_BATCH]
            del self._pending[:MAX_BATCH]
            # A caller cancelled before its turn gets nothing written.
            batch = [w for w in taken if not w.fut.cancelled()]
            if len(batch) == 1:
                await self._run_alone(batch[0])
            elif batch:
                await self._together(batch)

    async def _run_alone(self, write: _Write) -> None:
        try:
            result = await self._alone(write.op, write.single)
        except Exception as exc:
            _fail(write, exc)
        except BaseException:
            write.fut.cancel()
            raise
        else:
            _settle(write, result)

    async def _together(self, batch: list[_Write]) -> None:
        running = batch
        after: list[_Write] = []
        grouped = True
        try:
            pool = await self._connect()
            async with pool.acquire(timeout=self._timeout) as conn:
                try:
                    while running:
                        try:
                            failed = await self._attempt(conn, running, after, grouped)
                        except _Ungroup:
                            grouped = False
                            continue
                        if failed is None:
                            break
                        after.append(failed)
                        running = [w for w in running if w not in after]
                except BaseException:
                    # Gone, timed out or interrupted before COMMIT: the server rolls
                    # the transaction back when the connection closes.
                    terminate(conn)
                    raise
        except Exception as exc:
            for write in running:
                if write not in after:
                    _fail(write, exc)
        except BaseException:
            for write in (*running, *after):
                write.fut.cancel()
            raise
        for write in after:
            await self._run_alone(write)

    async def _attempt(
        self, conn: asyncpg.Connection, running: list[_Write], after: list[_Write], grouped: bool
    ) -> _Write | None:
        """Runs ``running`` in one transaction and commits it, settling every caller but
        those it adds to ``after`` (refused rows of a ``Bulk``); or, when one raises,
        rolls it back and returns that one (no caller settled)."""
        db = PgDb(conn)
        await conn.execute(_BEGIN)
        done: list[_Write] = []
        if grouped:
            await self._grouped(db, running, after, done)
        for write in running:
            if write in after or write in done:
                continue
            try:
                write.result = await write.op(db)
            except TimeoutError:
                raise
            except Exception as exc:
                if isinstance(exc, DriverError) and exc.disconnected:
                    raise
                await conn.execute("ROLLBACK")
                log.debug("a write set apart from its batch, to run alone: %r", exc)
                return write
            done.append(write)
        try:
            await conn.execute("COMMIT")
        except Exception as exc:
            terminate(conn)
            cause = pg_error(exc)
            for write in done:
                _fail(write, CommitUnknown(cause, write.result))
            return None
        for write in done:
            _settle(write, write.result)
        return None

    @staticmethod
    async def _grouped(
        db: PgDb, running: list[_Write], after: list[_Write], done: list[_Write]
    ) -> None:
        """Each ``Bulk`` statement once, for the rows of all its writes in ``running``."""
        by_sql: dict[str, list[tuple[_Write, Bulk[Any]]]] = defaultdict(list)
        for write in running:
            if write.bulk is not None:
                by_sql[write.bulk.sql].append((write, write.bulk))
        for sql, group in by_sql.items():
            try:
                rows = await db.rows(sql, {"rows": dumps([bulk.row for _, bulk in group])})
            except TimeoutError:
                raise
            except Exception as exc:
                if isinstance(exc, DriverError) and exc.disconnected:
                    raise
                await db.conn.execute("ROLLBACK")
                log.debug("a batch's rows failed together, to run one by one: %r", exc)
                raise _Ungroup from exc
            returned = {row[0]: row[1:] for row in rows}
            for number, (write, bulk) in enumerate(group, 1):
                row = returned.get(number)
                if row is None:
                    after.append(write)
                else:
                    write.result = bulk.finish(row)
                    done.append(write)


def _settle(write: _Write, result: Any) -> None:
    if not write.fut.done():
        write.fut.set_result(result)


def _fail(write: _Write, exc: BaseException) -> None:
    if not write.fut.done():
        write.fut.set_exception(exc)
