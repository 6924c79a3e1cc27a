"""The scenarios: what load, against which agent, and which figures come out.

Every scenario starts its own deployment (``modes.deploy``), measures one window
(server CPU and memory from ``/proc``, the machine's load, the load generator's
own CPU) and returns one result dict; ``report`` prints and saves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.bench.http import Conn, HttpError, Ids, count_tasks, rpc, send_body
from tether.bench.metrics import MIB, Window, proc_cpu
from tether.bench.modes import (
    DeployError,
    Deployment,
    DeployOptions,
    ModeUnavailable,
    deploy,
    service_pids,
)
from tether.bench.pyload import LoadError, Pool, split
from tether.bench.wrk import run_wrk, wrk_path

SATURATED_PCT = 90.0  # a load-generator process above this share of one core is the limit

AGENTS = "tether.bench.agents"


@dataclass
class Options:
    duration: float = 10.0
    connections: int = 64
    concurrency: int = 64
    tasks: int | None = None
    rate: float = 100.0
    subscribers: int = 1000
    ticks: int = 100
    streams: int = 10_000
    hold: float = 5.0
    sleep: float = 1.0
    client_procs: int = 2
    loadgen: str = "auto"  # auto | wrk | python
    threads: int = 1
    warmup: float = 1.0
    worker_procs: int = 1
    deadline: float = 900.0
    deploy: DeployOptions = field(default_factory=DeployOptions)

    def use_wrk(self) -> bool:
        if self.loadgen == "python":
            return False
        if self.loadgen == "wrk" and wrk_path() is None:
            raise FileNotFoundError("--loadgen wrk: wrk is not installed (apt-get install wrk)")
        return wrk_path() is not None


# -- small helpers --------------------------------------------------------------


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def at(p: float) -> float:
        return round(s[min(len(s) - 1, max(0, math.ceil(p / 100.0 * len(s)) - 1))], 3)

    return {"p50": at(50), "p95": at(95), "p99": at(99), "max": round(s[-1], 3)}


def _mib(n: int) -> float:
    return round(n / MIB, 1)


def _processes(dep: Deployment) -> list[dict[str, Any]]:
    return [
        {
            "role": p.role,
            "pid": p.pid,
            "cpu_s": round(p.cpu_since_mark, 3),
            "vmrss_mib": _mib(p.last_rss),
            "vmhwm_mib": _mib(p.last_hwm),
        }
        for p in dep.servers
    ]


def _api_rss(dep: Deployment) -> int:
    dep.group.sample()
    return sum(p.last_rss for p in dep.servers if not p.role.startswith("worker"))


def _loadgen_summary(kind: str, usages: list[dict[str, Any]], threads: int = 1) -> dict[str, Any]:
    cpu = sum(u["cpu_s"] for u in usages)
    worst = max((u["cpu_pct"] / max(threads, 1) for u in usages), default=0.0)
    return {
        "kind": kind,
        "procs": len(usages),
        "threads": threads,
        "cpu_s": round(cpu, 3),
        "max_cpu_pct_of_core": round(worst, 1),
        "vmhwm_mib": _mib(max((u.get("vmhwm", 0) for u in usages), default=0)),
        "saturated": worst >= SATURATED_PCT,
    }


def _cpu_of(pids: list[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            out[pid] = proc_cpu(pid)
    return out


class Measured:
    """One measured window over a deployment: ``await begin()`` then ``await end()``.

    Besides Tether's processes it follows the services': the PostgreSQL backends of
    the bench database and the Redis server (shared: it may serve others too)."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.window = Window()
        self.services0: dict[str, dict[int, float]] = {}
        self.services_cpu: dict[str, tuple[int, float]] = {}

    async def begin(self) -> None:
        pids = await service_pids(self.dep)
        self.services0 = {role: _cpu_of(p) for role, p in pids.items()}
        self.dep.group.mark()
        self.window.start()

    async def end(self) -> None:
        self.dep.group.sample()
        self.window.stop()
        pids = await service_pids(self.dep)
        for role, now in ((r, _cpu_of(p)) for r, p in pids.items()):
            before = self.services0.get(role, {})
            # A backend that appeared during the window is counted from its start.
            delta = sum(cpu - before.get(pid, 0.0) for pid, cpu in now.items())
            self.services_cpu[role] = (len(now), max(delta, 0.0))

    def server_cpu(self) -> float:
        return sum(p.cpu_since_mark for p in self.dep.servers)

    def fill(self, result: dict[str, Any], done: int, loadgen: dict[str, Any]) -> None:
        """The fields every scenario reports."""
        cpu = self.server_cpu()
        services = sum(c for _, c in self.services_cpu.values())
        result["server_cpu_s"] = round(cpu, 3)
        result["server_cpu_ms_per_task"] = round(1000.0 * cpu / done, 4) if done else None
        result["processes"] = _processes(self.dep)
        if self.services_cpu:
            result["services_cpu"] = {
                role: {"processes": n, "cpu_s": round(c, 3),
                       "cpu_ms_per_task": round(1000.0 * c / done, 4) if done else None}
                for role, (n, c) in self.services_cpu.items()
            }  # fmt: skip
        result["loadgen"] = loadgen
        result["machine_load"] = self.window.summary(cpu + services + loadgen["cpu_s"])


