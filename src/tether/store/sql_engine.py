"""The SQL engine under ``SqlStore``: connections, transactions, retries, error translation.

Every driver error is translated here, once: transient ones (a dropped connection,
a restarted server, a serialization failure or deadlock) are retried with bounded
backoff and then become ``StoreUnavailable``; refused values become ``InvalidInput``.
A PostgreSQL COMMIT whose outcome is unknown is checked before anything is run again.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import orjson
from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from tether.core.errors import (
    InvalidInput,
    StoreUnavailable,
    TetherError,
)
from tether.store import sqlite_inline
from tether.store.sql_exec import driver
from tether.store.sqlite_batch import GroupCommit

log = logging.getLogger("tether.store")
T = TypeVar("T")
Op = Callable[[AsyncConnection], Awaitable[T]]
Verify = Callable[[AsyncConnection, T], Awaitable[bool]]


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _sqlstate(exc: sa_exc.DBAPIError) -> str | None:
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return code if isinstance(code, str) else None


def _bad_value(exc: sa_exc.DBAPIError) -> bool:
    # asyncpg's data exceptions reach SQLAlchemy as a plain DBAPIError: class 22 says it.
    code = _sqlstate(exc)
    return isinstance(exc, sa_exc.DataError) or (code is not None and code.startswith("22"))


def _transient(exc: sa_exc.DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    code = _sqlstate(exc)
    # 40001 serialization failure, 40P01 deadlock, 08xxx connection, 57P0x shutdown
    # (57014, a cancelled statement, is a timeout: retrying it only adds load).
    if code is not None:
        return code in ("40001", "40P01") or code[:2] == "08" or code[:4] == "57P0"
    text = str(exc.orig).lower()
    return any(
        s in text
        for s in ("connection", "closed", "terminat", "database is locked", "shutting down")
    )


def _reason(exc: BaseException) -> str:
    """One line about a driver error, without the SQL and parameters SQLAlchemy appends."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc) or type(exc).__name__
    return text.splitlines()[0]


def _unavailable(message: str, cause: BaseException, *, retryable: bool = True) -> StoreUnavailable:
    err = StoreUnavailable(f"{message}: {_reason(cause)}")
    err.retryable = retryable
    return err


def _checking(verify: Verify[T], result: T) -> Op[bool]:
    return lambda conn: verify(conn, result)


class _CommitUnknown(Exception):
    """The connection broke while COMMIT was in flight: the write may or may not be stored."""

    def __init__(self, cause: BaseException, result: object) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.result = result  # what the transaction would have returned, had it committed


