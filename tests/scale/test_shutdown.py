"""Graceful shutdown: no new work once stopping, running work finishes or is handed back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tether import Agent, Context
from tether.broker.local import LocalBroker
from tether.core.states import TaskState
from tether.core.types import text_message
from tether.events.local import LocalEventBus
from tether.runtime.worker import Runtime
from tether.store.memory import MemoryStore
from tether.store.schema import tasks
from tether.store.sql import SqlStore

from .cluster import HTTP_TIMEOUT, Cluster, answer_of, get_task, submit, until
from .conftest import REDIS_URL, failed

sleeper = Agent(name="sleeper", description="sleeps as long as it is told")
STARTED: list[str] = []


@sleeper.handler
async def sleep(ctx: Context) -> Any:
    STARTED.append(ctx.task_id)
    await asyncio.sleep(float(ctx.text))
    return "slept"


async def test_stop_takes_no_new_work_and_hands_back_what_runs_on() -> None:
    store, broker = MemoryStore(), LocalBroker()
    rt = Runtime(sleeper, store, broker, LocalEventBus(), concurrency=4, lease_seconds=30)
    await rt.start()

    async def submit_local(text: str) -> str:
        sub = await store.submit(
            owner="o", message=text_message("ROLE_USER", text), context_id=None
        )
        await broker.enqueue(sub.task.id)
        return sub.task.id

    short, long = await submit_local("0.2"), await submit_local("60")

    async def both_running() -> bool:
        return rt.running == 2

    await until(both_running, "both handlers to start", 10.0)
    stopping = asyncio.create_task(rt.stop(grace=1.0))
    await asyncio.sleep(0)
    late = await submit_local("0.1")
    started = time.monotonic()
    await asyncio.wait_for(stopping, 10.0)
    assert 0.9 < time.monotonic() - started < 5.0
    assert (await store.get_task(None, short)).state is TaskState.COMPLETED
    # Handed back: still working, but free for any worker now, and queued again.
    handed = await store.get_task(None, long)
    assert handed.state is TaskState.WORKING and long in await store.runnable()
    assert late not in STARTED
    queued = {(await broker.next()).task_id for _ in range(2)}
    assert queued == {late, long}


@pytest.fixture(scope="module")
def db_url(scale_pg_database: Callable[[], str]) -> str:
    return scale_pg_database()


@pytest.fixture
def cluster(
    db_url: str, redis_prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    # A long lease: a task that moves to the other worker quickly was handed back,
    # not reclaimed after its lease ran out.
    c = Cluster(
        tmp_path,
        database_url=db_url,
        redis_url=REDIS_URL,
        prefix=redis_prefix,
        lease_seconds=30.0,
        env={"TETHER_SHUTDOWN_GRACE": "2"},
    )
    try:
        yield c
    finally:
        c.close()
        if failed(request):
            print(c.logs())


@pytest.mark.postgres
@pytest.mark.slow
async def test_sigterm_finishes_short_tasks_and_hands_back_long_ones(
    cluster: Cluster, db_url: str
) -> None:
    api = await cluster.api("api")
    leaving = await cluster.worker("worker-a")
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        short = [await submit(http, api.url, "tick 3 0.2") for _ in range(5)]
        long = [await submit(http, api.url, "hold") for _ in range(5)]
        db = SqlStore(db_url, run_migrations=False)
        await db.start()
        try:

            async def all_running() -> bool:
                async with db.engine.connect() as conn:
                    rows = await conn.execute(
                        sa.select(tasks.c.lease_owner).where(tasks.c.id.in_(short + long))
                    )
                    owners = [r.lease_owner or "" for r in rows]
                return len(owners) == 10 and all(f":{leaving.pid}:" in o for o in owners)

            await until(all_running, "worker-a to run all ten", 30.0)
            staying = await cluster.worker("worker-b")
            sent = time.monotonic()
            assert leaving.popen is not None
            leaving.popen.terminate()
            code = await asyncio.to_thread(leaving.popen.wait, 30.0)
            exited = time.monotonic() - sent
            assert code == 0, leaving.output()[-3000:]
            assert exited < 2.0 + 6.0, f"took {exited:.1f}s to exit"
            for task_id in short:
                task = await get_task(http, api.url, task_id)
                assert answer_of(task) == f"ticked by {leaving.pid}"
            for task_id in long:

                async def done(task_id: str = task_id) -> bool:
                    task = await get_task(http, api.url, task_id)
                    return bool(task["status"]["state"] == "TASK_STATE_COMPLETED")

                await until(done, f"{task_id} to complete on worker-b", 15.0)
                task = await get_task(http, api.url, task_id)
                assert answer_of(task) == f"done by {staying.pid} on attempt 2"
            # Well before the 30s lease could have run out.
            assert time.monotonic() - sent < 20.0
        finally:
            await db.close()
