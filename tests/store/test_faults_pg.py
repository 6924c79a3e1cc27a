"""PostgreSQL connections killed under load: retried or ``StoreUnavailable``, never raw errors."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import TypeVar

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from storekit import (
    OWNER,
    PG_ADMIN_URL,
    WORKER,
    S,
    agent_msg,
    new_task,
    stored_feedback,
    user_msg,
)

from tether.core.errors import InvalidInput, InvalidTransition, StoreUnavailable
from tether.core.types import JSON, Feedback, TaskRecord
from tether.store.base import ListQuery
from tether.store.sql import SqlStore
from tether.store.sql_exec import Db

pytestmark = pytest.mark.postgres

T = TypeVar("T")
CLIENTS = 6
STORM_KILLS = 25
DEADLINE = 120.0


@pytest.fixture
async def own_db(postgres_database: Callable[[], str]) -> AsyncIterator[str]:
    """A database of its own: every connection to it gets killed, and no other test's."""
    url = postgres_database()
    store = SqlStore(url)
    await store.start()  # migrate
    await store.close()
    yield url


@pytest.fixture
async def admin() -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
    try:
        yield conn
    finally:
        await conn.close(timeout=10)


async def kill_all(admin: asyncpg.Connection, url: str) -> int:
    database = url.rsplit("/", 1)[1]
    killed = await admin.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = $1 AND pid <> pg_backend_pid()",
        database,
        timeout=10,
    )
    return int(killed)


class Outcomes:
    """Tallies every store call: a success, a StoreUnavailable, or anything else (a bug)."""

    def __init__(self) -> None:
        self.ok = 0
        self.unavailable = 0
        self.wrong: list[BaseException] = []
        self.progress = asyncio.Condition()

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T | None:
        try:
            result = await fn()
        except StoreUnavailable as exc:
            if not exc.retryable:
                self.wrong.append(exc)
            self.unavailable += 1
            return None
        except Exception as exc:
            self.wrong.append(exc)
            return None
        self.ok += 1
        async with self.progress:
            self.progress.notify_all()
        return result

    async def advanced(self, calls: int) -> None:
        """Returns once ``calls`` more calls have succeeded."""
        target = self.ok + calls
        async with self.progress:
            await self.progress.wait_for(lambda: self.ok >= target)


async def client(
    store: SqlStore, n: int, outcomes: Outcomes, stop: asyncio.Event, submitted: dict[str, str]
) -> None:
    """A task's whole life, over and over; a chain stops at its first failure."""
    i = 0
    while not stop.is_set():
        i += 1
        msg: JSON = user_msg(f"c{n} #{i}")
        submitted[msg["messageId"]] = ""
        sub = await outcomes.call(partial(store.submit, owner=OWNER, message=msg, context_id=None))
        if sub is None:
            continue
        task: TaskRecord = sub.task
        submitted[msg["messageId"]] = task.id
        worker = f"{WORKER}-{n}"
        steps: list[Callable[[], Awaitable[object]]] = [
            partial(store.claim, task.id, worker, lease_seconds=60, max_attempts=5),
            partial(store.update_status, task.id, agent_msg(task, "busy"), lease_owner=worker),
            partial(
                store.add_artifact,
                task.id,
                {"artifactId": "a", "parts": [{"text": "x"}]},
                lease_owner=worker,
            ),
            partial(store.events_after, task.id, 0),
            partial(
                store.transition,
                task.id,
                S.COMPLETED,
                message=agent_msg(task, "done"),
                lease_owner=worker,
            ),
            partial(store.list_tasks, ListQuery(owner=OWNER, page_size=5)),
        ]
        for step in steps:
            if await outcomes.call(step) is None:
                break


