"""Redis restarts under a running deployment: nothing is lost, everything recovers by itself.

The local Redis keeps nothing across a restart (no RDB, no AOF), the harshest
case: every queue entry, event stream, consumer group and pending completion
is gone. Other suites share this Redis, so this test runs last in the session
(marker ``redis_restart``), keeps the outage to a few seconds, and always
leaves Redis running.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tether import publish_operation_complete
from tether.store.schema import tasks
from tether.store.sql import SqlStore

from .cluster import HTTP_TIMEOUT, Cluster, answer_of, frame_state, sse, submit, until
from .conftest import REDIS_URL, failed, redis_ready

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.redis_restart]

LEASE = 3.0
REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
    "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip


def stop_redis() -> None:
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], timeout=10, check=False)


def start_redis() -> None:
    subprocess.run(REDIS_START, timeout=10, check=True)


async def wait_redis(up: bool, within: float = 10.0) -> None:
    async def reached() -> bool:
        return await asyncio.to_thread(redis_ready) == up

    await until(reached, f"Redis to be {'up' if up else 'down'}", within)


@pytest.fixture
def redis_guard() -> Iterator[None]:
    """Whatever happens in the test, Redis is running when it ends."""
    try:
        yield
    finally:
        if not redis_ready():
            start_redis()
            deadline = time.monotonic() + 10
            while not redis_ready() and time.monotonic() < deadline:
                time.sleep(0.1)


@pytest.fixture
def cluster(
    scale_pg_database: Callable[[], str],
    redis_prefix: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Cluster]:
    c = Cluster(
        tmp_path,
        database_url=scale_pg_database(),
        redis_url=REDIS_URL,
        prefix=redis_prefix,
        lease_seconds=LEASE,
    )
    try:
        yield c
    finally:
        c.close()
        if failed(request):
            print(c.logs())


@pytest.fixture
async def db(cluster: Cluster) -> AsyncIterator[SqlStore]:
    store = SqlStore(cluster.database_url, run_migrations=False)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def test_a_redis_restart_loses_no_task_and_everything_recovers(
    cluster: Cluster, db: SqlStore, redis_guard: None
) -> None:
    api1, api2 = await cluster.api("api1"), await cluster.api("api2")
    workers = [await cluster.worker("worker-a"), await cluster.worker("worker-b")]
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        in_flight = [await submit(http, api1.url, "tick 15 0.2") for _ in range(10)]
        waiting = await submit(http, api2.url, "wait")

        # A client streaming, on the other replica, a task that outlives the outage.
        frames: list[tuple[int | None, str | None]] = []
        params = {"message": {"messageId": str(uuid.uuid4()), "role": "ROLE_USER",
                              "parts": [{"text": "tick 30 0.2"}]}}  # fmt: skip

        async def stream() -> None:
            async for event_id, result in sse(http, api2.url, "SendStreamingMessage", params):
                frames.append((event_id, frame_state(result)))

        streaming = asyncio.create_task(stream())

        async def parked() -> bool:
            async with db.engine.connect() as conn:
                owner = await conn.scalar(
                    sa.select(tasks.c.lease_owner).where(tasks.c.id == waiting)
                )
            return str(owner or "").startswith("wait:")

        await until(parked, "the waiting task to park", 30.0)

        async def streamed() -> bool:
            return len(frames) >= 3

        await until(streamed, "the stream to start", 30.0)

        down_at = time.monotonic()
        stop_redis()
        try:
            await wait_redis(up=False)
            # Submitted while Redis is away: stored, so accepted; queued once it is back.
            during = [await submit(http, api1.url, "quick") for _ in range(10)]

            async def noticed() -> bool:
                # Long enough for each part to have run into the outage, and no longer:
                # the queue consumers, the completion consumers, the event publishers
                # (events buffered), and the API's live event subscription.
                seen = [
                    f"{part}: Redis unavailable" in w.output()
                    for w in workers
                    for part in ("broker", "completion consumer", "event publisher")
                ]
                return all(seen) and "event subscriber: Redis unavailable" in api2.output()

            await until(noticed, "every part to notice the outage", 10.0)
        finally:
            start_redis()
        await wait_redis(up=True)
        outage = time.monotonic() - down_at
        print(f"Redis was down for {outage:.2f}s")
        assert outage < 10.0

        everything = [*in_flight, *during]

        async def all_completed() -> bool:
            async with db.engine.connect() as conn:
                rows = await conn.execute(
                    sa.select(tasks.c.state).where(tasks.c.id.in_(everything))
                )
                return [r.state for r in rows] == ["completed"] * len(everything)

        await until(all_completed, "every task to complete", 60.0)
        await asyncio.wait_for(streaming, 60.0)
        ids = [i for i, _ in frames if i is not None]
        assert ids == list(range(1, ids[-1] + 1)), frames
        assert frames[-1][1] == "completed"

        # The completion consumer recovered: its group was recreated on the empty Redis.
        op = f"{waiting}:approval"
        await publish_operation_complete(op, "after the restart", prefix=cluster.prefix,
                                         redis_url=REDIS_URL)  # fmt: skip

        async def resumed() -> bool:
            async with db.engine.connect() as conn:
                state = await conn.scalar(sa.select(tasks.c.state).where(tasks.c.id == waiting))
            return state == "completed"

        await until(resumed, "the waiting task to resume", 60.0)
        task = await db.get_task(None, waiting)
        assert task.status_message is not None
        assert answer_of({"status": {"message": task.status_message}}).startswith(
            "approved: after the restart"
        )

        # Live streams across replicas work again: submit on one API, stream it there,
        # events come from a worker through Redis.
        fresh = {"message": {"messageId": str(uuid.uuid4()), "role": "ROLE_USER",
                             "parts": [{"text": "tick 3 0.05"}]}}  # fmt: skip
        states = [
            frame_state(result)
            async for _, result in sse(http, api1.url, "SendStreamingMessage", fresh)
        ]
        assert states[-1] == "completed" and states.count("working") >= 3

    for task_id in during:
        logged = [e.seq for e in await db.events_after(task_id, 0)]
        assert logged == [1, 2, 3]
    assert "stored but not queued yet" in api1.output()
    for worker in workers:
        assert "Redis is back" in worker.output()
