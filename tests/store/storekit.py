"""Helpers for the store tests (a plain module so spawned processes can import it too)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tether.core.states import TaskState
from tether.core.types import DEFAULT_OWNER, JSON, Feedback, TaskRecord, text_message
from tether.store.base import TaskStore
from tether.store.common import stamp
from tether.store.memory import MemoryStore
from tether.store.schema import feedback
from tether.store.sql import SqlStore

S = TaskState
OWNER = DEFAULT_OWNER
WORKER = "worker-1"


async def truncate(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "TRUNCATE feedback, events, artifacts, messages, tasks, contexts "
                "RESTART IDENTITY"
            )
        )


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
