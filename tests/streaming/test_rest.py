"""The A2A 1.0 HTTP+JSON binding (spec 11): every route, its results and its errors."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .agents import GATES, agent
from .harness import JSON, SSEReader, serve, user_message

A2A_JSON = "application/a2a+json"


def error_of(response: httpx.Response, status: int, reason: str) -> JSON:
    """Asserts a google.rpc.Status body (spec 11.6) and returns its ``error``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(A2A_JSON)
    error = dict(response.json()["error"])
    assert error["code"] == status
    assert isinstance(error["status"], str) and error["message"]
    info = error["details"][0]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert info["domain"] == "a2a-protocol.org"
    assert info["reason"] == reason
    return error


async def send(http: httpx.AsyncClient, url: str, text: str, **config: Any) -> JSON:
    body: JSON = {"message": user_message(text)}
    if config:
        body["configuration"] = config
    response = await http.post(f"{url}/message:send", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(A2A_JSON)
    return dict(response.json()["task"])


async def test_card_advertises_the_binding(http: httpx.AsyncClient) -> None:
    async with serve(agent) as server:
        card = (await http.get(f"{server.url}/.well-known/agent-card.json")).json()
    assert {"url": server.url, "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0"} in card[
        "supportedInterfaces"
    ]


async def test_message_send(http: httpx.AsyncClient) -> None:
    async with serve(agent) as server:
        task = await send(http, server.url, "count 2")
        assert task["status"]["state"] == "TASK_STATE_COMPLETED"
        assert task["status"]["message"]["parts"] == [{"text": "done"}]
        quick = await send(http, server.url, "gate rest-send", returnImmediately=True)
        assert quick["status"]["state"] in ("TASK_STATE_SUBMITTED", "TASK_STATE_WORKING")
        GATES["rest-send"].set()
        # The same body under application/a2a+json, as the spec recommends.
        body = b'{"message": {"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "x"}]}}'
        response = await http.post(
            f"{server.url}/message:send", content=body, headers={"Content-Type": A2A_JSON}
        )
        assert response.status_code == 200


async def test_message_send_errors(http: httpx.AsyncClient) -> None:
    async with serve(agent) as server:
        url = f"{server.url}/message:send"
        error_of(await http.post(url, content=b"{not json"), 400, "PARSE_ERROR")
        error_of(await http.post(url, json=[1, 2]), 400, "INVALID_REQUEST")
        error = error_of(await http.post(url, json={}), 400, "INVALID_PARAMS")
        assert error["status"] == "INVALID_ARGUMENT"
        violations = error["details"][1]
        assert violations["@type"] == "type.googleapis.com/google.rpc.BadRequest"
        assert violations["fieldViolations"][0]["field"] == "message"
        bad_part = {"message": {"messageId": "m1", "role": "ROLE_USER", "parts": []}}
        error_of(await http.post(url, json=bad_part), 400, "INVALID_PARAMS")
        unknown = {"message": user_message("hi", taskId="no-such-task")}
        error = error_of(await http.post(url, json=unknown), 404, "TASK_NOT_FOUND")
        assert error["status"] == "NOT_FOUND"
        done = await send(http, server.url, "count 1")
        again = {"message": user_message("more", taskId=done["id"])}
        error = error_of(await http.post(url, json=again), 400, "UNSUPPORTED_OPERATION")
        assert error["status"] == "FAILED_PRECONDITION"


async def test_message_stream(http: httpx.AsyncClient) -> None:
    async with serve(agent) as server:
        async with http.stream(
            "POST", f"{server.url}/message:stream", json={"message": user_message("count 2")}
        ) as response:
            assert response.status_code == 200
            frames = [f async for f in SSEReader(response)]
        assert [f.kind for f in frames] == [
            "task",
            "statusUpdate",
            "statusUpdate",
            "artifactUpdate",
            "statusUpdate",
        ]
        assert [f.id for f in frames] == [1, 2, 3, 4, 5]
        assert "jsonrpc" not in frames[0].data  # no envelope in this binding
        # Errors before the stream are plain HTTP errors.
        response = await http.post(f"{server.url}/message:stream", json={"message": {}})
        error_of(response, 400, "INVALID_PARAMS")


async def test_get_task(http: httpx.AsyncClient) -> None:
    async with serve(agent) as server:
        task = await send(http, server.url, "ask")
        response = await http.get(f"{server.url}/tasks/{task['id']}")
        assert response.status_code == 200
        got = response.json()
        assert got["id"] == task["id"] and got["status"]["state"] == "TASK_STATE_INPUT_REQUIRED"
        assert len(got["history"]) == 2
        trimmed = (await http.get(f"{server.url}/tasks/{task['id']}?historyLength=1")).json()
        assert [m["role"] for m in trimmed["history"]] == ["ROLE_AGENT"]
        none = (await http.get(f"{server.url}/tasks/{task['id']}?historyLength=0")).json()
        assert "history" not in none
        error_of(await http.get(f"{server.url}/tasks/nope"), 404, "TASK_NOT_FOUND")
        error_of(
            await http.get(f"{server.url}/tasks/{task['id']}?historyLength=-1"),
            400,
            "INVALID_PARAMS",
        )
        error_of(
            await http.get(f"{server.url}/tasks/{task['id']}?historyLength=many"),
            400,
            "INVALID_PARAMS",
        )


async def test_list_tasks(http: httpx.AsyncClient) -> None:
    async with serve(agent) as server:
        a = await send(http, server.url, "count 2")
        b = await send(http, server.url, "ask")
        c = await send(http, server.url, "count 1")
        page = (await http.get(f"{server.url}/tasks", params={"pageSize": 2})).json()
        assert [t["id"] for t in page["tasks"]] == [c["id"], b["id"]]
        assert page["totalSize"] == 3 and page["pageSize"] == 2 and page["nextPageToken"]
        assert all("artifacts" not in t for t in page["tasks"])
        rest = (
            await http.get(
                f"{server.url}/tasks",
                params={"pageSize": 2, "pageToken": page["nextPageToken"]},
            )
        ).json()
        assert [t["id"] for t in rest["tasks"]] == [a["id"]] and rest["nextPageToken"] == ""
        waiting = (
            await http.get(f"{server.url}/tasks", params={"status": "TASK_STATE_INPUT_REQUIRED"})
        ).json()
        assert [t["id"] for t in waiting["tasks"]] == [b["id"]]
        in_context = (
            await http.get(
                f"{server.url}/tasks",
                params={"contextId": a["contextId"], "includeArtifacts": "true"},
            )
        ).json()
        assert [t["id"] for t in in_context["tasks"]] == [a["id"]]
        assert "artifacts" in in_context["tasks"][0]
        for params in ({"pageSize": 0}, {"pageSize": "lots"}, {"status": "SLEEPING"}):
            error_of(await http.get(f"{server.url}/tasks", params=params), 400, "INVALID_PARAMS")
        error_of(
            await http.get(f"{server.url}/tasks", params={"pageToken": "garbage!"}),
            400,
            "INVALID_PARAMS",
        )


async def test_cancel_task(http: httpx.AsyncClient) -> None:
    async with serve(agent) as server:
        task = await send(http, server.url, "gate never", returnImmediately=True)
        response = await http.post(f"{server.url}/tasks/{task['id']}:cancel", json={})
        assert response.status_code == 200
        assert response.json()["status"]["state"] == "TASK_STATE_CANCELED"
        # An empty body is a CancelTaskRequest with no metadata, too.
        again = await http.post(f"{server.url}/tasks/{task['id']}:cancel")
        error = error_of(again, 400, "TASK_NOT_CANCELABLE")
        assert error["status"] == "FAILED_PRECONDITION"
        error_of(await http.post(f"{server.url}/tasks/nope:cancel"), 404, "TASK_NOT_FOUND")


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_subscribe(method: str, http: httpx.AsyncClient) -> None:
    key = f"rest-sub-{method}"
    async with serve(agent) as server:
        task = await send(http, server.url, f"gate {key}", returnImmediately=True)
        async with http.stream(method, f"{server.url}/tasks/{task['id']}:subscribe") as response:
            assert response.status_code == 200
            frames = []
            async for frame in SSEReader(response):
                frames.append(frame)
                GATES[key].set()
        assert frames[0].kind == "task" and frames[0].body["id"] == task["id"]
        assert frames[-1].state == "TASK_STATE_COMPLETED"
        done = await http.request(method, f"{server.url}/tasks/{task['id']}:subscribe")
        error_of(done, 400, "UNSUPPORTED_OPERATION")
        error_of(
            await http.request(method, f"{server.url}/tasks/nope:subscribe"), 404, "TASK_NOT_FOUND"
        )


async def test_operations_this_agent_does_not_offer(http: httpx.AsyncClient) -> None:
    async with serve(agent) as server:
        task = await send(http, server.url, "count 1")
        base = f"{server.url}/tasks/{task['id']}/pushNotificationConfigs"
        for response in (
            await http.post(base, json={"url": "https://example.com/hook"}),
            await http.get(base),
            await http.get(f"{base}/c1"),
            await http.delete(f"{base}/c1"),
        ):
            error_of(response, 400, "PUSH_NOTIFICATION_NOT_SUPPORTED")
        card = await http.get(f"{server.url}/extendedAgentCard")
        error_of(card, 400, "UNSUPPORTED_OPERATION")


async def test_wrong_method_and_version(http: httpx.AsyncClient) -> None:
    async with serve(agent) as server:
        response = await http.get(f"{server.url}/message:send")
        assert response.status_code == 405
        assert response.headers["allow"] == "POST"
        assert response.json()["error"]["code"] == 405
        response = await http.delete(f"{server.url}/tasks/abc")
        assert response.status_code == 405 and response.headers["allow"] == "GET"
        old = await http.get(f"{server.url}/tasks", headers={"A2A-Version": "0.3"})
        error_of(old, 400, "VERSION_NOT_SUPPORTED")
        future = await http.get(f"{server.url}/tasks", headers={"A2A-Version": "2.0"})
        error_of(future, 400, "VERSION_NOT_SUPPORTED")
        ok = await http.get(f"{server.url}/tasks", headers={"A2A-Version": "1.0"})
        assert ok.status_code == 200


async def test_authentication_and_ownership(http: httpx.AsyncClient) -> None:
    keys = {"alice-key": "alice", "bob-key": "bob"}
    alice = {"Authorization": "Bearer alice-key"}
    bob = {"Authorization": "Bearer bob-key"}
    async with serve(agent, api_keys=keys) as server:
        response = await http.post(
            f"{server.url}/message:send", json={"message": user_message("count 1")}
        )
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["status"] == "UNAUTHENTICATED"
        response = await http.post(
            f"{server.url}/message:send",
            json={"message": user_message("count 1")},
            headers=alice,
        )
        task = response.json()["task"]
        assert (
            await http.get(f"{server.url}/tasks/{task['id']}", headers=alice)
        ).status_code == 200
        theirs = await http.get(f"{server.url}/tasks/{task['id']}", headers=bob)
        error_of(theirs, 404, "TASK_NOT_FOUND")
        listed = (await http.get(f"{server.url}/tasks", headers=bob)).json()
        assert listed["tasks"] == []
        sub = await http.get(
            f"{server.url}/tasks/{task['id']}:subscribe",
            headers={**bob, "Last-Event-ID": "0"},
        )
        error_of(sub, 404, "TASK_NOT_FOUND")
