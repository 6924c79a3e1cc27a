"""The Python load generator: several processes, each an asyncio loop of raw connections.

Used where wrk cannot go (SSE, submit-then-poll, thousands of idle streams) and as
the fallback when wrk is not installed. Each process measures its own CPU from
``/proc/self/stat`` so the report can say when the generator, not the server, was
the limit.

Protocol between the bench (parent) and each process, over a pipe:
child ``("ready", info)`` → parent ``("go", wall_time)`` → child runs →
child ``("result", dict)``; the parent may send ``("stop", None)`` at any time
(subscribers hold their streams until then or until the streams end).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from tether.bench.http import COMPLETED, Conn, HttpError, Ids, rpc_body, send_body
from tether.bench.metrics import proc_cpu, proc_memory

Spec = dict[str, Any]
Result = dict[str, Any]


class LoadError(Exception):
    pass


class Ctl:
    """The child's end of the pipe."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.stopped = asyncio.Event()
        self._go: asyncio.Future[float] | None = None

    def send(self, kind: str, payload: Any) -> None:
        self.conn.send((kind, payload))

    def listen(self) -> None:
        """Read the parent's messages on the event loop (go, stop)."""
        loop = asyncio.get_running_loop()
        self._go = loop.create_future()

        def readable() -> None:
            try:
                kind, payload = self.conn.recv()
            except (EOFError, OSError):
                loop.remove_reader(self.conn.fileno())
                self.stopped.set()  # the bench is gone: stop
                if self._go is not None and not self._go.done():
                    self._go.set_result(time.time())
                return
            if kind == "go" and self._go is not None and not self._go.done():
                self._go.set_result(float(payload))
            elif kind == "stop":
                self.stopped.set()

        loop.add_reader(self.conn.fileno(), readable)

    async def ready(self, info: Any = None) -> float:
        """Report ready; wait for the start signal; sleep until the common start time."""
        self.send("ready", info)
        assert self._go is not None
        start_at = await self._go
        delay = start_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        return start_at


class Usage:
    """This process's CPU and wall time between ``start()`` and ``result()``."""

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = proc_cpu()

    def result(self) -> Result:
        wall = time.monotonic() - self.t0
        cpu = proc_cpu() - self.cpu0
        _, hwm = proc_memory()
        return {"cpu_s": cpu, "wall_s": wall, "cpu_pct": 100.0 * cpu / wall if wall else 0.0,
                "vmhwm": hwm}  # fmt: skip


# -- jobs ----------------------------------------------------------------------


async def job_send(spec: Spec, ctl: Ctl) -> Result:
    """Closed loop: ``connections`` connections send SendMessage back to back, for
    ``duration`` seconds or until ``count`` messages are sent (by this process);
    ``warmup`` seconds of the same load first, not counted."""
    host, port = spec["host"], spec["port"]
    conns = [Conn(host, port) for _ in range(spec["connections"])]
    await asyncio.gather(*(c.connect() for c in conns))
    ids = Ids(spec.get("prefix"))
    blocking = not spec.get("return_immediately", False)
    expect: bytes = COMPLETED if blocking else b'"result"'
    metadata = spec.get("metadata")
    text = spec.get("text", "hello")
    counted = spec.get("count") is not None
    remaining = [int(spec.get("count") or 0)]
    lat: list[float] = []
    stats = {"completed": 0, "not_completed": 0, "errors": 0}
    samples: list[str] = []

    async def loop(conn: Conn, deadline: float | None) -> None:
        perf = time.perf_counter
        while not ctl.stopped.is_set():
            if deadline is not None and time.time() >= deadline:
                return
            if counted:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            body = send_body(ids, text, return_immediately=not blocking, metadata=metadata)
            t = perf()
            try:
                status, data = await conn.post(body)
            except HttpError as exc:
                stats["errors"] += 1
                if len(samples) < 3:
                    samples.append(str(exc))
                await asyncio.sleep(0.01)
                continue
            lat.append((perf() - t) * 1000.0)
            if status == 200 and expect in data:
                stats["completed"] += 1
            else:
                stats["not_completed"] += 1
                if len(samples) < 3:
                    samples.append(data[:300].decode(errors="replace"))

    warmup = float(spec.get("warmup") or 0.0)
    if warmup > 0 and not counted:
        until = time.time() + warmup
        await asyncio.gather(*(loop(c, until) for c in conns))
        lat.clear()
        samples.clear()
        stats.update(completed=0, not_completed=0, errors=0)
    usage = Usage()
    start_at = await ctl.ready()
    usage.start()
    deadline = start_at + spec["duration"] if spec.get("duration") else None
    await asyncio.gather(*(loop(c, deadline) for c in conns))
    for c in conns:
        c.close()
    return {**stats, "latency_ms": lat, "samples": samples, "usage": usage.result()}


