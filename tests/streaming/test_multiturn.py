"""Multi-turn conversations (spec 3.4): input-required, resuming a task, context rules."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .agents import GATES, agent
from .harness import JSON, call, read_stream, send, serve, user_message

TASK_NOT_FOUND = -32001
UNSUPPORTED_OPERATION = -32004
INVALID_PARAMS = -32602


def seen(task: JSON) -> JSON:
    """The data the ``ask``/``recall`` handler stored of what it saw."""
    (artifact,) = [a for a in task.get("artifacts", []) if a.get("name") == "seen"]
    return dict(artifact["parts"][0]["data"])


def texts(task: JSON) -> list[str]:
    return [
        f"{m['role']}: " + "".join(p.get("text", "") for p in m["parts"]) for m in task["history"]
    ]


async def send_error(http: httpx.AsyncClient, url: str, text: str, **extra: Any) -> JSON:
    body = await call(http, url, "SendMessage", {"message": user_message(text, **extra)})
    assert "error" in body, body
    return dict(body["error"])


async def test_ask_answer_complete_with_the_history_the_handler_saw(
    http: httpx.AsyncClient,
) -> None:
    async with serve(agent) as server:
        asked = await send(http, server.url, "ask")
        assert asked["status"]["state"] == "TASK_STATE_INPUT_REQUIRED"
        assert asked["status"]["message"]["parts"] == [{"text": "What is your name?"}]

        answered = await send(
            http, server.url, "Bob", taskId=asked["id"], contextId=asked["contextId"]
        )

    assert (answered["id"], answered["contextId"]) == (asked["id"], asked["contextId"])
    assert answered["status"]["state"] == "TASK_STATE_COMPLETED"
    assert answered["status"]["message"]["parts"] == [{"text": "Hello, Bob!"}]
    # The second run of the handler saw the whole conversation so far.
    assert seen(answered)["history"] == [
        "ROLE_USER: ask",
        "ROLE_AGENT: What is your name?",
        "ROLE_USER: Bob",
    ]
    assert texts(answered) == [
        "ROLE_USER: ask",
        "ROLE_AGENT: What is your name?",
        "ROLE_USER: Bob",
        "ROLE_AGENT: Hello, Bob!",
    ]


async def test_a_message_with_only_the_task_id_inherits_its_context(
    http: httpx.AsyncClient,
) -> None:
    async with serve(agent) as server:
        asked = await send(http, server.url, "ask")
        answered = await send(http, server.url, "Ann", taskId=asked["id"])

    assert answered["contextId"] == asked["contextId"]
    assert answered["status"]["state"] == "TASK_STATE_COMPLETED"
    answer = next(m for m in answered["history"] if "Ann" in str(m["parts"]))
    assert (answer["taskId"], answer["contextId"]) == (asked["id"], asked["contextId"])


async def test_a_mismatched_context_is_rejected_and_changes_nothing(
    http: httpx.AsyncClient,
) -> None:
    async with serve(agent) as server:
        asked = await send(http, server.url, "ask")
        error = await send_error(
            http, server.url, "Eve", taskId=asked["id"], contextId="some-other-context"
        )
        assert error["code"] == INVALID_PARAMS
        assert "does not match" in error["message"]
        task = (await call(http, server.url, "GetTask", {"id": asked["id"]}))["result"]
        assert task["status"]["state"] == "TASK_STATE_INPUT_REQUIRED"
        assert len(task["history"]) == 2

        rest = await http.post(
            f"{server.url}/message:send",
            json={"message": user_message("Eve", taskId=asked["id"], contextId="other")},
        )
        assert rest.status_code == 400
        assert rest.json()["error"]["details"][0]["reason"] == "INVALID_PARAMS"


@pytest.mark.parametrize("ending", ["completed", "canceled"])
async def test_a_message_to_a_finished_task_is_unsupported_operation(
    ending: str, http: httpx.AsyncClient
) -> None:
    async with serve(agent) as server:
        if ending == "completed":
            task = await send(http, server.url, "count 1")
        else:
            task = await send(http, server.url, "ask")
            await call(http, server.url, "CancelTask", {"id": task["id"]})
        error = await send_error(http, server.url, "more", taskId=task["id"])
        assert error["code"] == UNSUPPORTED_OPERATION
        assert error["data"][0]["metadata"]["state"] == f"TASK_STATE_{ending.upper()}"

        # The streaming send refuses it the same way, before any stream starts.
        body = await call(
            http,
            server.url,
            "SendStreamingMessage",
            {"message": user_message("more", taskId=task["id"])},
        )
        assert body["error"]["code"] == UNSUPPORTED_OPERATION

        rest = await http.post(
            f"{server.url}/message:send",
            json={"message": user_message("more", taskId=task["id"])},
        )
        assert rest.status_code == 400
        assert rest.json()["error"]["details"][0]["reason"] == "UNSUPPORTED_OPERATION"


async def test_a_message_to_a_task_that_is_still_working_is_refused(
    http: httpx.AsyncClient,
) -> None:
    async with serve(agent) as server:
        params = {
            "message": user_message("gate busy"),
            "configuration": {"returnImmediately": True},
        }
        task = (await call(http, server.url, "SendMessage", params))["result"]["task"]
        error = await send_error(http, server.url, "hurry", taskId=task["id"])
        GATES["busy"].set()
        assert error["code"] == UNSUPPORTED_OPERATION


async def test_an_unknown_task_id_is_task_not_found(http: httpx.AsyncClient) -> None:
    async with serve(agent) as server:
        error = await send_error(http, server.url, "hi", taskId="no-such-task")
    assert error["code"] == TASK_NOT_FOUND


async def test_a_new_task_in_an_existing_context_sees_that_contexts_history(
    http: httpx.AsyncClient,
) -> None:
    async with serve(agent) as server:
        asked = await send(http, server.url, "ask")
        await send(http, server.url, "Bob", taskId=asked["id"])
        recalled = await send(http, server.url, "recall", contextId=asked["contextId"])
        elsewhere = await send(http, server.url, "recall")

    assert recalled["id"] != asked["id"]
    assert recalled["contextId"] == asked["contextId"]
    assert seen(recalled)["context"] == [
        "ROLE_USER: ask",
        "ROLE_AGENT: What is your name?",
        "ROLE_USER: Bob",
        "ROLE_AGENT: Hello, Bob!",
        "ROLE_USER: recall",
    ]
    # The new task's own history is its own.
    assert texts(recalled) == ["ROLE_USER: recall", "ROLE_AGENT: recalled"]
    assert seen(elsewhere)["context"] == ["ROLE_USER: recall"]


async def test_turns_stream_with_ids_that_run_on_across_turns(http: httpx.AsyncClient) -> None:
    async with serve(agent) as server:
        first = await read_stream(
            http, server.url, "SendStreamingMessage", {"message": user_message("ask")}
        )
        task_id = first[0].body["id"]
        asked_at = first[-1].id
        assert first[-1].state == "TASK_STATE_INPUT_REQUIRED"
        assert asked_at is not None

        second = await read_stream(
            http,
            server.url,
            "SendStreamingMessage",
            {"message": user_message("Bob", taskId=task_id)},
        )
        # Resubscribing after the question replays the second turn, and only it.
        replay = await read_stream(
            http,
            server.url,
            "SubscribeToTask",
            {"id": task_id},
            headers={"Last-Event-ID": str(asked_at)},
        )

    snapshot = second[0]
    assert snapshot.kind == "task" and snapshot.body["id"] == task_id
    assert snapshot.state == "TASK_STATE_SUBMITTED"
    assert snapshot.id == asked_at + 1  # the follow-up's own event
    ids = [f.id for f in second[1:]]
    assert ids == list(range(asked_at + 2, asked_at + 2 + len(ids)))
    assert second[-1].state == "TASK_STATE_COMPLETED"
    assert [f.id for f in replay[1:]] == [asked_at + 1, *ids]
    assert replay[1].state == "TASK_STATE_SUBMITTED"


async def test_resending_the_same_follow_up_does_not_start_another_turn(
    http: httpx.AsyncClient,
) -> None:
    async with serve(agent) as server:
        asked = await send(http, server.url, "ask")
        answer = user_message("Bob", taskId=asked["id"])
        once = (await call(http, server.url, "SendMessage", {"message": answer}))["result"]
        twice = (await call(http, server.url, "SendMessage", {"message": answer}))["result"]

    assert once["task"]["id"] == twice["task"]["id"] == asked["id"]
    assert len(twice["task"]["history"]) == len(once["task"]["history"]) == 4
