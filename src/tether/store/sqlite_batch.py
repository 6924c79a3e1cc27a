"""Group commit for the SQLite store: the write transactions of concurrent callers
share one COMMIT.

Most of what a SQLite write costs is its COMMIT, which appends every page the
transaction touched to the WAL. Transactions queued in the same turn of the event
loop run one after another in a single transaction, each under a SAVEPOINT: one
that raises is rolled back alone and gets its own error, the others commit
together. A COMMIT that fails fails every transaction of the batch; none of them
landed (a SQLite COMMIT is never half-done), so their callers may run them again.

Every write goes through one flusher, so the store needs no other write lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tether.store.sql_exec import Db, DriverError, SqliteDb

T = TypeVar("T")
Op = Callable[[Db], Awaitable[T]]

# Bounds how long the first caller of a batch waits behind the others.
MAX_BATCH = 128


class GroupCommit:
    """Runs write transactions on ``db``, the store's one writing connection."""

    def __init__(self, db: SqliteDb) -> None:
        self.db = db
        self._pending: list[tuple[Op[Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def run(self, op: Op[T]) -> T:
        """``op``'s result once its transaction has committed, or what it raised."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((op, fut))
        if self._flusher is None:
            # Scheduled, not run: the callers already runnable in this turn join the batch.
            self._flusher = asyncio.create_task(self._flush())
        return await fut

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.wait([self._flusher], timeout=5.0)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                # A caller cancelled before its turn gets nothing written.
                batch = [(op, fut) for op, fut in batch if not fut.cancelled()]
                if batch:
                    await self._commit(batch)
        finally:
            self._flusher = None

    async def _commit(self, batch: list[tuple[Op[Any], asyncio.Future[Any]]]) -> None:
        db = self.db
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for op, fut in batch:
                    db.execute("SAVEPOINT op")
                    try:
                        result = await op(db)
                    except Exception as exc:
                        db.execute("ROLLBACK TO op")
                        db.execute("RELEASE op")
                        outcomes.append((fut, None, exc))
                    else:
                        db.execute("RELEASE op")
                        outcomes.append((fut, result, None))
                db.execute("COMMIT")
            except BaseException:
                if db.conn.in_transaction:
                    with contextlib.suppress(DriverError):
                        db.execute("ROLLBACK")
                raise
        except BaseException as exc:
            # Nothing of the batch landed: each caller gets the reason and may retry.
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for fut, result, error in outcomes:
            if fut.done():
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)
