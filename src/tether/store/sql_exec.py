"""The store's SQL runs here: plain text with ``:name`` parameters, on the driver.

SQLAlchemy keeps the schema and the migrations; the queries skip its execution
layer, which cost more than the queries themselves (measured on the PostgreSQL
server: 33% of its CPU was SQLAlchemy's own, 34% asyncpg's; on SQLite, building a
Core statement took 50-100 µs against a few µs for the prepared text). The text
is the same for both databases; ``SqliteDb`` runs it on ``sqlite3`` (which takes
``:name`` itself), ``PgDb`` on asyncpg (rewritten once to ``$n``).

JSON goes in and comes out as text, through ``dumps`` and ``loads``. Driver errors
are sorted here, once, into ``DriverError`` (and its ``Conflict`` and ``BadValue``):
what the engine needs to decide between retrying, refusing and giving up.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import asyncpg
import orjson

Params = Mapping[str, Any]
Row = Sequence[Any]


class DriverError(Exception):
    """A database driver's error. ``disconnected``: the connection is gone, so the
    call may work on another one; ``sqlstate``: PostgreSQL's code, when it gave one."""

    def __init__(
        self, cause: BaseException, *, sqlstate: str | None = None, disconnected: bool = False
    ) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.cause = cause
        self.sqlstate = sqlstate
        self.disconnected = disconnected


class Conflict(DriverError):
    """A unique or foreign-key constraint refused the write."""


class BadValue(DriverError):
    """The database refused a value (SQLSTATE class 22)."""


class CommitUnknown(Exception):
    """The connection broke while COMMIT was in flight: the write may or may not be stored."""

    def __init__(self, cause: BaseException, result: object) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.result = result  # what the transaction would have returned, had it committed


class Db(Protocol):
    """One connection, as the queries see it."""

    dialect: str

    async def rows(self, sql: str, params: Params) -> list[Row]: ...

    async def first(self, sql: str, params: Params) -> Row | None: ...

    async def run(self, sql: str, params: Params) -> int:
        """Runs a statement; the number of rows it changed."""
        ...


class SqliteDb:
    """A ``sqlite3`` connection in autocommit mode: the caller says BEGIN and COMMIT."""

    dialect = "sqlite"
    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Params | None = None) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params or {})
        except sqlite3.IntegrityError as exc:
            raise Conflict(exc) from exc
        except sqlite3.DataError as exc:
            raise BadValue(exc) from exc
        except sqlite3.Error as exc:
            raise DriverError(exc) from exc

    async def rows(self, sql: str, params: Params) -> list[Row]:
        return self.execute(sql, params).fetchall()

    async def first(self, sql: str, params: Params) -> Row | None:
        row: Row | None = self.execute(sql, params).fetchone()
        return row

    async def run(self, sql: str, params: Params) -> int:
        return self.execute(sql, params).rowcount


class PgDb:
    """An asyncpg connection; transactions are the caller's."""

    dialect = "postgresql"
    __slots__ = ("conn",)

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def rows(self, sql: str, params: Params) -> list[Row]:
        text, args = _positional(sql, params)
        try:
            return list(await self.conn.fetch(text, *args))
        except Exception as exc:
            raise pg_error(exc) from exc

    async def first(self, sql: str, params: Params) -> Row | None:
        text, args = _positional(sql, params)
        try:
            row: Row | None = await self.conn.fetchrow(text, *args)
        except Exception as exc:
            raise pg_error(exc) from exc
        return row

    async def run(self, sql: str, params: Params) -> int:
        text, args = _positional(sql, params)
        try:
            status = await self.conn.execute(text, *args)
        except Exception as exc:
            raise pg_error(exc) from exc
        # asyncpg answers with the command tag: "UPDATE 3", "INSERT 0 1", "DELETE 0".
        count = status.rsplit(" ", 1)[-1]
        return int(count) if count.isdigit() else 0


_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.cache
def _pg_text(sql: str) -> tuple[str, tuple[str, ...]]:
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PARAM.sub(number, sql), tuple(names)


def _positional(sql: str, params: Params) -> tuple[str, list[Any]]:
    text, names = _pg_text(sql)
    return text, [params[n] for n in names]


def pg_error(exc: BaseException) -> BaseException:
    """An asyncpg (or socket) error as a ``DriverError``; any other exception as it is."""
    if isinstance(exc, asyncpg.PostgresError):
        code = exc.sqlstate or ""
        kind = Conflict if code.startswith("23") else BadValue if code.startswith("22") else None
        # Class 08 (connection exceptions) and 57P0x (the server is going away): the
        # connection is lost, whatever the statement it carried did.
        gone = code.startswith("08") or code.startswith("57P0")
        return (kind or DriverError)(exc, sqlstate=code or None, disconnected=gone)
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError | OSError):
        return DriverError(exc, disconnected=True)
    return exc


def terminate(conn: Any) -> None:
    """Closes a broken asyncpg connection (its pool replaces it), so that giving it back
    cannot fail in turn and hide why it broke."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


def in_list(name: str, values: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """``:name_0, :name_1, …`` for an ``IN (…)`` of ``values``, and their parameters."""
    keys = [f"{name}_{i}" for i in range(len(values))]
    return ", ".join(f":{k}" for k in keys), dict(zip(keys, values, strict=True))


def dumps(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def loads(value: Any) -> Any:
    """A JSON column as read (text from both drivers: asyncpg's default for json/jsonb)."""
    return None if value is None else orjson.loads(value)


def sqlite_pragmas(conn: Any, busy_ms: int) -> None:
    """Settings every SQLite connection of the store gets (a DB-API connection)."""
    cur = conn.cursor()
    # WAL + NORMAL: durable at checkpoints, no fsync per commit; a crash of the
    # process loses nothing, a power cut may lose the last commits.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    # Each transaction of a group commit runs under a SAVEPOINT, whose statement
    # journal would otherwise be a temporary file: ~45 pwrite(2) calls per task.
    cur.execute("PRAGMA temp_store=MEMORY")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={busy_ms}")
    cur.close()
