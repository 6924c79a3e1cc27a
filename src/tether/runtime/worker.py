"""The worker loop: claim a task with a lease, run its handler, store the outcome.

Handler execution is at-least-once (a worker that dies mid-task leaves a lease
that expires, and the task runs again, up to ``max_attempts``); every state
change and event is exactly-once, because each is a compare-and-set fenced by
this worker's lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tether.broker.base import Broker
from tether.core.errors import HandlerError, InvalidTransition, LeaseLost, TetherError
from tether.core.states import TaskState
from tether.core.types import TaskEvent, new_id
from tether.events.base import EventBus
from tether.runtime.agent import Agent
from tether.runtime.context import Context
from tether.runtime.outcome import Outcome
from tether.runtime.parts import agent_message
from tether.store.base import TaskStore

log = logging.getLogger("tether.worker")


class Runtime:
    def __init__(
        self,
        agent: Agent,
        store: TaskStore,
        broker: Broker,
        bus: EventBus,
        *,
        concurrency: int = 64,
        lease_seconds: float = 30.0,
        worker_id: str | None = None,
    ) -> None:
        self.agent = agent
        self.store = store
        self.broker = broker
        self.bus = bus
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{new_id()[:8]}"
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._canceled: set[str] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._threads = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="handler")
        self._stopping = False

    @property
    def running(self) -> int:
        return len(self._running)

    async def start(self) -> None:
        if getattr(self.store, "exclusive", False):
            # This process alone uses the store: every lease left is a dead process's.
            released = await self.store.release_leases()
            if released:
                log.info("took back %d task(s) left running by a previous process", released)
        self.bus.on_final(self._on_final)
        self._loops = [asyncio.create_task(self._loop()) for _ in range(self.concurrency)]
        self._loops.append(asyncio.create_task(self._heartbeat()))
        self._loops.append(asyncio.create_task(self._redrive()))

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; give running handlers ``grace`` seconds, then hand them back."""
        self._stopping = True
        running = list(self._running.values())
        if running:
            await asyncio.wait(running, timeout=grace)
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        with contextlib.suppress(TetherError):
            await self.store.release_leases(self.worker_id)
        self._threads.shutdown(wait=False, cancel_futures=True)

    # -- loops ---------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._stopping:
            task_id = await self.broker.next()
            try:
                await self._run(task_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Never let one task take a worker slot down with it.
                log.exception("worker slot error on task %s", task_id)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            ids = list(self._running)
            if not ids:
                continue
            try:
                held = await self.store.renew(self.worker_id, ids, lease_seconds=self.lease_seconds)
            except TetherError as exc:
                log.warning("lease renewal failed: %s", exc)
                continue
            for task_id in set(ids) - held:
                log.warning("lost the lease on task %s; abandoning it", task_id)
                handler = self._running.get(task_id)
                if handler is not None:
                    self._canceled.add(task_id)
                    handler.cancel()

    async def _redrive(self) -> None:
        """The store is the outbox: queue every runnable task without a live lease."""
        while True:
            try:
                for task_id in await self.store.runnable():
                    if task_id not in self._running:
                        await self.broker.enqueue(task_id)
            except TetherError as exc:
                log.warning("re-drive failed: %s", exc)
            await asyncio.sleep(max(self.lease_seconds / 2, 0.5))

    async def _on_final(self, event: TaskEvent) -> None:
        handler = self._running.get(event.task_id)
        if handler is not None and event.payload["status"]["state"] == TaskState.CANCELED.wire:
            self._canceled.add(event.task_id)
            handler.cancel()

    # -- one task ------------------------------------------------------------

    async def _publish(self, events: list[TaskEvent]) -> None:
        for event in events:
            await self.bus.publish(event)

    async def _run(self, task_id: str) -> None:
        try:
            claim = await self.store.claim(
                task_id,
                self.worker_id,
                lease_seconds=self.lease_seconds,
                max_attempts=self.agent.max_attempts,
            )
        finally:
            self.broker.done(task_id)
        if claim is None:
            log.debug("task %s not claimed: taken, finished or canceled", task_id)
            return
        await self._publish(claim.events)
        if claim.task is None:
            log.warning("task %s failed: %d attempts used", task_id, self.agent.max_attempts)
            return
        ctx = Context(self, claim.task)
        handler = asyncio.create_task(self._invoke(ctx))
        self._running[task_id] = handler
        try:
            result = await handler
        except asyncio.CancelledError:
            if task_id in self._canceled:
                log.debug("task %s canceled while running", task_id)
                return
            raise
        except HandlerError as exc:
            if not exc.non_retryable and ctx.attempt < self.agent.max_attempts:
                await self._retry_later(task_id)
            else:
                await self._finish(ctx, TaskState.FAILED, exc.message)
        except TimeoutError:
            await self._finish(ctx, TaskState.FAILED, f"Timed out after {self.agent.timeout}s")
        except (LeaseLost, InvalidTransition):
            log.debug("task %s changed under its handler (canceled or taken over)", task_id)
        except Exception as exc:
            log.exception("handler failed on task %s", task_id)
            await self._finish(ctx, TaskState.FAILED, str(exc) or type(exc).__name__)
        else:
            if isinstance(result, Outcome):
                await self._finish(ctx, result.state, result.message)
            else:
                await self._finish(ctx, TaskState.COMPLETED, result)
        finally:
            self._running.pop(task_id, None)
            self._canceled.discard(task_id)

    async def _invoke(self, ctx: Context) -> Any:
        fn = self.agent.fn
        async with asyncio.timeout(self.agent.timeout):
            if inspect.isasyncgenfunction(fn):
                return await self._drain(fn(ctx), ctx)
            if inspect.iscoroutinefunction(fn):
                return await fn(ctx)
            loop = asyncio.get_running_loop()
            # Sync handlers block; they get a thread of their own pool, never the loop.
            return await loop.run_in_executor(self._threads, fn, ctx)

    async def _drain(self, gen: Any, ctx: Context) -> Any:
        """An async-generator handler: each yield is the next chunk of one artifact."""
        artifact_id: str | None = None
        async for item in gen:
            if isinstance(item, Outcome):
                return item
            artifact_id = await ctx.artifact(
                item, artifact_id=artifact_id, name="response", append=artifact_id is not None
            )
        if artifact_id is not None:
            await ctx.artifact("", artifact_id=artifact_id, append=True, last_chunk=True)
        return None

    async def _finish(self, ctx: Context, state: TaskState, result: Any) -> None:
        message = None if result is None else agent_message(result, ctx.task_id, ctx.context_id)
        try:
            event = await self.store.transition(
                ctx.task_id, state, message=message, lease_owner=self.worker_id
            )
        except (LeaseLost, InvalidTransition) as exc:
            log.debug("task %s not finished by this worker: %s", ctx.task_id, exc)
            return
        await self.bus.publish(event)

    async def _retry_later(self, task_id: str) -> None:
        # A zero-length renewal expires the lease now: the task is claimable again.
        await self.store.renew(self.worker_id, [task_id], lease_seconds=0)
        await self.broker.enqueue(task_id)
