"""aiosqlite without its thread, for the embedded SQLite store.

aiosqlite runs every call (cursor, execute, fetch, commit) on a thread of its
own; through SQLAlchemy that is about 40 thread hand-offs per task, and they
cost more CPU than the SQL itself (measured: 13 ms vs 5 ms of CPU per task on
submit+claim+complete+read). SQLite in WAL mode with ``synchronous=NORMAL``
answers from the page cache and never fsyncs on commit, so running each call
directly on the event loop is cheaper than handing it off. The store keeps
one writer at a time (its write lock), so a call never waits on SQLite's busy
handler while the loop is blocked.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import aiosqlite


class InlineConnection(aiosqlite.Connection):
    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._running or self._connection is None:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)

    async def _connect(self) -> InlineConnection:
        if self._connection is None:
            self._connection = self._connector()
        return self

    def __await__(self) -> Any:
        return self._connect().__await__()

    def stop(self) -> None:
        self._running = False
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def close(self) -> None:
        self.stop()


def connector(path: str, timeout: float) -> Callable[[], Awaitable[InlineConnection]]:
    """An ``async_creator`` for ``create_async_engine``."""
    connect = functools.partial(sqlite3.connect, path, timeout=timeout, check_same_thread=False)

    async def create() -> InlineConnection:
        conn = InlineConnection(connect, 64)
        return await conn._connect()

    return create
