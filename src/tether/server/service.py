"""The A2A operations, independent of binding (JSON-RPC, REST) and of version (0.3, 1.0)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tether.broker.base import Broker
from tether.core.errors import ContextMismatch, UnsupportedOperation
from tether.core.states import TaskState
from tether.core.types import JSON, Feedback, TaskEvent, TaskPage, TaskRecord
from tether.events.base import EventBus, Subscription
from tether.store.base import ListQuery, TaskStore

# How often a quiet waiter re-reads the task from the store, in case a live
# event was missed (a dropped subscriber, another replica's bus).
POLL_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class SendRequest:
    owner: str
    message: JSON
    metadata: JSON | None = None
    blocking: bool = True
    history_length: int | None = None


class TaskService:
    def __init__(
        self, store: TaskStore, broker: Broker, bus: EventBus, *, blocking_timeout: float
    ) -> None:
        self.store = store
        self.broker = broker
        self.bus = bus
        self.blocking_timeout = blocking_timeout

    async def _accept(self, req: SendRequest) -> tuple[TaskRecord, Subscription]:
        """Store the message (new task or follow-up), queue it, and watch it."""
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
            sub = await self.store.submit(
                owner=req.owner,
                message=msg,
                context_id=msg.get("contextId"),
                metadata=req.metadata,
            )
        watch = self.bus.subscribe(sub.task.id)
        if sub.event is not None:
            await self.bus.publish(sub.event)
            await self.broker.enqueue(sub.task.id)
        return sub.task, watch

    async def send(self, req: SendRequest) -> TaskRecord:
        task, watch = await self._accept(req)
        try:
            if req.blocking and not _settled(task.state):
                await self._settle(req.owner, task.id, watch)
        finally:
            watch.close()
        return await self.store.get_task(req.owner, task.id, req.history_length)

    async def _settle(self, owner: str, task_id: str, watch: Subscription) -> None:
        """Wait until the task is terminal or interrupted, at most ``blocking_timeout``."""
        deadline = time.monotonic() + self.blocking_timeout
        while (left := deadline - time.monotonic()) > 0:
            event = await watch.get(min(POLL_SECONDS, left))
            if event is not None and event.final:
                return
            if event is None:
                task = await self.store.get_task(owner, task_id, history_length=0)
                if _settled(task.state):
                    return

    async def stream(self, req: SendRequest) -> tuple[TaskRecord, AsyncIterator[TaskEvent]]:
        task, watch = await self._accept(req)
        return task, self._follow(task.id, 0, watch)

    async def subscribe(
        self, owner: str, task_id: str, after_seq: int | None
    ) -> tuple[TaskRecord, AsyncIterator[TaskEvent]]:
        watch = self.bus.subscribe(task_id)
        try:
            task = await self.store.get_task(owner, task_id)
        except BaseException:
            watch.close()
            raise
        if after_seq is None and task.state.terminal:
            watch.close()
            raise UnsupportedOperation(
                f"Task {task_id} is {task.state.value}; there is nothing left to stream"
            )
        start = task.last_seq if after_seq is None else after_seq
        return task, self._follow(task_id, start, watch)

    async def _follow(
        self, task_id: str, after_seq: int, watch: Subscription
    ) -> AsyncIterator[TaskEvent]:
        """Events after ``after_seq``: first from the log, then live, no gap, no duplicate.

        The subscription was opened before the log was read, so an event lands
        either in the log read or in the subscription (or both: skipped by seq).
        Ends after a terminal event; an interrupted one ends it too.
        """
        last = after_seq
        try:
            for logged in await self.store.events_after(task_id, last):
                last = logged.seq
                yield logged
                if logged.final:
                    return
            while True:
                event = await watch.get(POLL_SECONDS)
                if event is None or watch.overflowed:
                    # Quiet or cut off: the log is the truth; catch up from it.
                    if watch.overflowed:
                        watch.close()
                        watch = self.bus.subscribe(task_id)
                    for logged in await self.store.events_after(task_id, last):
                        last = logged.seq
                        yield logged
                        if logged.final:
                            return
                    continue
                if event.seq <= last:
                    continue
                if event.seq > last + 1:
                    for logged in await self.store.events_after(task_id, last):
                        if logged.seq >= event.seq:
                            break
                        last = logged.seq
                        yield logged
                last = event.seq
                yield event
                if event.final:
                    return
        finally:
            watch.close()

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


def _settled(state: TaskState) -> bool:
    return state.terminal or state.interrupted