def _frame_id(frame: bytes) -> int | None:
    if frame.startswith(b"id: "):
        end = frame.find(b"\n")
        with contextlib.suppress(ValueError):
            return int(frame[4:end])
    return None


async def job_stream(spec: Spec, ctl: Ctl) -> Result:
    """Open loop: SendStreamingMessage at ``rate`` per second for ``duration`` seconds;
    latency counted from the scheduled send time (no coordinated omission)."""
    host, port = spec["host"], spec["port"]
    rate, duration = float(spec["rate"]), float(spec["duration"])
    offset = float(spec.get("offset", 0.0))
    idle: list[Conn] = []
    ids = Ids(spec.get("prefix"))
    first_ms: list[float] = []
    working_ms: list[float] = []
    final_ms: list[float] = []
    lag_ms: list[float] = []
    stats = {"completed": 0, "not_completed": 0, "errors": 0, "events": 0}
    samples: list[str] = []
    # Warm a few connections so the first sends do not pay for the TCP handshake.
    warm = [Conn(host, port) for _ in range(min(8, max(int(rate / 20), 2)))]
    await asyncio.gather(*(c.connect() for c in warm))
    idle.extend(warm)
    usage = Usage()
    start_at = await ctl.ready()
    usage.start()
    perf = time.perf_counter
    base = perf() - (time.time() - start_at)  # perf_counter value at start_at

    async def one(at: float) -> None:
        conn = idle.pop() if idle else Conn(host, port)
        lag_ms.append((perf() - at) * 1000.0)
        body = send_body(ids, "stream", method="SendStreamingMessage")
        got_first = got_working = False
        ok = False
        try:
            async for frame in conn.sse(body):
                if not frame:
                    continue
                now = perf()
                stats["events"] += 1
                if not got_first:
                    got_first = True
                    first_ms.append((now - at) * 1000.0)
                    continue
                if not got_working and b"TASK_STATE_WORKING" in frame:
                    got_working = True
                    working_ms.append((now - at) * 1000.0)
                if COMPLETED in frame and b"statusUpdate" in frame:
                    final_ms.append((now - at) * 1000.0)
                    ok = True
            idle.append(conn)
        except HttpError as exc:
            stats["errors"] += 1
            if len(samples) < 3:
                samples.append(str(exc))
            conn.close()
            return
        stats["completed" if ok else "not_completed"] += 1

    n = int(rate * duration)
    pending: set[asyncio.Task[None]] = set()
    for i in range(n):
        if ctl.stopped.is_set():
            break
        at = base + offset + i / rate
        delay = at - perf()
        if delay > 0:
            await asyncio.sleep(delay)
        t = asyncio.create_task(one(at))
        pending.add(t)
        t.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=float(spec.get("drain", 30.0)))
    for c in idle:
        c.close()
    return {**stats, "first_ms": first_ms, "working_ms": working_ms, "final_ms": final_ms,
            "lag_ms": lag_ms, "sent": n, "samples": samples, "usage": usage.result()}  # fmt: skip


