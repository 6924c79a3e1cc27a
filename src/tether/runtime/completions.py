"""Completions of external operations: the Redis Streams consumer that resumes waiting tasks.

An external system completes an operation (``publish_operation_complete`` or
``POST /operations/{id}:complete``); the completion lands on
``<prefix>:completions`` and the consumer group ``completers`` (one consumer per
worker process) applies it:

* the outcome is stored once per operation id (``store.complete_operation``); a
  redelivered completion finds the operation ended and changes nothing;
* the entry is acknowledged only after that, so a consumer that dies in between
  leaves it pending, and another consumer takes it over with XAUTOCLAIM
  (following the cursor to the end) once it has been idle ``claim_idle`` seconds;
* an entry that cannot be read is dead-lettered at once, one whose handling keeps
  failing after ``max_deliveries`` deliveries (``<prefix>:completions:dead``);
* a store that is down is waited for (that is no fault of the message, so it
  does not count as a delivery), and Redis going away only pauses the loop: it
  retries with backoff for as long as it takes.

The task the completion released is queued again; if Redis refuses that, the
store's re-drive queues it (it is runnable now).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from tether.broker.base import Broker
from tether.broker.redis_client import (
    REDIS_ERRORS,
    Backoff,
    Entry,
    autoclaim,
    connect,
    ensure_group,
    is_nogroup,
    log_outage,
    log_recovery,
    text,
    unavailable,
)
from tether.core.errors import BrokerUnavailable, InvalidInput, TetherError
from tether.store.base import Completion, TaskStore
from tether.store.common import check_operation_id

log = logging.getLogger("tether.completions")

GROUP = "completers"
_BATCH = 100


def stream_name(prefix: str) -> str:
    return f"{prefix}:completions"


def encode(operation_id: str, result: Any, error: str | None) -> dict[str, bytes]:
    check_operation_id(operation_id)
    if error is not None and not isinstance(error, str):
        raise InvalidInput("error must be a string")
    try:
        data = orjson.dumps({"result": result, "error": error})
    except TypeError as exc:
        raise InvalidInput(f"the result is not JSON: {exc}") from None
    return {"op": operation_id.encode(), "data": data}


def decode(fields: dict[bytes, bytes]) -> tuple[str, Any, str | None]:
    """Raises ValueError for an entry no retry can make sense of."""
    try:
        operation_id = fields[b"op"].decode()
        data = orjson.loads(fields[b"data"])
    except (KeyError, UnicodeDecodeError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"not a completion: {exc!r}") from None
    if not isinstance(data, dict):
        raise ValueError("not a completion: data is not an object")
    error = data.get("error")
    if error is not None and not isinstance(error, str):
        raise ValueError("not a completion: error is not a string")
    return operation_id, data.get("result"), error


async def publish_operation_complete(
    operation_id: str,
    result: Any = None,
    *,
    error: str | None = None,
    redis_url: str | None = None,
    prefix: str | None = None,
    client: aioredis.Redis | None = None,
) -> str:
    """Complete ``operation_id``: the task waiting on it resumes with ``result``.

    With ``error``, the operation failed: ``ctx.wait_for`` raises ``OperationFailed``.
    Call it from any process that reaches the deployment's Redis (``redis_url``,
    default ``TETHER_BROKER_URL``; ``prefix``, default ``TETHER_REDIS_PREFIX`` or
    ``tether``). Safe to repeat: an operation completes once, later completions
    of it are ignored. Returns the stream entry id; raises ``BrokerUnavailable``
    when Redis cannot be reached.
    """
    fields = encode(operation_id, result, error)
    prefix = prefix or os.environ.get("TETHER_REDIS_PREFIX") or "tether"
    owned = client is None
    if client is None:
        url = redis_url or os.environ.get("TETHER_BROKER_URL", "")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise InvalidInput(
                "publish_operation_complete needs a Redis URL (redis_url= or TETHER_BROKER_URL)"
            )
        client = connect(url)
    try:
        return text(await client.xadd(stream_name(prefix), fields))  # type: ignore[arg-type]
    except REDIS_ERRORS as exc:
        raise unavailable("publish completion", exc) from exc
    finally:
        if owned:
            await client.aclose()


async def apply_completion(
    store: TaskStore, broker: Broker, operation_id: str, result: Any, error: str | None
) -> Completion:
    """Store the outcome (once) and queue the task it releases."""
    done = await store.complete_operation(operation_id, result=result, error=error)
    # A redelivery may follow a crash between the store and the enqueue: queue again
    # (idempotent); a task that is not waiting any more just is not claimed.
    task_id = done.resumed or (done.operation.task_id if not done.changed else None)
    if task_id is not None:
        try:
            await broker.enqueue(task_id)
        except BrokerUnavailable as exc:
            log.warning("task %s resumed but not queued (the re-drive will): %s", task_id, exc)
    return done


class CompletionConsumer:
    def __init__(
        self,
        store: TaskStore,
        broker: Broker,
        *,
        url: str = "redis://127.0.0.1:6379/0",
        client: aioredis.Redis | None = None,
        prefix: str = "tether",
        consumer: str = "completer",
        claim_idle: float = 30.0,
        max_deliveries: int = 5,
        block: float = 1.0,
        dead_maxlen: int = 10_000,
    ) -> None:
        self.store = store
        self.broker = broker
        self._owns_client = client is None
        self.redis = client if client is not None else connect(url)
        self.stream = stream_name(prefix)
        self.dead_stream = f"{self.stream}:dead"
        self.group = GROUP
        self.consumer = consumer
        self.claim_idle = claim_idle
        self.max_deliveries = max_deliveries
        self._claim_every = max(0.05, min(claim_idle / 2, 5.0))
        self._block = max(0.05, min(block, self._claim_every))
        self._dead_maxlen = dead_maxlen
        self._cursor = "0-0"
        self._next_claim = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.applied = 0
        self.duplicates = 0
        self.dead_lettered = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="completion-consumer")

    async def stop(self, grace: float = 5.0) -> None:
        """Let the loop finish its read (``block``) or store call and end; cancel it only if
        it does not: a command or transaction cut in half can leave its connection stuck."""
        if self._task is not None:
            self._stopping = True
            done, _ = await asyncio.wait({self._task}, timeout=grace + self._block)
            if not done:
                log.warning("completion consumer did not stop in %.0fs; cancelling it", grace)
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=2.0)
            self._task = None
        if self._owns_client:
            await self.redis.aclose()

    async def _loop(self) -> None:
        backoff = Backoff()
        group_ready = False
        while not self._stopping:
            try:
                if not group_ready:
                    await ensure_group(self.redis, self.stream, self.group)
                    group_ready = True
                entries = await self._fetch()
                log_recovery(log, backoff, "completion consumer")
                for entry in entries:
                    if self._stopping:
                        break  # the rest stay pending, for another consumer
                    await self._handle(entry)
            except REDIS_ERRORS as exc:
                if is_nogroup(exc):
                    log.warning("completion consumer group missing (Redis restarted?): recreating")
                    group_ready = False
                log_outage(log, backoff, "completion consumer", exc)
                await backoff.wait()
            except Exception:
                # Whatever it was, stopping for good would strand every waiting task.
                log.exception("completion consumer failed; going on")
                await backoff.wait()

    async def _fetch(self) -> list[Entry]:
        now = time.monotonic()
        if now >= self._next_claim:
            self._cursor, entries = await autoclaim(
                self.redis,
                self.stream,
                self.group,
                self.consumer,
                min_idle=self.claim_idle,
                cursor=self._cursor,
                want=_BATCH,
            )
            if self._cursor == "0-0":
                self._next_claim = now + self._claim_every
            if entries:
                return entries
        reply: Any = await self.redis.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: ">"},
            count=_BATCH,
            block=max(1, int(min(self._block, self._next_claim - now) * 1000)),
        )
        return [
            (text(entry_id), fields, 1)
            for _, stream_entries in reply or []
            for entry_id, fields in stream_entries
        ]

    async def _handle(self, entry: Entry) -> None:
        entry_id, fields, deliveries = entry
        try:
            operation_id, result, error = decode(fields)
        except ValueError as exc:
            await self._dead_letter(entry, str(exc))
            return
        if deliveries > self.max_deliveries:
            await self._dead_letter(entry, f"still failing after {deliveries - 1} deliveries")
            return
        try:
            done = await self._apply(operation_id, result, error)
        except Exception as exc:
            # Left pending: redelivered after ``claim_idle``, dead-lettered after the last try.
            log.warning(
                "completion %s of operation %s failed (delivery %d of %d): %s",
                entry_id,
                operation_id,
                deliveries,
                self.max_deliveries,
                exc,
            )
            return
        if done.changed:
            self.applied += 1
        else:
            self.duplicates += 1
            log.info(
                "operation %s already %s: completion ignored", operation_id, done.operation.state
            )
        await self._ack(entry_id)

    async def _apply(self, operation_id: str, result: Any, error: str | None) -> Completion:
        backoff = Backoff(cap=5.0)
        while True:
            try:
                return await apply_completion(self.store, self.broker, operation_id, result, error)
            except TetherError as exc:
                if not exc.retryable or self._stopping:
                    raise
                log_outage(log, backoff, "completion consumer (store)", exc)
            await backoff.wait()

    async def _ack(self, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()

    async def _dead_letter(self, entry: Entry, why: str) -> None:
        entry_id, fields, deliveries = entry
        log.warning("dead-lettering completion %s: %s", entry_id, why)
        dead: dict[Any, Any] = {
            **fields,
            b"entry": entry_id.encode(),
            b"deliveries": str(deliveries).encode(),
            b"reason": why.encode(),
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_stream, dead, maxlen=self._dead_maxlen)
            pipe.xack(self.stream, self.group, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()
        self.dead_lettered += 1
