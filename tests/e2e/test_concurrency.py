"""Sync handlers run on threads, never the loop; --concurrency bounds the handlers at once."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from .conftest import ServerFactory
from .helpers import HTTP_TIMEOUT, get_task, new_id, read_if_exists, send, text_of, wait_file

pytestmark = pytest.mark.timeout(180)


async def test_sync_handler_runs_in_a_worker_thread(tether_server: ServerFactory) -> None:
    server = tether_server("tests.e2e.agents:sync_agent")
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        task = await send(http, server.url, "thread")
    assert task["status"]["state"] == "TASK_STATE_COMPLETED"
    answer = text_of(task["status"]["message"])
    thread, main = answer.removeprefix("thread ").split(" main=")
    assert thread != main
    assert thread.startswith("handler")


async def test_sync_handler_does_not_block_the_loop(tether_server: ServerFactory) -> None:
    server = tether_server("tests.e2e.agents:sync_agent")
    name = new_id()
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        done = await send(http, server.url, "thread")  # a task to read back below
        sleeper = asyncio.create_task(send(http, server.url, f"sleep 4 {name}"))
        await wait_file(server.marks / f"{name}.started")

        async def probe(i: int) -> float:
            started = time.monotonic()
            if i % 2:
                response = await http.get(f"{server.url}/healthz")
                assert response.status_code == 200
            else:
                task = await get_task(http, server.url, done["id"])
                assert task["status"]["state"] == "TASK_STATE_COMPLETED"
            return time.monotonic() - started

        began = time.monotonic()
        latencies = await asyncio.gather(*(probe(i) for i in range(10)))
        elapsed = time.monotonic() - began
        # Answered while the handler still sleeps: a blocked loop could not have answered
        # before the sleep ended. The time bound is generous for a busy machine.
        assert await asyncio.to_thread(read_if_exists, server.marks / f"{name}.ended") is None
        assert elapsed < 3.0, latencies
        slept = await asyncio.wait_for(sleeper, HTTP_TIMEOUT)
    assert slept["status"]["state"] == "TASK_STATE_COMPLETED"


async def test_concurrency_bound_is_respected(tether_server: ServerFactory) -> None:
    server = tether_server(args=["--concurrency", "2"])
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        tasks = await asyncio.gather(*(send(http, server.url, "peak 0.4") for _ in range(8)))
    peaks = [int(text_of(t["status"]["message"]).removeprefix("peak ")) for t in tasks]
    assert all(t["status"]["state"] == "TASK_STATE_COMPLETED" for t in tasks)
    # Measured by the agent itself: never more than two handlers at once, and two did overlap.
    assert max(peaks) == 2, peaks


async def test_many_tasks_run_at_once(tether_server: ServerFactory) -> None:
    server = tether_server(args=["--concurrency", "16"])
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        began = time.monotonic()
        tasks = await asyncio.gather(*(send(http, server.url, "peak 1.0") for _ in range(16)))
        elapsed = time.monotonic() - began
    peaks = [int(text_of(t["status"]["message"]).removeprefix("peak ")) for t in tasks]
    assert max(peaks) > 8, peaks
    assert max(peaks) <= 16
    # Sixteen one-second handlers one after another would take 16 s.
    assert elapsed < 8.0
