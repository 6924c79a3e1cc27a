"""Task events across processes: a Redis Stream per task, and pub/sub to wake subscribers.

Every published event is written to ``<prefix>:events:<task id>`` with the entry
id ``<seq>-0`` (so the stream holds each sequence number at most once and can
be read from any ``Last-Event-ID``), trimmed to about ``maxlen`` entries and
expiring ``ttl`` seconds after the task's last event. The same event goes out
on the task's pub/sub channel, ``<prefix>:<db>:events:<task id>``.

A process with subscribers listens to every task's channel with one pattern
subscription, made when its first subscriber comes and kept from then on: opening
or closing a subscription then costs no Redis command, and a subscription opened
while the pattern is confirmed is live at once (every event published from then on
reaches it). Only while the pattern is not confirmed yet (the first subscriber, or
after a reconnect) are events held back, the stream's tail read, and the two handed
over in order, so an event published meanwhile is not missed. The price: every
process with subscribers hears every task's events (its subscribers' and the
others'); those of tasks it has no subscriber for are dropped by channel name,
unparsed. Worker processes subscribe to no task and hear none.

Redis is a fast path, never the record: the store's event log is. Publishing
does not wait for Redis (a background task pipelines the writes, and keeps the
newest ``buffer_limit`` events while Redis is away); a subscriber that misses
events sees a gap in the sequence numbers and the caller reads them from the
store (``server/service.py`` does), and ``history()`` answers None whenever the
stream cannot prove it holds every event asked for.

Cancels cross processes on ``<prefix>:cancel``: a canceled final event is also
published there, and ``on_final`` listeners (the worker runtime) hear those from
every process, besides every final event published by their own.

The writes and reads go through a ``Link`` and the subscriptions through a
connection of the bus's own (see ``broker/redis_client.py``): pub/sub messages are
parsed by hiredis as they arrive and handed to the subscribers on the spot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import secrets
import time
from collections import deque
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tether.broker.redis_client import (
    REDIS_ERRORS,
    Backoff,
    Link,
    Reply,
    Wire,
    connect,
    database,
    log_outage,
    log_recovery,
    open_wire,
    pack,
)
from tether.core.states import TaskState
from tether.core.types import TaskEvent, TaskRecord
from tether.events.base import Listener
from tether.events.buffer import BufferedSubscription

log = logging.getLogger("tether.events")

_BATCH = 256
# A final event's task travels with it up to this size (a blocking send answers with it);
# a larger one is read from the store by whoever needs it.
WHOLE_TASK_LIMIT = 64 * 1024
_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(TaskRecord))
# A quiet pub/sub connection is pinged this often, so a dead one is noticed.
_HEALTH_EVERY = 15.0


def _encode(event: TaskEvent, origin: str, whole: bytes | None = None) -> bytes:
    """``whole``: the encoded ``event.task``, sent along (live only, never logged)."""
    fields = {
        "o": origin,
        "t": event.task_id,
        "s": event.seq,
        "k": event.kind,
        "f": event.final,
        "p": event.payload,
    }
    if whole is not None:
        fields["w"] = orjson.Fragment(whole)
    return orjson.dumps(fields)


def _decode(data: bytes | str) -> tuple[TaskEvent, str]:
    d = orjson.loads(data)
    task = _record(d["w"]) if "w" in d else None
    event = TaskEvent(str(d["t"]), int(d["s"]), str(d["k"]), d["p"], bool(d["f"]), task)
    return event, str(d["o"])


def _whole(task: TaskRecord | None) -> bytes | None:
    """``task`` encoded, if it is small enough to travel with its event."""
    if task is None:
        return None
    encoded = orjson.dumps([getattr(task, name) for name in _RECORD_FIELDS])
    return encoded if len(encoded) <= WHOLE_TASK_LIMIT else None


def _record(values: list[Any]) -> TaskRecord:
    fields = dict(zip(_RECORD_FIELDS, values, strict=True))
    fields["state"] = TaskState(fields["state"])
    return TaskRecord(**fields)


def _canceled(event: TaskEvent) -> bool:
    return (
        event.final
        and event.kind == "status"
        and event.payload.get("status", {}).get("state") == TaskState.CANCELED.wire
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _glob_escape(name: str) -> str:
    """``name`` matched literally in a PSUBSCRIBE pattern."""
    for special in "\\*?[]":
        name = name.replace(special, "\\" + special)
    return name


def _entry_event(flat: Any) -> TaskEvent | None:
    """The event of a stream entry's flat field list (``[b"e", data]``), if it holds one."""
    if not isinstance(flat, list):
        return None
    for i in range(0, len(flat) - 1, 2):
        if flat[i] == b"e":
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                return _decode(flat[i + 1])[0]
    return None


