"""Helpers for the store tests (a plain module so spawned processes can import it too)."""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tether.core.errors import InvalidTransition
from tether.core.states import TaskState
from tether.core.types import DEFAULT_OWNER, JSON, Feedback, TaskRecord, text_message
from tether.store.base import TaskStore
from tether.store.common import stamp
from tether.store.memory import MemoryStore
from tether.store.schema import feedback, metadata
from tether.store.sql import SqlStore

S = TaskState
# The same server tests/conftest.py creates the databases on.
PG_ADMIN_URL = os.environ.get("TETHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
OWNER = DEFAULT_OWNER
WORKER = "worker-1"


async def truncate(engine: AsyncEngine) -> None:
    """Empties every table of the schema: each PostgreSQL test starts from nothing."""
    names = ", ".join(t.name for t in metadata.sorted_tables)
    async with engine.begin() as conn:
        await conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY"))


def user_msg(text: str = "hello", **extra: str) -> JSON:
    return text_message("ROLE_USER", text, **extra)


def agent_msg(task: TaskRecord, text: str = "ok") -> JSON:
    """An agent message as the runtime hands it to the store: stamped with its task."""
    return stamp(text_message("ROLE_AGENT", text), task.id, task.context_id)


async def new_task(
    store: TaskStore, owner: str = OWNER, context_id: str | None = None, text: str = "hello"
) -> TaskRecord:
    return (await store.submit(owner=owner, message=user_msg(text), context_id=context_id)).task


async def drive_to(store: TaskStore, state: TaskState, owner: str = OWNER) -> TaskRecord:
    """A fresh task brought to ``state`` along allowed transitions (no lease held)."""
    task = await new_task(store, owner)
    path: dict[TaskState, list[TaskState]] = {
        S.SUBMITTED: [],
        S.WORKING: [S.WORKING],
        S.INPUT_REQUIRED: [S.WORKING, S.INPUT_REQUIRED],
        S.AUTH_REQUIRED: [S.WORKING, S.AUTH_REQUIRED],
        S.COMPLETED: [S.WORKING, S.COMPLETED],
        S.FAILED: [S.FAILED],
        S.REJECTED: [S.REJECTED],
        S.CANCELED: [S.CANCELED],
    }
    for step in path[state]:
        await store.transition(task.id, step, message=agent_msg(task, f"-> {step.value}"))
    task = await store.get_task(owner, task.id, history_length=None)
    assert task.state is state
    return task


async def stored_feedback(store: TaskStore) -> list[Feedback]:
    if isinstance(store, MemoryStore):
        return list(store.feedback)
    assert isinstance(store, SqlStore)
    async with store.engine.connect() as conn:
        rows = (await conn.execute(sa.select(feedback).order_by(feedback.c.id))).all()
    return [Feedback(r.task_id, r.owner, r.rating, r.text, r.metadata) for r in rows]


# -- processes for the PostgreSQL concurrency test ------------------------------------


def next_state(state: TaskState) -> TaskState:
    """The cycle every contender pushes a task along: submitted -> working <-> input-required."""
    return S.INPUT_REQUIRED if state is S.WORKING else S.WORKING


def cas_process(
    url: str,
    task_ids: list[str],
    index: int,
    attempts: int,
    start: Any,
    results: Any,
) -> None:
    """One OS process of contenders: ``attempts`` read-then-compare-and-set rounds.

    Puts ``(index, wins, losses, errors)`` on ``results``; a win is
    ``(task_id, messageId, from, to)``.
    """
    import asyncio

    wins: list[tuple[str, str, str, str]] = []
    errors: list[str] = []
    losses = 0

    async def run() -> None:
        nonlocal losses
        store = SqlStore(url, pool_size=2, run_migrations=False)
        await store.start()
        try:
            for i in range(attempts):
                task_id = task_ids[i % len(task_ids)]
                task = await store.get_task(None, task_id, history_length=0)
                to = next_state(task.state)
                message = stamp(
                    text_message("ROLE_AGENT", f"p{index} a{i}"), task.id, task.context_id
                )
                try:
                    await store.transition(task_id, to, message=message)
                except InvalidTransition:
                    losses += 1
                else:
                    wins.append((task_id, message["messageId"], task.state.value, to.value))
        finally:
            await store.close()

    try:
        start.wait(timeout=120)
        asyncio.run(run())
    except BaseException as exc:  # reported to the parent, which fails the test
        errors.append(f"{type(exc).__name__}: {exc}")
    results.put((index, wins, losses, errors))