class SqlEngine:
    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        max_overflow: int = 10,
        pool_timeout: float = 10.0,
        command_timeout: float = 30.0,
        retries: int = 4,
        retry_backoff: float = 0.05,
        run_migrations: bool = True,
    ) -> None:
        self.url = url
        self.dialect = make_url(url).get_backend_name()
        self._retries = retries
        self._backoff = retry_backoff
        self._run_migrations = run_migrations
        self._lock_file: int | None = None
        kwargs: dict[str, Any] = {"json_serializer": _dumps, "json_deserializer": orjson.loads}
        if self.dialect == "sqlite":
            path = make_url(url).database or ":memory:"
            kwargs["async_creator"] = sqlite_inline.connector(path, command_timeout)
        else:
            kwargs.update(
                pool_size=pool_size,
                max_overflow=max_overflow,
                pool_timeout=pool_timeout,
                # No pre-ping: it costs a round trip per checkout (13% of the API's
                # time under load); a dead pooled connection is caught by the retry
                # loop, which invalidates the pool and runs the transaction again.
                pool_pre_ping=False,
                connect_args={
                    "command_timeout": command_timeout,
                    "server_settings": {"application_name": "tether"},
                },
            )
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        # SQLite: one writer, whose transactions share commits (WAL lets readers go on).
        self._batch = GroupCommit(self.engine) if self.dialect == "sqlite" else None
        self._reader: AsyncConnection | None = None
        if self.dialect == "sqlite":
            busy_ms = int(command_timeout * 1000)
            sa_event.listen(
                self.engine.sync_engine,
                "connect",
                lambda dbapi_conn, _rec: _sqlite_pragmas(dbapi_conn, busy_ms),
            )

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self.dialect == "sqlite":
            self._lock_database()
        if self._run_migrations:
            from tether.store.migrate import upgrade

            await self._retrying(lambda: upgrade(self.engine))

    async def close(self) -> None:
        if self._batch is not None:
            await self._batch.close()
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        await self.engine.dispose()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    def _lock_database(self) -> None:
        """One server process per SQLite file, so a restart may take over every lease."""
        path = make_url(self.url).database
        if not path or path == ":memory:":
            return
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
    ) -> T:
        """Run ``op`` until it succeeds, retrying transient failures a bounded number of times.

        After a commit of unknown outcome, ``verify`` (given what ``op`` returned) says
        whether it landed; without it only an ``idempotent`` op is run again.
        ``IntegrityError`` passes through untranslated: the caller decides what a
        conflict means (see ``_write``).
        """
        delay = self._backoff
        for attempt in range(self._retries + 1):
            cause: BaseException
            try:
                return await op()
            except (TetherError, sa_exc.IntegrityError):
                raise
            except _CommitUnknown as exc:
                cause = exc.cause
                if verify is not None:
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
            except sa_exc.DBAPIError as exc:
                if _bad_value(exc):
                    raise InvalidInput(f"the database refused a value: {_reason(exc)}") from exc
                if not _transient(exc):
                    raise _unavailable("database error", exc, retryable=False) from exc
                cause = exc
            except (TimeoutError, sa_exc.TimeoutError) as exc:
                # A statement or pool wait already took its full timeout: more tries only add load.
                raise _unavailable("database timed out", exc) from exc
            except OSError as exc:
                # asyncpg reports a refused or reset connect as a bare OSError.
                cause = exc
            except sa_exc.SQLAlchemyError as exc:
                raise _unavailable("database error", exc, retryable=False) from exc
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
        async with self.engine.connect() as conn:
            await conn.begin()
            result = await op(conn)
            try:
                await conn.commit()
            except Exception as exc:
                raise _CommitUnknown(exc, result) from exc
            return result

    async def _write(
        self,
        op: Op[T],
        *,
        idempotent: bool = False,
        verify: Verify[T] | None = None,
        on_conflict: Callable[[], Awaitable[T]] | None = None,
    ) -> T:
        """One transaction. ``idempotent``: repeating ``op`` after an unknown commit is safe;
        ``verify``: how to tell whether such a commit landed (see ``_retrying``).

        ``on_conflict`` answers a unique-constraint race lost to a concurrent writer;
        without it a conflict is the caller's bad input.
        """

        async def once() -> T:
            if self._batch is not None:
                return await self._batch.run(op)
            return await self._transaction(op)

        try:
            return await self._retrying(once, idempotent=idempotent, verify=verify)
        except sa_exc.IntegrityError as exc:
            if on_conflict is None:
                raise InvalidInput(f"conflicts with stored data: {_reason(exc)}") from exc
            return await on_conflict()

    async def _read(self, op: Op[T]) -> T:
        async def once() -> T:
            async with self.engine.connect() as conn:
                return await op(conn)

        async def shared() -> T:
            conn = await self._reading()
            raw = driver(conn)
            # One read transaction: the op's statements see one snapshot, and SQLite
            # takes its WAL read lock once instead of once per statement.
            own = not raw.in_transaction
            if own:
                raw.execute("BEGIN")
            try:
                return await op(conn)
            finally:
                if own and raw.in_transaction:
                    raw.execute("COMMIT")
                if conn.invalidated and self._reader is conn:
                    self._reader = None
                    await conn.close()

        return await self._retrying(shared if self.dialect == "sqlite" else once)

    async def _reading(self) -> AsyncConnection:
        """SQLite's one read connection, kept open.

        Checking a connection out of SQLAlchemy's pool costs more than the reads it
        serves, and concurrent reads would open (and close) overflow connections.
        SQLite calls run on the loop without yielding, so reads never overlap on it;
        outside a transaction each statement sees the latest commit.
        """
        if self._reader is None:
            conn = await self.engine.connect()
            if self._reader is None:
                self._reader = conn
            else:
                await conn.close()  # another read opened one meanwhile
        return self._reader


def _sqlite_pragmas(dbapi_conn: Any, busy_ms: int) -> None:
    cur = dbapi_conn.cursor()
    # WAL + NORMAL: durable at checkpoints, no fsync per commit; a crash of the
    # process loses nothing, a power cut may lose the last commits.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    # 64 MiB of page cache (the default is 2 MiB): the indexes' hot pages stay in memory.
    cur.execute("PRAGMA cache_size=-65536")
    cur.execute(f"PRAGMA busy_timeout={busy_ms}")
    cur.close()
