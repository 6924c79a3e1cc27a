"""The A2A operations, independent of binding (JSON-RPC, REST) and of version (0.3, 1.0).

Streams (SendStreamingMessage, SubscribeToTask) start with a Task snapshot, then
give the task's events in ``seq`` order: first from the store's log, then live
from the bus, filling any hole from the log, so every subscriber sees the same
events in the same order, each once. The rules on ids, resume and reset are in
docs/streaming.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from typing import Protocol

from tether.broker.base import Broker
from tether.core.errors import (
    BrokerUnavailable,
    ContextMismatch,
    TetherError,
    UnsupportedOperation,
)
from tether.core.states import TaskState
from tether.core.types import JSON, Feedback, TaskEvent, TaskPage, TaskRecord, now
from tether.events.base import EventBus, SubscriberLagged, Subscription
from tether.store.base import Claim, ListQuery, Start, TaskStore
from tether.store.common import trim_history

log = logging.getLogger("tether.server")

# How often a blocking send that heard nothing re-reads the task from the store.
POLL_SECONDS = 1.0
# How often an idle stream re-reads the log, in case a live event never came (a
# publisher that died between its commit and its publish, a bus that lost one).
RESYNC_SECONDS = 30.0
KEEPALIVE_SECONDS = 15.0
# Event logs of finished tasks dropped per store call by the retention loop.
PRUNE_BATCH = 200


class Starter(Protocol):
    """The runtime of this process, as a send sees it (``Runtime``)."""

    def reserve(self) -> Start | None:
        """A slot for a new task to be created already started, or None if none is free."""
        ...

    def started(self, claim: Claim | None) -> None:
        """Ends a reservation: the claim its submit made (None: it made none)."""
        ...


@dataclass(frozen=True, slots=True)
class SendRequest:
    owner: str
    message: JSON
    metadata: JSON | None = None
    blocking: bool = True
    history_length: int | None = None


@dataclass(frozen=True, slots=True)
class TaskStream:
    """What a streaming response sends: the Task snapshot first, then ``events``.

    ``snapshot_id`` is the SSE id of the snapshot frame: the event ``seq`` the
    snapshot includes, or None when the snapshot is sent on a resume and must
    leave the client's Last-Event-ID as it is. ``events`` yields None when the
    stream has been idle for the keep-alive interval. ``reset`` is set when the
    events a client asked for are no longer kept: what to tell it, and why.
    """

    task: TaskRecord
    snapshot_id: int | None
    events: AsyncGenerator[TaskEvent | None, None]
    reset: JSON | None = None


class TaskService:
    def __init__(
        self,
        store: TaskStore,
        broker: Broker,
        bus: EventBus,
        *,
        blocking_timeout: float,
        keepalive: float = KEEPALIVE_SECONDS,
        event_retention: float = 0.0,
        starter: Starter | None = None,
    ) -> None:
        self.store = store
        self.starter = starter
        self.broker = broker
        self.bus = bus
        self.blocking_timeout = blocking_timeout
        self.keepalive = keepalive
        self.event_retention = event_retention
        self._pruner: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.event_retention > 0:
            self._pruner = asyncio.create_task(self._prune_loop())

    async def close(self) -> None:
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
            self._pruner = None

    # -- send --------------------------------------------------------------

    async def _accept(
        self, req: SendRequest, *, listen: bool
    ) -> tuple[TaskRecord, Subscription | None]:
        """Store the message (new task or follow-up) and queue it.

        With ``listen``, a subscription to the task is opened before it is queued,
        so not even its first run's end can be missed.
        """
        msg = req.message
        task_id = msg.get("taskId")
        if task_id:
            current = await self.store.get_task(req.owner, task_id, history_length=0)
            context_id = msg.get("contextId")
            if context_id and context_id != current.context_id:
                raise ContextMismatch(
                    f"contextId {context_id} does not match task {task_id}'s context "
                    f"{current.context_id}"
                )
            sub = await self.store.resume(owner=req.owner, task_id=task_id, message=msg)
        else:
            # A blocking send's new task starts at once on an idle slot of this process:
            # created already claimed, one write instead of two. (Not for the others:
            # their callers may want to see the task submitted, not already working.)
            start = self.starter.reserve() if listen and self.starter is not None else None
            started = None
            try:
                sub = await self.store.submit(
                    owner=req.owner,
                    message=msg,
                    context_id=msg.get("contextId"),
                    metadata=req.metadata,
                    start=start,
                )
                started = sub.started
            finally:
                if start is not None and self.starter is not None:
                    self.starter.started(started)
        watch = self.bus.subscribe(sub.task.id, finals_only=True) if listen else None
        if sub.event is not None:
            try:
                if sub.event.seq > 1:
                    # A new task's first event is not published: nobody can be listening
                    # to a task whose id is not out yet, and a stream (or a replay from
                    # the bus) that wants it reads it from the log. Saved: a Redis write
                    # and its echo per task.
                    await self.bus.publish(sub.event)
                try:
                    await self.broker.enqueue(sub.task.id)
                except BrokerUnavailable as exc:
                    # Stored is accepted: the task row is the outbox, a worker's re-drive
                    # queues it once the queue is back.
                    log.warning("task %s stored but not queued yet: %s", sub.task.id, exc)
            except BaseException:
                if watch is not None:
                    watch.close()
                raise
        return sub.task, watch

    async def send(self, req: SendRequest) -> TaskRecord:
        task, watch = await self._accept(req, listen=req.blocking)
        if watch is not None:
            if _settled(task.state):
                watch.close()
            else:
                final = await self._settle(req.owner, task, watch)
                if final is not None and final.task is not None:
                    # The task as its outcome left it, read with that write: no second read.
                    # Nothing changes it once it is written, so it is copied only to trim.
                    done = final.task
                    history = trim_history(done.history, req.history_length)
                    return done if history is done.history else replace(done, history=history)
        return await self.store.get_task(req.owner, task.id, req.history_length)

    async def _settle(
        self, owner: str, accepted: TaskRecord, watch: Subscription
    ) -> TaskEvent | None:
        """Wait until the task is terminal or interrupted, at most ``blocking_timeout``;
        the final event, when one was heard.

        Closes ``watch`` (or the one that replaced it) before returning.
        """
        deadline = time.monotonic() + self.blocking_timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                final = await watch.get(min(POLL_SECONDS, left))
                # A final event from before this message (the end of the turn it answers,
                # heard late from another process) is not this message's outcome.
                if final is not None and final.seq > accepted.last_seq:
                    return final
                if final is not None:
                    continue
                if watch.overflowed:
                    # Only the outcome matters here, not the events: listen again.
                    watch.close()
                    watch = self.bus.subscribe(accepted.id, finals_only=True)
                task = await self.store.get_task(owner, accepted.id, history_length=0)
                if _settled(task.state):
                    return None
        finally:
            watch.close()
        return None

    # -- streams -------------------------------------------------------------

    async def stream(self, req: SendRequest) -> TaskStream:
        """SendStreamingMessage: the task as stored, then everything after it."""
        task, _ = await self._accept(req, listen=False)
        events = self._follow(task.id, task.last_seq, _settled(task.state))
        task.history = trim_history(task.history, req.history_length)
        return TaskStream(task, task.last_seq, events)

    async def subscribe(self, owner: str, task_id: str, after_seq: int | None) -> TaskStream:
        """SubscribeToTask, fresh (``after_seq`` None) or resumed after a Last-Event-ID.

        Fresh: the snapshot carries the id of the last event it includes and the
        live events follow it; a terminal task is refused, as the spec says.
        Resumed: the current snapshot, without an id, then exactly the events
        after ``after_seq``. When those are no longer kept (the log of a finished
        task was pruned, or the id is not one this task reached), the stream is
        a reset: the snapshot carries the id of its own position, from which the
        stream goes on, and ``TaskStream.reset`` says why.
        """
        task = await self.store.get_task(owner, task_id)
        settled = _settled(task.state)
        if after_seq is None:
            if task.state.terminal:
                raise UnsupportedOperation(
                    f"Task {task_id} is {task.state.value}; there is nothing left to stream"
                )
            return TaskStream(task, task.last_seq, self._follow(task_id, task.last_seq, settled))
        backlog: list[TaskEvent] = []
        if after_seq < task.last_seq:
            backlog = await self.store.events_after(task_id, after_seq)
        kept = after_seq == task.last_seq or (
            after_seq < task.last_seq and bool(backlog) and backlog[0].seq == after_seq + 1
        )
        if not kept:
            events = self._follow(task_id, task.last_seq, settled)
            return TaskStream(task, task.last_seq, events, reset=_reset_note(task, after_seq))
        if task.state.terminal and not backlog:
            raise UnsupportedOperation(
                f"Task {task_id} is {task.state.value} and event {after_seq} was its last; "
                "there is nothing left to stream"
            )
        return TaskStream(task, None, self._follow(task_id, after_seq, settled, backlog))

    async def _follow(
        self,
        task_id: str,
        after_seq: int,
        settled: bool,
        backlog: list[TaskEvent] | None = None,
    ) -> AsyncGenerator[TaskEvent | None, None]:
        """Events after ``after_seq``: ``backlog`` (read already), the log, then live.

        The subscription is opened before the log is read, so each event lands
        in the log read or in the subscription (or both: skipped by ``seq``); it
        is opened here, not by the caller, so a stream that never starts (its
        client gone before the first byte) holds nothing. Ends after a terminal or
        interrupted event, or at once when the snapshot was ``settled`` and
        nothing followed it. Yields None after ``keepalive`` seconds of silence.
        Raises ``SubscriberLagged`` when the reader fell too far behind.
        """
        watch = self.bus.subscribe(task_id)
        last = after_seq
        try:
            for logged in [*(backlog or ()), *await self.store.events_after(task_id, last)]:
                if logged.seq <= last:
                    continue
                last = logged.seq
                yield logged
                if logged.final:
                    return
            if settled and last == after_seq:
                return
            resync_at = time.monotonic() + RESYNC_SECONDS
            while True:
                event = await watch.get(self.keepalive)
                if watch.overflowed:
                    raise SubscriberLagged(task_id, last)
                if event is None:
                    if time.monotonic() >= resync_at:
                        resync_at = time.monotonic() + RESYNC_SECONDS
                        for logged in await self.store.events_after(task_id, last):
                            last = logged.seq
                            yield logged
                            if logged.final:
                                return
                    yield None
                    continue
                if event.seq <= last:
                    continue
                if event.seq > last + 1:
                    # A hole: the bus lost events (or the log read raced): fill it in order.
                    for logged in await self.store.events_after(task_id, last):
                        if logged.seq >= event.seq:
                            break
                        last = logged.seq
                        yield logged
                        if logged.final:
                            return
                last = event.seq
                yield event
                if event.final:
                    return
        finally:
            watch.close()

    # -- the rest --------------------------------------------------------------

    async def get(self, owner: str, task_id: str, history_length: int | None) -> TaskRecord:
        return await self.store.get_task(owner, task_id, history_length)

    async def list(self, query: ListQuery) -> TaskPage:
        return await self.store.list_tasks(query)

    async def cancel(self, owner: str, task_id: str) -> TaskRecord:
        event = await self.store.cancel(owner, task_id)
        await self.bus.publish(event)
        return await self.store.get_task(owner, task_id)

    async def feedback(self, fb: Feedback) -> None:
        await self.store.add_feedback(fb)

    # -- retention -------------------------------------------------------------

    async def prune_events(self) -> int:
        """Drop the event logs of tasks finished more than ``event_retention`` seconds ago."""
        cutoff = now() - self.event_retention
        total = 0
        while True:
            pruned = await self.store.prune_events(cutoff, limit=PRUNE_BATCH)
            total += pruned
            if pruned < PRUNE_BATCH:
                return total

    async def _prune_loop(self) -> None:
        interval = min(max(self.event_retention / 4, 1.0), 300.0)
        while True:
            try:
                pruned = await self.prune_events()
                if pruned:
                    log.info("dropped the event logs of %d finished task(s)", pruned)
            except TetherError as exc:
                log.warning("event retention: %s", exc)
            await asyncio.sleep(interval)


def _settled(state: TaskState) -> bool:
    return state.terminal or state.interrupted


def _reset_note(task: TaskRecord, after_seq: int) -> JSON:
    if after_seq > task.last_seq:
        why = f"event {after_seq} is not one task {task.id} reached (its last is {task.last_seq})"
    else:
        why = f"the events after {after_seq} are no longer kept"
    return {
        "reset": True,
        "lastEventId": after_seq,
        "resumedAt": task.last_seq,
        "reason": f"{why}; this snapshot replaces them and the stream goes on from it",
    }
