"""Redis Streams broker: one stream, one consumer group, a consumer per worker process.

Keys, under a configurable prefix (``tether`` by default):

* ``<prefix>:queue`` — the stream of task ids, read by the consumer group ``workers``;
* ``<prefix>:queue:dead`` — entries handed out ``max_deliveries`` times without ever
  being acknowledged (bounded with MAXLEN), for an operator to look at;
* ``<prefix>:queued:<task id>`` — the id of the task's latest entry, so an enqueue
  of a task whose entry still waits (in the stream, handed to no worker yet) adds
  nothing (the store's re-drive enqueues every runnable task again and again).

An entry stays pending from its delivery until the worker has stored the task's
outcome (``ack``); a live worker's heartbeat (``touch``) keeps resetting its idle
time. An entry idle past ``reclaim_idle`` (the lease) belonged to a worker that
died: another worker takes it over with XAUTOCLAIM, following the cursor through
the whole pending list, and the delivery count goes up. The lease on the task
row decides who may run it; the entry only says that someone should try.

The per-task commands (enqueue, ack) go through a ``Link``: those issued at the
same time share one write and one round trip. The fetch loop reads on a link of
its own, since its XREADGROUP blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tether.broker.base import Delivery
from tether.broker.redis_client import (
    REDIS_ERRORS,
    Backoff,
    Link,
    Reply,
    Script,
    autoclaim,
    connect,
    ensure_group,
    is_nogroup,
    log_outage,
    log_recovery,
    run_scripts,
    text,
    unavailable,
)
from tether.core.types import instance_id

log = logging.getLogger("tether.broker")

GROUP = "workers"
# A marker outlives its entry only after a crash between two steps; it then just expires.
MARKER_TTL = 24 * 3600

# Queue a task unless its latest entry is still waiting: in the stream and not handed
# out (pending) yet. One handed out may be queued again (a follow-up message). Asking
# the pending list here, only when a marker exists, spares the fetch a round trip per
# read to drop the markers of what it was handed. Without the group (a restart) the
# entry waits for the group that will be created from id 0.
_ENQUEUE = """
local last = redis.call('GET', KEYS[2])
if last and #redis.call('XRANGE', KEYS[1], last, last) > 0 then
  local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[3], last, last, 1)
  if not (ok and #p > 0) then return 0 end
end
local id = redis.call('XADD', KEYS[1], '*', 'task', ARGV[1])
redis.call('SET', KEYS[2], id, 'EX', ARGV[2])
return 1
"""

# pcall: after a restart the group may be gone, and there is then nothing left to ack.
_ACK = """
redis.pcall('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1
"""

_RELEASE = """
redis.pcall('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
local id = redis.call('XADD', KEYS[1], '*', 'task', ARGV[3])
redis.call('SET', KEYS[2], id, 'EX', ARGV[4])
return id
"""

_DEAD = """
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*',
  'task', ARGV[3], 'entry', ARGV[2], 'deliveries', ARGV[4], 'reason', ARGV[5])
redis.pcall('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1
"""

# Reset the idle time of entries this consumer still owns. XCLAIM ... JUSTID does not
# count a delivery; the owner check keeps a late heartbeat from taking an entry back
# from the worker that reclaimed it.
_TOUCH = """
local n = 0
for i = 3, #ARGV do
  local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if ok and #p > 0 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
"""


class RedisBroker:
    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        client: aioredis.Redis | None = None,
        prefix: str = "tether",
        consumer: str | None = None,
        reclaim_idle: float = 30.0,
        max_deliveries: int = 10,
        block: float = 1.0,
        dead_maxlen: int = 10_000,
    ) -> None:
        self.prefix = prefix
        self.stream = f"{prefix}:queue"
        self.dead_stream = f"{prefix}:queue:dead"
        self.group = GROUP
        self.consumer = consumer or instance_id()
        self.reclaim_idle = reclaim_idle
        self.max_deliveries = max_deliveries
        self._block = max(0.05, min(block, reclaim_idle / 2))
        self._reclaim_every = max(0.05, min(reclaim_idle / 3, 5.0))
        self._dead_maxlen = dead_maxlen
        self._owns_client = client is None
        # redis-py for the rare commands (reclaim, dead letters, housekeeping).
        self.redis = client if client is not None else connect(url)
        self._link = Link.of(self.redis)
        # A connection of its own, since XREADGROUP blocks on it; and no retry: a read
        # repeated after a lost reply would leave the first read's entries pending here
        # unseen (they are reclaimed after the lease).
        self._fetch_link = Link.of(self.redis, retries=0, shared=False)
        self._enqueue_script = Script(_ENQUEUE)
        self._ack_script = Script(_ACK)
        self._release_script = Script(_RELEASE)
        self._dead_script = Script(_DEAD)
        self._touch_script = Script(_TOUCH)
        self._ready: asyncio.Queue[Delivery] = asyncio.Queue()
        self._demand = 0
        self._wake = asyncio.Event()
        self._fetcher: asyncio.Task[None] | None = None
        self._closing = False
        self._cursor = "0-0"
        self._next_reclaim = 0.0
        self._next_cleanup = time.monotonic() + 600.0
        self.dead_lettered = 0

    def _marker(self, task_id: str) -> str:
        return f"{self.prefix}:queued:{task_id}"

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        try:
            await ensure_group(self.redis, self.stream, self.group)
        except REDIS_ERRORS as exc:
            # Not fatal: the fetch loop creates the group once Redis answers.
            log.warning("Redis broker starting without Redis: %s", exc)
        if self._fetcher is None:
            self._fetcher = asyncio.create_task(self._fetch_loop(), name="redis-broker-fetch")

    async def close(self) -> None:
        if self._fetcher is not None:
            # The fetch loop ends after its current read (at most ``block``); it is
            # cancelled only if it does not.
            self._closing = True
            self._wake.set()
            done, _ = await asyncio.wait({self._fetcher}, timeout=self._block + 5.0)
            if not done:
                self._fetcher.cancel()
                await asyncio.wait({self._fetcher}, timeout=2.0)
            self._fetcher = None
        while not self._ready.empty():
            with contextlib.suppress(Exception):
                await self.release(self._ready.get_nowait())
        await self._fetch_link.close()
        await self._link.close()
        if self._owns_client:
            await self.redis.aclose()

    # -- producing -------------------------------------------------------------

    def _enqueue_call(self, task_id: str) -> tuple[Script, list[str], list[str | int]]:
        return (
            self._enqueue_script,
            [self.stream, self._marker(task_id)],
            [task_id, MARKER_TTL, self.group],
        )

    async def enqueue(self, task_id: str) -> None:
        script, keys, args = self._enqueue_call(task_id)
        try:
            await script(self._link, keys, args)
        except REDIS_ERRORS as exc:
            raise unavailable("enqueue", exc) from exc

    async def enqueue_many(self, task_ids: Sequence[str]) -> None:
        if not task_ids:
            return
        try:
            replies = await run_scripts(self._link, [self._enqueue_call(t) for t in task_ids])
        except REDIS_ERRORS as exc:
            raise unavailable("enqueue", exc) from exc
        _raise_first_error("enqueue", replies)

    # -- consuming -------------------------------------------------------------

    async def next(self) -> Delivery:
        self._demand += 1
        self._wake.set()
        try:
            return await self._ready.get()
        finally:
            self._demand -= 1

    async def ack(self, delivery: Delivery) -> None:
        try:
            await self._ack_script(
                self._link,
                [self.stream, self._marker(delivery.task_id)],
                [self.group, delivery.entry_id],
            )
        except REDIS_ERRORS as exc:
            raise unavailable("ack", exc) from exc

    async def release(self, delivery: Delivery) -> None:
        try:
            await self._release_script(
                self._link,
                [self.stream, self._marker(delivery.task_id)],
                [self.group, delivery.entry_id, delivery.task_id, MARKER_TTL],
            )
        except REDIS_ERRORS as exc:
            raise unavailable("release", exc) from exc

    async def touch(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        try:
            await self._touch_script(
                self._link,
                [self.stream],
                [self.group, self.consumer, *(d.entry_id for d in deliveries)],
            )
        except REDIS_ERRORS as exc:
            raise unavailable("heartbeat", exc) from exc

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        """The newest dead-lettered entries (for operators and tests)."""
        try:
            rows: Any = await self.redis.xrevrange(self.dead_stream, count=count)
        except REDIS_ERRORS as exc:
            raise unavailable("dead letters", exc) from exc
        return [{text(k): text(v) for k, v in fields.items()} for _, fields in rows]

    # -- the fetch loop ----------------------------------------------------------

    async def _fetch_loop(self) -> None:
        """Fetch as many entries as ``next()`` callers wait for, never more.

        Fetching ahead would leave entries pending here, idle, while other workers
        have free slots, and they would be reclaimed from under us.
        """
        backoff = Backoff()
        while not self._closing:
            want = self._demand - self._ready.qsize()
            if want <= 0:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                got = await self._fetch(want)
            except REDIS_ERRORS as exc:
                if is_nogroup(exc):
                    log.warning("queue consumer group missing (Redis restarted?): recreating it")
                    with contextlib.suppress(*REDIS_ERRORS):
                        await ensure_group(self.redis, self.stream, self.group)
                        continue
                log_outage(log, backoff, "broker", exc)
                await backoff.wait()
                continue
            except Exception:
                log.exception("broker fetch failed")
                await backoff.wait()
                continue
            log_recovery(log, backoff, "broker")
            for delivery in got:
                self._ready.put_nowait(delivery)

    async def _fetch(self, want: int) -> list[Delivery]:
        now = time.monotonic()
        if now >= self._next_reclaim:
            got = await self._reclaim(want)
            if self._cursor == "0-0":
                self._next_reclaim = now + self._reclaim_every
            if now >= self._next_cleanup:
                self._next_cleanup = now + 600.0
                await self._forget_dead_consumers()
            if got:
                return got
        block = max(0.001, min(self._block, self._next_reclaim - now))
        # COUNT is the demand, so one read takes a whole burst; BLOCK returns as soon as
        # an entry arrives, the bound only brings the next reclaim round in time.
        reply: Reply = await self._fetch_link.call(
            "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", want,
            "BLOCK", max(1, int(block * 1000)), "STREAMS", self.stream, ">",
            reply_within=block + self._fetch_link.endpoint.read_timeout,
        )  # fmt: skip
        out = []
        for _, entries in reply or []:
            for entry_id, flat in entries:
                fields = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}
                delivery = await self._parse((entry_id, fields), 1)
                if delivery is not None:
                    out.append(delivery)
        return out

    async def _reclaim(self, want: int) -> list[Delivery]:
        """Take over entries idle past the lease: their worker died or hung."""
        self._cursor, entries = await autoclaim(
            self.redis,
            self.stream,
            self.group,
            self.consumer,
            min_idle=self.reclaim_idle,
            cursor=self._cursor,
            want=want,
        )
        out = []
        for entry_id, fields, count in entries:
            log.info("reclaimed queue entry %s (delivery %d)", entry_id, count)
            delivery = await self._parse((entry_id, fields), count)
            if delivery is not None:
                out.append(delivery)
        return out

    async def _parse(self, entry: tuple[Any, Any], deliveries: int) -> Delivery | None:
        entry_id, fields = text(entry[0]), entry[1] or {}
        task = fields.get(b"task")
        if task is None:
            await self._dead_letter(entry_id, "", deliveries, "malformed entry: no task id")
            return None
        delivery = Delivery(text(task), entry_id, deliveries)
        if deliveries > self.max_deliveries:
            await self._dead_letter(
                entry_id,
                delivery.task_id,
                deliveries,
                f"handed out {deliveries} times and never acknowledged",
            )
            return None
        return delivery

    async def _dead_letter(self, entry_id: str, task_id: str, deliveries: int, why: str) -> None:
        log.warning("dead-lettering queue entry %s of task %s: %s", entry_id, task_id, why)
        await self._dead_script(
            self._link,
            [self.stream, self._marker(task_id), self.dead_stream],
            [self.group, entry_id, task_id, deliveries, why, self._dead_maxlen],
        )
        self.dead_lettered += 1

    async def _forget_dead_consumers(self) -> None:
        """Consumers of processes long gone, with nothing pending, are only clutter."""
        for info in await self.redis.xinfo_consumers(self.stream, self.group):
            name = text(info["name"])
            if name != self.consumer and not info["pending"] and info["idle"] > 3_600_000:
                await self.redis.xgroup_delconsumer(self.stream, self.group, name)


def _raise_first_error(what: str, replies: list[Reply]) -> None:
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise unavailable(what, reply)
