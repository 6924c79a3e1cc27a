"""A client that keeps losing its connection still gets every event exactly once.

The handler emits 200 numbered events; the client drops the connection ten times
at random byte offsets (mostly in the middle of a frame, which it then discards,
as an SSE client must) and reconnects with Last-Event-ID each time. What it
concatenates is exactly 1..200, in order, with contiguous ids.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from .agents import agent
from .harness import JSON, Frame, SSEReader, new_id, rpc, serve, user_message

N = 200
DROPS = 10


@dataclass(frozen=True)
class Binding:
    name: str

    def open(self, http: httpx.AsyncClient, url: str, text: str) -> Any:
        if self.name == "rest":
            return http.stream(
                "POST", f"{url}/message:stream", json={"message": user_message(text)}
            )
        if self.name == "jsonrpc-0.3":
            message: JSON = {
                "kind": "message",
                "messageId": new_id(),
                "role": "user",
                "parts": [{"kind": "text", "text": text}],
            }
            return http.stream("POST", f"{url}/", json=rpc("message/stream", {"message": message}))
        body = rpc("SendStreamingMessage", {"message": user_message(text)})
        return http.stream("POST", f"{url}/", json=body)

    def resume(self, http: httpx.AsyncClient, url: str, task_id: str, last_id: int) -> Any:
        headers = {"Last-Event-ID": str(last_id)}
        if self.name == "rest":
            return http.stream("GET", f"{url}/tasks/{task_id}:subscribe", headers=headers)
        method = "tasks/resubscribe" if self.name == "jsonrpc-0.3" else "SubscribeToTask"
        return http.stream("POST", f"{url}/", json=rpc(method, {"id": task_id}), headers=headers)


def is_final(frame: Frame) -> bool:
    return frame.state in ("TASK_STATE_COMPLETED", "completed")


@pytest.mark.parametrize(
    ("binding", "store"),
    [("jsonrpc", "sqlite"), ("rest", "memory"), ("jsonrpc-0.3", "memory")],
)
async def test_ten_random_drops_lose_and_repeat_nothing(
    binding: str, store: str, tmp_path: Any, http: httpx.AsyncClient
) -> None:
    seed = int(os.environ.get("TETHER_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    # Byte budgets of the ten cut connections (the whole run is some 80-120 KB); the
    # first one gets at least the Task, else the client would not know the task's id.
    budgets = [rng.randint(2000, 5000)] + [rng.randint(100, 5000) for _ in range(DROPS - 1)]
    b = Binding(binding)
    db = "memory://" if store == "memory" else f"sqlite+aiosqlite:///{tmp_path / 't.db'}"

    events: list[Frame] = []  # every update received, across connections, in order
    snapshots: list[Frame] = []
    drops = 0
    async with serve(agent, db=db) as server:
        connection = b.open(http, server.url, f"count {N} 0.002")
        for budget in [*budgets, None]:
            async with connection as response:
                assert response.status_code == 200
                reader = SSEReader(response, limit=budget)
                async for frame in reader:
                    if frame.data is None:
                        continue
                    if frame.kind == "task":
                        snapshots.append(frame)
                        continue
                    events.append(frame)
            if budget is None:
                break
            drops += 1
            assert not events or not is_final(events[-1]), (
                f"seed {seed}: the task ended before drop {drops + 1}; budgets too large"
            )
            task_id = snapshots[0].body["id"]
            last_id = events[-1].id if events else snapshots[0].id
            assert last_id is not None
            connection = b.resume(http, server.url, task_id, last_id)

    numbered = [int(f.text) for f in events if f.text.isdigit()]
    assert numbered == list(range(1, N + 1)), f"seed {seed}"
    ids = [f.id for f in events]
    first = snapshots[0].id
    assert first is not None
    assert ids == list(range(first + 1, first + 1 + len(ids))), f"seed {seed}"
    assert is_final(events[-1])
    assert drops == DROPS
    # Only the first snapshot moves the client's position; a resumed one leaves it alone
    # (a budget may have cut a resumed snapshot short: those the client got are counted).
    assert 1 < len(snapshots) <= DROPS + 1
    assert [s.id for s in snapshots[1:]] == [None] * (len(snapshots) - 1)
    # Reconnections met the task still running: the events came live as well as replayed.
    assert any(s.state in ("TASK_STATE_WORKING", "working") for s in snapshots[1:]), f"seed {seed}"
