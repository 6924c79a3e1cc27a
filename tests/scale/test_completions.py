"""The completion consumer on Redis Streams, in one process (a real Redis, a real store).

Each completion is stored once per operation id and acknowledged after that;
entries a dead consumer held are taken over with XAUTOCLAIM; entries that cannot
be handled end in the dead-letter stream; the loop outlives Redis and store
outages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from tether import publish_operation_complete
from tether.broker.local import LocalBroker
from tether.core.errors import InvalidInput, StoreUnavailable
from tether.core.types import text_message
from tether.runtime.completions import CompletionConsumer, stream_name
from tether.store.base import Completion, OperationState
from tether.store.memory import MemoryStore

from .conftest import REDIS_URL

WAIT = 10.0
Make = Callable[..., Awaitable[CompletionConsumer]]


class FlakyStore(MemoryStore):
    """Refuses ``fail`` completions as a database outage would, then works."""

    def __init__(self, fail: int = 0) -> None:
        super().__init__()
        self.fail = fail
        self.calls = 0

    async def complete_operation(
        self, operation_id: str, *, result: Any = None, error: str | None = None
    ) -> Completion:
        self.calls += 1
        if self.fail > 0:
            self.fail -= 1
            raise StoreUnavailable("database unavailable (test)")
        return await super().complete_operation(operation_id, result=result, error=error)


@pytest.fixture
def store() -> FlakyStore:
    return FlakyStore()


@pytest.fixture
def broker() -> LocalBroker:
    return LocalBroker()


@pytest.fixture
async def consumers(
    store: FlakyStore, broker: LocalBroker, redis_prefix: str
) -> AsyncIterator[Make]:
    made: list[CompletionConsumer] = []

    async def make(**options: Any) -> CompletionConsumer:
        consumer = CompletionConsumer(
            store,
            broker,
            url=REDIS_URL,
            prefix=redis_prefix,
            consumer=f"c{len(made)}",
            **options,
        )
        await consumer.start()
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        await consumer.stop()


async def parked(store: MemoryStore, name: str = "op") -> tuple[str, str]:
    """A task waiting on an operation, as a handler leaves it: (task id, operation id)."""
    sub = await store.submit(owner="o", message=text_message("ROLE_USER", "x"), context_id=None)
    task = sub.task.id
    await store.claim(task, "w", lease_seconds=30, max_attempts=3)
    op = f"{task}:{name}"
    await store.wait_operation(task, op, lease_owner="w", deadline=None)
    return task, op


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def stream_is_empty(raw: aioredis.Redis, stream: str) -> bool:
    info = await raw.xpending(stream, "completers")
    return int(info["pending"]) == 0 and int(await raw.xlen(stream)) == 0


async def test_a_completion_resumes_the_waiting_task(
    consumers: Make, store: FlakyStore, broker: LocalBroker, redis_prefix: str
) -> None:
    consumer = await consumers()
    task, op = await parked(store)
    await publish_operation_complete(op, {"ok": True}, redis_url=REDIS_URL, prefix=redis_prefix)
    queued = await asyncio.wait_for(broker.next(), WAIT)
    assert queued.task_id == task
    stored = await store.get_operation(op)
    assert stored is not None and (stored.state, stored.result) == (
        OperationState.COMPLETED,
        {"ok": True},
    )
    assert (await store.get_task(None, task)).lease_owner is None
    assert consumer.applied == 1


async def test_a_failure_is_stored_as_one(
    consumers: Make, store: FlakyStore, broker: LocalBroker, redis_prefix: str
) -> None:
    await consumers()
    task, op = await parked(store)
    await publish_operation_complete(op, error="timeout upstream", prefix=redis_prefix,
                                     redis_url=REDIS_URL)  # fmt: skip
    assert (await asyncio.wait_for(broker.next(), WAIT)).task_id == task
    stored = await store.get_operation(op)
    assert stored is not None and (stored.state, stored.error) == (
        OperationState.FAILED,
        "timeout upstream",
    )


async def test_a_duplicate_completion_is_a_no_op(
    consumers: Make, store: FlakyStore, raw_redis: aioredis.Redis, redis_prefix: str
) -> None:
    consumer = await consumers()
    _, op = await parked(store)
    for result in ("first", "second", "third"):
        await publish_operation_complete(op, result, redis_url=REDIS_URL, prefix=redis_prefix)
    stream = stream_name(redis_prefix)

    async def all_handled() -> bool:
        return consumer.applied + consumer.duplicates == 3

    await until(all_handled, "three completions handled")
    assert (consumer.applied, consumer.duplicates) == (1, 2)
    stored = await store.get_operation(op)
    assert stored is not None and stored.result == "first"
    await until(lambda: stream_is_empty(raw_redis, stream), "every entry acknowledged")


async def test_entries_of_a_dead_consumer_are_reclaimed_and_applied_once(
    consumers: Make,
    store: FlakyStore,
    broker: LocalBroker,
    raw_redis: aioredis.Redis,
    redis_prefix: str,
) -> None:
    stream = stream_name(redis_prefix)
    await raw_redis.xgroup_create(stream, "completers", id="0", mkstream=True)
    ops = [await parked(store, f"op{i}") for i in range(30)]
    for _, op in ops:
        await publish_operation_complete(op, op, redis_url=REDIS_URL, prefix=redis_prefix)
    # A consumer reads them all and dies before handling any: they stay pending, idle.
    read = await raw_redis.xreadgroup("completers", "dead", {stream: ">"}, count=100)
    assert len(read[0][1]) == 30
    # ... and one more was stored by it, but it died before acknowledging.
    from tether.runtime.completions import apply_completion

    await apply_completion(store, broker, ops[0][1], ops[0][1], None)
    alive = await consumers(claim_idle=0.3)

    async def done() -> bool:
        return alive.applied + alive.duplicates == 30

    await until(done, "the dead consumer's entries taken over")
    assert (alive.applied, alive.duplicates) == (29, 1)
    for task, op in ops:
        stored = await store.get_operation(op)
        assert stored is not None and stored.result == op
        assert (await store.get_task(None, task)).lease_owner is None
    await until(lambda: stream_is_empty(raw_redis, stream), "every entry acknowledged")


async def test_poison_messages_end_in_the_dead_letter_stream(
    consumers: Make, store: FlakyStore, raw_redis: aioredis.Redis, redis_prefix: str
) -> None:
    stream = stream_name(redis_prefix)
    consumer = await consumers(claim_idle=0.2, max_deliveries=3)
    # Unreadable: dead-lettered at once.
    await raw_redis.xadd(stream, {"op": b"x", "data": b"{not json"})
    # Readable, but the store refuses it every time (an id too long): after 3 deliveries.
    too_long = "y" * 300
    await raw_redis.xadd(stream, {"op": too_long, "data": orjson.dumps({"result": 1})})
    # A good one between them still goes through.
    _, op = await parked(store)
    await publish_operation_complete(op, "fine", redis_url=REDIS_URL, prefix=redis_prefix)

    async def both_dead() -> bool:
        return consumer.dead_lettered == 2

    await until(both_dead, "two dead letters")
    dead = await raw_redis.xrange(f"{stream}:dead")
    reasons = {fields[b"op"].decode(): fields for _, fields in dead}
    assert reasons["x"][b"deliveries"] == b"1"
    assert b"not a completion" in reasons["x"][b"reason"]
    assert reasons[too_long][b"deliveries"] == b"4"
    assert consumer.applied == 1
    stored = await store.get_operation(op)
    assert stored is not None and stored.result == "fine"
    await until(lambda: stream_is_empty(raw_redis, stream), "nothing left pending")


async def test_a_store_outage_is_waited_out_not_dead_lettered(
    consumers: Make, store: FlakyStore, redis_prefix: str
) -> None:
    consumer = await consumers(claim_idle=0.2, max_deliveries=2)
    _, op = await parked(store)
    store.fail = 4
    await publish_operation_complete(op, "eventually", redis_url=REDIS_URL, prefix=redis_prefix)

    async def applied() -> bool:
        return consumer.applied == 1

    await until(applied, "the completion applied after the outage")
    assert consumer.dead_lettered == 0 and store.calls == 5


async def test_the_consumer_recovers_when_its_stream_and_group_vanish(
    consumers: Make, store: FlakyStore, raw_redis: aioredis.Redis, redis_prefix: str
) -> None:
    consumer = await consumers()
    _, first = await parked(store, "a")
    await publish_operation_complete(first, 1, redis_url=REDIS_URL, prefix=redis_prefix)

    async def applied(n: int) -> bool:
        return consumer.applied == n

    await until(lambda: applied(1), "the first completion")
    await raw_redis.delete(stream_name(redis_prefix))  # a restart without persistence
    _, second = await parked(store, "b")
    await publish_operation_complete(second, 2, redis_url=REDIS_URL, prefix=redis_prefix)
    await until(lambda: applied(2), "a completion after the group was lost")


async def test_publishing_checks_its_input() -> None:
    with pytest.raises(InvalidInput):
        await publish_operation_complete("", 1, redis_url=REDIS_URL)
    with pytest.raises(InvalidInput):
        await publish_operation_complete("op", object(), redis_url=REDIS_URL)
    with pytest.raises(InvalidInput):
        await publish_operation_complete("op", 1, redis_url="local")
