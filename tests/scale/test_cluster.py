"""A deployment of real processes on PostgreSQL and Redis: kill, cancel and complete across them.

Two ``tether serve --workers 0`` (API) and up to two ``tether worker`` processes
share one database and one Redis prefix; the test talks JSON-RPC and SSE to the
APIs, reads the database, and kills processes with SIGKILL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa

from tether import publish_operation_complete
from tether.runtime.waits import sign
from tether.store.schema import events, tasks
from tether.store.sql import SqlStore

from .cluster import (
    HTTP_TIMEOUT,
    Cluster,
    answer_of,
    frame_state,
    get_task,
    rpc,
    sse,
    submit,
    until,
    wait_state,
)
from .conftest import REDIS_URL, failed

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

LEASE = 3.0


@pytest.fixture(scope="module")
def db_url(scale_pg_database: Callable[[], str]) -> str:
    return scale_pg_database()


@pytest.fixture
def cluster(
    db_url: str, redis_prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    c = Cluster(
        tmp_path, database_url=db_url, redis_url=REDIS_URL, prefix=redis_prefix, lease_seconds=LEASE
    )
    try:
        yield c
    finally:
        c.close()
        if failed(request):
            print(c.logs())


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[SqlStore]:
    store = SqlStore(db_url, run_migrations=False)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, limits=limits) as client:
        yield client


async def states(db: SqlStore, ids: list[str]) -> dict[str, str]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(sa.select(tasks.c.id, tasks.c.state).where(tasks.c.id.in_(ids)))
        return {r.id: r.state for r in rows}


async def logged_states(db: SqlStore, task_id: str) -> list[tuple[int, str]]:
    """The task's event log: (seq, state) of each status event, ``artifact`` otherwise."""
    out = []
    for event in await db.events_after(task_id, 0):
        state = event.payload["status"]["state"] if event.kind == "status" else "artifact"
        out.append((event.seq, str(state).removeprefix("TASK_STATE_").lower()))
    return out


async def test_killing_a_worker_with_50_tasks_in_flight_loses_none(
    cluster: Cluster, db: SqlStore, http: httpx.AsyncClient
) -> None:
    api1, api2 = await cluster.api("api1"), await cluster.api("api2")
    doomed = await cluster.worker("worker-a")
    ids = [await submit(http, api1.url, "hold") for _ in range(50)]

    async def all_started() -> bool:
        return all(cluster.started(t) == [f"{doomed.pid} 1"] for t in ids)

    await until(all_started, "worker-a to run all 50", 60.0)
    assert set((await states(db, ids)).values()) == {"working"}
    survivor = await cluster.worker("worker-b")

    # Everyone watching, on the other API replica: each stream must see each event once.
    seen: dict[str, list[tuple[int | None, str | None]]] = {t: [] for t in ids}

    async def watch(task_id: str) -> None:
        async for event_id, result in sse(http, api2.url, "SubscribeToTask", {"id": task_id}):
            seen[task_id].append((event_id, frame_state(result) or "snapshot"))

    watchers = [asyncio.create_task(watch(t)) for t in ids]

    async def watching() -> bool:
        return all(seen[t] for t in ids)

    await until(watching, "50 subscribers", 30.0)
    killed_at = time.monotonic()
    doomed.kill()

    async def all_completed() -> bool:
        return set((await states(db, ids)).values()) == {"completed"}

    await until(all_completed, "the 50 tasks to complete on worker-b", LEASE + 30.0)
    took = time.monotonic() - killed_at
    print(f"50 tasks completed on the surviving worker {took:.2f}s after the kill")
    await asyncio.wait_for(asyncio.gather(*watchers), 30.0)
    # Within the lease plus a margin for the reclaim pass and a noisy machine.
    assert took < LEASE + 6.0, f"took {took:.1f}s"
    for task_id in ids:
        task = await get_task(http, api1.url, task_id)
        assert answer_of(task) == f"done by {survivor.pid} on attempt 2"
        assert cluster.started(task_id) == [f"{doomed.pid} 1", f"{survivor.pid} 2"]
        # Each transition, each event, exactly once.
        assert await logged_states(db, task_id) == [
            (1, "submitted"),
            (2, "working"),
            (3, "completed"),
        ]
        assert seen[task_id] == [(2, "snapshot"), (3, "completed")], seen[task_id]


