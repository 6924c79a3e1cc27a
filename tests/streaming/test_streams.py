"""What a stream is: its frames and ids, resume and reset, fan-out, disconnects, slow readers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tether import Agent, Context
from tether.core.types import now
from tether.server.sse import REPLAY_KEY

from .agents import GATES, agent
from .harness import (
    TIMEOUT,
    Frame,
    SSEReader,
    call,
    events_only,
    read_stream,
    rpc,
    send,
    serve,
    user_message,
)

UNSUPPORTED_OPERATION = -32004
INVALID_PARAMS = -32602
UNAVAILABLE = -32050


def stream_params(text: str) -> dict[str, Any]:
    return {"message": user_message(text)}


async def wait_until(probe: Any, what: str, within: float = TIMEOUT) -> None:
    """For state no event announces (the server noticing a disconnect): a bounded poll."""
    deadline = time.monotonic() + within
    while True:
        done = probe()
        if asyncio.iscoroutine(done):
            done = await done
        if done:
            return
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.02)


# -- frames and ids ------------------------------------------------------------


async def test_task_first_then_contiguous_ids_then_close_on_completion(
    http: httpx.AsyncClient,
) -> None:
    async with serve(agent) as server:
        frames = await read_stream(
            http, server.url, "SendStreamingMessage", stream_params("count 6")
        )

    first, *updates = frames
    assert first.kind == "task" and first.id == 1
    assert first.state == "TASK_STATE_SUBMITTED"
    # The submitted event (1) is the snapshot itself: it is not sent again.
    assert [f.id for f in updates] == list(range(2, 2 + len(updates)))
    assert [f.kind for f in updates] == ["statusUpdate"] + [
        "statusUpdate",
        "artifactUpdate",
    ] * 3 + ["statusUpdate"]
    assert [f.text for f in updates[1:-1]] == [str(i) for i in range(1, 7)]
    assert updates[-1].state == "TASK_STATE_COMPLETED"


async def test_stream_snapshot_honours_history_length(http: httpx.AsyncClient) -> None:
    params = {"message": user_message("count 1"), "configuration": {"historyLength": 0}}
    async with serve(agent) as server:
        frames = await read_stream(http, server.url, "SendStreamingMessage", params)
    assert "history" not in frames[0].body
    assert frames[-1].state == "TASK_STATE_COMPLETED"


async def test_stream_closes_when_the_task_asks_for_input(http: httpx.AsyncClient) -> None:
    async with serve(agent) as server:
        frames = await read_stream(http, server.url, "SendStreamingMessage", stream_params("ask"))
    assert frames[-1].state == "TASK_STATE_INPUT_REQUIRED"
    assert frames[-1].text == "What is your name?"


async def test_0_3_stream_has_kinds_and_a_final_flag(http: httpx.AsyncClient) -> None:
    message = {
        "kind": "message",
        "messageId": "m-03-stream",
        "role": "user",
        "parts": [{"kind": "text", "text": "count 2"}],
    }
    async with serve(agent) as server:
        frames = await read_stream(http, server.url, "message/stream", {"message": message})
        task_id = frames[0].body["id"]
        resumed = await read_stream(
            http, server.url, "tasks/resubscribe", {"id": task_id}, headers={"Last-Event-ID": "3"}
        )

    assert [f.kind for f in frames] == [
        "task",
        "status-update",
        "status-update",
        "artifact-update",
        "status-update",
    ]
    assert frames[0].body["status"]["state"] == "submitted"
    assert [f.body.get("final") for f in frames[1:] if f.kind == "status-update"] == [
        False,
        False,
        True,
    ]
    assert frames[-1].state == "completed"
    assert [f.id for f in resumed] == [None, 4, 5]
    assert [f.kind for f in resumed] == ["task", "artifact-update", "status-update"]


# -- subscribe, resume, reset ----------------------------------------------------


async def test_fresh_subscribe_snapshot_carries_the_id_it_includes(http: httpx.AsyncClient) -> None:
    async with serve(agent) as server:
        task = await _started(http, server.url, "gate fresh")
        async with http.stream(
            "POST", f"{server.url}/", json=rpc("SubscribeToTask", {"id": task["id"]})
        ) as response:
            reader = SSEReader(response)
            frames: list[Frame] = []
            async for frame in reader:
                frames.append(frame)
                if len(frames) == 1:
                    GATES["fresh"].set()
    snapshot, *updates = frames
    assert snapshot.kind == "task" and snapshot.state == "TASK_STATE_WORKING"
    assert snapshot.id == 2  # submitted (1), working (2)
    assert [f.id for f in updates] == [3]
    assert updates[0].state == "TASK_STATE_COMPLETED"


async def test_resume_gives_the_current_task_without_id_then_exactly_the_rest(
    http: httpx.AsyncClient,
) -> None:
    async with serve(agent) as server:
        full = await read_stream(http, server.url, "SendStreamingMessage", stream_params("count 8"))
        task_id = full[0].body["id"]
        last = full[-1].id
        assert last is not None
        for after in (0, 1, 5, last - 1):
            frames = await read_stream(
                http,
                server.url,
                "SubscribeToTask",
                {"id": task_id},
                headers={"Last-Event-ID": str(after)},
            )
            assert frames[0].kind == "task" and frames[0].id is None
            assert frames[0].state == "TASK_STATE_COMPLETED"  # current, not as of ``after``
            assert REPLAY_KEY not in frames[0].body.get("metadata", {})
            assert [f.id for f in frames[1:]] == list(range(after + 1, last + 1))
            resent = [f.data for f in frames[1:] if (f.id or 0) > 1]
            assert resent == [f.data for f in full[1:] if (f.id or 0) > after]
            if after == 0:
                # Event 1, which the first stream's snapshot stood for, is a status update.
                assert frames[1].kind == "statusUpdate"
                assert frames[1].state == "TASK_STATE_SUBMITTED"
        # The query parameter does what the header does (for a first EventSource connection).
        async with http.stream(
            "GET", f"{server.url}/tasks/{task_id}:subscribe", params={"lastEventId": str(last - 1)}
        ) as response:
            frames = [f async for f in SSEReader(response)]
        assert [f.id for f in frames] == [None, last]


async def test_nothing_after_the_last_event_of_a_finished_task_is_refused(
    http: httpx.AsyncClient,
) -> None:
    async with serve(agent) as server:
        full = await read_stream(http, server.url, "SendStreamingMessage", stream_params("count 1"))
        task_id = full[0].body["id"]
        for headers in ({}, {"Last-Event-ID": str(full[-1].id)}):
            response = await http.post(
                f"{server.url}/", json=rpc("SubscribeToTask", {"id": task_id}), headers=headers
            )
            assert response.json()["error"]["code"] == UNSUPPORTED_OPERATION


@pytest.mark.parametrize("value", ["abc", "-1", "1.5"])
async def test_a_malformed_last_event_id_is_invalid_params(
    value: str, http: httpx.AsyncClient
) -> None:
    async with serve(agent) as server:
        task = await send(http, server.url, "count 1")
        response = await http.post(
            f"{server.url}/",
            json=rpc("SubscribeToTask", {"id": task["id"]}),
            headers={"Last-Event-ID": value},
        )
        assert response.json()["error"]["code"] == INVALID_PARAMS
        rest = await http.get(
            f"{server.url}/tasks/{task['id']}:subscribe", headers={"Last-Event-ID": value}
        )
        assert rest.status_code == 400


async def test_pruned_events_reset_to_the_snapshot_and_say_so(http: httpx.AsyncClient) -> None:
    async with serve(agent) as server:
        full = await read_stream(http, server.url, "SendStreamingMessage", stream_params("count 4"))
        task_id = full[0].body["id"]
        last = full[-1].id
        assert await server.parts.store.prune_events(now() + 1) == 1
        async with http.stream(
            "POST",
            f"{server.url}/",
            json=rpc("SubscribeToTask", {"id": task_id}),
            headers={"Last-Event-ID": "2"},
        ) as response:
            reader = SSEReader(response)
            frames = [f async for f in reader]

    (snapshot,) = events_only(frames)
    assert snapshot.kind == "task" and snapshot.state == "TASK_STATE_COMPLETED"
    assert snapshot.id == last  # the client's position moves to the snapshot's
    note = snapshot.body["metadata"][REPLAY_KEY]
    assert note["reset"] is True
    assert (note["lastEventId"], note["resumedAt"]) == (2, last)
    assert "no longer kept" in note["reason"]
    assert reader.comments and reader.comments[0].startswith("reset:")
    # The snapshot has all the pruned events did: the artifact, the answer.
    assert [p["text"] for p in snapshot.body["artifacts"][0]["parts"]] == ["2", "4"]
    assert snapshot.body["status"]["message"]["parts"] == [{"text": "done"}]


async def test_an_id_the_task_never_reached_resets_and_goes_on_live(
    http: httpx.AsyncClient,
) -> None:
    async with serve(agent) as server:
        task = await _started(http, server.url, "gate beyond")
        async with http.stream(
            "GET", f"{server.url}/tasks/{task['id']}:subscribe", headers={"Last-Event-ID": "999"}
        ) as response:
            frames: list[Frame] = []
            async for frame in SSEReader(response):
                if frame.data is None:
                    continue
                frames.append(frame)
                if len(frames) == 1:
                    GATES["beyond"].set()
    snapshot, done = frames
    assert snapshot.id == 2
    note = snapshot.body["metadata"][REPLAY_KEY]
    assert note["lastEventId"] == 999 and note["resumedAt"] == 2
    assert "not one task" in note["reason"]
    assert done.id == 3 and done.state == "TASK_STATE_COMPLETED"


async def test_retention_loop_drops_the_logs_of_finished_tasks(http: httpx.AsyncClient) -> None:
    async with serve(agent, retention=0.01) as server:
        task = await send(http, server.url, "count 2")
        store = server.parts.store
        await wait_until(
            lambda: _no_events(store, task["id"]), "the retention loop pruned the finished task"
        )
        assert server.parts.service.event_retention == 0.01
        # The task itself is intact.
        response = await call(http, server.url, "GetTask", {"id": task["id"]})
        assert response["result"]["status"]["state"] == "TASK_STATE_COMPLETED"


async def _no_events(store: Any, task_id: str) -> bool:
    return not await store.events_after(task_id, 0)


# -- fan-out, disconnects, slow readers -------------------------------------------


async def test_several_subscribers_see_the_same_events_in_the_same_order(
    http: httpx.AsyncClient,
) -> None:
    async with serve(agent, db="memory://") as server:
        first = http.stream(
            "POST",
            f"{server.url}/",
            json=rpc("SendStreamingMessage", stream_params("count 60 0.005")),
        )
        async with first as response:
            reader = SSEReader(response)
            frames_a: list[Frame] = []
            others: list[asyncio.Task[list[Frame]]] = []
            async for frame in reader:
                frames_a.append(frame)
                task_id = frames_a[0].body["id"]
                if len(frames_a) in (1, 20, 40):
                    # Joining at different moments; each asks for everything after event 1.
                    others.append(asyncio.create_task(_subscriber(http, server.url, task_id)))
            frames_rest = await _rest_subscriber(http, server.url, task_id)
            results = await asyncio.gather(*others)

    expected = [(f.id, f.data) for f in frames_a[1:]]
    assert len(expected) == 62
    for frames in results:
        assert [(f.id, f.data) for f in frames[1:]] == expected
    assert [(f.id, {"jsonrpc": "2.0", "id": 1, "result": f.data}) for f in frames_rest[1:]] == (
        expected
    )


async def _subscriber(http: httpx.AsyncClient, url: str, task_id: str) -> list[Frame]:
    return await read_stream(
        http, url, "SubscribeToTask", {"id": task_id}, headers={"Last-Event-ID": "1"}
    )


async def _rest_subscriber(http: httpx.AsyncClient, url: str, task_id: str) -> list[Frame]:
    async with http.stream(
        "POST", f"{url}/tasks/{task_id}:subscribe", headers={"Last-Event-ID": "1"}
    ) as response:
        return [f async for f in SSEReader(response)]


async def test_disconnected_clients_leave_nothing_behind_and_the_task_runs_on(
    http: httpx.AsyncClient,
) -> None:
    async with serve(agent) as server:
        task = await _started(http, server.url, "gate leave")
        for _ in range(3):
            async with http.stream(
                "POST", f"{server.url}/", json=rpc("SubscribeToTask", {"id": task["id"]})
            ) as response:
                async for _frame in SSEReader(response):
                    break  # the snapshot, then drop
        await wait_until(
            lambda: server.bus.subscribers(task["id"]) == 0, "the server let go of dropped streams"
        )
        GATES["leave"].set()
        frames = await read_stream(
            http, server.url, "SubscribeToTask", {"id": task["id"]}, headers={"Last-Event-ID": "2"}
        )
        assert frames[-1].state == "TASK_STATE_COMPLETED"


async def test_cancel_ends_every_stream_of_the_task(http: httpx.AsyncClient) -> None:
    async with serve(agent) as server:
        task = await _started(http, server.url, "gate canceled-mid-stream")
        async with http.stream("GET", f"{server.url}/tasks/{task['id']}:subscribe") as response:
            frames: list[Frame] = []
            async for frame in SSEReader(response):
                frames.append(frame)
                if len(frames) == 1:
                    canceled = await http.post(f"{server.url}/tasks/{task['id']}:cancel")
                    assert canceled.status_code == 200
    assert frames[0].state == "TASK_STATE_WORKING"
    assert frames[-1].state == "TASK_STATE_CANCELED"
    assert [f.id for f in frames] == [2, 3]


async def test_keep_alive_comments_while_idle(http: httpx.AsyncClient) -> None:
    async with (
        serve(agent, keepalive=0.05) as server,
        http.stream(
            "POST", f"{server.url}/", json=rpc("SendStreamingMessage", stream_params("gate idle"))
        ) as response,
    ):
        reader = SSEReader(response)
        frames: list[Frame] = []
        async for frame in reader:
            frames.append(frame)
            if len(reader.comments) == 3:
                GATES["idle"].set()
    assert reader.comments[:3] == ["keep-alive"] * 3
    assert events_only(frames)[-1].state == "TASK_STATE_COMPLETED"


@pytest.mark.parametrize("binding", ["jsonrpc", "rest"])
async def test_a_reader_that_stalls_is_cut_off_with_a_reason_and_never_slows_the_task(
    binding: str, http: httpx.AsyncClient
) -> None:
    """8 MB of chunks against a reader that reads nothing until the task is done."""
    chunks, size = 2000, 4096
    async with serve(agent, buffer=16) as server:
        if binding == "rest":
            stalled = http.stream(
                "POST",
                f"{server.url}/message:stream",
                json=stream_params(f"blob {chunks} {size}"),
            )
        else:
            stalled = http.stream(
                "POST",
                f"{server.url}/",
                json=rpc("SendStreamingMessage", stream_params(f"blob {chunks} {size}")),
            )
        async with stalled as response:
            # Only the head is read; the body waits in the socket.
            started = time.monotonic()
            reader = SSEReader(response)
            first = await anext(reader)
            task_id = first.body["id"]
            # A reader that keeps up sees the task through, stalled one or not.
            frames = await _subscriber(http, server.url, task_id)
            assert frames[-1].state == "TASK_STATE_COMPLETED"
            # The snapshot, working, the chunks, the closing chunk, completed.
            assert len(events_only(frames)) == 1 + 1 + chunks + 1 + 1
            elapsed = time.monotonic() - started
            assert server.bus.subscribers(task_id) == 0  # the stalled one was let go

            rest = [f async for f in reader]
        errors = [f for f in rest if f.event == "error"]
        assert len(errors) == 1 and rest[-1] is errors[0], "the error closes the stream"
        delivered = [f for f in rest if f.data is not None and f.event != "error"]
        last_id = delivered[-1].id if delivered else first.id
        body = errors[0].data["error"]
        if binding == "rest":
            assert body["code"] == 503 and body["status"] == "UNAVAILABLE"
            details = body["details"]
        else:
            assert body["code"] == UNAVAILABLE
            details = body["data"]
        assert "fell too far behind" in body["message"]
        assert f"Last-Event-ID: {last_id}" in body["message"]
        assert details[0]["metadata"]["lastEventId"] == str(last_id)
        assert len(delivered) < chunks  # it was cut off, not fed

        # Resuming where it was cut off loses nothing.
        tail = await read_stream(
            http,
            server.url,
            "SubscribeToTask",
            {"id": task_id},
            headers={"Last-Event-ID": str(last_id)},
        )
    ids = [f.id for f in delivered] + [f.id for f in tail[1:]]
    assert ids == list(range(2, chunks + 5))
    assert elapsed < TIMEOUT


# -- handler-side streaming --------------------------------------------------------

gen_agent = Agent(name="gen", description="An async-generator handler")


@gen_agent.handler
async def numbers(ctx: Context) -> AsyncIterator[str]:
    for i in range(1, 6):
        yield f"<{i}>"


chunk_agent = Agent(name="chunks", description="Streams an artifact, leaving the block open")


@chunk_agent.handler
async def chunks(ctx: Context) -> str:
    async with ctx.stream_artifact(name="report") as out:
        for word in ("alpha ", "beta ", "gamma"):
            await out.write(word)
            await ctx.working(f"wrote {word.strip()}")
    return "report ready"


async def test_an_async_generator_handler_streams_its_yields(http: httpx.AsyncClient) -> None:
    async with serve(gen_agent) as server:
        frames = await read_stream(http, server.url, "SendStreamingMessage", stream_params("go"))
        task = await call(http, server.url, "GetTask", {"id": frames[0].body["id"]})

    chunks = [f.body for f in frames if f.kind == "artifactUpdate"]
    assert [c["artifact"]["parts"][0]["text"] for c in chunks] == [
        "<1>",
        "<2>",
        "<3>",
        "<4>",
        "<5>",
        "",
    ]
    assert [bool(c.get("append")) for c in chunks] == [False] + [True] * 5
    assert [bool(c.get("lastChunk")) for c in chunks] == [False] * 5 + [True]
    assert frames[-1].state == "TASK_STATE_COMPLETED"
    (artifact,) = task["result"]["artifacts"]
    assert "".join(p["text"] for p in artifact["parts"]) == "<1><2><3><4><5>"


async def test_stream_artifact_interleaves_with_status_and_closes_the_artifact(
    http: httpx.AsyncClient,
) -> None:
    async with serve(chunk_agent) as server:
        frames = await read_stream(http, server.url, "SendStreamingMessage", stream_params("go"))
        task = await call(http, server.url, "GetTask", {"id": frames[0].body["id"]})

    updates = [(f.kind, f.text) for f in frames[2:]]
    assert updates == [
        ("artifactUpdate", "alpha "),
        ("statusUpdate", "wrote alpha"),
        ("artifactUpdate", "beta "),
        ("statusUpdate", "wrote beta"),
        ("artifactUpdate", "gamma"),
        ("statusUpdate", "wrote gamma"),
        ("artifactUpdate", ""),
        ("statusUpdate", "report ready"),
    ]
    closing = frames[-2].body
    assert closing["append"] is True and closing["lastChunk"] is True
    (artifact,) = task["result"]["artifacts"]
    assert artifact["name"] == "report"
    assert "".join(p["text"] for p in artifact["parts"]) == "alpha beta gamma"


# -- helpers -----------------------------------------------------------------------


async def _started(http: httpx.AsyncClient, url: str, text: str) -> dict[str, Any]:
    """A task that is running (working, waiting on its gate)."""
    params = {"message": user_message(text), "configuration": {"returnImmediately": True}}
    task = (await call(http, url, "SendMessage", params))["result"]["task"]
    frames: list[Frame] = []
    async with http.stream(
        "POST", f"{url}/", json=rpc("SubscribeToTask", {"id": task["id"]})
    ) as response:
        async for frame in SSEReader(response):
            frames.append(frame)
            if frame.state == "TASK_STATE_WORKING":
                break
    return dict(task)
