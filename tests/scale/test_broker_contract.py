"""The ``Broker`` contract, on the in-process queue and on Redis Streams alike.

``consumers()`` stands for worker processes: with Redis each call is a broker of
its own (a consumer of the group), locally it is the one in-process queue.
Redis-only behaviour (reclaim after the lease, dead letters, recovery) follows.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from tether.broker.base import Broker, Delivery
from tether.broker.local import LocalBroker
from tether.broker.redis import RedisBroker
from tether.core.types import new_id

from .conftest import REDIS_URL

Make = Callable[..., Awaitable[Broker]]
QUIET = 0.4  # how long "nothing arrives" is watched for
WAIT = 10.0  # bound on every wait for something that should arrive


@pytest.fixture(params=["local", "redis"])
async def consumers(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    made: list[Broker] = []
    local = LocalBroker()
    prefix = request.getfixturevalue("redis_prefix") if request.param == "redis" else ""

    async def make(**options: Any) -> Broker:
        if request.param == "local":
            return local
        broker = RedisBroker(REDIS_URL, prefix=prefix, consumer=f"c{len(made)}", **options)
        await broker.start()
        made.append(broker)
        return broker

    yield make
    for broker in made:
        await broker.close()


async def take(broker: Broker, within: float = WAIT) -> Delivery:
    return await asyncio.wait_for(broker.next(), within)


async def nothing(broker: Broker, within: float = QUIET) -> None:
    with pytest.raises(TimeoutError):
        got = await asyncio.wait_for(broker.next(), within)
        pytest.fail(f"expected nothing, got {got}")


async def test_enqueue_then_next_then_ack(consumers: Make) -> None:
    broker = await consumers()
    task = new_id()
    await broker.enqueue(task)
    got = await take(broker)
    assert (got.task_id, got.deliveries) == (task, 1)
    await broker.ack(got)
    await nothing(broker)


async def test_entries_come_in_order(consumers: Make) -> None:
    broker = await consumers()
    tasks = [new_id() for _ in range(20)]
    for task in tasks[:10]:
        await broker.enqueue(task)
    await broker.enqueue_many(tasks[10:])
    got = [await take(broker) for _ in tasks]
    assert [d.task_id for d in got] == tasks
    for d in got:
        await broker.ack(d)


async def test_a_waiting_task_is_queued_once(consumers: Make) -> None:
    broker = await consumers()
    task = new_id()
    await broker.enqueue(task)
    await broker.enqueue(task)
    await broker.enqueue_many([task, task])
    got = await take(broker)
    assert got.task_id == task
    await nothing(broker)
    await broker.ack(got)


async def test_a_task_being_worked_on_can_be_queued_again(consumers: Make) -> None:
    """A follow-up message may queue the task before the worker acknowledged its entry."""
    broker = await consumers()
    task = new_id()
    await broker.enqueue(task)
    first = await take(broker)
    await broker.enqueue(task)
    second = await take(broker)
    assert second.task_id == task and second.entry_id != first.entry_id
    await broker.ack(first)
    await broker.ack(second)
    await nothing(broker)


async def test_release_hands_the_entry_back(consumers: Make) -> None:
    broker = await consumers()
    task = new_id()
    await broker.enqueue(task)
    got = await take(broker)
    await broker.release(got)
    again = await take(broker)
    assert again.task_id == task
    await broker.ack(again)
    await nothing(broker)


async def test_a_cancelled_wait_loses_nothing(consumers: Make) -> None:
    broker = await consumers()
    waiting = asyncio.create_task(broker.next())
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    task = new_id()
    await broker.enqueue(task)
    got = await take(broker)
    assert got.task_id == task
    await broker.ack(got)


async def test_consumers_share_the_work_without_duplicates(consumers: Make) -> None:
    a, b = await consumers(), await consumers()
    tasks = {new_id() for _ in range(30)}
    await a.enqueue_many(sorted(tasks))
    seen: list[str] = []

    async def work(broker: Broker) -> None:
        while len(seen) < len(tasks):
            try:
                d = await asyncio.wait_for(broker.next(), QUIET * 2)
            except TimeoutError:
                return
            seen.append(d.task_id)
            await broker.touch([d])
            await broker.ack(d)

    await asyncio.wait_for(asyncio.gather(work(a), work(b), work(a), work(b)), WAIT)
    assert sorted(seen) == sorted(tasks)


async def test_touch_and_ack_of_unknown_entries_are_harmless(consumers: Make) -> None:
    broker = await consumers()
    ghost = Delivery(new_id(), "1-1" if isinstance(broker, RedisBroker) else "0")
    await broker.touch([ghost])
    await broker.ack(ghost)
    await nothing(broker)


# -- Redis only: reclaim, dead letters, recovery ------------------------------------


@pytest.fixture
async def group(redis_prefix: str) -> AsyncIterator[Make]:
    made: list[RedisBroker] = []

    async def make(**options: Any) -> Broker:
        broker = RedisBroker(REDIS_URL, prefix=redis_prefix, consumer=f"w{len(made)}", **options)
        await broker.start()
        made.append(broker)
        return broker

    yield make
    for broker in made:
        await broker.close()


async def test_an_entry_of_a_dead_worker_is_reclaimed_after_the_lease(group: Make) -> None:
    dead = await group(reclaim_idle=0.5)
    task = new_id()
    await dead.enqueue(task)
    first = await take(dead)
    await dead.close()  # dies holding it, never acknowledged
    alive = await group(reclaim_idle=0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    got = await take(alive)
    assert (got.task_id, got.entry_id, got.deliveries) == (task, first.entry_id, 2)
    assert loop.time() - started >= 0.3
    await alive.ack(got)
    await nothing(alive, 1.0)


async def test_touch_keeps_a_live_worker_s_entry(group: Make) -> None:
    busy = await group(reclaim_idle=0.6)
    other = await group(reclaim_idle=0.6)
    task = new_id()
    await busy.enqueue(task)
    got = await take(busy)

    async def heartbeat() -> None:
        for _ in range(8):
            await asyncio.sleep(0.2)
            await busy.touch([got])

    beating = asyncio.create_task(heartbeat())
    await nothing(other, 1.6)
    await beating
    await busy.ack(got)


async def test_a_late_heartbeat_does_not_take_an_entry_back(group: Make) -> None:
    slow = await group(reclaim_idle=0.3)
    task = new_id()
    await slow.enqueue(task)
    got = await take(slow)
    taker = await group(reclaim_idle=0.3)
    reclaimed = await take(taker)
    assert reclaimed.entry_id == got.entry_id
    await slow.touch([got])  # the slow worker's heartbeat, too late
    assert isinstance(taker, RedisBroker)
    pending = await taker.redis.xpending_range(taker.stream, taker.group, "-", "+", 10)
    assert [p["consumer"].decode() for p in pending] == [taker.consumer]
    await taker.ack(reclaimed)


async def test_an_entry_nobody_acknowledges_is_dead_lettered(group: Make) -> None:
    broker = await group(reclaim_idle=0.2, max_deliveries=3)
    assert isinstance(broker, RedisBroker)
    task = new_id()
    await broker.enqueue(task)
    counts = [(await take(broker)).deliveries for _ in range(3)]
    assert counts == [1, 2, 3]
    await nothing(broker, 1.0)  # the fourth delivery goes to the dead-letter stream instead
    dead = await broker.dead_letters()
    assert [(d["task"], d["deliveries"]) for d in dead] == [(task, "4")]
    assert await broker.redis.xlen(broker.stream) == 0
    # Dead-lettered is not lost: a re-drive may queue the task again.
    await broker.enqueue(task)
    again = await take(broker)
    assert (again.task_id, again.deliveries) == (task, 1)
    await broker.ack(again)


async def test_reclaim_follows_the_cursor_through_a_long_pending_list(group: Make) -> None:
    dead = await group(reclaim_idle=0.3)
    tasks = [new_id() for _ in range(120)]
    await dead.enqueue_many(tasks)
    held = [await take(dead) for _ in tasks]
    await dead.close()
    alive = await group(reclaim_idle=0.3)
    got = [await take(alive) for _ in tasks]
    assert sorted(d.task_id for d in got) == sorted(tasks)
    assert {d.deliveries for d in got} == {2}
    assert {d.entry_id for d in got} == {d.entry_id for d in held}
    for d in got:
        await alive.ack(d)


async def test_the_group_is_recreated_when_the_stream_vanishes(
    group: Make, raw_redis: aioredis.Redis
) -> None:
    broker = await group()
    assert isinstance(broker, RedisBroker)
    first = new_id()
    await broker.enqueue(first)
    await broker.ack(await take(broker))
    await raw_redis.delete(broker.stream)  # as a restart without persistence leaves it
    waiting = asyncio.create_task(broker.next())
    task = new_id()
    await broker.enqueue(task)
    got = await asyncio.wait_for(waiting, WAIT)
    assert got.task_id == task
    await broker.ack(got)


async def test_a_released_entry_goes_to_any_worker(group: Make) -> None:
    broker = await group()
    assert isinstance(broker, RedisBroker)
    waiting = asyncio.create_task(broker.next())
    await asyncio.sleep(0.05)
    task = new_id()
    await broker.enqueue(task)
    got = await asyncio.wait_for(waiting, WAIT)
    await broker.release(got)
    other = await group()
    again = await take(other)
    assert again.task_id == task and again.deliveries == 1
    await other.ack(again)


async def test_enqueue_without_redis_says_so() -> None:
    from tether.core.errors import BrokerUnavailable

    broker = RedisBroker("redis://127.0.0.1:1/0", prefix="nowhere")
    try:
        with pytest.raises(BrokerUnavailable):
            await broker.enqueue(new_id())
    finally:
        await broker.close()