async def test_a_stream_resumes_on_the_other_api_after_its_api_is_killed(
    cluster: Cluster, db: SqlStore, http: httpx.AsyncClient
) -> None:
    api1, api2 = await cluster.api("api1"), await cluster.api("api2")
    await cluster.worker("worker-a")
    await cluster.worker("worker-b")
    params = {"message": {"messageId": "m-" + str(time.time()), "role": "ROLE_USER",
                          "parts": [{"text": "tick 25 0.1"}]}}  # fmt: skip
    frames: list[tuple[int | None, str | None]] = []
    task_id = ""
    with pytest.raises(httpx.HTTPError):
        async for event_id, result in sse(http, api1.url, "SendStreamingMessage", params):
            if "task" in result:
                task_id = result["task"]["id"]
            frames.append((event_id, frame_state(result)))
            if len(frames) == 6:
                api1.kill()
    assert task_id and len(frames) == 6
    last = max(i for i, _ in frames if i is not None)
    resumed: list[tuple[int | None, str | None]] = []
    async for event_id, result in sse(
        http, api2.url, "SubscribeToTask", {"id": task_id}, last_event_id=last
    ):
        resumed.append((event_id, frame_state(result)))
    # A snapshot without an id, then exactly the events after Last-Event-ID.
    assert resumed[0] == (None, None)
    ids = [i for i, _ in frames if i is not None] + [i for i, _ in resumed[1:]]
    logged = await logged_states(db, task_id)
    assert ids == [seq for seq, _ in logged], (frames, resumed)
    assert ids == list(range(1, len(logged) + 1))
    assert resumed[-1][1] == "completed"


async def test_a_cancel_on_any_api_stops_the_handler_on_its_worker_within_a_second(
    cluster: Cluster, db: SqlStore, http: httpx.AsyncClient
) -> None:
    api1, api2 = await cluster.api("api1"), await cluster.api("api2")
    await cluster.worker("worker-a")
    await cluster.worker("worker-b")
    ids = [await submit(http, api1.url, "block") for _ in range(4)]

    async def started() -> bool:
        return all(cluster.started(t) for t in ids)

    await until(started, "the handlers to start", 30.0)
    for task_id in ids:
        asked = time.time()
        canceled = await rpc(http, api2.url, "CancelTask", {"id": task_id})
        assert canceled["status"]["state"] == "TASK_STATE_CANCELED"

        async def stopped(task_id: str = task_id) -> bool:
            return bool(cluster.stopped(task_id))

        await until(stopped, f"the handler of {task_id} to stop", 10.0)
        pid, at = cluster.stopped(task_id)[0].split()
        assert pid == cluster.started(task_id)[0].split()[0]
        print(f"handler stopped {float(at) - asked:.3f}s after the cancel was sent")
        assert float(at) - asked < 1.0, f"stopped {float(at) - asked:.2f}s after the cancel"
    await asyncio.sleep(0.5)  # nothing may come after the cancel
    for task_id in ids:
        assert await logged_states(db, task_id) == [
            (1, "submitted"),
            (2, "working"),
            (3, "canceled"),
        ]


async def test_a_canceled_queued_task_never_starts(
    cluster: Cluster, db: SqlStore, http: httpx.AsyncClient
) -> None:
    api1, api2 = await cluster.api("api1"), await cluster.api("api2")
    await cluster.worker("worker-a", concurrency=1)
    await cluster.worker("worker-b", concurrency=1)
    blockers = [await submit(http, api1.url, "block") for _ in range(2)]

    async def busy() -> bool:
        return all(cluster.started(t) for t in blockers)

    await until(busy, "both workers busy", 30.0)
    queued = await submit(http, api1.url, "block")
    await rpc(http, api2.url, "CancelTask", {"id": queued})
    for blocker in blockers:
        await rpc(http, api2.url, "CancelTask", {"id": blocker})
    # The freed slots take the queued entry, find the task canceled, and acknowledge it.
    client = aioredis.Redis.from_url(REDIS_URL, protocol=2)
    try:

        async def drained() -> bool:
            length = await client.xlen(f"{cluster.prefix}:queue")
            pending = await client.xpending(f"{cluster.prefix}:queue", "workers")
            return int(length) == 0 and int(pending["pending"]) == 0

        await until(drained, "the queue to drain", 30.0)
    finally:
        await client.aclose()
    assert cluster.started(queued) == []
    assert await logged_states(db, queued) == [(1, "submitted"), (2, "canceled")]


async def test_a_cancel_survives_a_worker_restart(
    cluster: Cluster, db: SqlStore, http: httpx.AsyncClient
) -> None:
    api1, api2 = await cluster.api("api1"), await cluster.api("api2")
    first = await cluster.worker("worker-a")
    running = await submit(http, api1.url, "block")

    async def started() -> bool:
        return bool(cluster.started(running))

    await until(started, "the handler to start", 30.0)
    first.kill()
    # While no worker runs: cancel the orphaned task, and queue and cancel another.
    await rpc(http, api2.url, "CancelTask", {"id": running})
    queued = await submit(http, api1.url, "block")
    await rpc(http, api1.url, "CancelTask", {"id": queued})
    await cluster.worker("worker-b")
    client = aioredis.Redis.from_url(REDIS_URL, protocol=2)
    try:

        async def drained() -> bool:
            pending = await client.xpending(f"{cluster.prefix}:queue", "workers")
            return (
                int(pending["pending"]) == 0
                and int(await client.xlen(f"{cluster.prefix}:queue")) == 0
            )

        # The dead worker's entry is reclaimed after the lease, and acknowledged unrun.
        await until(drained, "both entries to be settled", LEASE + 30.0)
    finally:
        await client.aclose()
    assert len(cluster.started(running)) == 1
    assert cluster.started(queued) == []
    assert (await states(db, [running, queued])) == {running: "canceled", queued: "canceled"}