async def _rpc_once(dep: Deployment, method: str, params: dict[str, Any]) -> Any:
    conn = Conn(dep.host, dep.port)
    try:
        return await rpc(conn, method, params)
    finally:
        conn.close()


async def _send_once(dep: Deployment, text: str, **kw: Any) -> dict[str, Any]:
    conn = Conn(dep.host, dep.port)
    try:
        import orjson

        status, data = await conn.post(send_body(Ids(), text, **kw))
        reply: dict[str, Any] = orjson.loads(data)
        if status != 200 or "error" in reply:
            raise HttpError(f"SendMessage: HTTP {status}: {reply.get('error')}")
        result: dict[str, Any] = reply["result"]
        return result
    finally:
        conn.close()


async def _warm(dep: Deployment, metadata: dict[str, Any] | None = None) -> None:
    """One blocking task end to end: proves a worker consumes (split mode) before timing."""
    async with asyncio.timeout(60):
        result = await _send_once(dep, "warm-up", metadata=metadata)
    state = result["task"]["status"]["state"]
    if state in ("TASK_STATE_SUBMITTED", "TASK_STATE_WORKING"):
        raise DeployError(f"warm-up task still {state}: is a worker running?")


def _specs(dep: Deployment, total: int, procs: int, **common: Any) -> list[dict[str, Any]]:
    return [
        {"host": dep.host, "port": dep.port, "prefix": f"p{i}-{os.urandom(3).hex()}", **common}
        for i in range(procs)
    ][: max(1, total)]


