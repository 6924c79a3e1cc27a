"""The worker loop: claim a task with a lease, run its handler, store the outcome.

Handler execution is at-least-once (a worker that dies mid-task leaves a lease
that expires, and the task runs again, up to ``max_attempts``); every state
change and event is exactly-once, because each is a compare-and-set fenced by
this worker's lease.

The queue entry a task came from is acknowledged once its outcome is stored
(and before the event goes out, so a follow-up message can queue it again at
once); a worker that lost its lease abandons the task without acknowledging,
and a parked task (``ctx.wait_for``) is acknowledged and leaves its slot free.
On ``stop`` no slot takes new work; running handlers get the grace period, and
those still running then are handed back (lease expired, entry re-queued).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tether.broker.base import Broker, Delivery
from tether.broker.local import LocalBroker
from tether.core.errors import (
    HandlerError,
    InvalidInput,
    InvalidTransition,
    LeaseLost,
    TetherError,
)
from tether.core.states import TaskState
from tether.core.types import JSON, TaskEvent, instance_id
from tether.events.base import EventBus
from tether.runtime.agent import Agent
from tether.runtime.context import Context
from tether.runtime.outcome import Outcome
from tether.runtime.parts import agent_message
from tether.runtime.waits import Parked
from tether.store.base import Claim, Start, TaskStore

if TYPE_CHECKING:
    from tether.runtime.completions import CompletionConsumer

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
        completions: CompletionConsumer | None = None,
        secret: str | None = None,
        public_url: str | None = None,
    ) -> None:
        self.agent = agent
        self.store = store
        self.broker = broker
        self.bus = bus
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.worker_id = worker_id or instance_id()
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._contexts: dict[str, Context] = {}
        self._claiming: set[str] = set()
        self._canceled: set[str] = set()
        # Why a handler was stopped, when it was not a cancel: its lease went to another
        # worker (abandon, no ack), or this worker is shutting down (hand back).
        self._abandoned: set[str] = set()
        self._handing_back: set[str] = set()
        # Tasks whose lease is passing to a durable wait (``ctx.wait_for``): not lost.
        self.parking: set[str] = set()
        self._deliveries: dict[str, Delivery] = {}
        self.completions = completions
        self.secret = secret
        self.public_url = public_url
        self._slots: list[asyncio.Task[None]] = []
        self._idle: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        # Ends the heartbeat and re-drive loops between two store calls, never during one.
        self._halt = asyncio.Event()
        self._threads = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="handler")
        self._stopping = False
        # Tasks a submit created already claimed for this worker (``reserve``), until their
        # queue entry reaches a slot. Only with the in-process queue: the entry must come
        # back to this process, where the claim is.
        self._direct = isinstance(broker, LocalBroker)
        self._reserved = 0
        self._started: dict[str, Claim] = {}

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
        self._slots = [asyncio.create_task(self._loop()) for _ in range(self.concurrency)]
        self._loops = [
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._redrive()),
        ]
        if self.completions is not None:
            await self.completions.start()

    async def stop(self, grace: float = 10.0, hand_back_timeout: float = 5.0) -> None:
        """Stop claiming; give running handlers ``grace`` seconds, then hand them back."""
        self._stopping = True
        for slot in list(self._idle):
            slot.cancel()
        running = list(self._running.values())
        if running:
            await asyncio.wait(running, timeout=grace)
        for task_id in list(self._running):
            log.info("task %s still running after %.1fs: handing it back", task_id, grace)
            self._handing_back.add(task_id)
            self._stop_handler(task_id)
        slots = [slot for slot in self._slots if not slot.done()]
        if slots:
            await asyncio.wait(slots, timeout=hand_back_timeout)
        # Cancelling a store call half-way could leave its transaction (and row locks)
        # behind: the loops are asked to stop, and only cancelled if they do not.
        self._halt.set()
        if self._loops:
            await asyncio.wait(self._loops, timeout=hand_back_timeout)
        leftover = [t for t in [*self._slots, *self._loops] if not t.done()]
        for loop in leftover:
            loop.cancel()
        if leftover:
            # Bounded: a task stuck in its own cancellation must not hold the process.
            await asyncio.wait(leftover, timeout=2.0)
        if self.completions is not None:
            await self.completions.stop()
        with contextlib.suppress(TetherError):
            await self.store.release_leases(self.worker_id)
        self._threads.shutdown(wait=False, cancel_futures=True)

    def reserve(self) -> Start | None:
        """A slot for a new task that its submit creates already claimed by this worker,
        if a slot is idle and not promised yet; ``started`` ends the reservation."""
        if not self._direct or self._stopping or len(self._idle) <= self._reserved:
            return None
        self._reserved += 1
        return Start(self.worker_id, self.lease_seconds)

    def started(self, claim: Claim | None) -> None:
        """The reserved task's claim (None: the submit created nothing). Its queue entry,
        enqueued next, runs it without claiming it again."""
        self._reserved -= 1
        if claim is not None and claim.task is not None:
            self._started[claim.task.id] = claim

    # -- loops ---------------------------------------------------------------

    async def _loop(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self._stopping:
            # Idle slots are what ``stop`` cancels at once; an entry a cancelled ``next``
            # was about to return stays queued (the broker's ``next`` is cancel-safe).
            self._idle.add(me)
            try:
                delivery = await self.broker.next()
            finally:
                self._idle.discard(me)
            try:
                await self._run(delivery)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Never let one task take a worker slot down with it. The entry stays
                # unacknowledged: another worker reclaims it once it is idle past the lease.
                log.exception("worker slot error on task %s", delivery.task_id)

    async def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if stopping; True when it is time to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._halt.wait(), seconds)
        return self._halt.is_set()

    async def _heartbeat(self) -> None:
        while not await self._pause(self.lease_seconds / 3):
            ids = list(self._running)
            if not ids:
                continue
            try:
                held = await self.store.renew(self.worker_id, ids, lease_seconds=self.lease_seconds)
            except TetherError as exc:
                log.warning("lease renewal failed: %s", exc)
                continue
            for task_id in set(ids) - held - self.parking:
                handler = self._running.get(task_id)
                if handler is None or handler.done():
                    continue  # it finished meanwhile: its lease went with its final state
                log.warning("lost the lease on task %s; abandoning it", task_id)
                self._abandoned.add(task_id)
                self._stop_handler(task_id)
            # After the renewal: an entry idle past the lease then always has an expired lease.
            touch = [self._deliveries[t] for t in held if t in self._deliveries]
            try:
                # Bounded: a hung queue must not delay the next lease renewal.
                await asyncio.wait_for(self.broker.touch(touch), self.lease_seconds / 3)
            except (TetherError, TimeoutError) as exc:
                log.debug("queue heartbeat failed: %r", exc)

    async def _redrive(self) -> None:
        """The store is the outbox: queue every runnable task without a live lease."""
        failing = False
        while not self._halt.is_set():
            try:
                ids = [t for t in await self.store.runnable() if t not in self._running]
                # Idempotent: a task whose entry still waits in the queue gets no second one.
                await self.broker.enqueue_many(ids)
                failing = False
            except TetherError as exc:
                (log.debug if failing else log.warning)("re-drive failed: %s", exc)
                failing = True
            if await self._pause(max(self.lease_seconds / 2, 0.5)):
                return

    async def _on_final(self, event: TaskEvent) -> None:
        if event.payload["status"]["state"] != TaskState.CANCELED.wire:
            return
        if event.task_id in self._claiming:
            self._canceled.add(event.task_id)
        # Started by its submit but not run yet: its entry claims it the usual way, and
        # finds it canceled.
        self._started.pop(event.task_id, None)
        self._stop_handler(event.task_id)

    def _stop_handler(self, task_id: str) -> None:
        handler = self._running.get(task_id)
        if handler is None:
            return
        self._canceled.add(task_id)
        ctx = self._contexts.get(task_id)
        if ctx is not None:
            # A sync handler's thread cannot be interrupted; it can look at this.
            ctx.cancel_requested = True
        handler.cancel()

    # -- one task ------------------------------------------------------------

    async def _publish(self, events: list[TaskEvent]) -> None:
        for event in events:
            await self.bus.publish(event)

    async def _ack(self, delivery: Delivery | None) -> None:
        if delivery is None:
            return
        try:
            await self.broker.ack(delivery)
        except TetherError as exc:
            # Not lost: the entry is reclaimed after the lease, and its claim finds nothing to do.
            log.warning("could not acknowledge task %s's entry: %s", delivery.task_id, exc)

    async def _hand_back(self, delivery: Delivery) -> None:
        """Shutting down with the task unfinished: let another worker have it now."""
        with contextlib.suppress(TetherError):
            await self.store.renew(self.worker_id, [delivery.task_id], lease_seconds=0)
        try:
            await self.broker.release(delivery)
        except TetherError as exc:
            log.warning(
                "could not hand task %s back (it will be reclaimed): %s", delivery.task_id, exc
            )

    async def _run(self, delivery: Delivery) -> None:
        task_id = delivery.task_id
        # From here until the handler is registered in ``_running``, a cancel event
        # finds no handler to stop: ``_on_final`` records it in ``_canceled`` instead.
        self._claiming.add(task_id)
        try:
            claim = self._started.pop(task_id, None) or await self.store.claim(
                task_id,
                self.worker_id,
                lease_seconds=self.lease_seconds,
                max_attempts=self.agent.max_attempts,
            )
            if claim is None:
                # Finished, canceled, waiting, or leased by a live worker (which holds an
                # entry of its own): this entry has nothing left to do.
                log.debug("task %s not claimed: taken, finished or canceled", task_id)
                await self._ack(delivery)
                return
            if claim.task is None:
                await self._ack(delivery)
                await self._publish(claim.events)
                log.warning("task %s failed: %d attempts used", task_id, self.agent.max_attempts)
                return
            await self._publish(claim.events)
            ctx = Context(self, claim.task)
            handler = asyncio.create_task(self._invoke(ctx))
            self._running[task_id] = handler
            self._contexts[task_id] = ctx
            self._deliveries[task_id] = delivery
        finally:
            self._claiming.discard(task_id)
            if task_id not in self._running:
                self._canceled.discard(task_id)
        if task_id in self._canceled:
            # Canceled between the claim and now: the handler never gets to run.
            ctx.cancel_requested = True
            handler.cancel()
        try:
            result = await handler
        except asyncio.CancelledError:
            if task_id in self._abandoned:
                log.debug("task %s abandoned: its lease is another worker's", task_id)
                return
            if task_id in self._handing_back:
                await self._hand_back(delivery)
                return
            if task_id in self._canceled:
                log.debug("task %s canceled while running", task_id)
                await self._ack(delivery)
                return
            raise
        except Parked as parked:
            # The wait is stored and holds the lease; a completion queues the task again.
            log.debug("task %s waits for operation %s", task_id, parked.operation_id)
            await self._ack(delivery)
        except HandlerError as exc:
            if not exc.non_retryable and ctx.attempt < self.agent.max_attempts:
                await self._retry_later(delivery)
            else:
                await self._finish(ctx, TaskState.FAILED, exc.message)
        except LeaseLost:
            log.debug("task %s taken over by another worker", task_id)
        except InvalidTransition:
            log.debug("task %s changed under its handler (canceled)", task_id)
            await self._ack(delivery)
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
            self._contexts.pop(task_id, None)
            self._deliveries.pop(task_id, None)
            self._canceled.discard(task_id)
            self._abandoned.discard(task_id)
            self._handing_back.discard(task_id)
            self.parking.discard(task_id)

    async def _invoke(self, ctx: Context) -> Any:
        limit = self.agent.timeout
        if limit is None:
            # No timeout scope without a deadline: entering one reads the running loop,
            # a getpid(2) per task on Python 3.11.
            return await self._call(ctx)
        try:
            async with asyncio.timeout(limit) as deadline:
                return await self._call(ctx)
        except TimeoutError:
            # Only our own deadline is a timeout of the task; a TimeoutError the
            # handler let escape (an HTTP call of its own, say) is an ordinary failure.
            if deadline.expired():
                raise HandlerError(f"Timed out after {limit}s") from None
            raise

    async def _call(self, ctx: Context) -> Any:
        fn = self.agent.fn
        if inspect.isasyncgenfunction(fn):
            return await self._drain(fn(ctx), ctx)
        if inspect.iscoroutinefunction(fn):
            return await fn(ctx)
        loop = asyncio.get_running_loop()
        # Sync handlers block; they get a thread of their own pool, never the loop.
        result = await loop.run_in_executor(self._threads, fn, ctx)
        if inspect.isawaitable(result):
            # An async handler that does not look like one (an object with an
            # async __call__, a plain wrapper around a coroutine function).
            return await result
        return result

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
        try:
            message = None if result is None else agent_message(result, ctx.task_id, ctx.context_id)
        except InvalidInput as exc:
            # Raised here it would leave the task working until its lease ran out,
            # and then run it again for the same answer: fail it now, saying why.
            state = TaskState.FAILED
            message = agent_message(
                f"The handler returned {type(result).__name__}, not a message: {exc.message}",
                ctx.task_id,
                ctx.context_id,
            )
        try:
            event = await self._transition(ctx, state, message)
        except InvalidInput as exc:
            # The store refused the answer (say, a messageId this owner used before):
            # the same reasoning, fail the task now rather than run it again.
            log.warning("task %s: the handler's answer was refused: %s", ctx.task_id, exc)
            refused = f"The handler's answer was refused: {exc.message}"
            event = await self._transition(
                ctx, TaskState.FAILED, agent_message(refused, ctx.task_id, ctx.context_id)
            )
        if event is not None:
            # Acknowledged before the event goes out: whoever the event reaches may send
            # a follow-up message, whose enqueue must not find this entry still waiting.
            await self._ack(self._deliveries.get(ctx.task_id))
            await self.bus.publish(event)

    async def _transition(
        self, ctx: Context, state: TaskState, message: JSON | None
    ) -> TaskEvent | None:
        try:
            return await self.store.transition(
                ctx.task_id, state, message=message, lease_owner=self.worker_id
            )
        except LeaseLost as exc:
            # Another worker has the task now, and its entry: leave both alone.
            log.debug("task %s not finished by this worker: %s", ctx.task_id, exc)
            return None
        except InvalidTransition as exc:
            # Canceled meanwhile: the task's state is stored all the same.
            log.debug("task %s not finished by this worker: %s", ctx.task_id, exc)
            await self._ack(self._deliveries.get(ctx.task_id))
            return None

    async def _retry_later(self, delivery: Delivery) -> None:
        # A zero-length renewal expires the lease now: the task is claimable again.
        await self.store.renew(self.worker_id, [delivery.task_id], lease_seconds=0)
        try:
            await self.broker.release(delivery)
        except TetherError as exc:
            log.warning(
                "task %s not queued for its retry (the re-drive will): %s", delivery.task_id, exc
            )
