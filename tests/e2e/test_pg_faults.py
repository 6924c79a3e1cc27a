"""The server on PostgreSQL while the database misbehaves: no task lost, clear errors, recovery.

``tether serve`` talks to PostgreSQL through a TCP proxy in this test process, so
an outage can be made for this server alone (other suites share the database
server): ``cut()`` drops every connection and refuses new ones until ``restore()``.
Connections are also terminated from the database side with ``pg_terminate_backend``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from .conftest import ServerFactory
from .helpers import error_code, get_task, message, result, rpc, send, wait_state

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PG_HOST, PG_PORT = "127.0.0.1", 5432
UNAVAILABLE = -32050
TASKS = 20
T = TypeVar("T")


class PgProxy:
    """A byte pipe to PostgreSQL that can be cut and restored.

    It runs its own event loop on a thread: the server fixture waits for the
    server synchronously, and the server's start-up goes through this pipe.
    """

    def __init__(self) -> None:
        self.port = 0
        self.up = True
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def start(self) -> None:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(PG_HOST, PG_PORT)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            pipe = asyncio.create_task(self._pump(src, dst))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.close()

    async def _cut(self) -> None:
        self.up = False
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture
def proxy() -> Iterator[PgProxy]:
    p = PgProxy()
    p.start()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def database(postgres_database: Callable[[], str]) -> str:
    return postgres_database()


def via(proxy: PgProxy, url: str) -> str:
    return (
        make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    )


async def completed_events(url: str) -> dict[str, int]:
    """Completed status events per task, read straight from the database."""
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT task_id, count(*) AS n FROM events "
            "WHERE payload->'status'->>'state' = 'TASK_STATE_COMPLETED' GROUP BY task_id"
        )
        gaps = await conn.fetchval(
            "SELECT count(*) FROM tasks t WHERE t.last_seq <> "
            "(SELECT count(*) FROM events e WHERE e.task_id = t.id)"
        )
        assert gaps == 0, "an event sequence has a gap or a duplicate"
        return {r["task_id"]: r["n"] for r in rows}
    finally:
        await conn.close()


async def terminate_all(url: str) -> int:
    name = make_url(url).database
    conn = await asyncpg.connect(f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres", timeout=10)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
        )
    finally:
        await conn.close()


async def test_terminated_connections_lose_no_task(
    tether_server: ServerFactory, database: str, tmp_path: Path
) -> None:
    server = tether_server(db=False, args=["--db", database, "--lease-seconds", "3"])
    async with httpx.AsyncClient(timeout=30) as http:
        ids = [
            (await send(http, server.url, f"sleep 0.5 t{i}", return_immediately=True))["id"]
            for i in range(TASKS)
        ]
        killed = 0
        for _ in range(3):
            killed += await terminate_all(database)
            await asyncio.sleep(0.3)  # let the tasks make progress between the kills
        assert killed > 0, "the server held no database connection to terminate"
        for task_id in ids:
            await wait_state(http, server.url, task_id, "TASK_STATE_COMPLETED", within=120)
    per_task = await completed_events(database)
    assert {task_id: per_task.get(task_id) for task_id in ids} == dict.fromkeys(ids, 1)


async def test_outage_gives_a_retryable_error_and_the_server_recovers(
    tether_server: ServerFactory, database: str, proxy: PgProxy
) -> None:
    server = tether_server(db=False, args=["--db", via(proxy, database), "--lease-seconds", "3"])
    async with httpx.AsyncClient(timeout=60) as http:
        before = await send(http, server.url, "sleep 1 pre", return_immediately=True)
        proxy.cut()
        try:
            down = await rpc(http, server.url, "GetTask", {"id": before["id"]})
            assert error_code(down) == UNAVAILABLE
            error = down["error"]
            assert "retry" in error["message"].lower()
            info = error["data"][0]
            assert info["reason"] == "UNAVAILABLE" and info["metadata"]["retryable"] == "true"
            rest = await http.get(f"{server.url}/tasks/{before['id']}")
            assert rest.status_code == 503
            sent = await rpc(http, server.url, "SendMessage", {"message": message("echo x")})
            assert error_code(sent) == UNAVAILABLE
        finally:
            proxy.restore()
        # No restart: the same process answers again once the database is back.
        done = await wait_state(http, server.url, before["id"], "TASK_STATE_COMPLETED", within=120)
        assert done["status"]["state"] == "TASK_STATE_COMPLETED"
        again = result(await rpc(http, server.url, "SendMessage", {"message": message("echo y")}))
        assert again["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
        assert (await get_task(http, server.url, before["id"]))["id"] == before["id"]