async def test_completions_resume_waiting_tasks_across_processes(
    cluster: Cluster, db: SqlStore, http: httpx.AsyncClient
) -> None:
    api1, api2 = await cluster.api("api1"), await cluster.api("api2")
    workers = [await cluster.worker("worker-a"), await cluster.worker("worker-b")]
    pids = {str(w.pid) for w in workers}
    by_function, by_http, failing, timing_out, duplicated = [
        await submit(http, api1.url, text) for text in ("wait", "wait", "wait", "wait 2", "wait")
    ]
    waiting = [by_function, by_http, failing, timing_out, duplicated]

    async def parked() -> bool:
        async with db.engine.connect() as conn:
            rows = await conn.execute(sa.select(tasks.c.lease_owner).where(tasks.c.id.in_(waiting)))
            return all((r.lease_owner or "").startswith("wait:") for r in rows)

    await until(parked, "every task to wait", 30.0)

    def op(task_id: str) -> str:
        return f"{task_id}:approval"

    prefix = cluster.prefix
    await publish_operation_complete(op(by_function), "yes", redis_url=REDIS_URL, prefix=prefix)
    response = await http.post(
        f"{api2.url}operations/{op(by_http)}:complete",
        json={"result": {"approved_by": "http"}},
        headers={"X-Tether-Token": sign(cluster.secret, op(by_http))},
    )
    assert response.status_code == 202, response.text
    forged = await http.post(
        f"{api2.url}operations/{op(failing)}:complete",
        json={"result": "forged"},
        headers={"X-Tether-Token": sign("not-the-secret", op(failing))},
    )
    assert forged.status_code == 403
    await publish_operation_complete(
        op(failing), error="denied", redis_url=REDIS_URL, prefix=prefix
    )
    # The same completion delivered twice (a publisher's retry): applied once.
    for _ in range(2):
        await publish_operation_complete(
            op(duplicated), "first", redis_url=REDIS_URL, prefix=prefix
        )
    # A poison message on the same stream is dead-lettered, and stops nothing.
    raw = aioredis.Redis.from_url(REDIS_URL, protocol=2)
    try:
        await raw.xadd(f"{prefix}:completions", {"garbage": b"1"})

        done = await wait_state(http, api1.url, by_function, {"completed"}, 30.0)
        assert answer_of(done).startswith("approved: yes by ")
        done = await wait_state(http, api2.url, by_http, {"completed"}, 30.0)
        assert answer_of(done).startswith("approved: {'approved_by': 'http'} by ")
        failed = await wait_state(http, api1.url, failing, {"failed"}, 30.0)
        assert answer_of(failed) == f"Operation {op(failing)} failed: denied"
        timed_out = await wait_state(http, api1.url, timing_out, {"failed"}, 2 + LEASE + 30.0)
        assert answer_of(timed_out) == f"Operation {op(timing_out)} timed out"
        done = await wait_state(http, api1.url, duplicated, {"completed"}, 30.0)
        assert answer_of(done).startswith("approved: first by ")
        # A different completion of an operation that already ended changes nothing.
        # (Racing completions of one operation: the first one stored wins.)
        await publish_operation_complete(
            op(duplicated), "second", redis_url=REDIS_URL, prefix=prefix
        )

        async def poison_dead() -> bool:
            return int(await raw.xlen(f"{prefix}:completions:dead")) == 1

        await until(poison_dead, "the poison message dead-lettered", 30.0)

        async def all_acknowledged() -> bool:
            info = await raw.xpending(f"{prefix}:completions", "completers")
            return int(info["pending"]) == 0 and int(await raw.xlen(f"{prefix}:completions")) == 0

        await until(all_acknowledged, "every completion acknowledged", 30.0)
        assert answer_of(await get_task(http, api2.url, duplicated)).startswith("approved: first")
    finally:
        await raw.aclose()
    for task_id in (by_function, by_http, duplicated):
        # Replayed once the completion came, on whichever worker took it.
        runs = cluster.started(task_id)
        assert len(runs) == 2 and {r.split()[0] for r in runs} <= pids
        assert (await logged_states(db, task_id)) == [
            (1, "submitted"),
            (2, "working"),
            (3, "completed"),
        ]
    async with db.engine.connect() as conn:
        count = await conn.execute(
            sa.select(sa.func.count()).select_from(events).where(events.c.task_id == duplicated)
        )
        assert count.scalar_one() == 3
