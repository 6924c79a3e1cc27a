"""Crash safety: SIGKILL ``tether serve`` mid-work, start it again, lose and repeat nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import ServerFactory
from .helpers import HTTP_TIMEOUT, eventually, new_id, result, rpc, send, text_of
from .server import TetherServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TASKS = 20
SLEEP = 1.0
CONCURRENCY = 5


def read_db(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the server's SQLite file directly (read-only: the server may still be up)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute(sql, args).fetchall()


async def count(http: httpx.AsyncClient, server: TetherServer, state: str) -> int:
    page = result(await rpc(http, server.url, "ListTasks", {"status": state, "pageSize": 1}))
    return int(page["totalSize"])


async def test_sigkill_mid_work_loses_and_repeats_nothing(tether_server: ServerFactory) -> None:
    server = tether_server(args=["--concurrency", str(CONCURRENCY)])
    assert server.db is not None
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        submitted = await asyncio.gather(
            *(
                send(http, server.url, f"sleep {SLEEP} kill-{i}", return_immediately=True)
                for i in range(TASKS)
            )
        )
        ids = {t["id"] for t in submitted}
        assert len(ids) == TASKS

        # Kill once the first wave is done and the next one is running: some tasks are
        # completed, some working (leased, handler mid-sleep), the rest still queued.
        async def mid_way() -> bool | None:
            done = await count(http, server, "TASK_STATE_COMPLETED")
            working = await count(http, server, "TASK_STATE_WORKING")
            return True if done >= CONCURRENCY and working > 0 and done < TASKS else None

        await eventually(mid_way, within=60, interval=0.02, what="a mid-way point")
        server.kill()
        assert server.proc is not None and server.proc.returncode == -signal.SIGKILL

    states = Counter(s for (s,) in read_db(server.db, "SELECT state FROM tasks"))
    assert states["working"] > 0, states
    assert 0 < states["completed"] < TASKS, states

    server.start()  # the same database: it takes back every lease the dead process held
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:

        async def all_done() -> bool | None:
            return True if await count(http, server, "TASK_STATE_COMPLETED") == TASKS else None

        await eventually(all_done, within=120, interval=0.1, what="all tasks completed")
        for task_id in ids:
            task = result(await rpc(http, server.url, "GetTask", {"id": task_id}))
            assert task["status"]["state"] == "TASK_STATE_COMPLETED"
            assert text_of(task["status"]["message"]) == f"slept {SLEEP}"
    server.stop()

    rows = read_db(
        server.db, "SELECT task_id, seq, kind, final, payload FROM events ORDER BY task_id, seq"
    )
    by_task: dict[str, list[tuple[int, str, bool, dict[str, Any]]]] = {}
    for task_id, seq, kind, final, payload in rows:
        by_task.setdefault(task_id, []).append((seq, kind, bool(final), json.loads(payload)))
    assert set(by_task) == ids
    last_seq = dict(read_db(server.db, "SELECT id, last_seq FROM tasks"))
    for task_id, events in by_task.items():
        seqs = [seq for seq, *_ in events]
        assert seqs == list(range(1, len(seqs) + 1)), (task_id, seqs)  # gap-free from 1
        assert last_seq[task_id] == len(seqs)
        seen = [p["status"]["state"] for _, kind, _, p in events if kind == "status"]
        assert seen.count("TASK_STATE_COMPLETED") == 1, (task_id, seen)
        assert seen.count("TASK_STATE_SUBMITTED") == 1 and seen[0] == "TASK_STATE_SUBMITTED"
        assert seen.count("TASK_STATE_WORKING") == 1, (task_id, seen)
        assert [final for _, _, final, _ in events] == [False] * (len(events) - 1) + [True]
        assert seen[-1] == "TASK_STATE_COMPLETED"

    # Handlers are at-least-once: the ones the kill interrupted ran again, on attempt 2.
    runs = {i: (server.marks / f"kill-{i}.runs").read_text().split() for i in range(TASKS)}
    assert all(r for r in runs.values()), runs
    assert any("2" in r for r in runs.values()), runs


async def test_a_handler_that_kills_its_process_fails_after_max_attempts(
    tether_server: ServerFactory,
) -> None:
    max_attempts = 2  # agents.crasher.max_attempts
    server = tether_server("tests.e2e.agents:crasher")
    assert server.db is not None
    message_id = new_id()
    params = {
        "message": {"messageId": message_id, "role": "ROLE_USER", "parts": [{"text": "crash"}]},
        "configuration": {"returnImmediately": True},
    }
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        # The process may die before it answers; the task is stored by then.
        with contextlib.suppress(httpx.TransportError):
            await rpc(http, server.url, "SendMessage", params)
    assert server.wait_exit(60) == -signal.SIGKILL

    # Every restart takes the task up again, and the handler kills the process again...
    for _ in range(max_attempts - 1):
        server.launch()
        assert server.wait_exit(60) == -signal.SIGKILL, server.output()
    # ...until the attempts are used up: then the task is failed, not run again.
    server.start()
    (task_id,) = read_db(
        server.db, "SELECT task_id FROM messages WHERE message_id = ?", message_id
    )[0]
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:

        async def failed() -> dict[str, Any] | None:
            task = result(await rpc(http, server.url, "GetTask", {"id": task_id}))
            return task if task["status"]["state"] == "TASK_STATE_FAILED" else None

        task = await eventually(failed, what="the crashing task to fail")
        assert f"{max_attempts} attempts" in text_of(task["status"]["message"])
        # The same messageId again is the same (failed) task, not a new attempt.
        again = result(await rpc(http, server.url, "SendMessage", params))["task"]
        assert again["id"] == task_id and again["status"]["state"] == "TASK_STATE_FAILED"
        # The process lives on and serves other tasks.
        ok = await send(http, server.url, "hello")
        assert ok["status"]["state"] == "TASK_STATE_COMPLETED"
    assert server.proc is not None and server.proc.poll() is None

    # One more restart: still failed, and the handler is not started again.
    server.stop()
    server.start()
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        assert (await send(http, server.url, "after restart"))["status"][
            "state"
        ] == "TASK_STATE_COMPLETED"
        task = result(await rpc(http, server.url, "GetTask", {"id": task_id}))
        assert task["status"]["state"] == "TASK_STATE_FAILED"
    assert server.proc.poll() is None
    attempts = (server.marks / "crash.attempts").read_text().split()
    assert attempts == [str(n) for n in range(1, max_attempts + 1)]
    states = [
        json.loads(p)["status"]["state"]
        for (p,) in read_db(
            server.db,
            "SELECT payload FROM events WHERE task_id = ? AND kind = 'status' ORDER BY seq",
            task_id,
        )
    ]
    assert states == ["TASK_STATE_SUBMITTED", "TASK_STATE_WORKING", "TASK_STATE_FAILED"]
