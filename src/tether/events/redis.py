"""Task events across processes: a Redis Stream per task, and pub/sub to wake subscribers.

Every published event is written to ``<prefix>:events:<task id>`` with the entry
id ``<seq>-0`` (so the stream holds each sequence number at most once and can
be read from any ``Last-Event-ID``), trimmed to about ``maxlen`` entries and
expiring ``ttl`` seconds after the task's last event. The same event goes out
on the task's pub/sub channel, which carries it live to every API replica with
a subscriber; a replica that (re)subscribes first reads the stream's tail, so
an event published while it was subscribing is not missed.

Redis is a fast path, never the record: the store's event log is. Publishing
does not wait for Redis (a background task pipelines the writes, and keeps the
newest ``buffer_limit`` events while Redis is away); a subscriber that misses
events sees a gap in the sequence numbers and the caller reads them from the
store (``server/service.py`` does), and ``history()`` answers None whenever the
stream cannot prove it holds every event asked for.

Cancels cross processes on ``<prefix>:cancel``: a canceled final event is also
published there, and ``on_final`` listeners (the worker runtime) hear those from
every process, besides every final event published by their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import deque
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from tether.broker.redis_client import (
    REDIS_ERRORS,
    Backoff,
    connect,
    database,
    log_outage,
    log_recovery,
)
from tether.core.states import TaskState
from tether.core.types import TaskEvent, new_id
from tether.events.base import Listener

log = logging.getLogger("tether.events")

_BATCH = 256


def _encode(event: TaskEvent, origin: str) -> bytes:
    return orjson.dumps(
        {
            "o": origin,
            "t": event.task_id,
            "s": event.seq,
            "k": event.kind,
            "f": event.final,
            "p": event.payload,
        }
    )


def _decode(data: bytes | str) -> tuple[TaskEvent, str]:
    d = orjson.loads(data)
    return TaskEvent(str(d["t"]), int(d["s"]), str(d["k"]), d["p"], bool(d["f"])), str(d["o"])


def _canceled(event: TaskEvent) -> bool:
    return (
        event.final
        and event.kind == "status"
        and event.payload.get("status", {}).get("state") == TaskState.CANCELED.wire
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisSubscription:
    def __init__(self, bus: RedisEventBus, task_id: str, limit: int) -> None:
        self._bus = bus
        self.task_id = task_id
        self._queue: asyncio.Queue[TaskEvent] = asyncio.Queue(limit)
        self._overflowed = False
        self._closed = False
        self._last = 0  # highest seq handed over: the same event comes from several paths

    def _offer(self, event: TaskEvent) -> None:
        if self._overflowed or self._closed or event.seq <= self._last:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            # Cut a reader this slow off and free what it holds; it resumes from the
            # store by sequence number.
            self._overflowed = True
            while not self._queue.empty():
                self._queue.get_nowait()
            self.close()
            return
        self._last = event.seq

    @property
    def overflowed(self) -> bool:
        return self._overflowed

    async def get(self, wait: float) -> TaskEvent | None:
        if self._overflowed:
            return None
        if not self._queue.empty():
            return self._queue.get_nowait()
        if self._closed or wait <= 0:
            return None
        try:
            async with asyncio.timeout(wait):
                return await self._queue.get()
        except TimeoutError:
            return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._bus._drop(self)


class _Channel:
    """The local subscribers of one task, and the state of its pub/sub subscription."""

    __slots__ = ("held", "limit", "live", "subs")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.subs: set[RedisSubscription] = set()
        # False from a (re)subscription until the stream's tail is read: live events
        # wait in ``held`` meanwhile, so they are handed over in sequence order.
        self.live = False
        self.held: list[TaskEvent] = []

    def offer(self, event: TaskEvent) -> None:
        if not self.live:
            # Bounded while Redis is away; what is dropped is a gap the store fills.
            if len(self.held) < self.limit:
                self.held.append(event)
            return
        for sub in list(self.subs):
            sub._offer(event)


class RedisEventBus:
    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        client: aioredis.Redis | None = None,
        prefix: str = "tether",
        maxlen: int = 1000,
        ttl: float = 3600.0,
        subscriber_limit: int = 1000,
        buffer_limit: int = 10_000,
        catch_up: int = 200,
    ) -> None:
        self._owns_client = client is None
        self.redis = client if client is not None else connect(url)
        self.prefix = prefix
        # Pub/sub channels ignore SELECT: name the database so deployments sharing a
        # server on different databases do not hear each other.
        self._chan = f"{prefix}:{database(self.redis)}"
        self.cancel_channel = f"{self._chan}:cancel"
        self._control = f"{self._chan}:control"
        self.maxlen = maxlen
        self.ttl_ms = max(1, int(ttl * 1000))
        self._limit = subscriber_limit
        self._catch_up_count = catch_up
        self.origin = new_id()[:12]
        self._channels: dict[str, _Channel] = {}
        self._listeners: list[Listener] = []
        self._out: deque[TaskEvent] = deque(maxlen=buffer_limit)
        self._out_ready = asyncio.Event()
        self._dropped = 0
        self._want_changed = asyncio.Event()
        self._catching_up: set[str] = set()
        # Channels Redis confirmed this connection is subscribed to.
        self._confirmed: set[str] = set()
        self._catch_up_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    def stream_key(self, task_id: str) -> str:
        return f"{self.prefix}:events:{task_id}"

    def _channel_name(self, task_id: str) -> str:
        return f"{self._chan}:events:{task_id}"

    def _task_of(self, channel: str) -> str | None:
        head = f"{self._chan}:events:"
        return channel[len(head) :] if channel.startswith(head) else None

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._flush_loop(), name="redis-events-flush"),
                asyncio.create_task(self._listen_loop(), name="redis-events-listen"),
                asyncio.create_task(self._catch_up_loop(), name="redis-events-catch-up"),
            ]

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Flush what is buffered (for ``flush_timeout`` at most) and stop.

        The loops end by themselves between two Redis calls; one is cancelled only if it
        does not, since a command cut in half can leave its connection stuck.
        """
        self._closing = True
        for wake in (self._out_ready, self._want_changed, self._catch_up_ready):
            wake.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=flush_timeout + 2.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        self._tasks = []
        self._channels.clear()
        if self._owns_client:
            await self.redis.aclose()

    # -- publishing ----------------------------------------------------------------

    async def publish(self, event: TaskEvent) -> None:
        channel = self._channels.get(event.task_id)
        if channel is not None:
            channel.offer(event)
        if event.final:
            await self._tell_listeners(event)
        if len(self._out) == self._out.maxlen:
            self._dropped += 1
            if self._dropped in (1, 100) or self._dropped % 10_000 == 0:
                log.warning(
                    "Redis unreachable: %d event(s) not published (they stay in the store)",
                    self._dropped,
                )
        self._out.append(event)
        self._out_ready.set()

    async def _tell_listeners(self, event: TaskEvent) -> None:
        for listener in list(self._listeners):
            try:
                result = listener(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("final-event listener failed")

    async def _flush_loop(self) -> None:
        backoff = Backoff()
        while not (self._closing and not self._out):
            await self._out_ready.wait()
            self._out_ready.clear()
            while self._out:
                batch = [self._out.popleft() for _ in range(min(_BATCH, len(self._out)))]
                try:
                    await self._write(batch)
                except REDIS_ERRORS as exc:
                    if self._closing:
                        # No waiting for Redis on the way out: the store has every event.
                        self._out.clear()
                        break
                    # Put the batch back in front, in order; the deque keeps the newest.
                    room = (self._out.maxlen or len(batch)) - len(self._out)
                    self._out.extendleft(reversed(batch[-room:] if room > 0 else []))
                    log_outage(log, backoff, "event publisher", exc)
                    await backoff.wait()
                    continue
                except Exception:
                    log.exception("event publish failed; %d event(s) dropped", len(batch))
                    continue
                log_recovery(log, backoff, "event publisher")
                self._dropped = 0

    async def _write(self, batch: list[TaskEvent]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for event in batch:
                data = _encode(event, self.origin)
                key = self.stream_key(event.task_id)
                # The seq as entry id: a second copy of an event is refused by Redis.
                pipe.xadd(key, {"e": data}, id=f"{event.seq}-0", maxlen=self.maxlen)
                pipe.pexpire(key, self.ttl_ms)
                pipe.publish(self._channel_name(event.task_id), data)
                if _canceled(event):
                    pipe.publish(self.cancel_channel, data)
            # raise_on_error=False: a refused duplicate or out-of-order XADD must not stop
            # the rest of the batch; connection errors still raise.
            await pipe.execute(raise_on_error=False)

    # -- replay ----------------------------------------------------------------------

    async def history(self, task_id: str, after_seq: int) -> list[TaskEvent] | None:
        """Events after ``after_seq`` from the task's stream, or None if it may lack some.

        None (read the store instead) when Redis is unreachable, the stream expired
        or was trimmed past ``after_seq``, or a sequence number is missing.
        """
        try:
            rows: Any = await self.redis.xrange(self.stream_key(task_id), min=f"{after_seq + 1}-0")
        except REDIS_ERRORS:
            return None
        events = []
        expected = after_seq + 1
        for entry_id, fields in rows:
            seq = int(_text(entry_id).split("-", 1)[0])
            if seq != expected or b"e" not in fields:
                return None
            events.append(_decode(fields[b"e"])[0])
            expected += 1
        return events or None

    # -- subscribing -------------------------------------------------------------------

    def subscribe(self, task_id: str) -> RedisSubscription:
        sub = RedisSubscription(self, task_id, self._limit)
        channel = self._channels.get(task_id)
        if channel is None:
            channel = self._channels[task_id] = _Channel(self._limit)
            if self._channel_name(task_id) in self._confirmed:
                # Still subscribed (its last subscriber just left, the UNSUBSCRIBE not
                # sent): no confirmation will come, so read the stream's tail now.
                self._catching_up.add(task_id)
                self._catch_up_ready.set()
            self._want_changed.set()
        channel.subs.add(sub)
        return sub

    def on_final(self, listener: Listener) -> None:
        self._listeners.append(listener)
        self._want_changed.set()

    def _drop(self, sub: RedisSubscription) -> None:
        channel = self._channels.get(sub.task_id)
        if channel is not None:
            channel.subs.discard(sub)
            if not channel.subs:
                del self._channels[sub.task_id]
                self._want_changed.set()

    def _wanted(self) -> set[str]:
        names = {self._control, *(self._channel_name(t) for t in self._channels)}
        if self._listeners:
            names.add(self.cancel_channel)
        return names

    async def _listen_loop(self) -> None:
        """One pub/sub connection for the process; rebuilt from scratch after any error."""
        backoff = Backoff()
        while not self._closing:
            pubsub = self.redis.pubsub()
            tasks: list[asyncio.Task[None]] = []
            try:
                have: set[str] = set()
                # Subscribed before reading: a pub/sub connection without channels cannot read.
                await self._sync(pubsub, have)
                tasks = [
                    asyncio.create_task(self._read_loop(pubsub, backoff)),
                    asyncio.create_task(self._command_loop(pubsub, have)),
                ]
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            except REDIS_ERRORS as exc:
                log_outage(log, backoff, "event subscriber", exc)
            except Exception:
                log.exception("event subscriber failed; reconnecting")
            finally:
                if self._closing and tasks:
                    # On the way out the reader ends after its current read: let it.
                    await asyncio.wait(tasks, timeout=2.0)
                for task in tasks:
                    task.cancel()
                if tasks:
                    await asyncio.wait(tasks, timeout=2.0)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            if self._closing:
                return
            # Every channel starts over: its events are read again from the stream.
            self._confirmed.clear()
            for channel in self._channels.values():
                channel.live = False
            await backoff.wait()

    async def _read_loop(self, pubsub: PubSub, backoff: Backoff) -> None:
        while not self._closing:
            # A bounded wait: ``close`` is noticed, and the client's health-check PING runs
            # on a quiet connection.
            message = await pubsub.get_message(timeout=1.0)
            if message is not None:
                log_recovery(log, backoff, "event subscriber")
                await self._on_message(message)

    async def _command_loop(self, pubsub: PubSub, have: set[str]) -> None:
        while not self._closing:
            await self._want_changed.wait()
            self._want_changed.clear()
            if not self._closing:
                await self._sync(pubsub, have)

    async def _sync(self, pubsub: PubSub, have: set[str]) -> None:
        want = self._wanted()
        add, remove = want - have, have - want
        if add:
            await pubsub.subscribe(*sorted(add))
            have |= add
        if remove:
            await pubsub.unsubscribe(*sorted(remove))
            have -= remove

    async def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        name = _text(message.get("channel"))
        if kind == "unsubscribe":
            self._confirmed.discard(name)
            return
        if kind == "subscribe":
            self._confirmed.add(name)
            # A new channel, or redis-py's own resubscription after a reconnect: either
            # way events may have gone by unheard, and the stream has them.
            task_id = self._task_of(name)
            channel = self._channels.get(task_id) if task_id is not None else None
            if task_id is not None and channel is not None:
                channel.live = False
                self._catching_up.add(task_id)
                self._catch_up_ready.set()
            return
        if kind != "message":
            return
        try:
            event, origin = _decode(message["data"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed event on %s", name)
            return
        if name == self.cancel_channel:
            if origin != self.origin:
                await self._tell_listeners(event)
            return
        channel = self._channels.get(event.task_id)
        if channel is not None:
            channel.offer(event)

    async def _catch_up_loop(self) -> None:
        while not self._closing:
            await self._catch_up_ready.wait()
            self._catch_up_ready.clear()
            while self._catching_up and not self._closing:
                batch = [self._catching_up.pop() for _ in range(min(100, len(self._catching_up)))]
                tails: list[Any]
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for task_id in batch:
                            pipe.xrevrange(self.stream_key(task_id), count=self._catch_up_count)
                        tails = await pipe.execute()
                except REDIS_ERRORS:
                    # Hand over what was heard; the store fills any gap by sequence number.
                    tails = [[] for _ in batch]
                for task_id, tail in zip(batch, tails, strict=True):
                    self._go_live(task_id, tail)

    def _go_live(self, task_id: str, tail: list[Any]) -> None:
        channel = self._channels.get(task_id)
        if channel is None:
            return
        events = {e.seq: e for e in channel.held}
        for _, fields in tail:
            if b"e" in fields:
                with contextlib.suppress(orjson.JSONDecodeError, KeyError, ValueError):
                    event = _decode(fields[b"e"])[0]
                    events.setdefault(event.seq, event)
        channel.held = []
        channel.live = True
        for seq in sorted(events):
            channel.offer(events[seq])
