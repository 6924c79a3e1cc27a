"""``TaskStore.prune_events``: the same on every backend (what "no longer kept" means)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tether.core.states import TaskState
from tether.core.types import DEFAULT_OWNER, TaskRecord, now, text_message
from tether.store import TaskStore, open_store
from tether.store.common import stamp

WORKER = "w1"


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TaskStore]:
    if request.param == "memory":
        url = "memory://"
    elif request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'tether.db'}"
    else:
        create: Callable[[], str] = request.getfixturevalue("postgres_database")
        url = create()
    s = open_store(url, run_migrations=True)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def _task(store: TaskStore, end: TaskState | None) -> TaskRecord:
    """A task with a few events, left working or brought to ``end``."""
    message = text_message("ROLE_USER", "hi")
    task = (await store.submit(owner=DEFAULT_OWNER, message=message, context_id=None)).task
    await store.claim(task.id, WORKER, lease_seconds=30, max_attempts=3)
    await store.add_artifact(
        task.id, {"artifactId": "a", "parts": [{"text": "x"}]}, lease_owner=WORKER
    )
    if end is not None:
        answer = stamp(text_message("ROLE_AGENT", "bye"), task.id, task.context_id)
        await store.transition(task.id, end, message=answer, lease_owner=WORKER)
    return await store.get_task(None, task.id)


async def test_prune_drops_the_logs_of_finished_tasks_only(store: TaskStore) -> None:
    done = await _task(store, TaskState.COMPLETED)
    failed = await _task(store, TaskState.FAILED)
    running = await _task(store, None)
    asking = await _task(store, TaskState.INPUT_REQUIRED)

    assert await store.prune_events(now() - 3600) == 0  # none finished that long ago
    assert len(await store.events_after(done.id, 0)) == done.last_seq == 4

    assert await store.prune_events(now() + 1, limit=1) == 1
    assert await store.prune_events(now() + 1, limit=5) == 1
    assert await store.prune_events(now() + 1) == 0  # nothing left to drop

    for task in (done, failed):
        assert await store.events_after(task.id, 0) == []
        # The task itself stays whole: state, history, artifacts, and its sequence.
        kept = await store.get_task(DEFAULT_OWNER, task.id)
        assert (kept.state, kept.last_seq) == (task.state, task.last_seq)
        assert kept.history == task.history and kept.artifacts == task.artifacts
    for task in (running, asking):
        assert [e.seq for e in await store.events_after(task.id, 0)] == list(
            range(1, task.last_seq + 1)
        )