async def test_connections_killed_under_load(
    own_db: str, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tether.store")
    store = SqlStore(own_db, run_migrations=False, pool_size=4)
    await store.start()
    outcomes = Outcomes()
    stop = asyncio.Event()
    submitted: dict[str, str] = {}  # messageId -> task id ("" while unacknowledged)
    clients = [
        asyncio.create_task(client(store, n, outcomes, stop, submitted)) for n in range(CLIENTS)
    ]
    kills = 0
    try:
        async with asyncio.timeout(DEADLINE):
            for _ in range(STORM_KILLS):
                # Kill only once the clients have made progress since the last kill, so
                # every kill lands on live work rather than on an idle, broken pool.
                await outcomes.advanced(3)
                # Jitter, so kills fall at every point of a transaction, COMMIT included.
                await asyncio.sleep(random.uniform(0, 0.01))
                kills += await kill_all(admin, own_db)
            # And one more stretch of calm: the clients must get work done again.
            await outcomes.advanced(20)
    finally:
        stop.set()
        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(*clients)

    assert outcomes.wrong == [], [f"{type(e).__name__}: {e}" for e in outcomes.wrong[:5]]
    assert kills >= STORM_KILLS, "the kills did not hit any connection"
    assert any("retrying" in r.getMessage() for r in caplog.records), "no retry was exercised"

    # The same store, never restarted, works again.
    task = await new_task(store, text="after the storm")
    claim = await store.claim(task.id, WORKER, lease_seconds=60, max_attempts=3)
    assert claim is not None and claim.task is not None
    await store.transition(task.id, S.COMPLETED, lease_owner=WORKER)

    # No submitted task is lost: acknowledged ones exist, unacknowledged ones can be sent
    # again and then exist exactly once.
    for message_id, task_id in submitted.items():
        if task_id:
            assert (await store.get_task(OWNER, task_id)).id == task_id
        else:
            again = await store.submit(
                owner=OWNER, message=user_msg(messageId=message_id), context_id=None
            )
            submitted[message_id] = again.task.id
    assert len(set(submitted.values())) == len(submitted)
    page = await store.list_tasks(ListQuery(owner=OWNER, page_size=1))
    assert page.total_size == len(submitted) + 1

    # Nothing half-written: every task's event log is still gap-free.
    for task_id in list(submitted.values())[:200]:
        record = await store.get_task(OWNER, task_id)
        seqs = [e.seq for e in await store.events_after(task_id, 0)]
        assert seqs == list(range(1, record.last_seq + 1))
    await store.close()


async def test_idle_pool_survives_a_kill(own_db: str, admin: asyncpg.Connection) -> None:
    store = SqlStore(own_db, run_migrations=False)
    await store.start()
    try:
        task = await new_task(store)
        assert await kill_all(admin, own_db) >= 1
        assert (await store.get_task(OWNER, task.id)).id == task.id
        await store.transition(task.id, S.WORKING)
    finally:
        await store.close()


async def test_unreachable_server_is_store_unavailable() -> None:
    store = SqlStore(
        "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere",
        run_migrations=False,
        retries=2,
        retry_backoff=0.01,
    )
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.get_task(OWNER, "x")
        assert info.value.retryable
        with pytest.raises(StoreUnavailable):
            await store.submit(owner=OWNER, message=user_msg(), context_id=None)
    finally:
        await store.close()


async def test_values_postgres_refuses_are_invalid_input(pg_store: SqlStore) -> None:
    # JSONB cannot hold U+0000; the caller gets InvalidInput, not a driver error.
    with pytest.raises(InvalidInput):
        await pg_store.submit(owner=OWNER, message=user_msg("nul \x00 here"), context_id=None)
    assert (await pg_store.list_tasks(ListQuery(owner=OWNER))).total_size == 0


class CommitCutter:
    """A TCP proxy in front of PostgreSQL that breaks a connection around one COMMIT.

    ``arm("after")``: the next COMMIT (or statement run outside a transaction, which
    commits on its own) reaches the server, which commits, and its reply is dropped
    with the connection (a lost acknowledgement). ``arm("before")``: it never reaches
    the server and the connection drops.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.mode: str | None = None
        self.explicit = False
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    def arm(self, mode: str, *, explicit: bool = False) -> None:
        """``explicit``: only a COMMIT statement counts (a batch's, or a transaction's)."""
        self.mode = mode
        self.explicit = explicit

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(*self.target)
        drop_reply = asyncio.Event()
        # The server's last ReadyForQuery status: b"I" idle, b"T" in a transaction.
        status = [b""]

        def cut() -> None:
            self.cuts += 1
            cw.transport.abort()
            sw.transport.abort()

        async def upstream() -> None:
            while data := await cr.read(65536):
                if self.mode is not None and _commits(data, status[0], self.explicit):
                    mode, self.mode = self.mode, None
                    if mode == "before":
                        cut()
                        return
                    drop_reply.set()
                sw.write(data)
                await sw.drain()

        async def downstream() -> None:
            while data := await sr.read(65536):
                if drop_reply.is_set():
                    cut()  # the server has answered the COMMIT: it committed
                    return
                at = data.rfind(b"Z\x00\x00\x00\x05")
                if at >= 0 and at + 5 < len(data):
                    status[0] = data[at + 5 : at + 6]
                cw.write(data)
                await cw.drain()

        pumps = {asyncio.create_task(upstream()), asyncio.create_task(downstream())}
        self._pumps.update(pumps)
        # Either side closing ends the pair, as a real TCP hop would let it.
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        cw.transport.abort()
        sw.transport.abort()
        await asyncio.gather(*pumps, return_exceptions=True)
        self._pumps.difference_update(pumps)


def _commits(data: bytes, status: bytes, explicit: bool) -> bool:
    """Whether ``data`` from the client ends a write: a COMMIT, or (unless ``explicit``)
    a statement executed outside a transaction (autocommit: its own commit)."""
    execute = b"E\x00\x00\x00\x09\x00"  # Execute of the unnamed portal, no row limit
    return b"COMMIT" in data or (not explicit and status == b"I" and execute in data)


@pytest.fixture
async def cutter(own_db: str) -> AsyncIterator[tuple[CommitCutter, str]]:
    url = make_url(own_db)
    proxy = CommitCutter(url.host or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    try:
        yield proxy, url.set(port=port).render_as_string(hide_password=False)
    finally:
        await proxy.close()


@pytest.mark.parametrize("mode", ["after", "before"])
async def test_lost_commit_is_applied_exactly_once(
    cutter: tuple[CommitCutter, str], mode: str
) -> None:
    """Every write whose COMMIT outcome is lost is answered once, and stored once."""
    proxy, url = cutter
    store = SqlStore(url, run_migrations=False)
    await store.start()

    async def cut(fn: Callable[[], Awaitable[T]]) -> T:
        before = proxy.cuts
        proxy.arm(mode)
        result = await fn()
        assert proxy.cuts == before + 1, "the connection was not cut"
        return result

    try:
        sub = await cut(partial(store.submit, owner=OWNER, message=user_msg(), context_id=None))
        assert sub.created and sub.event is not None and sub.event.seq == 1
        task = sub.task
        claim = await cut(partial(store.claim, task.id, WORKER, lease_seconds=60, max_attempts=1))
        assert claim is not None and claim.task is not None
        assert [e.seq for e in claim.events] == [2]
        status = await cut(
            partial(store.update_status, task.id, agent_msg(task, "busy"), lease_owner=WORKER)
        )
        assert status.seq == 3
        for i, text in enumerate(["a", "b"]):
            chunk = {"artifactId": "out", "parts": [{"text": text}]}
            event = await cut(
                partial(store.add_artifact, task.id, chunk, lease_owner=WORKER, append=i > 0)
            )
            assert event.seq == 4 + i
        asked = await cut(
            partial(
                store.transition,
                task.id,
                S.INPUT_REQUIRED,
                message=agent_msg(task, "?"),
                lease_owner=WORKER,
            )
        )
        assert asked.seq == 6
        resumed = await cut(
            partial(store.resume, owner=OWNER, task_id=task.id, message=user_msg("!"))
        )
        assert resumed.created and resumed.event is not None and resumed.event.seq == 7
        canceled = await cut(partial(store.cancel, OWNER, task.id))
        assert canceled.seq == 8
        await cut(partial(store.add_feedback, Feedback(task.id, OWNER, 5, "thanks")))

        final = await store.get_task(OWNER, task.id)
        assert final.state is S.CANCELED and final.last_seq == 8
        assert [e.seq for e in await store.events_after(task.id, 0)] == list(range(1, 9))
        assert [p["text"] for p in final.artifacts[0]["parts"]] == ["a", "b"]
        assert [m["parts"][0]["text"] for m in final.history] == ["hello", "busy", "?", "!"][
            :0
        ] or len(final.history) == 3
        assert len(await stored_feedback(store)) == 1
        assert (await store.list_tasks(ListQuery(owner=OWNER))).total_size == 1
    finally:
        await store.close()


@pytest.mark.parametrize("mode", ["after", "before"])
async def test_lost_commit_of_a_batch_is_applied_exactly_once(
    cutter: tuple[CommitCutter, str], mode: str
) -> None:
    """Writes that shared a COMMIT whose outcome was lost: each is answered once and
    stored once (its own check after the lost commit, as if it had been alone)."""
    proxy, url = cutter
    store = SqlStore(url, run_migrations=False)
    await store.start()
    try:
        tasks = [await new_task(store, text=f"t{i}") for i in range(12)]
        # A lone new task runs in autocommit; only a batch (or a transaction) says COMMIT.
        proxy.arm(mode, explicit=True)
        async with asyncio.timeout(DEADLINE):
            claims = await asyncio.gather(
                *(store.claim(t.id, WORKER, lease_seconds=60, max_attempts=1) for t in tasks)
            )
            subs = await asyncio.gather(
                *(
                    store.submit(owner=OWNER, message=user_msg(f"n{i}"), context_id=None)
                    for i in range(12)
                )
            )
        assert proxy.cuts == 1, "no COMMIT was cut"
        assert all(c is not None and c.task is not None for c in claims)
        assert all([e.seq for e in c.events] == [2] for c in claims if c is not None)
        assert all(s.created for s in subs)
        assert len({s.task.id for s in subs}) == 12
        assert (await store.list_tasks(ListQuery(owner=OWNER))).total_size == 24
        for t in tasks:
            stored = await store.get_task(OWNER, t.id)
            assert stored.state is S.WORKING and stored.attempts == 1
            assert [e.seq for e in await store.events_after(t.id, 0)] == [1, 2]
    finally:
        await store.close()


async def test_serialization_failures_are_retried(
    own_db: str, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """Under an operator's SERIALIZABLE default, lost races raise 40001: retried, then decided."""
    caplog.set_level(logging.WARNING, logger="tether.store")
    database = make_url(own_db).database
    await admin.execute(
        f'ALTER DATABASE "{database}" SET default_transaction_isolation TO serializable'
    )
    # One store runs its writes in turn, in shared transactions (``pg_batch``): the
    # racers are stores of their own, as separate processes would be.
    stores = [SqlStore(own_db, run_migrations=False, pool_size=2) for _ in range(16)]
    for one in stores:
        await one.start()
    store = stores[0]
    try:
        task = await new_task(store)
        await store.transition(task.id, S.WORKING)
        # Open the pools' connections first, so the 16 updates below really race
        # (connection set-up would otherwise stagger them into a queue).
        await asyncio.gather(*(one.get_task(None, task.id) for one in stores))
        targets = [S.COMPLETED, S.FAILED, S.CANCELED, S.REJECTED] * 4
        async with asyncio.timeout(DEADLINE):
            results = await asyncio.gather(
                *(one.transition(task.id, to) for one, to in zip(stores, targets, strict=True)),
                return_exceptions=True,
            )
        winners = [r for r in results if not isinstance(r, BaseException)]
        assert len(winners) == 1
        assert all(isinstance(r, InvalidTransition) for r in results if r not in winners)
        seqs = [e.seq for e in await store.events_after(task.id, 0)]
        assert seqs == [1, 2, 3]
        assert any("could not serialize" in r.getMessage() for r in caplog.records)
    finally:
        for one in stores:
            await one.close()


async def test_deadlock_victim_is_retried(
    own_db: str, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A real 40P01 from PostgreSQL, as asyncpg reports it, is retried."""
    caplog.set_level(logging.WARNING, logger="tether.store")
    store = SqlStore(own_db, run_migrations=False)
    await store.start()
    database = make_url(own_db).database
    other = await asyncpg.connect(
        make_url(PG_ADMIN_URL).set(database=database).render_as_string(hide_password=False),
        timeout=10,
    )
    try:
        a, b = await new_task(store), await new_task(store)
        # The other session detects deadlocks late, so the store's session is the victim.
        await other.execute("SET deadlock_timeout = '10s'")
        holding = other.transaction()
        await holding.start()
        await other.execute("UPDATE tasks SET version = version WHERE id = $1", a.id)
        attempts = 0
        store_holds_b = asyncio.Event()

        async def op(db: Db) -> int:
            nonlocal attempts
            attempts += 1
            bump = "UPDATE tasks SET version = version + 1 WHERE id = :id"
            await db.run(bump, {"id": b.id})
            store_holds_b.set()
            await db.run(bump, {"id": a.id})  # waits for the other session
            return attempts

        async def other_side() -> None:
            await store_holds_b.wait()
            # Closes the cycle; blocks until PostgreSQL kills the store's transaction.
            await other.execute("UPDATE tasks SET version = version WHERE id = $1", b.id)
            await holding.commit()

        async with asyncio.timeout(DEADLINE):
            done, _ = await asyncio.gather(store._write(op), other_side())
        assert done == 2  # the first attempt was the deadlock victim
        assert any("deadlock" in r.getMessage() for r in caplog.records)
        assert (await store.get_task(OWNER, a.id)).version == 1
        assert (await store.get_task(OWNER, b.id)).version == 1
    finally:
        await other.close(timeout=10)
        await store.close()


async def test_batches_that_lock_in_opposite_orders_each_land_once(
    own_db: str, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """Two processes' batches that lock the same two tasks in opposite orders: the one
    that waits gives up the lock after ``LOCK_WAIT`` instead of waiting for PostgreSQL's
    deadlock detector, its write runs alone, every write lands once, every log stays
    gap-free."""
    caplog.set_level(logging.DEBUG, logger="tether.store")
    database = make_url(own_db).database
    # The detector would take 10 s to break the cycle: the test must not need it.
    await admin.execute(f'ALTER DATABASE "{database}" SET deadlock_timeout TO 10000')
    first, second = (SqlStore(own_db, run_migrations=False) for _ in range(2))
    await first.start()
    await second.start()
    try:
        # Open the pools' connections first, so that both batches start at once.
        warm = await new_task(first)
        await asyncio.gather(*(one.get_task(None, warm.id) for one in (first, second) * 2))
        for attempt in range(5):
            a = await new_task(first, text=f"a{attempt}")
            b = await new_task(first, text=f"b{attempt}")
            for task in (a, b):
                assert await first.claim(task.id, WORKER, lease_seconds=60, max_attempts=1)
            busy = agent_msg(a, "busy")
            async with asyncio.timeout(5.0):  # half the detector's time
                events = await asyncio.gather(
                    # One batch per store, each locking a and b in its own order.
                    first.update_status(a.id, dict(busy), lease_owner=WORKER),
                    first.update_status(b.id, dict(busy), lease_owner=WORKER),
                    second.update_status(b.id, dict(busy), lease_owner=WORKER),
                    second.update_status(a.id, dict(busy), lease_owner=WORKER),
                )
            assert sorted(e.seq for e in events) == [3, 3, 4, 4]
            for task in (a, b):
                assert [e.seq for e in await first.events_after(task.id, 0)] == [1, 2, 3, 4]
            if any("lock timeout" in r.getMessage() for r in caplog.records):
                break
        else:
            pytest.fail("the two batches never waited on each other in 5 tries")
    finally:
        await first.close()
        await second.close()
