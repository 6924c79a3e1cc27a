"""Durable waits: the store's side (every backend), then the runtime's, in one process.

Across processes, through Redis, see ``test_cluster.py``; the completion
consumer itself is in ``test_completions.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tether import Agent, Context, OperationFailed, OperationTimedOut, Settings, create_app
from tether.broker.local import LocalBroker
from tether.core.errors import InvalidInput, InvalidTransition, LeaseLost
from tether.core.states import TaskState
from tether.core.types import now, text_message
from tether.events.local import LocalEventBus
from tether.runtime.completions import apply_completion
from tether.runtime.waits import sign
from tether.runtime.worker import Runtime
from tether.store.base import WAIT_PREFIX, OperationState, TaskStore
from tether.store.memory import MemoryStore
from tether.store.sql import SqlStore

W1, W2 = "worker-1", "worker-2"
WAIT = 10.0


@pytest.fixture(scope="module")
def pg_url(scale_pg_database: Callable[[], str]) -> str:
    return scale_pg_database()


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'waits.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[TaskStore]:
    s: TaskStore = MemoryStore() if store_url == "memory://" else SqlStore(store_url)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def working(store: TaskStore, worker: str = W1) -> str:
    """A task claimed by ``worker``: working, leased."""
    sub = await store.submit(owner="o", message=text_message("ROLE_USER", "hi"), context_id=None)
    claim = await store.claim(sub.task.id, worker, lease_seconds=30, max_attempts=3)
    assert claim is not None and claim.task is not None
    return sub.task.id


def op_id(task_id: str, name: str = "op") -> str:
    return f"{task_id}:{name}"


# -- the store ------------------------------------------------------------------


async def test_a_wait_parks_the_task_until_the_completion(store: TaskStore) -> None:
    task = await working(store)
    op = op_id(task)
    waited = await store.wait_operation(task, op, lease_owner=W1, deadline=None)
    assert (waited.state, waited.task_id) == (OperationState.PENDING, task)
    row = await store.get_task(None, task)
    assert row.state is TaskState.WORKING and row.lease_owner == WAIT_PREFIX + op
    assert row.attempts == 0
    # Parked: neither re-driven nor claimable, and the old lease no longer writes.
    assert task not in await store.runnable()
    assert await store.claim(task, W2, lease_seconds=30, max_attempts=3) is None
    assert await store.renew(W1, [task], lease_seconds=30) == set()

    done = await store.complete_operation(op, result={"answer": 42})
    assert done.changed and done.resumed == task
    assert done.operation.state is OperationState.COMPLETED
    assert task in await store.runnable()
    claim = await store.claim(task, W2, lease_seconds=30, max_attempts=3)
    assert claim is not None and claim.task is not None and claim.task.attempts == 1
    again = await store.wait_operation(task, op, lease_owner=W2, deadline=None)
    assert (again.state, again.result) == (OperationState.COMPLETED, {"answer": 42})
    assert (await store.get_task(None, task)).lease_owner == W2  # not parked again


async def test_a_completion_is_stored_once(store: TaskStore) -> None:
    task = await working(store)
    op = op_id(task)
    await store.wait_operation(task, op, lease_owner=W1, deadline=None)
    first = await store.complete_operation(op, result="first")
    second = await store.complete_operation(op, result="second")
    failed = await store.complete_operation(op, error="late failure")
    assert first.changed and not second.changed and not failed.changed
    assert second.resumed is None
    stored = await store.get_operation(op)
    assert stored is not None and (stored.state, stored.result) == (
        OperationState.COMPLETED,
        "first",
    )


async def test_a_completion_may_come_before_the_wait(store: TaskStore) -> None:
    task = await working(store)
    op = op_id(task)
    early = await store.complete_operation(op, result=[1, 2])
    assert early.changed and early.resumed is None and early.operation.task_id is None
    waited = await store.wait_operation(task, op, lease_owner=W1, deadline=now() + 60)
    assert (waited.state, waited.result, waited.task_id) == (
        OperationState.COMPLETED,
        [1, 2],
        task,
    )
    assert (await store.get_task(None, task)).lease_owner == W1


async def test_a_failed_operation_keeps_its_error(store: TaskStore) -> None:
    task = await working(store)
    op = op_id(task)
    await store.wait_operation(task, op, lease_owner=W1, deadline=None)
    done = await store.complete_operation(op, error="card declined")
    assert done.resumed == task
    await store.claim(task, W2, lease_seconds=30, max_attempts=3)
    waited = await store.wait_operation(task, op, lease_owner=W2, deadline=None)
    assert (waited.state, waited.error) == (OperationState.FAILED, "card declined")


async def test_the_deadline_frees_the_task_and_the_wait_times_out(store: TaskStore) -> None:
    task = await working(store)
    op = op_id(task)
    await store.wait_operation(task, op, lease_owner=W1, deadline=now() + 0.3)
    assert task not in await store.runnable()
    await asyncio.sleep(0.4)
    assert task in await store.runnable()
    claim = await store.claim(task, W2, lease_seconds=30, max_attempts=3)
    assert claim is not None
    # A re-run asking for a later deadline does not extend the first one.
    waited = await store.wait_operation(task, op, lease_owner=W2, deadline=now() + 3600)
    assert waited.state is OperationState.TIMED_OUT
    late = await store.complete_operation(op, result="too late")
    assert not late.changed and late.operation.state is OperationState.TIMED_OUT


async def test_only_the_lease_holder_may_wait(store: TaskStore) -> None:
    task = await working(store)
    with pytest.raises(LeaseLost):
        await store.wait_operation(task, op_id(task), lease_owner=W2, deadline=None)
    await store.cancel("o", task)
    with pytest.raises(InvalidTransition):
        await store.wait_operation(task, op_id(task), lease_owner=W1, deadline=None)


async def test_an_operation_belongs_to_one_task(store: TaskStore) -> None:
    a, b = await working(store), await working(store)
    op = op_id(a)
    await store.wait_operation(a, op, lease_owner=W1, deadline=None)
    with pytest.raises(InvalidInput):
        await store.wait_operation(b, op, lease_owner=W1, deadline=None)
    with pytest.raises(InvalidInput):
        await store.wait_operation(a, "x" * 200, lease_owner=W1, deadline=None)
    with pytest.raises(InvalidInput):
        await store.complete_operation("")


async def test_a_canceled_waiting_task_stays_canceled(store: TaskStore) -> None:
    task = await working(store)
    op = op_id(task)
    await store.wait_operation(task, op, lease_owner=W1, deadline=None)
    await store.cancel("o", task)
    done = await store.complete_operation(op, result="whatever")
    assert done.changed and done.resumed is None
    assert (await store.get_task(None, task)).state is TaskState.CANCELED
    assert task not in await store.runnable()


# -- the runtime, in one process ------------------------------------------------------

waiter = Agent(name="waiter", description="waits for an operation", max_attempts=2)
RUNS: list[str] = []


@waiter.handler
async def wait_handler(ctx: Context) -> Any:
    kind, _, rest = ctx.text.partition(" ")
    RUNS.append(f"{ctx.task_id}:{kind}")
    if kind == "quick":
        return "quick"
    op = ctx.operation("approval")
    timeout = float(rest) if rest else None
    try:
        result = await ctx.wait_for(op.id, timeout=timeout)
    except OperationFailed as exc:
        return f"failed: {exc.error}"
    except OperationTimedOut:
        return "gave up waiting"
    return f"approved: {result}"


@pytest.fixture
async def runtime() -> AsyncIterator[Runtime]:
    store, broker, bus = MemoryStore(), LocalBroker(), LocalEventBus()
    rt = Runtime(waiter, store, broker, bus, concurrency=1, lease_seconds=1.0, secret="s3cret")
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop(grace=1.0)


async def submit(rt: Runtime, text: str) -> str:
    sub = await rt.store.submit(owner="o", message=text_message("ROLE_USER", text), context_id=None)
    await rt.broker.enqueue(sub.task.id)
    return sub.task.id


async def until(
    rt: Runtime, task_id: str, check: Callable[[Any], bool], within: float = WAIT
) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        task = await rt.store.get_task(None, task_id)
        if check(task):
            return task
        if loop.time() > deadline:
            raise AssertionError(f"task {task_id} is {task.state} ({task.lease_owner})")
        await asyncio.sleep(0.02)


def answer(task: Any) -> str:
    return str(task.status_message["parts"][0]["text"])


async def test_a_waiting_task_frees_its_slot_and_resumes_with_the_result(runtime: Runtime) -> None:
    RUNS.clear()
    task = await submit(runtime, "wait")
    parked = await until(runtime, task, lambda t: (t.lease_owner or "").startswith(WAIT_PREFIX))
    assert parked.state is TaskState.WORKING
    # One slot, and it is free: another task runs to the end meanwhile.
    other = await submit(runtime, "quick")
    await until(runtime, other, lambda t: t.state is TaskState.COMPLETED)
    done = await apply_completion(runtime.store, runtime.broker, f"{task}:approval", "yes", None)
    assert done.resumed == task
    finished = await until(runtime, task, lambda t: t.state.terminal)
    assert (finished.state, answer(finished)) == (TaskState.COMPLETED, "approved: yes")
    # Replayed: the code before the wait ran twice, the wait returned the second time.
    assert RUNS.count(f"{task}:wait") == 2
    events = await runtime.store.events_after(task, 0)
    states = [e.payload["status"]["state"] for e in events if e.kind == "status"]
    assert states == ["TASK_STATE_SUBMITTED", "TASK_STATE_WORKING", "TASK_STATE_COMPLETED"]


async def test_a_failed_operation_reaches_the_handler(runtime: Runtime) -> None:
    task = await submit(runtime, "wait")
    await until(runtime, task, lambda t: (t.lease_owner or "").startswith(WAIT_PREFIX))
    await apply_completion(runtime.store, runtime.broker, f"{task}:approval", None, "denied")
    finished = await until(runtime, task, lambda t: t.state.terminal)
    assert answer(finished) == "failed: denied"


async def test_a_wait_times_out(runtime: Runtime) -> None:
    task = await submit(runtime, "wait 0.5")
    finished = await until(runtime, task, lambda t: t.state.terminal)
    assert answer(finished) == "gave up waiting"


async def test_a_parked_task_can_be_canceled(runtime: Runtime) -> None:
    task = await submit(runtime, "wait")
    await until(runtime, task, lambda t: (t.lease_owner or "").startswith(WAIT_PREFIX))
    await runtime.store.cancel("o", task)
    done = await apply_completion(runtime.store, runtime.broker, f"{task}:approval", "yes", None)
    assert done.resumed is None
    await asyncio.sleep(0.3)
    assert (await runtime.store.get_task(None, task)).state is TaskState.CANCELED


async def test_the_http_callback_completes_directly_when_embedded() -> None:
    settings = Settings(database_url="memory://", broker_url="local", workers=2)
    settings.secret = "s3cret"
    settings.lease_seconds = 2.0
    app = create_app(waiter, settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as http,
    ):
        rt = app.state.tether.runtime
        task = await submit(rt, "wait")
        await until(rt, task, lambda t: (t.lease_owner or "").startswith(WAIT_PREFIX))
        op = f"{task}:approval"
        url = f"/operations/{op}:complete"
        bad = await http.post(url, json={"result": 1}, headers={"X-Tether-Token": "nope"})
        assert bad.status_code == 403
        ok = await http.post(url, json={"result": "via http"}, params={"token": sign("s3cret", op)})
        assert ok.status_code == 200, ok.text
        assert ok.json()["duplicate"] is False
        again = await http.post(
            url, json={"result": "twice"}, headers={"X-Tether-Token": sign("s3cret", op)}
        )
        assert again.status_code == 200 and again.json()["duplicate"] is True
        finished = await until(rt, task, lambda t: t.state.terminal)
        assert answer(finished) == "approved: via http"


async def test_releasing_every_lease_keeps_parked_tasks_parked(store: TaskStore) -> None:
    """A restart of the embedded server takes back leases, never a parked task's wait."""
    task = await working(store)
    op = op_id(task)
    await store.wait_operation(task, op, lease_owner=W1, deadline=None)
    await store.release_leases()
    parked = await store.get_task(None, task)
    assert parked.lease_owner == WAIT_PREFIX + op
    assert task not in await store.runnable()
