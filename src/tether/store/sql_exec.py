"""Plain SQL text, run on either backend: the store's hot path.

Building a SQLAlchemy Core statement and looking up its compiled form costs
50-100 µs a statement; a task takes about a dozen statements. The hot path keeps
its SQL as text with ``:name`` parameters, a form both ``sqlite3`` and
``sqlalchemy.text`` accept, and runs it

- on SQLite, on the ``sqlite3`` connection under the SQLAlchemy one (so in the
  same transaction), where a cached prepared statement costs a few µs;
- on PostgreSQL, as ``sqlalchemy.text`` (compiled once, prepared once per
  connection by asyncpg).

JSON goes in as text (``dumps``); it comes back as text from SQLite and decoded
from PostgreSQL, and ``loads`` takes either. ``sqlite3`` errors are wrapped in
SQLAlchemy's ``DBAPIError`` family here, so the engine translates one family.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

Params = Mapping[str, Any]
Row = Sequence[Any]


class Raw:
    """A ``sqlite3`` connection whose errors read as SQLAlchemy's."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    def execute(self, sql: str, params: Params | None = None) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, params or {})
        except sqlite3.Error as exc:
            raise sa_exc.DBAPIError.instance(sql, params, exc, sqlite3.Error) from exc


def driver(conn: AsyncConnection) -> Raw:
    """The ``sqlite3`` connection under ``conn``, a started SQLite connection."""
    sync = conn.sync_connection
    assert sync is not None, "the connection is not started"
    # SQLAlchemy's adapter -> our InlineConnection (aiosqlite) -> sqlite3.
    return Raw(sync.connection.driver_connection._connection)  # type: ignore[union-attr]


@functools.cache
def _text(sql: str) -> sa.TextClause:
    return sa.text(sql)


async def rows(conn: AsyncConnection, sql: str, params: Params) -> list[Row]:
    if conn.dialect.name == "sqlite":
        return driver(conn).execute(sql, params).fetchall()
    return list((await conn.execute(_text(sql), dict(params))).all())


async def first(conn: AsyncConnection, sql: str, params: Params) -> Row | None:
    if conn.dialect.name == "sqlite":
        row: Row | None = driver(conn).execute(sql, params).fetchone()
        return row
    return (await conn.execute(_text(sql), dict(params))).first()


async def run(conn: AsyncConnection, sql: str, params: Params) -> int:
    """Executes a statement that returns no rows; the number of rows it changed."""
    if conn.dialect.name == "sqlite":
        return driver(conn).execute(sql, params).rowcount
    return (await conn.execute(_text(sql), dict(params))).rowcount


def dumps(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def loads(value: Any) -> Any:
    """A JSON column as read: text from SQLite, already decoded from PostgreSQL."""
    return orjson.loads(value) if isinstance(value, (str, bytes)) else value
