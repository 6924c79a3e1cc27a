"""The SQL engine under ``SqlStore``: connections, transactions, retries, error translation.

SQLite: one connection writes, through ``GroupCommit``, and reads between its
transactions (a read of several statements in a read transaction of its own).
PostgreSQL: an asyncpg pool; concurrent writes share transactions through
``PgGroupCommit`` (a lone one is its own), each read runs its statements in
autocommit. SQLAlchemy's engine serves the schema's migrations only (``tether db``,
and start-up).

Every driver error is translated here, once: transient ones (a dropped connection,
a restarted server, a serialization failure or deadlock) are retried with bounded
backoff and then become ``StoreUnavailable``; refused values become ``InvalidInput``.
A PostgreSQL COMMIT whose outcome is unknown is checked before anything is run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import sqlite3
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar, cast

import asyncpg

from tether.core.errors import (
    InvalidInput,
    StoreUnavailable,
    TetherError,
)
from tether.store.sql_exec import (
    BadValue,
    CommitUnknown,
    Conflict,
    Db,
    DriverError,
    PgDb,
    SqliteDb,
    pg_error,
    sqlite_pragmas,
    terminate,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine
from tether.store.pg_batch import Bulk, PgGroupCommit
from tether.store.sqlite_batch import GroupCommit

log = logging.getLogger("tether.store")
T = TypeVar("T")
Op = Callable[[Db], Awaitable[T]]
Verify = Callable[[Db, T], Awaitable[bool]]
Recover = Callable[[Db], Awaitable[T | None]]


def _transient(exc: DriverError) -> bool:
    if exc.disconnected:
        return True
    code = exc.sqlstate
    # 40001 serialization failure, 40P01 deadlock, 08xxx connection, 57P0x shutdown
    # (57014, a cancelled statement, is a timeout: retrying it only adds load).
    if code is not None:
        return code in ("40001", "40P01") or code[:2] == "08" or code[:4] == "57P0"
    text = str(exc).lower()
    return any(
        s in text
        for s in ("connection", "closed", "terminat", "database is locked", "shutting down")
    )


def _reason(exc: BaseException) -> str:
    """One line about a driver error."""
    return (str(exc) or type(exc).__name__).splitlines()[0]


def _unavailable(message: str, cause: BaseException, *, retryable: bool = True) -> StoreUnavailable:
    err = StoreUnavailable(f"{message}: {_reason(cause)}")
    err.retryable = retryable
    return err


def _checking(verify: Verify[T], result: T) -> Op[bool]:
    return lambda db: verify(db, result)


class SqlEngine:
    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        pool_timeout: float = 10.0,
        command_timeout: float = 30.0,
        retries: int = 4,
        retry_backoff: float = 0.05,
        run_migrations: bool = True,
    ) -> None:
        self.url = url
        self.dialect, self._target = _parse(url)
        self._retries = retries
        self._backoff = retry_backoff
        self._run_migrations = run_migrations
        self._command_timeout = command_timeout
        self._pool_size = pool_size
        self._pool_timeout = pool_timeout
        self._lock_file: int | None = None
        self._batch: GroupCommit | None = None
        self._pg_batch: PgGroupCommit | None = None
        self._reader: SqliteDb | None = None
        self._pool: asyncpg.Pool | None = None
        self._engine: AsyncEngine | None = None

    @property
    def engine(self) -> AsyncEngine:
        """SQLAlchemy's engine on this database, for migrations and operators' tools."""
        if self._engine is None:
            from tether.store.migrate import engine

            self._engine = engine(self.url, self._command_timeout)
        return self._engine

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self.dialect == "sqlite":
            self._lock_database()
        if self._run_migrations and not await self._at_head():
            from tether.store.migrate import upgrade_url

            await self._retrying(lambda: upgrade_url(self.url, self._command_timeout))

    # SQLite: one connection writes (all writes share its commits) and reads between
    # them. It is opened on first use, like PostgreSQL's pool, so a tool may read a store
    # it did not start (``tether tasks ls`` beside a running server).

    def _writer(self) -> GroupCommit:
        if self._batch is None:
            conn = self._sqlite()
            # Twice the default page cache for the writer: it keeps the indexes' right
            # edges, where every insert lands, without growing the process much.
            conn.execute("PRAGMA cache_size=-4096")
            self._batch = GroupCommit(SqliteDb(conn))
        return self._batch

    def _reading(self) -> SqliteDb:
        """The writer's connection, between its transactions: reads share its page
        cache, which another connection would drop after every commit and read again.
        A connection of its own while a batch is open (never, as long as no write
        yields to the loop half-way: a read must not see what is not committed)."""
        writer = self._writer().db
        if not writer.conn.in_transaction:
            return writer
        if self._reader is None:
            self._reader = SqliteDb(self._sqlite())
        return self._reader

    async def close(self) -> None:
        if self._batch is not None:
            await self._batch.close()
            self._batch.db.conn.close()
            self._batch = None
        if self._reader is not None:
            self._reader.conn.close()
            self._reader = None
        if self._pg_batch is not None:
            await self._pg_batch.close()
            self._pg_batch = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), self._pool_timeout)
            self._pool = None
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    async def _at_head(self) -> bool:
        """Whether the schema is at ``revision.HEAD`` (then nothing loads Alembic)."""
        from tether.store.revision import HEAD

        async def version(db: Db) -> bool:
            try:
                row = await db.first("SELECT version_num FROM alembic_version", {})
            except DriverError as exc:
                if exc.disconnected:
                    raise
                return False  # no such table yet: a new database
            return row is not None and row[0] == HEAD

        return await self._read(version)

    def _sqlite(self) -> sqlite3.Connection:
        # Autocommit mode: the store says BEGIN and COMMIT itself.
        conn = sqlite3.connect(
            self._target,
            timeout=self._command_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        sqlite_pragmas(conn, int(self._command_timeout * 1000))
        return conn

    async def _connections(self) -> asyncpg.Pool:
        """The pool, made on first use: it opens connections as calls need them, so a
        server that starts while PostgreSQL is down answers "unavailable" until it is up."""
        if self._pool is not None:
            return self._pool
        pool: asyncpg.Pool = await asyncpg.create_pool(
            self._target,
            min_size=0,
            max_size=self._pool_size,
            # The server enforces the timeout: a statement it cancels is rolled back, where
            # one the client gives up on may still commit (it runs without BEGIN/COMMIT,
            # see ``_statement``). The client's own limit is the backstop for a dead link.
            command_timeout=self._command_timeout + 5.0,
            server_settings={
                "application_name": "tether",
                "statement_timeout": str(int(self._command_timeout * 1000)),
            },
            # The store leaves no session state behind; asyncpg's default reset costs a
            # round trip each time a connection goes back to the pool.
            reset=_rollback_if_open,
        )
        if self._pool is None:
            self._pool = pool
        else:
            await pool.close()  # another call made one meanwhile
        return self._pool

    def _lock_database(self) -> None:
        """One server process per SQLite file, so a restart may take over every lease."""
        path = self._target
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreUnavailable(
                f"{path} is in use by another Tether process; a SQLite store serves one "
                "process (use PostgreSQL to run several)"
            ) from None
        self._lock_file = fd

    @property
    def exclusive(self) -> bool:
        """True when this process alone uses the store, so stale leases are all ours."""
        return self._lock_file is not None

    # -- transactions ------------------------------------------------------

    async def _retrying(
        self,
        op: Callable[[], Awaitable[T]],
        *,
        idempotent: bool = True,
        verify: Verify[T] | None = None,
        recover: Recover[T] | None = None,
    ) -> T:
        """Run ``op`` until it succeeds, retrying transient failures a bounded number of times.

        After a commit of unknown outcome, ``verify`` (given what ``op`` returned) says
        whether it landed, or ``recover`` finds what it wrote (a statement whose reply was
        lost: no result to check); without either only an ``idempotent`` op is run again.
        ``Conflict`` passes through untranslated: the caller decides what a
        conflict means (see ``_write``).
        """
        delay = self._backoff
        for attempt in range(self._retries + 1):
            cause: BaseException
            try:
                try:
                    return await op()
                except (
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                    asyncpg.InternalClientError,
                ) as raw:
                    # From the pool or a transaction's BEGIN, outside ``PgDb``'s own calls.
                    raise pg_error(raw) from raw
            except (TetherError, Conflict):
                raise
            except CommitUnknown as exc:
                cause = exc.cause
                if recover is not None:
                    try:
                        found = await self._read(recover)
                    except StoreUnavailable as unknown:
                        raise _unavailable(
                            "database connection lost during a write; it may or may not "
                            "have been applied",
                            cause,
                        ) from unknown
                    if found is not None:
                        return found
                    log.info("write did not land, running it again: %s", _reason(cause))
                elif verify is not None:
                    result = cast(T, exc.result)
                    try:
                        landed = await self._read(_checking(verify, result))
                    except StoreUnavailable as unknown:
                        raise _unavailable(
                            "database connection lost while committing; the write may or may "
                            "not have been applied",
                            cause,
                        ) from unknown
                    if landed:
                        return result
                    log.info("commit did not land, running the write again: %s", _reason(cause))
                elif not idempotent:
                    raise _unavailable(
                        "database connection lost while committing; the write may or may not "
                        "have been applied",
                        cause,
                    ) from cause
            except DriverError as exc:
                if isinstance(exc, BadValue):
                    raise InvalidInput(f"the database refused a value: {_reason(exc)}") from exc
                if exc.sqlstate == "57014":
                    # statement_timeout: it had its full time; more tries only add load.
                    raise _unavailable("database timed out", exc) from exc
                if not _transient(exc):
                    raise _unavailable("database error", exc, retryable=False) from exc
                cause = exc
            except TimeoutError as exc:
                # A statement or pool wait already took its full timeout: more tries only add load.
                raise _unavailable("database timed out", exc) from exc
            except OSError as exc:
                # asyncpg reports a refused or reset connect as a bare OSError.
                cause = exc
            if attempt == self._retries:
                raise _unavailable(
                    f"database unavailable after {attempt + 1} attempts", cause
                ) from cause
            log.warning("database error, retrying in %.2fs: %s", delay, _reason(cause))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    async def _transaction(self, op: Op[T]) -> T:
        """A PostgreSQL transaction (SQLite's go through ``GroupCommit``)."""
        pool = await self._connections()
        async with pool.acquire(timeout=self._pool_timeout) as conn:
            xact = conn.transaction()
            await xact.start()
            try:
                result = await op(PgDb(conn))
            except BaseException:
                try:
                    await xact.rollback()
                except Exception:
                    terminate(conn)
                raise
            try:
                await xact.commit()
            except Exception as exc:
                terminate(conn)
                raise CommitUnknown(pg_error(exc), result) from exc
            return result

    async def _write(
        self,
        op: Op[T],
        *,
        idempotent: bool = False,
        verify: Verify[T] | None = None,
        on_conflict: Callable[[], Awaitable[T]] | None = None,
        recover: Recover[T] | None = None,
        bulk: Bulk[T] | None = None,
    ) -> T:
        """One transaction. ``idempotent``: repeating ``op`` after an unknown commit is safe;
        ``verify``: how to tell whether such a commit landed (see ``_retrying``).

        ``recover``: ``op`` writes with one statement on PostgreSQL, so alone it runs
        without BEGIN and COMMIT (two round trips, a quarter of a task's cost there); after
        a lost reply ``recover`` finds what it wrote, or None when it did not land.

        ``on_conflict`` answers a unique-constraint race lost to a concurrent writer;
        without it a conflict is the caller's bad input.

        ``bulk``: ``op`` is that statement alone; a PostgreSQL batch runs it once for all
        its writes (``pg_batch``).
        """

        async def once() -> T:
            if self.dialect == "sqlite":
                return await self._writer().run(op)
            return await self._pg_writer().run(op, single=recover is not None, bulk=bulk)

        try:
            return await self._retrying(once, idempotent=idempotent, verify=verify, recover=recover)
        except Conflict as exc:
            if on_conflict is None:
                raise InvalidInput(f"conflicts with stored data: {_reason(exc)}") from exc
            return await on_conflict()

    def _pg_writer(self) -> PgGroupCommit:
        if self._pg_batch is None:
            self._pg_batch = PgGroupCommit(self._connections, self._pool_timeout, self._alone)
        return self._pg_batch

    async def _alone(self, op: Op[T], single: bool) -> T:
        """One write transaction by itself; ``single``: ``op`` is one statement, run
        without BEGIN and COMMIT."""
        return await (self._statement(op) if single else self._transaction(op))

    async def _statement(self, op: Op[T]) -> T:
        """``op``'s one write statement, in autocommit (PostgreSQL)."""
        pool = await self._connections()
        async with pool.acquire(timeout=self._pool_timeout) as conn:
            try:
                return await op(PgDb(conn))
            except DriverError as exc:
                if exc.disconnected:
                    terminate(conn)
                    raise CommitUnknown(exc, None) from exc
                raise
            except TimeoutError as exc:
                # The server did not answer in time: the statement may still run and commit.
                terminate(conn)
                raise CommitUnknown(exc, None) from exc

    async def _read(self, op: Op[T], *, one_statement: bool = False) -> T:
        """``op``'s reads, which see one snapshot. ``one_statement``: ``op`` runs one
        statement, a snapshot of its own, so SQLite needs no transaction around it."""

        async def pooled() -> T:
            pool = await self._connections()
            async with pool.acquire(timeout=self._pool_timeout) as conn:
                return await op(PgDb(conn))

        async def shared() -> T:
            db = self._reading()
            if one_statement:
                return await op(db)
            # One read transaction: the op's statements see one snapshot, and SQLite
            # takes its WAL read lock once instead of once per statement. Calls on
            # sqlite3 never yield to the loop, so nothing else runs on the connection
            # meanwhile. ROLLBACK ends a transaction that only read.
            db.execute("BEGIN")
            try:
                return await op(db)
            finally:
                if db.conn.in_transaction:  # SQLite ends it itself on some errors
                    db.execute("ROLLBACK")

        return await self._retrying(shared if self.dialect == "sqlite" else pooled)


async def _rollback_if_open(conn: asyncpg.Connection) -> None:
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _parse(url: str) -> tuple[str, str]:
    """The dialect, and the SQLite path or the DSN asyncpg takes, of a SQLAlchemy-style URL."""
    scheme, sep, rest = url.partition("://")
    dialect = scheme.split("+", 1)[0]
    if sep and dialect == "sqlite":
        # sqlite:///relative.db and sqlite:////absolute/path.db, as SQLAlchemy reads them.
        path = rest[1:].split("?", 1)[0] if rest.startswith("/") else ""
        if path in ("", ":memory:"):
            raise InvalidInput("a SQLite store needs a file path (memory:// keeps tasks in memory)")
        return dialect, path
    if sep and dialect in ("postgresql", "postgres"):
        return "postgresql", f"postgresql://{rest}"
    raise InvalidInput(f"{url!r}: not a sqlite:/// or postgresql:// database URL")
