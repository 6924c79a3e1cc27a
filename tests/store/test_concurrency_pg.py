"""Compare-and-set under real contention: 8 OS processes on shared PostgreSQL rows."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import queue
from collections import Counter, defaultdict
from typing import Any

import pytest
import sqlalchemy as sa
from storekit import OWNER, S, cas_process, new_task, truncate, user_msg

from tether.core.errors import InvalidInput
from tether.core.states import TaskState, can_transition
from tether.store.base import ListQuery, Submitted
from tether.store.schema import events, messages
from tether.store.sql import SqlStore

pytestmark = pytest.mark.postgres

PROCESSES = 8
ATTEMPTS = 200
TASKS = 4  # few rows, so that the processes collide on nearly every attempt
DEADLINE = 240.0


async def setup(url: str) -> list[str]:
    store = SqlStore(url, run_migrations=False)
    await store.start()
    try:
        await truncate(store.engine)
        return [(await new_task(store, text=f"shared {i}")).id for i in range(TASKS)]
    finally:
        await store.close()


async def load(url: str, task_ids: list[str]) -> dict[str, Any]:
    store = SqlStore(url, run_migrations=False)
    await store.start()
    try:
        out: dict[str, Any] = {}
        async with store.engine.connect() as conn:
            for task_id in task_ids:
                rows = (
                    await conn.execute(
                        sa.select(events.c.seq, events.c.payload)
                        .where(events.c.task_id == task_id)
                        .order_by(events.c.seq)
                    )
                ).all()
                n_messages = (
                    await conn.execute(
                        sa.select(sa.func.count())
                        .select_from(messages)
                        .where(messages.c.task_id == task_id)
                    )
                ).scalar_one()
                out[task_id] = {
                    "task": await store.get_task(OWNER, task_id, history_length=0),
                    "events": [(r.seq, r.payload) for r in rows],
                    "messages": n_messages,
                }
        return out
    finally:
        await store.close()


def test_processes_contend_for_transitions(migrated_postgres_url: str) -> None:
    url = migrated_postgres_url
    task_ids = asyncio.run(setup(url))

    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    results: Any = ctx.Queue()
    procs = [
        ctx.Process(target=cas_process, args=(url, task_ids, i, ATTEMPTS, start, results))
        for i in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    reports = []
    try:
        start.set()
        for _ in procs:
            reports.append(results.get(timeout=DEADLINE))
    except queue.Empty:
        pytest.fail(f"only {len(reports)} of {PROCESSES} processes reported in {DEADLINE}s")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)

    errors = [e for _, _, _, errs in reports for e in errs]
    assert errors == []
    wins = [w for _, ws, _, _ in reports for w in ws]
    losses = sum(n for _, _, n, _ in reports)
    assert len(wins) + losses == PROCESSES * ATTEMPTS
    assert losses > 0, "no contention: the test proves nothing"

    stored = asyncio.run(load(url, task_ids))
    wins_by_task: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)
    for win in wins:
        wins_by_task[win[0]].append(win)
    for task_id in task_ids:
        got = stored[task_id]
        seqs = [seq for seq, _ in got["events"]]
        task = got["task"]
        # Gap-free, duplicate-free, and the row's counter agrees with the log.
        assert seqs == list(range(1, task.last_seq + 1))
        assert len(seqs) == 1 + len(wins_by_task[task_id])
        assert task.version == len(wins_by_task[task_id])
        assert got["messages"] == 1 + len(wins_by_task[task_id])

        states = [TaskState.from_wire(p["status"]["state"]) for _, p in got["events"]]
        assert states[0] is S.SUBMITTED
        for before, after in itertools.pairwise(states):
            assert can_transition(before, after), (before, after)
        assert states[-1] is task.state

        # Every event after the first is one winner's message, and every winner has one.
        logged = [p["status"]["message"]["messageId"] for _, p in got["events"][1:]]
        assert Counter(logged) == Counter(w[1] for w in wins_by_task[task_id])
        by_message = {w[1]: w for w in wins_by_task[task_id]}
        for _, payload in got["events"][1:]:
            _, _, _, to = by_message[payload["status"]["message"]["messageId"]]
            # The guard is ``state IN allowed_from(to)``, not the state the winner read:
            # the task may have moved to another allowed state in between (checked legal
            # above), so only the target is the winner's own.
            assert to == TaskState.from_wire(payload["status"]["state"]).value


async def test_concurrent_writes_share_commits_and_answer_alone(pg_store: SqlStore) -> None:
    """Writes that arrive together share transactions (``pg_batch``), yet each answers
    what it would alone: a repeated messageId finds its first task, a refused value is
    refused, and neither undoes the others."""
    originals = [user_msg(f"m{i}") for i in range(24)]
    repeats = [dict(m) for m in originals[::4]]
    refused = user_msg("nul \x00 here")
    calls = [*originals, *repeats, refused]
    async with asyncio.timeout(DEADLINE):
        results = await asyncio.gather(
            *(pg_store.submit(owner=OWNER, message=m, context_id=None) for m in calls),
            return_exceptions=True,
        )
    *answers, bad = results
    assert isinstance(bad, InvalidInput)
    by_message: dict[str, set[str]] = defaultdict(set)
    for message, answer in zip(calls, answers, strict=False):
        assert isinstance(answer, Submitted), answer
        by_message[message["messageId"]].add(answer.task.id)
    assert all(len(ids) == 1 for ids in by_message.values())
    assert sum(isinstance(a, Submitted) and a.created for a in answers) == len(originals)
    page = await pg_store.list_tasks(ListQuery(owner=OWNER, page_size=1))
    assert page.total_size == len(originals)

    # Rows written by one transaction share its id (xmin): fewer ids than tasks.
    pool = await pg_store._connections()
    transactions = await pool.fetchval("SELECT count(DISTINCT xmin::text) FROM tasks")
    assert 1 <= transactions < len(originals)

    # Each task goes on alone as before: claimed, finished, its log gap-free.
    tasks = [a.task for a in answers if isinstance(a, Submitted) and a.created]
    claims = await asyncio.gather(
        *(pg_store.claim(t.id, "w", lease_seconds=60, max_attempts=1) for t in tasks)
    )
    assert all(c is not None and c.task is not None for c in claims)
    finals = await asyncio.gather(
        *(pg_store.transition(t.id, S.COMPLETED, lease_owner="w") for t in tasks)
    )
    assert {e.seq for e in finals} == {3}
    for t in tasks:
        assert [e.seq for e in await pg_store.events_after(t.id, 0)] == [1, 2, 3]


async def _statements_per_transaction(store: SqlStore, table: str) -> tuple[int, int]:
    """The transactions that wrote ``table``'s live rows, and how many of them wrote
    those rows with more than one statement (rows of one statement share xmin and cmin)."""
    pool = await store._connections()
    row = await pool.fetchrow(
        "SELECT count(*), count(*) FILTER (WHERE statements > 1) FROM (SELECT "
        f"count(DISTINCT cmin::text) AS statements FROM {table} GROUP BY xmin::text) x"
    )
    assert row is not None
    return int(row[0]), int(row[1])


async def test_writes_of_one_kind_in_a_batch_go_as_one_statement(pg_store: SqlStore) -> None:
    """A batch runs its submits, its claims and its outcomes as one statement each
    (``pg_batch.Bulk``); a row the statement refuses (a lease held by another worker, a
    task another outcome finished first) answers as it would alone, the others stand."""
    n = 32
    async with asyncio.timeout(DEADLINE):
        subs = await asyncio.gather(
            *(pg_store.submit(owner=OWNER, message=user_msg(f"b{i}"), context_id=None)
              for i in range(n))
        )  # fmt: skip
        transactions, split = await _statements_per_transaction(pg_store, "tasks")
        assert transactions < n and split == 0
        ids = [s.task.id for s in subs]
        claims = await asyncio.gather(
            *(pg_store.claim(t, "w", lease_seconds=60, max_attempts=1) for t in ids)
        )
        assert all(c is not None and c.task is not None for c in claims)
        transactions, split = await _statements_per_transaction(pg_store, "tasks")
        assert transactions < n and split == 0

        # Two outcomes race for each of the first tasks; others get one from a worker
        # without their lease.
        twice, stranger = ids[:4], ids[4:8]
        results = await asyncio.gather(
            *(pg_store.transition(t, S.COMPLETED, lease_owner="w") for t in ids[8:] + twice),
            *(pg_store.transition(t, S.FAILED, lease_owner="w") for t in twice),
            *(pg_store.transition(t, S.FAILED, lease_owner="x") for t in stranger),
            return_exceptions=True,
        )
        won = Counter(e.task_id for e in results if not isinstance(e, BaseException))
        assert set(won) == set(ids) - set(stranger) and set(won.values()) == {1}
        refused = [type(e).__name__ for e in results if isinstance(e, BaseException)]
        assert sorted(refused) == ["InvalidTransition"] * 4 + ["LeaseLost"] * 4
        for t in stranger:
            await pg_store.transition(t, S.COMPLETED, lease_owner="w")
    for t in ids:
        task = await pg_store.get_task(OWNER, t)
        assert task.state in (S.COMPLETED, S.FAILED) and task.version == 2
        assert [e.seq for e in await pg_store.events_after(t, 0)] == [1, 2, 3]
