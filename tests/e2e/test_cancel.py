"""Cancel: a queued task never starts; a running handler is stopped; terminal stays terminal."""

from __future__ import annotations

import httpx
import pytest

from .conftest import ServerFactory
from .helpers import (
    HTTP_TIMEOUT,
    error_code,
    get_task,
    message,
    new_id,
    result,
    rpc,
    send,
    wait_file,
    wait_state,
)

pytestmark = pytest.mark.timeout(180)


async def test_canceled_queued_task_never_starts(tether_server: ServerFactory) -> None:
    # One worker slot: while the first task blocks it, the second waits in the queue.
    server = tether_server(args=["--concurrency", "1"])
    first, queued = new_id(), new_id()
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        blocker = await send(http, server.url, f"block {first}", return_immediately=True)
        await wait_file(server.marks / f"{first}.started")
        waiting = await send(http, server.url, f"block {queued}", return_immediately=True)
        assert waiting["status"]["state"] == "TASK_STATE_SUBMITTED"

        canceled = result(await rpc(http, server.url, "CancelTask", {"id": waiting["id"]}))
        assert canceled["status"]["state"] == "TASK_STATE_CANCELED"

        # Free the slot, then run one more task through it: the queue is FIFO with one
        # worker, so once this one is done the canceled task has had its turn.
        await rpc(http, server.url, "CancelTask", {"id": blocker["id"]})
        assert await wait_file(server.marks / f"{first}.stopped") == "canceled"
        after = await send(http, server.url, "echo after")
        assert after["status"]["state"] == "TASK_STATE_COMPLETED"

        assert not (server.marks / f"{queued}.started").exists()
        final = await get_task(http, server.url, waiting["id"])
        assert final["status"]["state"] == "TASK_STATE_CANCELED"


async def test_cancel_stops_a_running_handler(tether_server: ServerFactory) -> None:
    server = tether_server()
    name = new_id()
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        task = await send(http, server.url, f"block {name}", return_immediately=True)
        await wait_file(server.marks / f"{name}.started")
        running = await get_task(http, server.url, task["id"])
        assert running["status"]["state"] == "TASK_STATE_WORKING"

        canceled = result(await rpc(http, server.url, "CancelTask", {"id": task["id"]}))
        assert canceled["status"]["state"] == "TASK_STATE_CANCELED"
        # The handler saw the cancellation: its finally block ran with CancelledError.
        assert await wait_file(server.marks / f"{name}.stopped") == "canceled"

        # Nothing leaves a terminal state: not a second cancel, not a new message.
        again = await rpc(http, server.url, "CancelTask", {"id": task["id"]})
        assert error_code(again) == -32002
        follow_up = await rpc(
            http, server.url, "SendMessage", {"message": message("echo", task_id=task["id"])}
        )
        assert error_code(follow_up) == -32004
        final = await get_task(http, server.url, task["id"])
        assert final["status"]["state"] == "TASK_STATE_CANCELED"
        assert "artifacts" not in final

        # The worker slot is free again.
        assert (await send(http, server.url, "echo next"))["status"][
            "state"
        ] == "TASK_STATE_COMPLETED"


async def test_cancel_input_required_task(tether_server: ServerFactory) -> None:
    server = tether_server()
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        asked = await send(http, server.url, "ask")
        assert asked["status"]["state"] == "TASK_STATE_INPUT_REQUIRED"
        canceled = result(await rpc(http, server.url, "CancelTask", {"id": asked["id"]}))
        assert canceled["status"]["state"] == "TASK_STATE_CANCELED"
        answer = await rpc(
            http,
            server.url,
            "SendMessage",
            {"message": message("Ada", task_id=asked["id"], context_id=asked["contextId"])},
        )
        assert error_code(answer) == -32004
        await wait_state(http, server.url, asked["id"], "TASK_STATE_CANCELED")


async def test_cancel_reaches_a_sync_handler(tether_server: ServerFactory) -> None:
    server = tether_server("tests.e2e.agents:sync_agent")
    name = new_id()
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        task = await send(http, server.url, f"spin {name}", return_immediately=True)
        await wait_file(server.marks / f"{name}.started")
        canceled = result(await rpc(http, server.url, "CancelTask", {"id": task["id"]}))
        assert canceled["status"]["state"] == "TASK_STATE_CANCELED"
        # Its thread saw ctx.cancel_requested and returned; the answer is dropped.
        assert await wait_file(server.marks / f"{name}.stopped") == "canceled"
        final = await get_task(http, server.url, task["id"])
        assert final["status"]["state"] == "TASK_STATE_CANCELED"
        assert (await send(http, server.url, "thread"))["status"]["state"] == (
            "TASK_STATE_COMPLETED"
        )
