"""A server killed mid-stream: after the restart the client resumes with Last-Event-ID.

``tether serve`` runs as a subprocess on a SQLite file. The client streams a long
task, the server is SIGKILLed (no shutdown hook runs), the same command starts
it again on the same file, and the client resubscribes with the last id it got.
It receives every event it missed, then the terminal one: its two halves put
together are the task's whole log, as a replay from 0 shows.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .harness import TIMEOUT, Frame, SSEReader, rpc, user_message

REPO = Path(__file__).resolve().parents[2]
TETHER = Path(sys.executable).with_name("tether")
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, db: Path, log: Path) -> None:
        self.db = db
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        # The developer's own TETHER_* settings must not change what the test runs against.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        env["PYTHONUNBUFFERED"] = "1"
        for _ in range(3):
            self.port = free_port()
            cmd = [str(TETHER), "serve", "tests/streaming/agents.py:agent"]
            cmd += ["--port", str(self.port), "--db", str(self.db), "--log-level", "warning"]
            with self.log.open("ab") as out:
                self.proc = subprocess.Popen(
                    cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
                )
            if self._ready():
                return
        raise AssertionError(f"tether serve never bound a port:\n{self.output()}")

    def _ready(self) -> bool:
        """A bounded poll: another process's readiness announces itself no other way."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    if "address already in use" in self.output().lower():
                        return False
                    raise AssertionError(f"tether serve exited:\n{self.output()}")
                try:
                    if http.get(f"{self.url}/healthz").status_code == 200:
                        return True
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise AssertionError(f"tether serve not ready in {START_TIMEOUT}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(TIMEOUT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "tether.db", tmp_path / "server.log")
    yield s
    s.stop()


@pytest.mark.slow
async def test_sigkill_mid_stream_then_resume_after_restart(
    server: Server, http: httpx.AsyncClient
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