async def job_subscribe(spec: Spec, ctl: Ctl) -> Result:
    """``count`` SubscribeToTask streams on ``task_id``; ready once every stream has its
    first frame; then count frames (and gaps in ``id:``) until the streams end or stop."""
    host, port, task_id = spec["host"], spec["port"], spec["task_id"]
    n = int(spec["count"])
    gate = asyncio.Semaphore(int(spec.get("open_parallel", 100)))
    opened = asyncio.Event()
    finished = asyncio.Event()
    state = {"open": 0, "failed": 0, "ended": 0, "broken": 0, "frames": 0, "gaps": 0,
             "completed": 0}  # fmt: skip
    times = {"first": 0.0, "last": 0.0}
    samples: list[str] = []
    conns: list[Conn] = []
    usage = Usage()
    over = [0]

    async def one(i: int) -> None:
        conn = Conn(host, port)
        conns.append(conn)
        body = rpc_body("SubscribeToTask", {"id": task_id}, i + 1)
        last_id: int | None = None
        last_frame = b""
        got_final = False
        is_open = False
        try:
            async with gate:
                stream = conn.sse(body)
                await anext(stream)  # headers
                snapshot = await anext(stream)  # the task snapshot
                last_id = _frame_id(snapshot)
            is_open = True
            state["open"] += 1
            if state["open"] + state["failed"] >= n:
                opened.set()
            async for frame in stream:
                now = time.time()
                state["frames"] += 1
                if not times["first"] or now < times["first"]:
                    times["first"] = now
                times["last"] = max(times["last"], now)
                seq = _frame_id(frame)
                if seq is not None:
                    if last_id is not None and seq != last_id + 1:
                        state["gaps"] += 1
                    last_id = seq
                if COMPLETED in frame:
                    state["completed"] += 1
                    got_final = True
                last_frame = frame
            state["ended"] += 1
            if not got_final and len(samples) < 3:
                text = last_frame[-300:].decode(errors="replace")
                samples.append(f"stream ended without a completed event; last frame: {text}")
        except (HttpError, StopAsyncIteration, OSError, ValueError) as exc:
            if is_open:
                state["broken"] += 1
            else:
                state["failed"] += 1
                if state["open"] + state["failed"] >= n:
                    opened.set()
            if len(samples) < 3:
                samples.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
            over[0] += 1
            if over[0] >= n:
                finished.set()

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(float(spec.get("open_timeout", 120.0))):
            await opened.wait()
    usage.start()
    await ctl.ready({"open": state["open"], "failed": state["failed"], "at": time.time()})
    stop = asyncio.create_task(ctl.stopped.wait())
    end = asyncio.create_task(finished.wait())
    await asyncio.wait([stop, end], return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    end.cancel()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in conns:
        c.close()
    return {**state, "first_frame_at": times["first"], "last_frame_at": times["last"],
            "samples": samples, "usage": usage.result()}  # fmt: skip


JOBS: dict[str, Callable[[Spec, Ctl], Awaitable[Result]]] = {
    "send": job_send,
    "stream": job_stream,
    "subscribe": job_subscribe,
}


def _child_main(job: str, spec: Spec, conn: Connection) -> None:
    from tether.bench.procs import die_with_parent, raise_nofile

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench handles Ctrl-C and stops us
    raise_nofile()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> Result:
        ctl = Ctl(conn)
        ctl.listen()
        return await JOBS[job](spec, ctl)

    try:
        result = asyncio.run(main())
    except BaseException as exc:  # report, do not die silently
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    # The loop's reader left the pipe non-blocking; a result larger than the pipe
    # buffer (latency samples) would fail with EAGAIN while the parent is reading.
    os.set_blocking(conn.fileno(), True)
    conn.send(("result", result))


class Pool:
    """Load-generator processes running one job each; always ``close()`` it."""

    def __init__(self, job: str, specs: list[Spec]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.job = job
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        for spec in specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child_main, args=(job, spec, child), daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    async def collect(self, kind: str, wait_s: float) -> list[Any]:
        """One ``kind`` message from every process (ready or result)."""
        got: list[Any] = [None] * len(self.conns)
        done = [False] * len(self.conns)
        deadline = time.monotonic() + wait_s
        while not all(done):
            for i, conn in enumerate(self.conns):
                if done[i]:
                    continue
                try:
                    has = conn.poll()
                except (EOFError, OSError):
                    has = False
                if has:
                    try:
                        k, payload = conn.recv()
                    except (EOFError, OSError) as exc:
                        raise LoadError(f"load generator {i} went away: {exc}") from None
                    if k == "error":
                        raise LoadError(f"load generator {i}: {payload}")
                    if k == kind:
                        got[i], done[i] = payload, True
                elif not self.procs[i].is_alive():
                    raise LoadError(f"load generator {i} exited with code {self.procs[i].exitcode}")
            if time.monotonic() > deadline:
                raise LoadError(f"load generators not {kind} after {wait_s:.0f}s")
            if not all(done):
                await asyncio.sleep(0.02)
        return got

    def send(self, kind: str, payload: Any = None) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send((kind, payload))

    def go(self, delay: float = 0.2) -> float:
        start_at = time.time() + delay
        self.send("go", start_at)
        return start_at

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(3)
            if p.is_alive():
                p.kill()
                p.join(3)
        for c in self.conns:
            c.close()


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as integers allow (no zero parts)."""
    parts = max(1, min(parts, total)) if total > 0 else 1
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
