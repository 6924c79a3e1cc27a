"""A scaled-out deployment as real processes: ``tether serve --workers 0`` and ``tether worker``.

Every process shares one fresh PostgreSQL database and the local Redis under a
key prefix of its own, and logs to a file of its own (shown when a test fails).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from httpx_sse import aconnect_sse

REPO = Path(__file__).resolve().parents[2]
TETHER = Path(sys.executable).with_name("tether")
TARGET = "tests.scale.scale_agents:agent"
# Generous: two noisy cores, other suites running, cold interpreters.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
HTTP_TIMEOUT = 30.0

JSON = dict[str, Any]
T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> Proc:
        with self.log.open("ab") as out:
            out.write(f"\n$ {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        return self

    def kill(self) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(STOP_TIMEOUT)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int | None:
        if self.popen is None:
            return None
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)
        return self.popen.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Cluster:
    """API and worker processes of one deployment; ``close`` stops every one still running."""

    def __init__(
        self,
        workdir: Path,
        *,
        database_url: str,
        redis_url: str,
        prefix: str,
        lease_seconds: float = 3.0,
        secret: str = "scale-secret",
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.marks = workdir / "marks"
        self.marks.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url
        self.redis_url = redis_url
        self.prefix = prefix
        self.lease_seconds = lease_seconds
        self.secret = secret
        self.procs: list[Proc] = []
        base = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        base.update(
            PYTHONUNBUFFERED="1",
            TETHER_DATABASE_URL=database_url,
            TETHER_BROKER_URL=redis_url,
            TETHER_REDIS_PREFIX=prefix,
            TETHER_LEASE_SECONDS=str(lease_seconds),
            TETHER_SECRET=secret,
            TETHER_SHUTDOWN_GRACE="2",
            TETHER_COMPLETION_CLAIM_IDLE="2",
            TETHER_SCALE_MARKS=str(self.marks),
        )
        base.update(env or {})
        self.env = base

    def _proc(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, self.env, self.workdir / f"{name}.log")
        self.procs.append(proc)
        return proc

    async def api(self, name: str) -> Proc:
        proc = self._proc(name, [])
        proc.port = free_port()
        proc.argv = [
            str(TETHER), "serve", TARGET, "--port", str(proc.port), "--workers", "0",
            "--log-level", "warning",
        ]  # fmt: skip
        proc.start()
        async with httpx.AsyncClient(timeout=5.0) as http:

            async def ready() -> bool:
                if not proc.alive():
                    raise AssertionError(f"{name} exited:\n{proc.output()[-3000:]}")
                try:
                    return (await http.get(f"{proc.url}healthz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await until(ready, f"{name} to answer", START_TIMEOUT)
        return proc

    async def worker(self, name: str, concurrency: int = 64) -> Proc:
        proc = self._proc(name, [])
        proc.argv = [
            str(TETHER), "worker", TARGET, "--concurrency", str(concurrency),
            "--log-level", "info",
        ]  # fmt: skip
        proc.start()

        async def ready() -> bool:
            if not proc.alive():
                raise AssertionError(f"{name} exited:\n{proc.output()[-3000:]}")
            return " running " in proc.output()

        await until(ready, f"{name} to run", START_TIMEOUT)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate(5.0)

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.output()[-4000:]}" for p in self.procs)

    def started(self, task_id: str) -> list[str]:
        path = self.marks / f"started-{task_id}"
        return path.read_text().splitlines() if path.exists() else []

    def stopped(self, task_id: str) -> list[str]:
        path = self.marks / f"stopped-{task_id}"
        return path.read_text().splitlines() if path.exists() else []


# -- waiting with a bound ------------------------------------------------------------


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float) -> None:
    """Poll ``check`` until it holds; there is no event to wait on across processes."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


# -- a JSON-RPC client -------------------------------------------------------------


def message(text: str) -> JSON:
    return {"messageId": str(uuid.uuid4()), "role": "ROLE_USER", "parts": [{"text": text}]}


async def rpc(http: httpx.AsyncClient, url: str, method: str, params: JSON) -> JSON:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    response = await http.post(url, json=body, headers={"A2A-Version": "1.0"})
    assert response.status_code == 200, response.text
    data: JSON = response.json()
    assert "error" not in data, data
    result: JSON = data["result"]
    return result


async def submit(http: httpx.AsyncClient, url: str, text: str) -> str:
    params = {"message": message(text), "configuration": {"returnImmediately": True}}
    return str((await rpc(http, url, "SendMessage", params))["task"]["id"])


async def get_task(http: httpx.AsyncClient, url: str, task_id: str) -> JSON:
    return await rpc(http, url, "GetTask", {"id": task_id})


def state_of(task: JSON) -> str:
    return str(task["status"]["state"]).removeprefix("TASK_STATE_").lower()


def answer_of(task: JSON) -> str:
    msg = task["status"].get("message") or {}
    return "\n".join(p["text"] for p in msg.get("parts", []) if "text" in p)


async def wait_state(
    http: httpx.AsyncClient, url: str, task_id: str, states: set[str], within: float
) -> JSON:
    seen: JSON = {}

    async def reached() -> bool:
        nonlocal seen
        seen = await get_task(http, url, task_id)
        return state_of(seen) in states

    try:
        await until(reached, f"task {task_id} to be {states}", within)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; it is {state_of(seen)}: {seen}") from None
    return seen


async def sse(
    http: httpx.AsyncClient,
    url: str,
    method: str,
    params: JSON,
    last_event_id: int | None = None,
) -> AsyncIterator[tuple[int | None, JSON]]:
    """The frames of one streaming call: (SSE id, JSON-RPC result)."""
    headers = {"A2A-Version": "1.0"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    async with aconnect_sse(http, "POST", url, json=body, headers=headers) as source:
        async for frame in source.aiter_sse():
            if not frame.data:
                continue
            data = frame.json()
            assert "error" not in data, data
            yield (int(frame.id) if frame.id else None), data["result"]


def frame_state(result: JSON) -> str | None:
    update = result.get("statusUpdate")
    if update is None:
        return None
    return str(update["status"]["state"]).removeprefix("TASK_STATE_").lower()
