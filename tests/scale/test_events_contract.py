"""The ``EventBus`` contract, in process and on Redis alike; then what only Redis does.

``buses()`` stands for processes: with Redis each call is a bus of its own (an
API replica, a worker), locally it is the one in-process bus, so every test
that publishes on one and listens on another holds for both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from tether.core.states import TaskState
from tether.core.types import TaskEvent, TaskRecord, new_id
from tether.events.base import EventBus, Subscription
from tether.events.local import LocalEventBus
from tether.events.redis import RedisEventBus

from .cluster import until
from .conftest import REDIS_URL

Make = Callable[..., Awaitable[EventBus]]
WAIT = 10.0


def status(task_id: str, seq: int, state: TaskState = TaskState.WORKING) -> TaskEvent:
    final = state.terminal or state.interrupted
    payload = {"taskId": task_id, "contextId": "c", "status": {"state": state.wire}}
    return TaskEvent(task_id, seq, "status", payload, final)


@pytest.fixture(params=["local", "redis"])
async def buses(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    made: list[EventBus] = []
    local = LocalEventBus()
    prefix = request.getfixturevalue("redis_prefix") if request.param == "redis" else ""

    async def make(**options: Any) -> EventBus:
        if request.param == "local":
            if options:
                bus: EventBus = LocalEventBus(**options)
                made.append(bus)
                return bus
            return local
        bus = RedisEventBus(REDIS_URL, prefix=prefix, **options)
        await bus.start()
        made.append(bus)
        return bus

    yield make
    for bus in made:
        await bus.close()


async def collect(sub: Subscription, n: int, within: float = WAIT) -> list[TaskEvent]:
    got: list[TaskEvent] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while len(got) < n and (left := deadline - loop.time()) > 0:
        event = await sub.get(min(left, 0.5))
        if event is not None:
            got.append(event)
    return got


async def settle(sub: Subscription, quiet: float = 0.4) -> list[TaskEvent]:
    """Whatever else arrives within ``quiet`` seconds."""
    got = []
    while (event := await sub.get(quiet)) is not None:
        got.append(event)
    return got


async def test_a_subscriber_gets_its_task_s_events_in_order(buses: Make) -> None:
    publisher, reader = await buses(), await buses()
    task = new_id()
    sub = reader.subscribe(task)
    events = [status(task, seq) for seq in range(1, 21)]
    for event in events:
        await publisher.publish(event)
    got = await collect(sub, 20)
    assert [e.seq for e in got] == list(range(1, 21))
    assert got[3] == events[3]
    assert await settle(sub) == []
    sub.close()


async def test_other_tasks_events_do_not_arrive(buses: Make) -> None:
    publisher, reader = await buses(), await buses()
    mine, other = new_id(), new_id()
    sub = reader.subscribe(mine)
    await publisher.publish(status(other, 1))
    await publisher.publish(status(mine, 1))
    got = await collect(sub, 1)
    assert [(e.task_id, e.seq) for e in got] == [(mine, 1)]
    assert await settle(sub) == []
    sub.close()


async def test_every_subscriber_gets_every_event(buses: Make) -> None:
    publisher, reader_a, reader_b = await buses(), await buses(), await buses()
    task = new_id()
    subs = [reader_a.subscribe(task), reader_a.subscribe(task), reader_b.subscribe(task)]
    for seq in (1, 2, 3):
        await publisher.publish(status(task, seq))
    for sub in subs:
        assert [e.seq for e in await collect(sub, 3)] == [1, 2, 3]
        sub.close()


async def test_a_finals_only_subscriber_gets_the_outcome_alone(buses: Make) -> None:
    publisher, reader = await buses(), await buses()
    task = new_id()
    outcome, everything = reader.subscribe(task, finals_only=True), reader.subscribe(task)
    for seq in (1, 2, 3):
        await publisher.publish(status(task, seq))
    await publisher.publish(status(task, 4, TaskState.INPUT_REQUIRED))
    assert [e.seq for e in await collect(everything, 4)] == [1, 2, 3, 4]
    got = await collect(outcome, 1)
    assert [(e.seq, e.final) for e in got] == [(4, True)]
    assert await settle(outcome) == []
    outcome.close()
    everything.close()


async def test_a_final_event_brings_its_task_along(buses: Make) -> None:
    publisher, reader = await buses(), await buses()
    task_id = new_id()
    answer = {"messageId": "m2", "role": "ROLE_AGENT", "parts": [{"text": "ok"}]}
    whole = TaskRecord(
        task_id,
        "c",
        "alice",
        TaskState.COMPLETED,
        version=2,
        status_message=answer,
        history=[{"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "hi"}]}, answer],
        artifacts=[{"artifactId": "a", "parts": [{"text": "x" * 100}]}],
        metadata={"k": [1, 2]},
        last_seq=2,
        attempts=1,
    )
    huge = replace(whole, artifacts=[{"artifactId": "a", "parts": [{"text": "x" * 70_000}]}])
    outcome = reader.subscribe(task_id, finals_only=True)
    await publisher.publish(replace(status(task_id, 2, TaskState.COMPLETED), task=whole))
    [got] = await collect(outcome, 1)
    assert got.task == whole
    outcome.close()
    if isinstance(publisher, RedisEventBus):
        # Too large to travel: the reader is left to read the store, and the log never has it.
        other = new_id()
        outcome = reader.subscribe(other, finals_only=True)
        await publisher.publish(replace(status(other, 1, TaskState.COMPLETED), task=huge))
        [got] = await collect(outcome, 1)
        assert got.task is None and got.seq == 1
        outcome.close()
        logged = await reader.history(task_id, 1) or []
        assert [(e.seq, e.task) for e in logged] == [(2, None)]


async def test_a_closed_subscription_hears_nothing_more(buses: Make) -> None:
    publisher, reader = await buses(), await buses()
    task = new_id()
    sub = reader.subscribe(task)
    await publisher.publish(status(task, 1))
    assert len(await collect(sub, 1)) == 1
    sub.close()
    await publisher.publish(status(task, 2))
    assert await sub.get(0.3) is None


async def test_a_subscription_reopened_at_once_still_hears_new_events(buses: Make) -> None:
    publisher, reader = await buses(), await buses()
    task = new_id()
    first = reader.subscribe(task)
    await publisher.publish(status(task, 1))
    assert [e.seq for e in await collect(first, 1)] == [1]
    first.close()
    second = reader.subscribe(task)
    await publisher.publish(status(task, 2))
    got: list[int] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while 2 not in got and loop.time() < deadline:
        event = await second.get(0.5)
        if event is not None:
            got.append(event.seq)
    # Earlier events may come again (a reader skips them by seq); the new one must come.
    assert 2 in got and got == sorted(set(got))
    second.close()


async def test_a_reader_that_falls_behind_is_cut_off(buses: Make) -> None:
    bus = await buses(subscriber_limit=5)
    task = new_id()
    sub = bus.subscribe(task)
    for seq in range(1, 12):
        await bus.publish(status(task, seq))

    async def overflowed() -> bool:
        return sub.overflowed

    # Redis hands the events over once its subscription is live.
    await until(overflowed, "the subscriber to be cut off", WAIT)
    assert await sub.get(0.1) is None  # resumes from the store instead, by seq


async def test_final_events_reach_the_final_listeners(buses: Make) -> None:
    bus = await buses()
    heard: list[TaskEvent] = []
    bus.on_final(heard.append)
    task = new_id()
    await bus.publish(status(task, 1))
    await bus.publish(status(task, 2, TaskState.COMPLETED))
    assert [(e.task_id, e.seq) for e in heard] == [(task, 2)]


async def test_get_waits_at_most_as_long_as_asked(buses: Make) -> None:
    bus = await buses()
    sub = bus.subscribe(new_id())
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await sub.get(0.2) is None
    assert 0.15 <= loop.time() - started < 2.0
    sub.close()


# -- Redis only: across processes, replay, recovery ------------------------------


@pytest.fixture
async def redis_buses(redis_prefix: str) -> AsyncIterator[Callable[..., Awaitable[RedisEventBus]]]:
    made: list[RedisEventBus] = []

    async def make(**options: Any) -> RedisEventBus:
        bus = RedisEventBus(REDIS_URL, prefix=redis_prefix, **options)
        await bus.start()
        made.append(bus)
        return bus

    yield make
    for bus in made:
        await bus.close()


async def test_a_cancel_reaches_final_listeners_in_other_processes(
    redis_buses: Callable[..., Awaitable[RedisEventBus]],
) -> None:
    api, worker = await redis_buses(), await redis_buses()
    heard: asyncio.Queue[TaskEvent] = asyncio.Queue()
    worker.on_final(heard.put_nowait)
    await asyncio.sleep(0.2)  # the worker's subscription to the cancel channel is in place
    task = new_id()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await api.publish(status(task, 3, TaskState.CANCELED))
    event = await asyncio.wait_for(heard.get(), 1.0)
    assert (event.task_id, event.seq) == (task, 3)
    assert loop.time() - started < 1.0
    # Other finals of other processes are theirs to act on: not sent across.
    await api.publish(status(new_id(), 2, TaskState.COMPLETED))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(heard.get(), 0.4)


async def test_events_published_before_the_subscription_was_live_are_not_missed(
    redis_buses: Callable[..., Awaitable[RedisEventBus]],
) -> None:
    publisher, reader = await redis_buses(), await redis_buses()
    task = new_id()
    await publisher.publish(status(task, 1))
    await publisher.publish(status(task, 2))
    await asyncio.sleep(0.2)  # flushed to the stream before anyone subscribes
    sub = reader.subscribe(task)
    await publisher.publish(status(task, 3))
    got = await collect(sub, 3)
    assert [e.seq for e in got] == [1, 2, 3]
    sub.close()


async def test_history_replays_after_any_seq_on_any_replica(
    redis_buses: Callable[..., Awaitable[RedisEventBus]],
) -> None:
    publisher, replica = await redis_buses(), await redis_buses()
    task = new_id()
    for seq in range(1, 8):
        await publisher.publish(status(task, seq))
    await publisher.publish(status(task, 5))  # a duplicate is stored once
    sub = replica.subscribe(task)
    await collect(sub, 7)
    sub.close()
    replay = await replica.history(task, 3)
    assert replay is not None and [e.seq for e in replay] == [4, 5, 6, 7]
    assert replay[0] == status(task, 4)
    assert await replica.history(task, 7) is None  # nothing after: ask the store


async def test_history_falls_back_when_redis_no_longer_has_the_events(
    redis_buses: Callable[..., Awaitable[RedisEventBus]],
) -> None:
    short = await redis_buses(maxlen=3, ttl=0.5)
    task = new_id()
    for seq in range(1, 30):
        await short.publish(status(task, seq))
    sub = short.subscribe(task)
    await short.publish(status(task, 30))
    await collect(sub, 1)
    sub.close()
    # Trimmed: the first events are gone, so a replay from 0 must go to the store.
    assert await short.history(task, 0) is None
    tail = await short.history(task, 27)
    assert tail is not None and [e.seq for e in tail] == [28, 29, 30]
    # Expired: the whole stream is gone.
    await asyncio.sleep(0.8)
    assert not await short.redis.exists(short.stream_key(task))
    assert await short.history(task, 27) is None


async def test_history_refuses_a_stream_with_a_hole(
    redis_buses: Callable[..., Awaitable[RedisEventBus]],
) -> None:
    bus = await redis_buses()
    task = new_id()
    for seq in (1, 2, 4):
        await bus.publish(status(task, seq))
    sub = bus.subscribe(task)
    await collect(sub, 1)
    await asyncio.sleep(0.2)
    sub.close()
    assert await bus.history(task, 0) is None
    tail = await bus.history(task, 3)
    assert tail is not None and [e.seq for e in tail] == [4]


async def test_subscribers_recover_when_the_pubsub_connection_is_killed(
    redis_buses: Callable[..., Awaitable[RedisEventBus]], raw_redis: aioredis.Redis
) -> None:
    publisher, reader = await redis_buses(), await redis_buses()
    task = new_id()
    sub = reader.subscribe(task)
    await publisher.publish(status(task, 1))
    assert [e.seq for e in await collect(sub, 1)] == [1]
    # Kill every pub/sub connection (as a Redis restart or a network cut would).
    killed = await raw_redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    assert int(killed) >= 1
    for seq in (2, 3, 4):
        await publisher.publish(status(task, seq))
    got = await collect(sub, 3, within=15.0)
    assert [e.seq for e in got] == [2, 3, 4]
    sub.close()
