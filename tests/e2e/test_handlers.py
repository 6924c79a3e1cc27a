"""What a handler may do, seen from a client: every way a task can end or report progress."""

from __future__ import annotations

import sqlite3

import httpx
import pytest
from a2a.types import a2a_pb2 as pb
from google.protobuf.json_format import MessageToDict

from .conftest import ServerFactory
from .helpers import (
    HTTP_TIMEOUT,
    JSON,
    assert_no_stack_trace,
    eventually,
    get_task,
    new_id,
    pb_text,
    sdk,
    sdk_send,
    text_of,
    wait_state,
)
from .server import TetherServer

pytestmark = pytest.mark.timeout(120)


async def test_returning_a_string_completes_with_it(server: TetherServer) -> None:
    async with sdk(server.url) as client:
        task = await sdk_send(client, "echo plain text")
    assert task.status.state == pb.TASK_STATE_COMPLETED
    assert pb_text(task.status.message) == "echo: plain text"


async def test_returning_parts_completes_with_them(server: TetherServer) -> None:
    async with sdk(server.url) as client:
        task = await sdk_send(client, "parts")
    assert task.status.state == pb.TASK_STATE_COMPLETED
    parts = task.status.message.parts
    assert len(parts) == 2
    assert parts[0].text == "first part"
    assert MessageToDict(parts[1].data) == {"answer": 42}


async def test_returning_a_message_completes_with_it(server: TetherServer) -> None:
    async with sdk(server.url) as client:
        task = await sdk_send(client, "message")
    assert task.status.state == pb.TASK_STATE_COMPLETED
    msg = task.status.message
    assert msg.role == pb.ROLE_AGENT
    assert pb_text(msg) == "a whole message"
    assert MessageToDict(msg.metadata) == {"source": "e2e"}
    # The runtime names the task and context on the handler's message.
    assert msg.task_id == task.id and msg.context_id == task.context_id
    assert msg.message_id


async def test_artifacts(server: TetherServer) -> None:
    async with sdk(server.url) as client:
        task = await sdk_send(client, "artifact")
        assert task.status.state == pb.TASK_STATE_COMPLETED
        assert [a.name for a in task.artifacts] == ["report", "table"]
        report, table = task.artifacts
        assert report.description == "a text artifact"
        assert pb_text(report) == "the report body"
        assert MessageToDict(table.parts[0].data) == {"rows": 3}
        assert report.artifact_id != table.artifact_id
        # ListTasks includes them only on request.
        with_artifacts = await client.list_tasks(
            pb.ListTasksRequest(context_id=task.context_id, include_artifacts=True)
        )
        assert [a.name for a in with_artifacts.tasks[0].artifacts] == ["report", "table"]


async def test_intermediate_status_update_is_visible_while_working(server: TetherServer) -> None:
    gate = new_id()
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http, sdk(server.url) as client:
        task = await sdk_send(client, f"progress {gate}", return_immediately=True)

        async def progress() -> JSON | None:
            seen = await get_task(http, server.url, task.id)
            status = seen["status"]
            if status["state"] == "TASK_STATE_WORKING" and "message" in status:
                return seen
            return None

        working = await eventually(progress, what="the working status message")
        assert text_of(working["status"]["message"]) == "halfway there"
        assert working["status"]["message"]["role"] == "ROLE_AGENT"
        (server.marks / f"{gate}.go").write_text("")
        done = await wait_state(http, server.url, task.id, "TASK_STATE_COMPLETED")
    assert text_of(done["status"]["message"]) == "finished"
    # The event log holds the update between working and completed, in order.
    with sqlite3.connect(f"file:{server.db}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT seq, payload FROM events WHERE task_id = ? ORDER BY seq", (task.id,)
        ).fetchall()
    assert [seq for seq, _ in rows] == list(range(1, len(rows) + 1))
    payloads = [p for _, p in rows]
    assert "TASK_STATE_SUBMITTED" in payloads[0]
    assert "TASK_STATE_WORKING" in payloads[1]
    assert "halfway there" in payloads[2]
    assert "TASK_STATE_COMPLETED" in payloads[-1]


