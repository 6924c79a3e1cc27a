"""The same operations by their A2A 0.3 names, with 0.3 shapes, over raw HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from a2a.client import A2ACardResolver, ClientConfig, ClientFactory
from a2a.types import a2a_pb2 as pb
from a2a.utils.errors import TaskNotCancelableError, TaskNotFoundError

from .helpers import (
    HTTP_TIMEOUT,
    message_03,
    new_id,
    pb_text,
    result,
    rpc,
    rpc03,
    sdk_send,
    wait_state,
)
from .server import TetherServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
        yield client


def _text(msg: dict[str, object]) -> str:
    parts = msg["parts"]
    assert isinstance(parts, list)
    return "\n".join(p["text"] for p in parts if p.get("kind") == "text")


@pytest.mark.parametrize("version", [None, "0.3", "0.3.0"])
async def test_message_send_returns_a_03_task(
    server: TetherServer, http: httpx.AsyncClient, version: str | None
) -> None:
    task = result(
        await rpc(
            http,
            server.url,
            "message/send",
            {"message": message_03("artifact")},
            version=version,
        )
    )
    assert task["kind"] == "task"
    assert task["status"]["state"] == "completed"
    status_msg = task["status"]["message"]
    assert status_msg["kind"] == "message"
    assert status_msg["role"] == "agent"
    assert _text(status_msg) == "two artifacts attached"
    assert [a["name"] for a in task["artifacts"]] == ["report", "table"]
    assert task["artifacts"][0]["parts"] == [{"kind": "text", "text": "the report body"}]
    assert task["artifacts"][1]["parts"] == [{"kind": "data", "data": {"rows": 3}}]
    assert [m["role"] for m in task["history"]] == ["user", "agent"]
    assert all(m["kind"] == "message" for m in task["history"])


async def test_message_send_blocking_false_returns_at_once(
    server: TetherServer, http: httpx.AsyncClient
) -> None:
    gate = new_id()
    task = result(
        await rpc03(
            http,
            server.url,
            "message/send",
            {"message": message_03(f"progress {gate}"), "configuration": {"blocking": False}},
        )
    )
    assert task["status"]["state"] in ("submitted", "working")
    (server.marks / f"{gate}.go").write_text("")
    await wait_state(http, server.url, task["id"], "TASK_STATE_COMPLETED")
    done = result(await rpc03(http, server.url, "tasks/get", {"id": task["id"]}))
    assert done["status"]["state"] == "completed"


async def test_tasks_get_with_history_length(server: TetherServer, http: httpx.AsyncClient) -> None:
    asked = result(await rpc03(http, server.url, "message/send", {"message": message_03("ask")}))
    assert asked["status"]["state"] == "input-required"
    follow_up = message_03("Lin", taskId=asked["id"], contextId=asked["contextId"])
    done = result(await rpc03(http, server.url, "message/send", {"message": follow_up}))
    assert done["id"] == asked["id"] and done["status"]["state"] == "completed"
    assert _text(done["status"]["message"]) == "Hello, Lin"

    got = result(
        await rpc03(http, server.url, "tasks/get", {"id": asked["id"], "historyLength": 2})
    )
    assert [_text(m) for m in got["history"]] == ["Lin", "Hello, Lin"]
    everything = result(await rpc03(http, server.url, "tasks/get", {"id": asked["id"]}))
    assert len(everything["history"]) == 4
    none = result(
        await rpc03(http, server.url, "tasks/get", {"id": asked["id"], "historyLength": 0})
    )
    assert "history" not in none


async def test_tasks_list_and_cancel(server: TetherServer, http: httpx.AsyncClient) -> None:
    first = result(await rpc03(http, server.url, "message/send", {"message": message_03("echo a")}))
    ctx = first["contextId"]
    name = new_id()
    blocked = result(
        await rpc03(
            http,
            server.url,
            "message/send",
            {
                "message": message_03(f"block {name}", contextId=ctx),
                "configuration": {"blocking": False},
            },
        )
    )
    listed = result(await rpc03(http, server.url, "tasks/list", {"contextId": ctx}))
    assert {t["id"] for t in listed["tasks"]} == {first["id"], blocked["id"]}
    assert all(t["kind"] == "task" for t in listed["tasks"])
    assert listed["totalSize"] == 2 and listed["nextPageToken"] == ""

    only_done = result(
        await rpc03(http, server.url, "tasks/list", {"contextId": ctx, "status": "completed"})
    )
    assert [t["id"] for t in only_done["tasks"]] == [first["id"]]

    canceled = result(await rpc03(http, server.url, "tasks/cancel", {"id": blocked["id"]}))
    assert canceled["kind"] == "task"
    assert canceled["status"]["state"] == "canceled"
    again = await rpc03(http, server.url, "tasks/cancel", {"id": blocked["id"]})
    assert again["error"]["code"] == -32002
    missing = await rpc03(http, server.url, "tasks/get", {"id": new_id()})
    assert missing["error"]["code"] == -32001


async def test_idempotent_message_send(server: TetherServer, http: httpx.AsyncClient) -> None:
    msg = message_03("echo same")
    first = result(await rpc03(http, server.url, "message/send", {"message": msg}))
    again = result(await rpc03(http, server.url, "message/send", {"message": msg}))
    assert again["id"] == first["id"]
    # The same messageId under the 1.0 names is the same message too.
    v10 = {**msg, "role": "ROLE_USER", "parts": [{"text": "echo same"}]}
    v10.pop("kind")
    third = result(await rpc(http, server.url, "SendMessage", {"message": v10}))
    assert third["task"]["id"] == first["id"]


async def test_the_sdk_0_3_transport(server: TetherServer) -> None:
    """The official client's own 0.3 JSON-RPC transport, chosen from the card's 0.3 interface."""
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        card = await A2ACardResolver(http, server.url).get_agent_card()
        legacy = [i for i in card.supported_interfaces if i.protocol_version == "0.3"]
        assert legacy, "the card offers a 0.3 interface"
        del card.supported_interfaces[:]
        card.supported_interfaces.extend(legacy)
        client = ClientFactory(ClientConfig(streaming=False, httpx_client=http)).create(card)
        asked = await sdk_send(client, "ask")
        assert asked.status.state == pb.TASK_STATE_INPUT_REQUIRED
        done = await sdk_send(client, "Bo", task_id=asked.id, context_id=asked.context_id)
        assert done.status.state == pb.TASK_STATE_COMPLETED
        assert pb_text(done.status.message) == "Hello, Bo"
        got = await client.get_task(pb.GetTaskRequest(id=asked.id, history_length=1))
        assert [pb_text(m) for m in got.history] == ["Hello, Bo"]
        with pytest.raises(TaskNotCancelableError):
            await client.cancel_task(pb.CancelTaskRequest(id=asked.id))
        with pytest.raises(TaskNotFoundError):
            await client.get_task(pb.GetTaskRequest(id=new_id()))
