"""The official a2a-sdk client streams and resubscribes against a real uvicorn server.

Both of the card's 1.0 bindings: JSON-RPC (``POST /``) and HTTP+JSON (``/message:stream``,
``/tasks/{id}:subscribe``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from a2a.client import Client, ClientCallContext, ClientConfig, ClientFactory
from a2a.types import a2a_pb2 as pb
from a2a.utils.errors import TaskNotFoundError, UnsupportedOperationError

from .agents import GATES, agent
from .harness import TIMEOUT, serve

BINDINGS = ["JSONRPC", "HTTP+JSON"]


@asynccontextmanager
async def sdk_client(url: str, binding: str) -> AsyncIterator[Client]:
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        config = ClientConfig(
            streaming=True, httpx_client=http, supported_protocol_bindings=[binding]
        )
        client = await ClientFactory(config).create_from_url(url)
        try:
            yield client
        finally:
            await client.close()


def request(text: str, *, task_id: str = "", context_id: str = "") -> pb.SendMessageRequest:
    msg = pb.Message(
        message_id=str(uuid.uuid4()),
        role=pb.ROLE_USER,
        parts=[pb.Part(text=text)],
        task_id=task_id,
        context_id=context_id,
    )
    return pb.SendMessageRequest(message=msg)


def kind(response: pb.StreamResponse) -> str:
    return str(response.WhichOneof("payload"))


def text(response: pb.StreamResponse) -> str:
    if response.HasField("artifact_update"):
        parts = response.artifact_update.artifact.parts
    elif response.HasField("status_update"):
        parts = response.status_update.status.message.parts
    else:
        return ""
    return "".join(p.text for p in parts)


def numbers(responses: list[pb.StreamResponse]) -> list[int]:
    return [int(text(r)) for r in responses if text(r).isdigit()]


def state(response: pb.StreamResponse) -> int:
    if response.HasField("task"):
        return int(response.task.status.state)
    return int(response.status_update.status.state)


@pytest.mark.parametrize("binding", BINDINGS)
async def test_stream_starts_with_the_task_and_ends_when_it_completes(binding: str) -> None:
    async with serve(agent) as server, sdk_client(server.url, binding) as client:
        responses = [r async for r in client.send_message(request("count 20"))]

    assert kind(responses[0]) == "task"
    task = responses[0].task
    assert task.status.state == pb.TASK_STATE_SUBMITTED
    assert [kind(r) for r in responses[1:]] == (
        ["status_update"] + ["status_update", "artifact_update"] * 10 + ["status_update"]
    )
    assert numbers(responses) == list(range(1, 21))
    assert state(responses[-1]) == pb.TASK_STATE_COMPLETED
    assert text(responses[-1]) == "done"
    for r in responses[1:]:
        update = r.status_update if r.HasField("status_update") else r.artifact_update
        assert (update.task_id, update.context_id) == (task.id, task.context_id)
    chunks = [r.artifact_update for r in responses if r.HasField("artifact_update")]
    assert [c.append for c in chunks] == [False] + [True] * 9
    assert [c.last_chunk for c in chunks] == [False] * 9 + [True]
    assert len({c.artifact.artifact_id for c in chunks}) == 1


@pytest.mark.parametrize("binding", BINDINGS)
async def test_dropped_stream_resumes_with_last_event_id(binding: str) -> None:
    """The snapshot is event 1 and ids have no gaps, so the k-th update is event 1 + k."""
    async with serve(agent, db="memory://") as server, sdk_client(server.url, binding) as client:
        received: list[pb.StreamResponse] = []
        stream = client.send_message(request("count 40 0.01"))
        async for response in stream:
            received.append(response)
            if len(received) == 11:
                break
        await stream.aclose()  # drops the connection
        task_id = received[0].task.id
        last_event_id = len(received)  # the snapshot (id 1) and ten updates (ids 2..11)

        context = ClientCallContext(service_parameters={"Last-Event-ID": str(last_event_id)})
        resumed = [
            r
            async for r in client.subscribe(pb.SubscribeToTaskRequest(id=task_id), context=context)
        ]

    assert kind(resumed[0]) == "task"  # the current state, as the spec asks
    assert resumed[0].task.id == task_id
    assert numbers(received[1:] + resumed[1:]) == list(range(1, 41))
    assert state(resumed[-1]) == pb.TASK_STATE_COMPLETED


@pytest.mark.parametrize("binding", BINDINGS)
async def test_subscribe_to_a_running_task_then_see_it_finish(binding: str) -> None:
    key = f"sdk-{binding}"
    async with serve(agent) as server, sdk_client(server.url, binding) as client:
        first = client.send_message(request(f"gate {key}"))
        task = (await anext(first)).task
        await first.aclose()

        subscription = client.subscribe(pb.SubscribeToTaskRequest(id=task.id))
        snapshot = await anext(subscription)
        assert snapshot.HasField("task") and snapshot.task.id == task.id
        assert snapshot.task.status.state in (pb.TASK_STATE_SUBMITTED, pb.TASK_STATE_WORKING)
        GATES[key].set()
        rest = [r async for r in subscription]

    assert state(rest[-1]) == pb.TASK_STATE_COMPLETED
    assert text(rest[-1]) == "opened"


@pytest.mark.parametrize("binding", BINDINGS)
async def test_subscribe_errors_are_the_spec_errors(binding: str) -> None:
    async with serve(agent) as server, sdk_client(server.url, binding) as client:
        done = [r async for r in client.send_message(request("count 2"))]
        task_id = done[0].task.id
        with pytest.raises(UnsupportedOperationError):
            async for _ in client.subscribe(pb.SubscribeToTaskRequest(id=task_id)):
                pass
        with pytest.raises(TaskNotFoundError):
            async for _ in client.subscribe(pb.SubscribeToTaskRequest(id=str(uuid.uuid4()))):
                pass


@pytest.mark.parametrize("binding", BINDINGS)
async def test_multi_turn_over_streams(binding: str) -> None:
    async with serve(agent) as server, sdk_client(server.url, binding) as client:
        first = [r async for r in client.send_message(request("ask"))]
        task = first[0].task
        assert state(first[-1]) == pb.TASK_STATE_INPUT_REQUIRED
        assert text(first[-1]) == "What is your name?"

        # Only the task id: the context is the task's.
        second = [r async for r in client.send_message(request("Bob", task_id=task.id))]

    assert second[0].task.id == task.id
    assert second[0].task.context_id == task.context_id
    assert state(second[-1]) == pb.TASK_STATE_COMPLETED
    assert text(second[-1]) == "Hello, Bob!"