async def test_raising_fails_the_task_with_the_message_only(server: TetherServer) -> None:
    async with sdk(server.url) as client:
        task = await sdk_send(client, "fail")
    assert task.status.state == pb.TASK_STATE_FAILED
    text = pb_text(task.status.message)
    assert text == "the answer was 41, not 42"
    assert_no_stack_trace(str(task))


async def test_retryable_handler_error_runs_again(server: TetherServer) -> None:
    async with sdk(server.url) as client:
        task = await sdk_send(client, "retry 3")
    assert task.status.state == pb.TASK_STATE_COMPLETED
    assert pb_text(task.status.message) == "ok on attempt 3"


async def test_a_result_that_is_no_message_fails_at_once(server: TetherServer) -> None:
    async with sdk(server.url) as client:
        task = await sdk_send(client, "bad-result")
    assert task.status.state == pb.TASK_STATE_FAILED
    assert "int" in pb_text(task.status.message)
    assert_no_stack_trace(str(task))


async def test_input_required_then_resumed_with_history(server: TetherServer) -> None:
    async with sdk(server.url) as client:
        asked = await sdk_send(client, "ask")
        assert asked.status.state == pb.TASK_STATE_INPUT_REQUIRED
        assert pb_text(asked.status.message) == "What is your name?"
        answered = await sdk_send(client, "Grace", task_id=asked.id, context_id=asked.context_id)
    assert answered.id == asked.id
    assert answered.status.state == pb.TASK_STATE_COMPLETED
    assert pb_text(answered.status.message) == "Hello, Grace"


async def test_reject(server: TetherServer) -> None:
    async with sdk(server.url) as client:
        task = await sdk_send(client, "reject")
        assert task.status.state == pb.TASK_STATE_REJECTED
        assert pb_text(task.status.message) == "I do not do that"
        # Nothing leaves a terminal state: no further message, no cancel.
        with pytest.raises(Exception, match="rejected"):
            await sdk_send(client, "echo please", task_id=task.id)
        after = await client.get_task(pb.GetTaskRequest(id=task.id))
    assert after.status.state == pb.TASK_STATE_REJECTED


async def test_an_answer_the_store_refuses_fails_at_once(server: TetherServer) -> None:
    async with sdk(server.url) as client:
        await sdk_send(client, "fixed-id")  # the first use of that messageId is fine
        task = await sdk_send(client, "fixed-id")
    assert task.status.state == pb.TASK_STATE_FAILED
    assert "refused" in pb_text(task.status.message)
    assert_no_stack_trace(str(task))


async def test_a_timeout_error_of_the_handler_is_not_a_deadline(server: TetherServer) -> None:
    async with sdk(server.url) as client:
        task = await sdk_send(client, "own-timeout")
    assert task.status.state == pb.TASK_STATE_FAILED
    assert pb_text(task.status.message) == "the upstream service took too long"


async def test_agent_timeout_fails_a_slow_handler(tether_server: ServerFactory) -> None:
    server = tether_server("tests.e2e.agents:timed")
    name = new_id()
    async with sdk(server.url) as client:
        task = await sdk_send(client, f"block {name}")
        quick = await sdk_send(client, "echo in time")
    assert task.status.state == pb.TASK_STATE_FAILED
    assert pb_text(task.status.message) == "Timed out after 0.5s"
    assert (server.marks / f"{name}.stopped").read_text() == "canceled"
    assert quick.status.state == pb.TASK_STATE_COMPLETED


async def test_an_async_callable_object_handler(tether_server: ServerFactory) -> None:
    server = tether_server("tests.e2e.agents:callable_agent")
    async with sdk(server.url) as client:
        task = await sdk_send(client, "hi")
    assert task.status.state == pb.TASK_STATE_COMPLETED
    assert pb_text(task.status.message) == "hello from an object: hi"
