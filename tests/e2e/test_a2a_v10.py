"""A2A 1.0 over JSON-RPC, through the official a2a-sdk client."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import httpx
import pytest
from a2a.types import a2a_pb2 as pb
from a2a.utils.errors import (
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)

from .conftest import ServerFactory
from .helpers import (
    HTTP_TIMEOUT,
    new_id,
    pb_message,
    pb_text,
    result,
    rpc,
    sdk,
    sdk_send,
    send,
    wait_state,
)
from .server import TetherServer

pytestmark = pytest.mark.timeout(120)


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


async def test_send_message_waits_for_the_answer(server: TetherServer) -> None:
    async with sdk(server.url) as client:
        task = await sdk_send(client, "echo hello there")
    assert task.status.state == pb.TASK_STATE_COMPLETED
    assert pb_text(task.status.message) == "echo: hello there"
    assert task.status.message.role == pb.ROLE_AGENT
    # Ids are the server's, fresh for each new task.
    assert _is_uuid(task.id) and _is_uuid(task.context_id) and task.id != task.context_id
    assert [pb_text(m) for m in task.history] == ["echo hello there", "echo: hello there"]


async def test_return_immediately_returns_before_the_task_ends(server: TetherServer) -> None:
    gate = new_id()
    async with sdk(server.url) as client:
        task = await sdk_send(client, f"progress {gate}", return_immediately=True)
        # The handler cannot finish before the test writes the go file.
        assert task.status.state in (pb.TASK_STATE_SUBMITTED, pb.TASK_STATE_WORKING)
        (server.marks / f"{gate}.go").write_text("")
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
            await wait_state(http, server.url, task.id, "TASK_STATE_COMPLETED")
        done = await client.get_task(pb.GetTaskRequest(id=task.id))
    assert pb_text(done.status.message) == "finished"


async def test_server_generates_distinct_ids_and_keeps_a_given_context(
    server: TetherServer,
) -> None:
    async with sdk(server.url) as client:
        first = await sdk_send(client, "echo one")
        second = await sdk_send(client, "echo two")
        same_context = await sdk_send(client, "echo three", context_id=first.context_id)
    assert len({first.id, second.id, same_context.id}) == 3
    assert first.context_id != second.context_id
    assert same_context.context_id == first.context_id


async def test_get_task_history_length(server: TetherServer) -> None:
    async with sdk(server.url) as client:
        asked = await sdk_send(client, "ask")
        assert asked.status.state == pb.TASK_STATE_INPUT_REQUIRED
        done = await sdk_send(client, "Ada", task_id=asked.id, context_id=asked.context_id)
        assert done.status.state == pb.TASK_STATE_COMPLETED

        async def history(length: int | None) -> list[str]:
            request = pb.GetTaskRequest(id=asked.id)
            if length is not None:
                request.history_length = length
            return [pb_text(m) for m in (await client.get_task(request)).history]

        everything = ["ask", "What is your name?", "Ada", "Hello, Ada"]
        assert await history(None) == everything
        assert await history(0) == []
        assert await history(1) == ["Hello, Ada"]
        assert await history(3) == everything[1:]
        assert await history(100) == everything
        # SendMessage's configuration.historyLength trims the returned task the same way.
        short = await sdk_send(client, "echo trimmed", history_length=1)
        assert [pb_text(m) for m in short.history] == ["echo: trimmed"]


async def test_list_tasks_paginates_and_filters(server: TetherServer) -> None:
    async with sdk(server.url) as client:
        first = await sdk_send(client, "echo page 0")
        ctx = first.context_id
        ids = [first.id]
        for i in range(1, 5):
            ids.append((await sdk_send(client, f"echo page {i}", context_id=ctx)).id)
        asked = await sdk_send(client, "ask", context_id=ctx)
        rejected = await sdk_send(client, "reject", context_id=ctx)
        other = await sdk_send(client, "echo elsewhere")

        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = await client.list_tasks(
                pb.ListTasksRequest(context_id=ctx, page_size=3, page_token=token)
            )
            pages += 1
            assert page.total_size == 7
            assert page.page_size == 3
            assert len(page.tasks) <= 3
            seen += [t.id for t in page.tasks]
            assert all(t.context_id == ctx for t in page.tasks)
            # Artifacts are left out unless asked for.
            assert all(len(t.artifacts) == 0 for t in page.tasks)
            token = page.next_page_token
            if not token:
                break
            assert pages < 10, "pagination does not end"
        assert pages == 3
        assert sorted(seen) == sorted([*ids, asked.id, rejected.id])
        assert other.id not in seen

        # Newest status first, across pages.
        everything = await client.list_tasks(pb.ListTasksRequest(context_id=ctx, page_size=100))
        stamps = [t.status.timestamp.ToMilliseconds() for t in everything.tasks]
        assert stamps == sorted(stamps, reverse=True)
        assert [t.id for t in everything.tasks] == seen

        waiting = await client.list_tasks(
            pb.ListTasksRequest(context_id=ctx, status=pb.TASK_STATE_INPUT_REQUIRED)
        )
        assert [t.id for t in waiting.tasks] == [asked.id]
        assert waiting.total_size == 1 and waiting.next_page_token == ""
        done = await client.list_tasks(
            pb.ListTasksRequest(context_id=ctx, status=pb.TASK_STATE_COMPLETED)
        )
        assert sorted(t.id for t in done.tasks) == sorted(ids)
        refused = await client.list_tasks(
            pb.ListTasksRequest(context_id=ctx, status=pb.TASK_STATE_REJECTED)
        )
        assert [t.id for t in refused.tasks] == [rejected.id]


async def test_cancel_task(server: TetherServer) -> None:
    name = new_id()
    async with sdk(server.url) as client:
        task = await sdk_send(client, f"block {name}", return_immediately=True)
        canceled = await client.cancel_task(pb.CancelTaskRequest(id=task.id))
        assert canceled.id == task.id
        assert canceled.status.state == pb.TASK_STATE_CANCELED
        fetched = await client.get_task(pb.GetTaskRequest(id=task.id))
        assert fetched.status.state == pb.TASK_STATE_CANCELED


async def test_errors_reach_the_sdk_as_typed_errors(server: TetherServer) -> None:
    async with sdk(server.url) as client:
        with pytest.raises(TaskNotFoundError):
            await client.get_task(pb.GetTaskRequest(id=new_id()))
        with pytest.raises(TaskNotFoundError):
            await client.cancel_task(pb.CancelTaskRequest(id=new_id()))
        done = await sdk_send(client, "echo finished")
        with pytest.raises(TaskNotCancelableError):
            await client.cancel_task(pb.CancelTaskRequest(id=done.id))
        # A finished task takes no more messages.
        with pytest.raises(UnsupportedOperationError):
            await sdk_send(client, "echo again", task_id=done.id)
        with pytest.raises(TaskNotFoundError):
            await sdk_send(client, "echo to nowhere", task_id=new_id())


async def test_idempotent_send_returns_the_existing_task(server: TetherServer) -> None:
    message_id = new_id()
    async with sdk(server.url) as client:
        first = await sdk_send(client, "echo once", message_id=message_id)
        again = await sdk_send(client, "echo once", message_id=message_id)
        # Even a different text under the same messageId is the same message, already accepted.
        third = await sdk_send(client, "echo twice?", message_id=message_id)
        assert again.id == first.id == third.id
        assert again.status.state == pb.TASK_STATE_COMPLETED
        listed = await client.list_tasks(pb.ListTasksRequest(context_id=first.context_id))
        assert [t.id for t in listed.tasks] == [first.id]
        assert [pb_text(m) for m in again.history] == ["echo once", "echo: once"]


async def test_idempotent_send_while_the_task_is_still_running(server: TetherServer) -> None:
    gate, message_id = new_id(), new_id()
    async with sdk(server.url) as client:
        first = await sdk_send(
            client, f"progress {gate}", message_id=message_id, return_immediately=True
        )
        again = await sdk_send(
            client, f"progress {gate}", message_id=message_id, return_immediately=True
        )
        assert again.id == first.id
        (server.marks / f"{gate}.go").write_text("")
        # Blocking re-send of the same message waits for the one task to finish.
        final = await sdk_send(client, f"progress {gate}", message_id=message_id)
        assert final.id == first.id
        assert final.status.state == pb.TASK_STATE_COMPLETED


async def test_sdk_send_with_a_message_object(server: TetherServer) -> None:
    """``pb_message`` round trip: a message the client built keeps its id in history."""
    msg = pb_message("echo kept")
    async with sdk(server.url) as client:
        responses = [r async for r in client.send_message(pb.SendMessageRequest(message=msg))]
    task = responses[0].task
    assert task.history[0].message_id == msg.message_id
    assert task.history[0].task_id == task.id


async def test_list_tasks_treats_default_values_as_no_filter(server: TetherServer) -> None:
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        task = await send(http, server.url, "echo defaults")
        page = result(
            await rpc(
                http,
                server.url,
                "ListTasks",
                {"contextId": "", "status": "TASK_STATE_UNSPECIFIED", "pageToken": ""},
            )
        )
    assert task["id"] in [t["id"] for t in page["tasks"]]


async def test_list_tasks_status_timestamp_after_is_utc(tether_server: ServerFactory) -> None:
    # A server whose local time is not UTC: a timestamp without an offset is still UTC.
    server = tether_server(env={"TZ": "Asia/Tokyo"})
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        task = await send(http, server.url, "echo when")
        stamp = datetime.fromisoformat(task["status"]["timestamp"])

        async def after(moment: datetime, *, offset: bool) -> list[str]:
            text = moment.isoformat() if offset else moment.replace(tzinfo=None).isoformat()
            page = result(await rpc(http, server.url, "ListTasks", {"statusTimestampAfter": text}))
            return [t["id"] for t in page["tasks"]]

        second = timedelta(seconds=1)
        for offset in (True, False):
            assert await after(stamp - second, offset=offset) == [task["id"]], offset
            assert await after(stamp + second, offset=offset) == [], offset
