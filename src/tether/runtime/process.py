"""One process's backends, chosen from ``Settings``, and the ``tether worker`` process.

``TETHER_BROKER_URL=local`` (the default) is the embedded deployment: an
in-process queue and event bus, so the API and its workers share one process.
``redis://…`` is the scaled-out one: the queue, the live events, cancels and
completions go through Redis, so any number of API processes (``serve
--workers 0``) and worker processes (``tether worker``) share one PostgreSQL
database and one Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tether.broker.base import Broker
from tether.broker.local import LocalBroker
from tether.config import Settings
from tether.core.errors import InvalidInput
from tether.core.types import instance_id
from tether.events.base import EventBus
from tether.events.local import LocalEventBus
from tether.runtime.agent import Agent
from tether.runtime.worker import Runtime
from tether.store import open_store
from tether.store.base import TaskStore

log = logging.getLogger("tether.worker")

Complete = Callable[[str, Any, str | None], Awaitable[dict[str, Any]]]

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def uses_redis(settings: Settings) -> bool:
    url = settings.broker_url.strip()
    if url in ("", "local"):
        return False
    if url.startswith(_REDIS_SCHEMES):
        return True
    raise InvalidInput(f"TETHER_BROKER_URL={url!r}: use 'local' or a redis:// URL")


def tune_gc() -> None:
    """For a server or worker process, once it has loaded its code.

    What exists by then (modules, the app) lives as long as the process: the cyclic
    collector stops walking it (``gc.freeze``). A task makes and drops thousands of
    objects, nearly all freed by their reference counts, so a young collection every
    700 allocations (the default) ran several times per task; every 20,000 keeps the
    garbage cycles that asyncio leaves (futures, tracebacks) short-lived all the same.
    Measured on the embedded echo server: 5% fewer instructions per task.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def default_worker_id() -> str:
    return instance_id()


def open_broker(settings: Settings, worker_id: str) -> Broker:
    if not uses_redis(settings):
        return LocalBroker()
    from tether.broker.redis import RedisBroker

    # An entry idle past the lease belonged to a worker that stopped heartbeating.
    return RedisBroker(
        settings.broker_url,
        prefix=settings.redis_prefix,
        consumer=worker_id,
        reclaim_idle=settings.lease_seconds,
        max_deliveries=settings.max_deliveries,
    )


def open_bus(settings: Settings) -> EventBus:
    if not uses_redis(settings):
        return LocalEventBus(subscriber_limit=settings.sse_buffer)
    from tether.events.redis import RedisEventBus

    return RedisEventBus(
        settings.broker_url,
        prefix=settings.redis_prefix,
        maxlen=settings.events_maxlen,
        ttl=settings.events_ttl,
        subscriber_limit=settings.sse_buffer,
    )


def make_runtime(
    agent: Agent,
    settings: Settings,
    store: TaskStore,
    broker: Broker,
    bus: EventBus,
    worker_id: str,
) -> Runtime:
    completions = None
    if uses_redis(settings):
        # Imported here: the embedded server never loads redis (7 MiB of its memory).
        from tether.runtime.completions import CompletionConsumer

        completions = CompletionConsumer(
            store,
            broker,
            url=settings.broker_url,
            prefix=settings.redis_prefix,
            consumer=worker_id,
            claim_idle=settings.completion_claim_idle,
            max_deliveries=settings.completion_max_deliveries,
        )
    return Runtime(
        agent,
        store,
        broker,
        bus,
        concurrency=settings.workers,
        lease_seconds=settings.lease_seconds,
        worker_id=worker_id,
        completions=completions,
        secret=settings.secret,
        public_url=settings.public_url,
    )


def completer(settings: Settings, store: TaskStore, broker: Broker) -> Complete:
    """How the API's HTTP callback completes an operation in this deployment."""
    if uses_redis(settings):
        # Through the stream, like every completion: the consumer group stores it once.
        async def publish(operation_id: str, result: Any, error: str | None) -> dict[str, Any]:
            from tether.runtime.completions import publish_operation_complete

            client = getattr(broker, "redis", None)
            entry = await publish_operation_complete(
                operation_id,
                result,
                error=error,
                redis_url=settings.broker_url,
                prefix=settings.redis_prefix,
                client=client,
            )
            return {"operationId": operation_id, "accepted": True, "entry": entry}

        return publish

    async def direct(operation_id: str, result: Any, error: str | None) -> dict[str, Any]:
        # Embedded: no consumer group to go through; store it and queue the task here.
        from tether.runtime.completions import apply_completion

        done = await apply_completion(store, broker, operation_id, result, error)
        return {
            "operationId": operation_id,
            "accepted": True,
            "state": done.operation.state.value,
            "duplicate": not done.changed,
        }

    return direct


async def run_worker(agent: Agent, settings: Settings, stop: asyncio.Event | None = None) -> None:
    """``tether worker``: run the agent's handlers until SIGTERM/SIGINT (or ``stop``)."""
    if not uses_redis(settings):
        raise InvalidInput(
            "a worker process needs a shared broker: set TETHER_BROKER_URL=redis://… "
            "(and TETHER_DATABASE_URL to the API's PostgreSQL database)"
        )
    if settings.workers < 1:
        raise InvalidInput("a worker process needs --concurrency of at least 1")
    _ = agent.fn
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    worker_id = default_worker_id()
    store = open_store(settings.database_url)
    broker = open_broker(settings, worker_id)
    bus = open_bus(settings)
    runtime = make_runtime(agent, settings, store, broker, bus, worker_id)
    await store.start()
    try:
        await bus.start()
        await broker.start()
        await runtime.start()
        log.info(
            "worker %s running %r: %d slot(s), lease %.1fs, broker %s",
            worker_id,
            agent.name,
            settings.workers,
            settings.lease_seconds,
            settings.broker_url,
        )
        await stop.wait()
        log.info("worker %s stopping: %d task(s) running", worker_id, runtime.running)
        grace = settings.shutdown_grace
        await _bounded("runtime", runtime.stop(grace), grace + 15.0)
    finally:
        await _bounded("broker", broker.close(), 10.0)
        await _bounded("event bus", bus.close(), 10.0)
        await _bounded("store", store.close(), 10.0)
        log.info("worker %s stopped", worker_id)


async def _bounded(what: str, step: Awaitable[None], limit: float) -> None:
    """One step of shutdown, given ``limit`` seconds: a stuck step must not keep the
    process from exiting (its orchestrator would SIGKILL it, losing the hand-back)."""
    started = time.monotonic()
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=limit)
    if not done:
        log.error("shutdown: closing the %s took over %.0fs; going on without it", what, limit)
        for pending in asyncio.all_tasks():
            if pending is not asyncio.current_task():
                log.error("still running: %r\n%s", pending, _stack(pending))
        task.cancel()
        return
    if not task.cancelled() and task.exception() is not None:
        log.error("shutdown: closing the %s failed: %r", what, task.exception())
    log.debug("shutdown: %s closed in %.2fs", what, time.monotonic() - started)


def _stack(task: asyncio.Task[Any]) -> str:
    out = io.StringIO()
    task.print_stack(file=out)
    return out.getvalue()