class _Channel:
    """The local subscribers of one task, and whether its events are live yet."""

    __slots__ = ("held", "limit", "live", "subs")

    def __init__(self, limit: int, live: bool) -> None:
        self.limit = limit
        self.subs: set[BufferedSubscription] = set()
        # False until the stream's tail is read after the pattern subscription was
        # (re)confirmed: live events wait in ``held`` meanwhile, so they are handed
        # over in sequence order.
        self.live = live
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
        self._link = Link.of(self.redis)
        self.prefix = prefix
        # Pub/sub channels ignore SELECT: name the database so deployments sharing a
        # server on different databases do not hear each other.
        self._chan = f"{prefix}:{database(self.redis)}"
        self.cancel_channel = f"{self._chan}:cancel"
        self._control = f"{self._chan}:control"
        self._events_head = f"{self._chan}:events:".encode()
        self._pattern = _glob_escape(f"{self._chan}:events:") + "*"
        self._cancel_b = self.cancel_channel.encode()
        self.maxlen = maxlen
        self.ttl_ms = max(1, int(ttl * 1000))
        self._limit = subscriber_limit
        self._catch_up_count = catch_up
        # Random, not a prefix of ``new_id()``: ids are time-ordered, so two buses
        # started in the same millisecond would share their first characters.
        self.origin = secrets.token_hex(6)
        self._channels: dict[str, _Channel] = {}
        self._listeners: list[Listener] = []
        self._out: deque[TaskEvent] = deque(maxlen=buffer_limit)
        self._out_ready = asyncio.Event()
        self._dropped = 0
        # Wakes the listen loop: what to subscribe to changed, a cancel was heard from
        # another process, the connection was lost, or the bus is closing.
        self._listen_wake = asyncio.Event()
        self._want_changed = False
        self._want_pattern = False
        # The pattern subscription is confirmed on the current pub/sub connection.
        self._pattern_live = False
        self._heard: deque[TaskEvent] = deque()
        self._last_heard = 0.0
        self._catching_up: set[str] = set()
        self._catch_up_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    def stream_key(self, task_id: str) -> str:
        return f"{self.prefix}:events:{task_id}"

    def _channel_name(self, task_id: str) -> str:
        return f"{self._chan}:events:{task_id}"

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
        does not.
        """
        self._closing = True
        for wake in (self._out_ready, self._listen_wake, self._catch_up_ready):
            wake.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=flush_timeout + 2.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        self._tasks = []
        self._channels.clear()
        await self._link.close()
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
        commands: list[tuple[Any, ...]] = []
        for event in batch:
            data = _encode(event, self.origin)
            key = self.stream_key(event.task_id)
            # The seq as entry id: a second copy of an event is refused by Redis.
            commands.append(("XADD", key, "MAXLEN", "~", self.maxlen, f"{event.seq}-0", "e", data))
            commands.append(("PEXPIRE", key, self.ttl_ms))
            whole = _whole(event.task)
            live = data if whole is None else _encode(event, self.origin, whole)
            commands.append(("PUBLISH", self._channel_name(event.task_id), live))
            if _canceled(event):
                commands.append(("PUBLISH", self.cancel_channel, data))
        # Error replies (a refused duplicate or out-of-order XADD) must not stop the rest
        # of the batch; they come back as values. A lost connection raises.
        await self._link.calls(commands)

    # -- replay ----------------------------------------------------------------------

    async def history(self, task_id: str, after_seq: int) -> list[TaskEvent] | None:
        """Events after ``after_seq`` from the task's stream, or None if it may lack some.

        None (read the store instead) when Redis is unreachable, the stream expired
        or was trimmed past ``after_seq``, or a sequence number is missing.
        """
        try:
            rows: Reply = await self._link.call(
                "XRANGE", self.stream_key(task_id), f"{after_seq + 1}-0", "+"
            )
        except REDIS_ERRORS:
            return None
        events = []
        expected = after_seq + 1
        for entry_id, flat in rows or []:
            seq = int(_text(entry_id).split("-", 1)[0])
            event = _entry_event(flat)
            if seq != expected or event is None:
                return None
            events.append(event)
            expected += 1
        return events or None

    # -- subscribing -------------------------------------------------------------------

    def subscribe(self, task_id: str, *, finals_only: bool = False) -> BufferedSubscription:
        # The same event may come live and from the stream's tail: handed over once.
        sub = BufferedSubscription(
            task_id, self._limit, self._drop, dedupe=True, finals_only=finals_only
        )
        channel = self._channels.get(task_id)
        if channel is None:
            # Live at once when the pattern is confirmed: every event published from now
            # on reaches this connection after the confirmation did.
            channel = self._channels[task_id] = _Channel(self._limit, self._pattern_live)
            if not self._want_pattern:
                self._want_pattern = True
                self._want_changed = True
                self._listen_wake.set()
        channel.subs.add(sub)
        return sub

    def on_final(self, listener: Listener) -> None:
        self._listeners.append(listener)
        self._want_changed = True
        self._listen_wake.set()

    def _drop(self, sub: BufferedSubscription) -> None:
        channel = self._channels.get(sub.task_id)
        if channel is not None:
            channel.subs.discard(sub)
            if not channel.subs:
                del self._channels[sub.task_id]

    def _wanted(self) -> set[tuple[str, str]]:
        names = {("SUBSCRIBE", self._control)}
        if self._listeners:
            names.add(("SUBSCRIBE", self.cancel_channel))
        if self._want_pattern:
            names.add(("PSUBSCRIBE", self._pattern))
        return names

    def _sync(self, wire: Wire, have: set[tuple[str, str]]) -> None:
        want = self._wanted()
        for command, name in sorted(want - have):
            wire.write(pack((command, name)))
        have |= want

    async def _listen_loop(self) -> None:
        """One pub/sub connection for the process; rebuilt from scratch after any error."""
        backoff = Backoff()
        while not self._closing:
            wire: Wire | None = None
            try:
                wire = await open_wire(self._link.endpoint, self._on_push, self._listen_wake.set)
                have: set[tuple[str, str]] = set()
                self._want_changed = False
                # Subscribed before anything else: a pub/sub connection without channels
                # would read nothing, not even the health check's answer.
                self._sync(wire, have)
                self._last_heard = time.monotonic()
                pinged = 0.0
                while not self._closing:
                    if wire.closed.is_set():
                        raise wire.error or ConnectionError("pub/sub connection lost")
                    while self._heard:
                        await self._tell_listeners(self._heard.popleft())
                    if self._want_changed:
                        self._want_changed = False
                        self._sync(wire, have)
                    now = time.monotonic()
                    if now - self._last_heard >= _HEALTH_EVERY and pinged <= self._last_heard:
                        pinged = now
                        wire.write(pack(("PING",)))
                    elif pinged > self._last_heard and now - pinged > wire.timeout:
                        raise TimeoutError("pub/sub connection: no answer to PING")
                    self._listen_wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await self._listen_wake.wait()
            except REDIS_ERRORS as exc:  # TimeoutError and ConnectionError are OSErrors
                log_outage(log, backoff, "event subscriber", exc)
            except Exception:
                log.exception("event subscriber failed; reconnecting")
            finally:
                if wire is not None:
                    wire.close()
                # Every channel starts over: its events are read again from the stream.
                self._pattern_live = False
                for channel in self._channels.values():
                    channel.live = False
            if self._closing:
                return
            await backoff.wait()

    def _on_push(self, reply: Reply) -> None:
        """A pub/sub message, as it arrives (synchronously, in arrival order)."""
        self._last_heard = time.monotonic()
        if not isinstance(reply, list) or not reply:
            return
        kind = reply[0]
        if kind == b"pmessage" and len(reply) == 4:
            name: bytes = reply[2]
            if not name.startswith(self._events_head):
                return
            # Dropped unparsed unless this process has a subscriber to the task.
            channel = self._channels.get(name[len(self._events_head) :].decode())
            if channel is None:
                return
            try:
                event, _ = _decode(reply[3])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("ignoring a malformed event on %s", _text(name))
                return
            channel.offer(event)
        elif kind == b"message" and len(reply) == 3:
            if reply[1] != self._cancel_b:
                return
            try:
                event, origin = _decode(reply[2])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("ignoring a malformed event on %s", self.cancel_channel)
                return
            if origin != self.origin:
                # Listeners may wait: the listen loop calls them.
                self._heard.append(event)
                self._listen_wake.set()
        elif kind == b"psubscribe":
            self._pattern_live = True
            # Events of channels opened before now may have gone by unheard: the
            # stream has them.
            stale = [task for task, channel in self._channels.items() if not channel.live]
            if stale:
                self._catching_up.update(stale)
                self._catch_up_ready.set()

    async def _catch_up_loop(self) -> None:
        while not self._closing:
            await self._catch_up_ready.wait()
            self._catch_up_ready.clear()
            while self._catching_up and not self._closing:
                batch = [self._catching_up.pop() for _ in range(min(100, len(self._catching_up)))]
                tails: list[Reply]
                try:
                    tails = await self._link.calls(
                        [
                            (
                                "XREVRANGE",
                                self.stream_key(t),
                                "+",
                                "-",
                                "COUNT",
                                self._catch_up_count,
                            )
                            for t in batch
                        ]
                    )
                except REDIS_ERRORS:
                    # Hand over what was heard; the store fills any gap by sequence number.
                    tails = [[] for _ in batch]
                for task_id, tail in zip(batch, tails, strict=True):
                    self._go_live(task_id, [] if isinstance(tail, ResponseError) else tail)

    def _go_live(self, task_id: str, tail: list[Any]) -> None:
        channel = self._channels.get(task_id)
        if channel is None or not self._pattern_live:
            # Gone, or the connection dropped meanwhile: the next confirmation catches up.
            return
        events = {e.seq: e for e in channel.held}
        for _, flat in tail or []:
            event = _entry_event(flat)
            if event is not None:
                events.setdefault(event.seq, event)
        channel.held = []
        channel.live = True
        for seq in sorted(events):
            channel.offer(events[seq])