async def _with_pool(pool: Pool, fn: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await fn()
    finally:
        pool.close()


# -- closed loop: ceiling and echo ------------------------------------------------


async def closed_loop(dep: Deployment, opts: Options) -> dict[str, Any]:
    """Blocking SendMessage, back to back on ``connections`` connections, ``duration`` s."""
    m = Measured(dep)
    result: dict[str, Any] = {}
    nonce = os.urandom(4).hex()
    if dep.mode != "ceiling":
        await _warm(dep)
    if opts.use_wrk():
        if opts.warmup >= 1:
            await run_wrk(dep.url + "/", duration=opts.warmup, connections=opts.connections,
                          threads=opts.threads, nonce=f"w{nonce}")  # fmt: skip
        await m.begin()
        r = await run_wrk(dep.url + "/", duration=opts.duration, connections=opts.connections,
                          threads=opts.threads, nonce=nonce)  # fmt: skip
        await m.end()
        usage = {"cpu_s": r.cpu_s, "cpu_pct": 100.0 * r.cpu_s / r.duration_s, "vmhwm": r.maxrss}
        loadgen = _loadgen_summary("wrk", [usage], r.threads)
        result.update(
            completed=r.completed,
            not_completed=r.not_completed,
            errors=r.errors,
            duration_s=round(r.duration_s, 3),
            latency_ms={k: round(r.latency_ms[k], 3) for k in ("p50", "p95", "p99", "max")},
            socket_errors=r.socket_errors,
            samples=r.bad_samples,
        )
    else:
        procs = max(1, min(opts.client_procs, opts.connections))
        specs = [
            {**s, "connections": c, "duration": opts.duration, "warmup": opts.warmup}
            for s, c in zip(
                _specs(dep, opts.connections, procs), split(opts.connections, procs), strict=False
            )
        ]
        pool = Pool("send", specs)

        async def run() -> list[dict[str, Any]]:
            await pool.collect("ready", 120)
            await m.begin()
            pool.go()
            out: list[dict[str, Any]] = await pool.collect("result", opts.duration + 120)
            await m.end()
            return out

        parts = await _with_pool(pool, run)
        lat = [x for p in parts for x in p["latency_ms"]]
        usages = [p["usage"] for p in parts]
        loadgen = _loadgen_summary("python", usages)
        result.update(
            completed=sum(p["completed"] for p in parts),
            not_completed=sum(p["not_completed"] for p in parts),
            errors=sum(p["errors"] for p in parts),
            duration_s=round(max(u["wall_s"] for u in usages), 3),
            latency_ms=percentiles(lat),
            samples=[s for p in parts for s in p["samples"]][:3],
        )
    done = int(result["completed"])
    result["tasks_per_s"] = round(done / result["duration_s"], 1) if result["duration_s"] else 0
    result["headline"] = {"name": "tasks/s", "value": result["tasks_per_s"]}
    m.fill(result, done, loadgen)
    return result


# -- submit N with returnImmediately, then poll until all completed --------------


async def _submit_and_wait(
    dep: Deployment,
    opts: Options,
    n: int,
    metadata: dict[str, Any] | None,
    *,
    track_working: bool = False,
) -> dict[str, Any]:
    """Submit ``n`` tasks with returnImmediately (``client_procs`` processes), then poll
    ListTasks until all are completed; with ``track_working``, the most seen running."""
    m = Measured(dep)
    poll = Conn(dep.host, dep.port)
    base_done = await count_tasks(poll, "TASK_STATE_COMPLETED")
    procs = max(1, min(opts.client_procs, n))
    conns = max(procs, min(opts.connections, n))
    counts = split(n, procs)
    conn_counts = split(conns, procs)
    specs = [
        {**s, "connections": c, "count": k, "return_immediately": True, "metadata": metadata}
        for s, c, k in zip(_specs(dep, n, procs), conn_counts, counts, strict=False)
    ]
    pool = Pool("send", specs)
    timeline: list[tuple[float, int]] = []
    max_working = [0]

    async def run() -> tuple[list[dict[str, Any]], float, float, int]:
        await pool.collect("ready", 120)
        await m.begin()
        start_at = pool.go()
        results: list[dict[str, Any]] | None = None
        submitted_at = 0.0
        all_done_at = 0.0
        done = 0
        deadline = time.monotonic() + opts.deadline
        collector = asyncio.create_task(pool.collect("result", opts.deadline))
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                if collector.done() and results is None:
                    results = collector.result()
                    submitted_at = time.time()
                done = await count_tasks(poll, "TASK_STATE_COMPLETED") - base_done
                if track_working:
                    working = await count_tasks(poll, "TASK_STATE_WORKING")
                    max_working[0] = max(max_working[0], working)
                timeline.append((round(time.time() - start_at, 2), done))
                if results is not None and done >= n - _not_accepted(results):
                    all_done_at = time.time()
                    break
            if results is None:
                results = await collector
                submitted_at = submitted_at or time.time()
        finally:
            collector.cancel()
            with contextlib.suppress(BaseException):
                await collector
        await m.end()
        if not all_done_at:
            all_done_at = time.time()
        return results, submitted_at - start_at, all_done_at - start_at, done

    try:
        parts, submit_s, total_s, done = await _with_pool(pool, run)
        failed = sum(
            [await count_tasks(poll, s) for s in ("TASK_STATE_FAILED", "TASK_STATE_CANCELED")]
        )
    finally:
        poll.close()
    usages = [p["usage"] for p in parts]
    accepted = sum(p["completed"] for p in parts)
    lat = [x for p in parts for x in p["latency_ms"]]
    result: dict[str, Any] = {
        "completed": done,
        "not_completed": max(n - done, 0),
        "errors": sum(p["errors"] + p["not_completed"] for p in parts) + failed,
        "duration_s": round(total_s, 3),
        "latency_ms": percentiles(lat),
        "tasks_per_s": round(done / total_s, 1) if total_s else 0,
        "samples": [s for p in parts for s in p["samples"]][:3],
        "extra": {
            "tasks": n,
            "accepted": accepted,
            "failed_or_canceled": failed,
            "submit_s": round(submit_s, 3),
            "submits_per_s": round(accepted / submit_s, 1) if submit_s else None,
            "all_completed_s": round(total_s, 3),
            "progress": timeline[:: max(1, len(timeline) // 20)],
        },
    }
    if track_working:
        result["extra"]["max_working_seen"] = max_working[0]
    result["headline"] = {"name": "tasks/s", "value": result["tasks_per_s"]}
    m.fill(result, done, _loadgen_summary("python", usages))
    result["extra"]["rss_after_mib"] = {p["role"]: p["vmrss_mib"] for p in result["processes"]}
    return result


def _not_accepted(results: list[dict[str, Any]]) -> int:
    return sum(p["errors"] + p["not_completed"] for p in results)


async def submit(dep: Deployment, opts: Options) -> dict[str, Any]:
    n = opts.tasks or 5000
    await _warm(dep)
    return await _submit_and_wait(dep, opts, n, None)


async def slow(dep: Deployment, opts: Options) -> dict[str, Any]:
    n = opts.tasks or 1000
    await _warm(dep, {"sleep": 0})
    result = await _submit_and_wait(dep, opts, n, {"sleep": opts.sleep}, track_working=True)
    workers = opts.concurrency * (opts.worker_procs if dep.mode == "redis" else 1)
    ideal = math.ceil(n / workers) * opts.sleep
    wall = result["duration_s"]
    result["extra"].update(
        sleep_s=opts.sleep,
        concurrency=workers,
        ideal_s=round(ideal, 3),
        wall_vs_ideal=round(wall / ideal, 3) if ideal else None,
        # Held: as many ran at once as allowed (or as there were tasks).
        concurrency_held=result["extra"]["max_working_seen"] >= min(workers, n) * 0.95,
    )
    result["headline"] = {"name": "wall/ideal", "value": result["extra"]["wall_vs_ideal"]}
    return result


# -- streaming ------------------------------------------------------------------


async def stream(dep: Deployment, opts: Options) -> dict[str, Any]:
    """SendStreamingMessage at a fixed rate: submit → first SSE frame, → first status
    update from the worker, → the completed event."""
    await _warm(dep)
    m = Measured(dep)
    procs = max(1, opts.client_procs)
    per = opts.rate / procs
    specs = [
        {**s, "rate": per, "duration": opts.duration, "offset": i / opts.rate}
        for i, s in enumerate(_specs(dep, procs, procs))
    ]
    pool = Pool("stream", specs)

    async def run() -> list[dict[str, Any]]:
        await pool.collect("ready", 120)
        await m.begin()
        pool.go()
        out: list[dict[str, Any]] = await pool.collect("result", opts.duration + 60)
        await m.end()
        return out

    parts = await _with_pool(pool, run)
    usages = [p["usage"] for p in parts]
    done = sum(p["completed"] for p in parts)
    wall = max(u["wall_s"] for u in usages)
    first = percentiles([x for p in parts for x in p["first_ms"]])
    working = percentiles([x for p in parts for x in p["working_ms"]])
    final = percentiles([x for p in parts for x in p["final_ms"]])
    result: dict[str, Any] = {
        "completed": done,
        "not_completed": sum(p["not_completed"] for p in parts),
        "errors": sum(p["errors"] for p in parts),
        "duration_s": round(wall, 3),
        "tasks_per_s": round(done / wall, 1) if wall else 0,
        "latency_ms": first,
        "samples": [s for p in parts for s in p["samples"]][:3],
        "extra": {
            "rate": opts.rate,
            # Below the rate, the server fell behind: latency then measures its backlog.
            "kept_up": bool(wall and done / wall >= 0.95 * opts.rate),
            "sent": sum(p["sent"] for p in parts),
            "first_frame_ms": first,
            "first_worker_event_ms": working,
            "completed_event_ms": final,
            "client_lag_ms": percentiles([x for p in parts for x in p["lag_ms"]]),
            "events": sum(p["events"] for p in parts),
        },
    }
    result["headline"] = {"name": "p99 first event ms", "value": first.get("p99")}
    m.fill(result, done, _loadgen_summary("python", usages))
    return result


async def _waiting_task(dep: Deployment, ticks: int) -> tuple[str, Path]:
    """A ticker task that is working but silent until its start file exists."""
    trigger = dep.workdir / f"start-{os.urandom(4).hex()}"
    meta = {"ticks": ticks, "interval": 0, "start_file": str(trigger), "max_wait": 900}
    result = await _send_once(dep, "tick", return_immediately=True, metadata=meta)
    task_id = str(result["task"]["id"])
    conn = Conn(dep.host, dep.port)
    try:
        async with asyncio.timeout(60):
            while True:  # subscribers attach to a running task, as in real use
                task = await rpc(conn, "GetTask", {"id": task_id, "historyLength": 0})
                state = task["status"]["state"]
                if state == "TASK_STATE_WORKING":
                    return task_id, trigger
                if state not in ("TASK_STATE_SUBMITTED",):
                    raise DeployError(f"ticker task is {state}, not working")
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise DeployError("ticker task not picked up by a worker in 60 s") from None
    finally:
        conn.close()


def _subscriber_specs(
    dep: Deployment, task_id: str, total: int, procs: int
) -> list[dict[str, Any]]:
    return [
        {**s, "task_id": task_id, "count": c, "open_timeout": 300.0}
        for s, c in zip(_specs(dep, total, procs), split(total, procs), strict=False)
    ]


async def fanout(dep: Deployment, opts: Options) -> dict[str, Any]:
    """Many subscribers of one task: events/s delivered while it emits ``ticks`` updates."""
    task_id, trigger = await _waiting_task(dep, opts.ticks)
    m = Measured(dep)
    n = opts.subscribers
    procs = max(opts.client_procs, math.ceil(n / 2500))
    pool = Pool("subscribe", _subscriber_specs(dep, task_id, n, procs))

    async def run() -> tuple[list[Any], list[dict[str, Any]], float]:
        ready = await pool.collect("ready", 300)
        await m.begin()
        start_at = pool.go(0.05)
        await asyncio.sleep(max(start_at - time.time(), 0))
        resumed_at = time.time()
        trigger.touch()
        out: list[dict[str, Any]] = await pool.collect("result", opts.deadline)
        await m.end()
        return ready, out, resumed_at

    ready, parts, resumed_at = await _with_pool(pool, run)
    usages = [p["usage"] for p in parts]
    opened = sum(r["open"] for r in ready)
    frames = sum(p["frames"] for p in parts)
    last = max((p["last_frame_at"] for p in parts), default=0.0)
    span = max(last - resumed_at, 1e-6)
    done = sum(p["completed"] for p in parts)
    errors = sum(p["failed"] + p["broken"] + p["gaps"] for p in parts)
    result: dict[str, Any] = {
        "completed": done,
        "not_completed": max(opened - done, 0),
        "errors": errors,
        "duration_s": round(span, 3),
        "tasks_per_s": None,
        "latency_ms": {},
        "samples": [s for p in parts for s in p["samples"]][:3],
        "extra": {
            "subscribers": n,
            "opened": opened,
            "ticks": opts.ticks,
            "events_delivered": frames,
            "events_per_subscriber": round(frames / opened, 1) if opened else 0,
            "events_per_s": round(frames / span, 1),
            "gaps": sum(p["gaps"] for p in parts),
            "broken_streams": sum(p["broken"] for p in parts),
        },
    }
    result["headline"] = {"name": "events/s", "value": result["extra"]["events_per_s"]}
    m.fill(result, frames, _loadgen_summary("python", usages))
    result["server_cpu_ms_per_event"] = result.pop("server_cpu_ms_per_task")
    return result


async def idle_sse(dep: Deployment, opts: Options) -> dict[str, Any]:
    """``streams`` idle SubscribeToTask streams: server memory per stream, idle CPU."""
    task_id, trigger = await _waiting_task(dep, 0)
    await asyncio.sleep(1.0)
    rss_before = _api_rss(dep)
    n = opts.streams
    procs = max(opts.client_procs, math.ceil(n / 2500))
    m = Measured(dep)
    dep.group.mark()
    t_open = time.monotonic()
    pool = Pool("subscribe", _subscriber_specs(dep, task_id, n, procs))

    async def run() -> tuple[list[Any], list[dict[str, Any]], int, float]:
        ready = await pool.collect("ready", 600)
        open_s = time.monotonic() - t_open
        dep.group.sample()
        open_cpu[0] = m.server_cpu()
        await m.begin()
        pool.go(0.0)
        await asyncio.sleep(opts.hold)
        rss_with = _api_rss(dep)
        await m.end()
        trigger.touch()  # the task completes: every stream gets its last event and ends
        try:
            out: list[dict[str, Any]] = await pool.collect("result", 120)
        except LoadError:
            pool.send("stop")
            out = await pool.collect("result", 30)
        return ready, out, rss_with, open_s

    open_cpu = [0.0]
    ready, parts, rss_with, open_s = await _with_pool(pool, run)
    usages = [p["usage"] for p in parts]
    opened = sum(r["open"] for r in ready)
    done = sum(p["completed"] for p in parts)
    delta = rss_with - rss_before
    cpu = m.server_cpu()
    result: dict[str, Any] = {
        "completed": done,
        "not_completed": max(opened - done, 0),
        "errors": sum(r["failed"] for r in ready) + sum(p["broken"] for p in parts),
        "duration_s": round(m.window.wall, 3),
        "tasks_per_s": None,
        "latency_ms": {},
        "samples": [s for p in parts for s in p["samples"]][:3],
        "extra": {
            "streams": n,
            "opened": opened,
            "open_s": round(open_s, 2),
            "opens_per_s": round(opened / open_s, 1) if open_s else None,
            "server_cpu_ms_per_open": round(1000.0 * open_cpu[0] / opened, 3) if opened else None,
            "server_rss_before_mib": _mib(rss_before),
            "server_rss_with_streams_mib": _mib(rss_with),
            "kib_per_stream": round(delta / 1024 / opened, 1) if opened else None,
            "idle_server_cpu_pct": round(100.0 * cpu / m.window.wall, 1) if m.window.wall else 0,
        },
    }
    result["headline"] = {"name": "MiB with streams", "value": _mib(rss_with)}
    m.fill(result, 0, _loadgen_summary("python", usages))
    return result


# -- the table of scenarios --------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    agent: str
    run: Callable[[Deployment, Options], Coroutine[Any, Any, dict[str, Any]]]
    about: str
    modes: tuple[str, ...] | None = None  # None: every Tether mode


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("ceiling", "", closed_loop, "bare Starlette JSON-RPC endpoint", ("ceiling",)),
        Scenario("echo", f"{AGENTS}:echo", closed_loop, "blocking SendMessage, echo agent"),
        Scenario("submit", f"{AGENTS}:echo", submit, "returnImmediately x N, poll to done"),
        Scenario("stream", f"{AGENTS}:echo", stream, "SendStreamingMessage at --rate"),
        Scenario("fanout", f"{AGENTS}:ticker", fanout, "--subscribers streams of one task"),
        Scenario("slow", f"{AGENTS}:slow", slow, "N tasks sleeping --sleep s each"),
        Scenario("idle-sse", f"{AGENTS}:ticker", idle_sse, "--streams idle SSE subscribers"),
    )
}


def run_one(scenario: str, mode: str, opts: Options) -> dict[str, Any]:
    spec = SCENARIOS[scenario]
    if spec.modes is not None:
        mode = spec.modes[0]
    result: dict[str, Any] = {"scenario": scenario, "mode": mode, "status": "ok"}
    started = time.time()
    try:
        with deploy(mode, spec.agent, opts.deploy) as dep:
            result["deployment"] = dep.notes
            result.update(asyncio.run(spec.run(dep, opts)))
    except ModeUnavailable as exc:
        result.update(status="unavailable", reason=str(exc))
    except (DeployError, LoadError, HttpError, RuntimeError, OSError, TimeoutError) as exc:
        result.update(status="error", reason=f"{type(exc).__name__}: {exc}")
    result["wall_s"] = round(time.time() - started, 2)
    return result
