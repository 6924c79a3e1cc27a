"""A server killed mid-stream: after the restart the client resumes with Last-Event-ID.

``tether serve`` runs as a subprocess on a SQLite file. The client streams a long
task, the server is SIGKILLed (no shutdown hook runs), the same command starts
it again on the same file, and the client resubscribes with the last id it got.
It receives every event it missed, then the terminal one: its two halves put
together are the task's whole log, as a replay from 0 shows.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from e2e.server import TetherServer

from .harness import Frame, SSEReader, rpc, user_message


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TetherServer]:
    s = TetherServer(
        "tests/streaming/agents.py:agent",
        db=tmp_path / "tether.db",
        marks=tmp_path / "marks",
        log=tmp_path / "server.log",
        args=["--log-level", "warning"],
    )
    yield s
    s.stop()


@pytest.mark.slow
async def test_sigkill_mid_stream_then_resume_after_restart(
    server: TetherServer, http: httpx.AsyncClient
) -> None:
    server.start()
    before: list[Frame] = []
    body = rpc("SendStreamingMessage", {"message": user_message("count 120 0.02")})
    async with http.stream("POST", f"{server.url}/", json=body) as response:
        reader = SSEReader(response)
        try:
            async for frame in reader:
                before.append(frame)
                if sum(f.text.isdigit() for f in before) == 20:
                    server.kill()  # mid-stream; the rest of this read fails
        except httpx.TransportError:
            pass
    assert server.proc is not None and server.proc.returncode == -signal.SIGKILL
    snapshot, *seen = before
    task_id = snapshot.body["id"]
    last_id = seen[-1].id
    assert last_id is not None and snapshot.id == 1
    assert [f.id for f in seen] == list(range(2, last_id + 1))
    assert not any(f.state == "TASK_STATE_COMPLETED" for f in seen)

    server.start()  # the same database file; the task is taken back and run again
    resumed = await _read(http, server.url, task_id, last_id)
    everything = await _read(http, server.url, task_id, 0)

    assert resumed[0].kind == "task" and resumed[0].id is None
    after = resumed[1:]
    assert after[-1].state == "TASK_STATE_COMPLETED"
    assert [f.id for f in after] == list(range(last_id + 1, after[-1].id + 1))
    # Before the kill and after the restart, together: the whole log, nothing twice.
    log = everything[1:]
    assert [f.id for f in log] == list(range(1, after[-1].id + 1))
    assert [f.data for f in seen + after] == [f.data for f in log[1:]]
    # The handler ran again after the restart (at-least-once), all the way through.
    numbered = [int(f.text) for f in after if f.text.isdigit()]
    assert numbered[-120:] == list(range(1, 121))


async def _read(http: httpx.AsyncClient, url: str, task_id: str, after: int) -> list[Frame]:
    body = rpc("SubscribeToTask", {"id": task_id})
    headers = {"Last-Event-ID": str(after)}
    async with http.stream("POST", f"{url}/", json=body, headers=headers) as response:
        assert response.status_code == 200
        return [f async for f in SSEReader(response) if f.data is not None]
